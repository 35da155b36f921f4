"""The `sweep:` section of a spec: its models, its checks against the spec it sweeps, and its Ray Tune objects.

Tune sees a trial's values as a flat config keyed by the dotted spec paths themselves
(`{"rbnn.tmin": 0.003}`); `apply_config` writes them into the raw spec, which is then validated like any
other spec. Metric and mode belong in `tune.TuneConfig` (see `tune_config`), which hands them on to the
scheduler and the searcher. Ray is imported inside the builders, so that importing the spec stays light.
"""
from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_serializer, model_validator

from bitfleet.dotted import set_path
from bitfleet.errors import SpecError, format_validation_error
from bitfleet.spec import MAX_EPOCHS, MAX_WORKERS, Strict

RANGES = ("uniform", "loguniform", "randint")
LISTS = ("choice", "grid")
KINDS = RANGES + LISTS
TIME_ATTR = "training_iteration"  # the trainable reports to Tune once per epoch: an iteration is an epoch
FIXED = {  # top-level sections a sweep cannot vary, and why
    "name": "the run's name; Tune names the trials",
    "workload": "each workload has its own sections; sweep one workload per spec",
    "sweep": "a sweep does not sweep its own settings",
}
_PAIRS = {"uniform": TypeAdapter(tuple[float, float]), "loguniform": TypeAdapter(tuple[float, float]),
          "randint": TypeAdapter(tuple[int, int])}
_OPTUNA_CHOICES = (str, int, float, bool, type(None))  # what optuna's CategoricalDistribution can hold


# --------------------------------------------------------------------------- models


class Distribution(Strict):
    """One swept value, written as a one-key mapping: `{loguniform: [1.0e-3, 1.0e-1]}`, `{choice: [1, 2, 5]}`.

    Ranges are Tune's: `randint: [low, high]` excludes high. Whether a range is empty is checked by
    `SweepSpec`, which knows the path to name in the message.
    """

    kind: Literal[KINDS]  # type: ignore[valid-type]
    values: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, raw: Any) -> Any:
        # built in Python: Distribution(kind=..., values=...)
        if isinstance(raw, dict) and set(raw) == {"kind", "values"}:
            raw = {raw["kind"]: raw["values"]}
        if not (isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in KINDS):
            raise ValueError(f"expected one key out of {', '.join(KINDS)}, e.g. {{loguniform: [1.0e-3, 1.0e-1]}}")
        ((kind, values),) = raw.items()
        return {"kind": kind, "values": _values(kind, values)}

    @model_serializer
    def _as_written(self) -> dict[str, list]:
        """Dump as the user writes it, so a resolved spec reads back unchanged."""
        return {self.kind: self.values}

    def problem(self) -> str | None:
        """Why this distribution holds no value (an empty range or list), or None."""
        if self.kind in LISTS:
            return None if self.values else f"{self.kind} needs at least one value"
        low, high = self.values
        if self.kind == "loguniform" and low <= 0:
            return f"loguniform needs 0 < low (got low {low})"
        if low >= high:
            excluded = ", high excluded" if self.kind == "randint" else ""
            return f"{self.kind} range is empty (low {low} >= high {high}{excluded})"
        return None


def _values(kind: str, values: Any) -> list:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{kind} takes a list of values")
    if kind not in _PAIRS:
        return list(values)
    numbers = "two integers, high excluded" if kind == "randint" else "two numbers"
    try:
        if any(isinstance(v, bool) for v in values):
            raise ValueError
        return list(_PAIRS[kind].validate_python(values))
    except (ValidationError, ValueError):
        raise ValueError(f"{kind} takes [low, high], {numbers}") from None


class Fifo(Strict):
    """Every trial runs to the end."""

    type: Literal["fifo"] = "fifo"


class Asha(Strict):
    """Asynchronous successive halving: the worst trials stop at grace_period * reduction_factor^k epochs."""

    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS)  # epochs every trial runs before it may be stopped
    reduction_factor: float = Field(3.0, gt=1, le=1000)
    max_t: int | None = Field(None, ge=1, le=MAX_EPOCHS)  # epochs; None: the spec's train.epochs (check_sweep)


class Pbt(Strict):
    """Population based training: every perturbation_interval epochs the worst trials copy the best ones'
    checkpoints and mutate their values (lists and choices shift to a neighbour, ranges scale by 0.8 or 1.2).
    `synch`: every trial waits at each perturbation epoch until all have reached it (each restarts from its
    checkpoint), so trials are ranked at the same epoch; otherwise a trial is ranked against the others'
    latest scores, and one that started late may never be compared."""

    type: Literal["pbt"] = "pbt"
    perturbation_interval: int = Field(ge=1, le=MAX_EPOCHS)  # epochs
    mutations: dict[str, Distribution] = Field(min_length=1)  # dotted path -> distribution, or a plain list
    quantile_fraction: float = Field(0.25, ge=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    synch: bool = False

    @field_validator("mutations", mode="before")
    @classmethod
    def _lists_are_choices(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            return {path: {"choice": v} if isinstance(v, list) else v for path, v in raw.items()}
        return raw

    @model_validator(mode="after")
    def _mutable(self):
        for path, dist in self.mutations.items():
            if dist.problem():
                raise ValueError(f"mutations.{path}: {dist.problem()}")
            if dist.kind == "grid":
                raise ValueError(f"mutations.{path}: grid is not a mutation; use choice (or a plain list)")
        return self


class Pb2(Strict):
    """PB2: PBT whose new values come from a Gaussian-process bandit over the real-valued `bounds`."""

    type: Literal["pb2"] = "pb2"
    perturbation_interval: int = Field(ge=1, le=MAX_EPOCHS)  # epochs
    bounds: dict[str, tuple[float, float]] = Field(min_length=1)  # dotted path -> [low, high]
    quantile_fraction: float = Field(0.25, ge=0, le=0.5)
    synch: bool = False  # as PBT's

    @field_validator("bounds", mode="before")
    @classmethod
    def _pairs(cls, raw: Any) -> Any:
        for path, pair in raw.items() if isinstance(raw, dict) else ():
            try:
                low, high = _values("uniform", pair)
            except ValueError:
                raise ValueError(f"{path}: takes [low, high], two numbers (got {pair!r})") from None
            if low >= high:
                raise ValueError(f"{path}: range is empty (low {low} >= high {high})")
        return raw


Scheduler = Annotated[Union[Fifo, Asha, Pbt, Pb2], Field(discriminator="type")]
SCHEDULERS: dict[str, type[Strict]] = {"fifo": Fifo, "asha": Asha, "pbt": Pbt, "pb2": Pb2}


class Search(Strict):
    """How trials' values are picked. grid enumerates every grid and choice value; optuna and hyperopt learn
    from finished trials (`pip install optuna` / `hyperopt`)."""

    type: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    seed: int | None = None


class SweepSpec(Strict):
    """`sweep:`: `bitfleet sweep` runs the spec as a Tune experiment over `space`.

    `metric` is a name the loop reports (`test/acc`, `val/loss`, `epoch`); it is not checked against the
    loop, only that it is non-empty.
    """

    metric: str = Field("test/acc", min_length=1)
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, le=100_000)  # trials; under grid search, repeats of the whole grid (default 1)
    max_concurrent: int | None = Field(None, ge=1, le=MAX_WORKERS)  # None: as many as the cluster's resources fit
    space: dict[str, Distribution] = {}  # dotted spec path -> distribution
    scheduler: Scheduler = Fifo()
    search: Search = Search()

    @model_validator(mode="before")
    @classmethod
    def _grid_runs_once(cls, raw: Any) -> Any:
        """Under grid search a sample is the whole grid: one, unless more are asked for."""
        if isinstance(raw, dict) and "num_samples" not in raw and _search_type(raw.get("search")) == "grid":
            return {**raw, "num_samples": 1}
        return raw

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, raw: Any) -> Any:
        return parse_scheduler(raw)

    @field_validator("search", mode="before")
    @classmethod
    def _search_shorthand(cls, raw: Any) -> Any:
        return {"type": raw} if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _check(self):
        problem = next(_problems(self), None)
        if problem:
            raise ValueError(problem)
        return self

    def swept(self) -> Iterator[tuple[str, str, str]]:
        """(where in the sweep section, dotted spec path, kind) of every value a trial varies."""
        for path, dist in self.space.items():
            yield "space", path, dist.kind
        if isinstance(self.scheduler, Pbt):
            for path, dist in self.scheduler.mutations.items():
                yield "scheduler.mutations", path, dist.kind
        if isinstance(self.scheduler, Pb2):
            for path in self.scheduler.bounds:
                yield "scheduler.bounds", path, "bounds"

    def bounding_values(self) -> Iterator[tuple[str, str, Any]]:
        """(where in the sweep section, dotted spec path, value) of the values that bound what a trial can get:
        every listed value and both ends of every range (of a range that excludes its high, the last value
        below it). Constraints on a field are intervals, so a field that takes these takes every draw."""
        distributions = [("space", path, dist) for path, dist in self.space.items()]
        if isinstance(self.scheduler, Pbt):
            distributions += [("scheduler.mutations", path, dist) for path, dist in self.scheduler.mutations.items()]
        for where, path, dist in distributions:
            if dist.kind in LISTS:
                yield from ((where, path, value) for value in dist.values)
                continue
            low, high = dist.values
            yield where, path, low
            yield where, path, high - 1 if dist.kind == "randint" else math.nextafter(high, low)
        if isinstance(self.scheduler, Pb2):
            for path, (low, high) in self.scheduler.bounds.items():
                yield from (("scheduler.bounds", path, low), ("scheduler.bounds", path, high))


def _search_type(raw: Any) -> Any:
    if isinstance(raw, Search):
        return raw.type
    return raw.get("type") if isinstance(raw, dict) else raw


def parse_scheduler(raw: Any) -> Strict:
    """The scheduler from `{type: asha, grace_period: 20}` (or just `asha`). An option another scheduler
    has is reported as not being this scheduler's, with this one's options, rather than as an unknown key."""
    if isinstance(raw, tuple(SCHEDULERS.values())):
        return raw
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise ValueError("expected a scheduler name or a mapping like {type: asha, grace_period: 10}")
    kind = raw.get("type")
    if kind not in SCHEDULERS:
        raise ValueError(f"type: expected one of {', '.join(SCHEDULERS)} (got {kind!r})")
    model = SCHEDULERS[kind]
    options = [name for name in model.model_fields if name != "type"]
    for key in raw:
        if key != "type" and key not in options:
            raise ValueError(f"{key}: not an option of scheduler {kind} (options: {', '.join(options) or 'none'})")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, model)) from None


def parse_sweep(raw: Any) -> SweepSpec | None:
    """The spec's `sweep:` section as a SweepSpec, or a SpecError naming the field under `sweep.`."""
    if raw is None or isinstance(raw, SweepSpec):
        return raw
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, SweepSpec, prefix="sweep")) from None


def _problems(sweep: SweepSpec) -> Iterator[str]:
    """Every rule that ties the sweep's parts together, as `field.path: what is wrong`."""
    sched, search = sweep.scheduler, sweep.search.type
    if not sweep.space and not isinstance(sched, (Pbt, Pb2)):
        yield ("space: nothing to sweep; give dotted spec paths and distributions, "
               "e.g. {rbnn.tmin: {loguniform: [1.0e-3, 1.0e-1]}}")
    for path, dist in sweep.space.items():
        if dist.problem():
            yield f"space.{path}: {dist.problem()}"
    if isinstance(sched, (Pbt, Pb2)) and search in ("optuna", "hyperopt"):
        yield (f"search.type: scheduler {sched.type} picks the trials' values itself and takes no searcher; "
               f"use search random or grid (got {search})")
    for path, dist in sweep.space.items():
        yield from _search_problems(search, path, dist)
    yield from _overlaps([(where, path) for where, path, _ in sweep.swept()])


def _search_problems(search: str, path: str, dist: Distribution) -> Iterator[str]:
    if search == "grid" and dist.kind not in LISTS:
        yield (f"space.{path}: search grid enumerates grid and choice values only (got {dist.kind}); "
               "use search random, optuna or hyperopt for ranges")
    if search in ("optuna", "hyperopt") and dist.kind == "grid":
        yield f"space.{path}: search {search} cannot enumerate a grid; use choice"
    if search == "optuna" and dist.kind == "choice" and not all(isinstance(v, _OPTUNA_CHOICES) for v in dist.values):
        yield f"space.{path}: optuna's choices must be numbers, strings, booleans or null (got {dist.values!r})"


def _overlaps(swept: list[tuple[str, str]]) -> Iterator[str]:
    """A path inside another swept path: which of the two values would the trial get?"""
    for where, path in swept:
        for _, other in swept:
            if path.startswith(other + "."):
                yield f"{where}.{path}: overlaps {other}, which is swept as a whole"


# --------------------------------------------------------------------------- checks against the spec


def check_sweep(sweep: SweepSpec, resolved: Mapping[str, Any]) -> None:
    """Raise SpecError unless every swept path is a field of `resolved` (the resolved spec, dumped) that can take
    the values swept, and the scheduler's epochs fit the run's (train.epochs, failure.checkpoint_every)."""
    tree = {key: value for key, value in resolved.items() if key != "sweep"}
    fields = dict(_walk(tree))
    for where, path, kind in sweep.swept():
        problem = _path_problem(path, kind, fields)
        if problem:
            raise SpecError(f"sweep.{where}.{path}: {problem}")
    problem = _schedule_problem(sweep.scheduler, fields)
    if problem:
        raise SpecError(f"sweep.scheduler.{problem}")


def _walk(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every section and every leaf; lists are leaves (set_path cannot index them)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, dict):
            yield from _walk(value, path + ".")


def _path_problem(path: str, kind: str, fields: Mapping[str, Any]) -> str | None:
    head = path.split(".")[0]
    if head in FIXED:
        return f"{head} cannot be swept ({FIXED[head]})"
    if path not in fields:
        close = difflib.get_close_matches(path, list(fields), n=1)
        return "no such field in the spec" + (f" (did you mean {close[0]}?)" if close else "")
    value = fields[path]
    if kind in LISTS or value is None:  # None: an optional field whose type its default does not show
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{kind} draws numbers but {path} is {type(value).__name__} {value!r}"
    if isinstance(value, int) and kind != "randint":
        instead = "pbt with a randint mutation" if kind == "bounds" else "randint"
        return f"{'pb2' if kind == 'bounds' else kind} draws real numbers but {path} is an integer (use {instead})"
    return None


def _schedule_problem(sched: Strict, fields: Mapping[str, Any]) -> str | None:
    """Epoch counts of the scheduler that would silently do nothing, or exploit stale checkpoints."""
    epochs, every = fields.get("train.epochs"), fields.get("failure.checkpoint_every")
    if isinstance(sched, Asha) and epochs and sched.grace_period >= (sched.max_t or epochs):
        return (f"grace_period: {sched.grace_period} leaves nothing to stop early: it must be below "
                f"max_t={sched.max_t or epochs}" + ("" if sched.max_t else " (train.epochs)"))
    if not isinstance(sched, (Pbt, Pb2)):
        return None
    interval = sched.perturbation_interval
    if epochs and interval >= epochs:
        return (f"perturbation_interval: {interval} epochs is not below train.epochs={epochs}: "
                "nothing would be perturbed")
    if every and interval % every:
        return (f"perturbation_interval: {interval} is not a multiple of failure.checkpoint_every={every}: "
                "a trial that copies another would restore an older checkpoint")
    return None


def apply_config(raw_spec: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    """One trial's raw spec: a deep copy with each dotted key of Tune's config set, to be validated like
    any spec (a value the spec rejects fails that trial, naming the field)."""
    raw = copy.deepcopy(dict(raw_spec))
    for path, value in config.items():
        set_path(raw, path, _plain(value), f"trial config {path}")
    return raw


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers: the trial's resolved spec is written as YAML."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value
