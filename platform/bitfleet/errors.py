"""How a wrong spec is reported: one `SpecError` whose message names the field and what was expected."""
from __future__ import annotations

import difflib
import re
import warnings

from pydantic import BaseModel, ValidationError


class SpecError(ValueError):
    """A spec the user wrote is wrong; the message names the field and what was expected."""


class SpecWarning(UserWarning):
    """A setting that cannot take effect as written (a fine-tune that starts after the last epoch); the message
    names the field. The CLI prints it as one line, once."""


def spec_warning(message: str) -> None:
    warnings.warn(SpecWarning(message), stacklevel=2)


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


class ClusterError(ConnectionError):
    """The Ray cluster a command names is missing, does not answer, or refuses the request: one line naming
    the address and what to check, not a traceback."""


def failure_line(exc: BaseException) -> str:
    """What failed, in one line: a worker's error is the last line of its traceback (`ValueError: ...`)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1:  # a traceback inside the message (Ray's TrainingFailedError, a RayTaskError)
        cause = [line for line in lines if ":" in line and line.split(":", 1)[0].replace(".", "").isidentifier()]
        return one_line(cause[-1] if cause else lines[-1])
    line = lines[0] if isinstance(exc, (OSError, ValueError, RuntimeError)) else f"{type(exc).__name__}: {lines[0]}"
    return one_line(line)
