"""How a wrong spec is reported: one `SpecError` whose message names the field and what was expected."""
from __future__ import annotations

import difflib
import re

from pydantic import BaseModel, ValidationError


class SpecError(ValueError):
    """A spec the user wrote is wrong; the message names the field and what was expected."""


def one_line(message: str) -> str:
    """`message` as one printable line: what a spec holds (a key with a newline, a terminal escape sequence)
    is shown escaped, never written to the terminal as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first pydantic error as `field.path: what was expected (got ...)`."""
    err = exc.errors()[0]
    loc = [prefix.rstrip(".")] if prefix else []
    loc += [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    own = re.match(r"^([\w.]+): (.*)$", msg, re.S)
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1)
        expected = f"expected one of {', '.join(fields)}" if fields else "this section takes no keys"
        msg = f"unknown key; did you mean {close[0]!r}?" if close else f"unknown key; {expected}"
    elif own:  # our own validators name the field, relative to where they sit
        loc.append(own.group(1))
        msg = own.group(2)
    elif err["type"] != "missing" and err["loc"]:  # a model's own check names what is wrong without the input
        got = repr(err["input"])
        msg = f"{msg} (got {got if len(got) <= 100 else got[:97] + '...'})"
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def _fields_at(model: type[BaseModel], loc) -> list[str]:
    """Field names of the nested model at `loc`, for close-match suggestions."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        for candidate in getattr(ann, "__args__", (ann,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return []
    return list(model.model_fields)


def unknown_key_message(key: str, fields, workload: str) -> str:
    known = list(fields) + [workload]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(known)}"
    return f"{key}: unknown key{hint}"
