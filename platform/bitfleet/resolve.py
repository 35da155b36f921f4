"""Spec file + overrides -> a resolved RunSpec, checked against everything it names, before any Ray call.

Resolution parses each workload section once — `model:` into the workload's `ModelConfig`, its own section
into its `Options`, `sweep:` into a `SweepSpec` — and checks the spec against the registry, the data on
disk, the checkpoints it names, its sweep and its pipeline's stages. What it returns travels typed to the
scheduler and to every worker; nothing downstream parses a section again.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from bitfleet import registry, storage, strict_yaml
from bitfleet.data import check_available
from bitfleet.dotted import leaves, set_path
from bitfleet.engine.checkpoint import NO_SHARDS, fetched, has_shards
from bitfleet.errors import SpecError, format_validation_error, spec_warning
from bitfleet.run_identity import result_fields
from bitfleet.spec import RunSpec, StageSpec
from bitfleet.sweeps import SweepSpec, apply_config, check_sweep, parse_sweep

CONFIG_FILE = "config.json"  # a run's resolved spec (and the history of those it ran with), by the scheduler


def load_spec(path: str | Path, overrides: list[str] = (), fresh: bool = False) -> RunSpec:
    """Read a YAML spec, apply `a.b.c=value` overrides and resolve it (`fresh`: see `validate_spec`)."""
    raw = read_spec_file(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_spec(raw, fresh=fresh)


def read_spec_file(path: str | Path) -> dict:
    raw = strict_yaml.load_file(path) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of spec fields at the top level")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Set `train.epochs=3` in a raw spec dict; the value is YAML (numbers, lists, bools), read as a spec is."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"override {item!r}: expected dotted.path=value, e.g. train.epochs=1")
    set_path(raw, key, strict_yaml.load_text(value, f"override {key}", field=key, lines=False), f"override {key}")


def validate_spec(raw: dict, pending_checkpoints: tuple[str, ...] = (), fresh: bool = False) -> RunSpec:
    """The resolved RunSpec of a raw spec dict, or a SpecError naming the first wrong field.

    `pending_checkpoints`: folders that earlier pipeline stages will write; not required to exist yet.
    `fresh`: the run will start anew (`--fresh`), so an existing run of that name is not compared with it.
    """
    spec = parse(raw)
    if spec.stages:
        validate_stages(spec)
    if spec.train.init_from and spec.train.init_from not in pending_checkpoints:
        existing_checkpoint(spec.train.init_from, "train.init_from")
    if spec.train.resume_from:
        sharded = existing_checkpoint(spec.train.resume_from, "train.resume_from")
        if spec.train.strategy == "deepspeed" and not sharded:
            raise SpecError(f"train.resume_from: {spec.train.resume_from} has {NO_SHARDS}")
    if spec.train.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise SpecError("train.strategy: deepspeed needs DeepSpeed: `pip install bitfleet[deepspeed]` (on every node)")
    missing = check_available(spec.data)
    if missing:
        raise SpecError(missing)
    if not fresh:
        check_existing_run(spec)
    return spec


def parse(raw: dict) -> RunSpec:
    """The typed spec of a raw spec dict: each field checked alone, each section parsed by its own model, the
    whole checked by its workload and its sweep. No data set, run folder or `init_from` is looked at (only
    what a workload's own check reads, such as rbnn's teacher): cheap enough to repeat for every value a sweep
    can give."""
    if isinstance(raw.get("workload"), str):
        registry.workload_class(raw["workload"])  # an unknown workload is named as such, before its section
    try:
        spec = RunSpec.model_validate(with_workload_defaults(raw))
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, RunSpec)) from None
    spec = registry.workload_class(spec.workload).resolve_sections(spec)
    if spec.sweep is not None:
        spec = spec.model_copy(update={"sweep": parse_sweep(spec.sweep)})
    workload = registry.get(spec.workload, spec.options)
    workload.validate(spec)
    _check_checkpoint_metric(spec, workload)
    if spec.sweep is not None:
        check_sweep(spec.sweep, spec.model_dump(mode="json"))
        check_swept_values(spec, spec.sweep)
    return spec


def check_swept_values(spec: RunSpec, sweep: SweepSpec) -> None:
    """Every value the sweep can give a field is one the field takes: each listed value and each end of each
    range, set into the spec as a trial's values are (`apply_config`) and parsed, now rather than when the
    trial that draws it starts."""
    base = spec.model_dump(mode="json", exclude={"sweep"})
    for where, path, value in sweep.bounding_values():
        try:
            parse(apply_config(base, {path: value}))
        except SpecError as exc:
            raise SpecError(f"sweep.{where}.{path}: the value {value!r} is refused: {exc}") from None


def with_workload_defaults(raw: dict) -> dict:
    """The raw spec over its workload's `defaults` for platform sections: mappings merge key by key, and any
    value the spec gives (a number, a list, null) wins. An unknown workload is left to validation."""
    name = raw.get("workload")
    if not isinstance(name, str) or name not in registry.names():
        return raw
    return _merged(registry.workload_class(name).defaults, raw)


def _merged(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_existing_run(spec: RunSpec) -> None:
    """A rerun under an existing run name continues that run: refuse one whose resolved spec would change
    its result (listing each field `old → new`); `train.epochs` may only grow (extending a run)."""
    config = storage.join(storage.run_path(spec), CONFIG_FILE)
    try:
        if not storage.exists(config):
            return
    except OSError as exc:  # an object store this machine cannot reach: the run could not write there either
        raise SpecError(f"storage_path: cannot reach {spec.storage_path}: {exc}") from None
    try:
        old = json.loads(storage.read_text(config))["spec"]
    except (ValueError, KeyError, TypeError):
        raise SpecError(f"{config} is unreadable (a truncated write?): rerun with --fresh to start the run "
                        "anew, its folder kept aside") from None
    new = spec.model_dump(mode="json")
    before, after = drift_fields(old), drift_fields(new)
    # fields both record: a run started by an older bitfleet recorded fewer (no workload defaults, say)
    changed = [f"{key}: {before[key]!r} → {after[key]!r}" for key in sorted(before.keys() & after.keys())
               if before[key] != after[key]]
    old_epochs, new_epochs = old.get("train", {}).get("epochs", 0), new["train"]["epochs"]
    if new_epochs < old_epochs:
        changed.append(f"train.epochs: {old_epochs} → {new_epochs} (a run can be extended, not shortened)")
    if changed:
        raise SpecError(f"{spec.name}: {storage.run_path(spec)} holds a run of a different spec: "
                        f"{'; '.join(changed)}. Rerun with --fresh to start it anew (the old folder is kept "
                        "beside it), or name it differently")


def drift_fields(dumped: dict) -> dict:
    """What a rerun must keep: the fields that decide the result, and a sweep's own section."""
    fields = result_fields(dumped)
    if dumped.get("sweep"):
        fields.update(leaves(dumped["sweep"], "sweep."))
    return fields


def set_aside(spec: RunSpec) -> str | None:
    """`--fresh`: move an existing run folder out of the way (to `<name>.<UTC time>` beside it); returns
    where it went, None when there was none."""
    folder = Path(spec.storage_path) / spec.name
    if storage.is_uri(spec.storage_path):
        raise SpecError(f"--fresh: storage_path {spec.storage_path} is a URI; move or delete {folder.name} there, "
                        "or give the run another name")
    if not folder.exists():
        return None
    aside = folder.with_name(f"{folder.name}.{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    folder.rename(aside)
    return str(aside)


def existing_checkpoint(path: str, field: str) -> bool:
    """Check that a spec field names a complete checkpoint (a checkpoint or a run folder; a local path or an
    object-store URI), or raise a SpecError naming the field; returns whether it holds DeepSpeed shards."""
    try:
        with fetched(path) as found:
            return has_shards(found)
    except OSError as exc:  # FileNotFoundError, or an object store that cannot be read
        raise SpecError(f"{field}: {exc}") from None


def apply_data_overrides(raw: dict, overrides: list[str], command: str) -> None:
    """`-o data.FIELD=VALUE` items (where a trained model's data is, how it loads) into a raw spec holding a
    `data:` section; a SpecError for an override of any other field, which would not be the trained model's."""
    for item in overrides:
        if not item.startswith("data."):
            raise SpecError(f"override {item!r}: {command} takes data.* overrides only")
        apply_override(raw, item)


def recorded_spec(run_dir: str, data_overrides: list[str] = ()) -> RunSpec:
    """The resolved spec a run recorded in its folder (`config.json`; a local path or an object-store URI),
    with `data.*` overrides applied; a SpecError naming the folder when it holds no run."""
    config = storage.join(str(run_dir), CONFIG_FILE)
    try:
        raw = json.loads(storage.read_text(config))["spec"]
    except FileNotFoundError:
        raise SpecError(f"{run_dir}: not a bitfleet run folder (no {CONFIG_FILE})") from None
    except OSError as exc:
        raise SpecError(f"{run_dir}: cannot read {CONFIG_FILE}: {exc}") from None
    except (ValueError, KeyError, TypeError):
        raise SpecError(f"{config} is unreadable (a truncated write?)") from None
    apply_data_overrides(raw, data_overrides, "eval")
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, RunSpec)) from None
    return registry.workload_class(spec.workload).resolve_sections(spec)


def _check_checkpoint_metric(spec: RunSpec, workload) -> None:
    """`failure.checkpoint_metric` and `train.early_stopping.metric` name a split the run evaluates and,
    without a mode, a metric whose direction the workload's objective knows; an early stop whose patience
    outlasts the run is warned about."""
    failure, stopping = spec.failure, spec.train.early_stopping
    _check_metric(spec, workload, failure.checkpoint_metric, failure.checkpoint_mode,
                  "failure.checkpoint_metric", "failure.checkpoint_mode")
    if stopping is not None:
        _check_metric(spec, workload, stopping.metric, stopping.mode,
                      "train.early_stopping.metric", "train.early_stopping.mode")
        if stopping.patience >= spec.train.epochs:
            spec_warning(f"train.early_stopping.patience: {stopping.patience} is not below train.epochs="
                         f"{spec.train.epochs}: the run can never stop early")


def _check_metric(spec: RunSpec, workload, metric: str | None, mode: str | None, metric_field: str,
                  mode_field: str) -> None:
    if metric is None:
        return
    ema = spec.train.ema is not None and metric.startswith("ema/")
    split, _, leaf = metric.removeprefix("ema/" if ema else "").partition("/")
    splits = ("train", "test", "val") if spec.data.val_size else ("train", "test")
    if split not in splits or not leaf or (ema and split == "train"):
        raise SpecError(f"{metric_field}: {metric!r} is not a metric of this run: expected <split>/<name> with "
                        f"split {' or '.join(splits)}" +
                        ("" if spec.data.val_size else " (val needs data.val_size > 0)") +
                        (", or ema/<split>/<name> (val or test) of the EMA" if spec.train.ema else ""))
    if mode is None and leaf not in workload.Objective.modes:
        raise SpecError(f"{mode_field}: set max or min: {workload.name}'s objective does not know whether a "
                        f"higher {leaf!r} is better (it knows {', '.join(workload.Objective.modes)})")


# --------------------------------------------------------------------------- pipeline stages


def stage_raw(spec: RunSpec, stage: StageSpec) -> dict:
    """The raw spec of one stage: the pipeline's fields, the stage's overrides, its name, folder and inputs."""
    raw = spec.model_dump(mode="json", exclude={"stages", "inputs"})
    for key, value in stage.overrides.items():
        set_path(raw, key, value, f"stages.{stage.name}.overrides.{key}")
    folder = Path(spec.storage_path) / spec.name
    raw.update(name=stage.name, storage_path=str(folder), inputs={need: str(folder / need) for need in stage.needs})
    if stage.init_from:
        set_path(raw, "train.init_from", str(folder / stage.init_from), f"stages.{stage.name}.init_from")
    return raw


def validate_stages(spec: RunSpec) -> None:
    """Every stage's spec resolves (bar checkpoints its needs will write) and names a known task."""
    tasks = {"report"} | set(registry.get(spec.workload).tasks())
    for stage in spec.stages:
        if stage.task and stage.task not in tasks:
            raise SpecError(f"stages.{stage.name}.task: {stage.task!r} is not a task of {spec.workload} "
                            f"(expected one of {', '.join(sorted(tasks))})")
        raw = stage_raw(spec, stage)
        try:
            validate_spec(raw, pending_checkpoints=tuple(raw["inputs"].values()))  # written by the needed stages
        except SpecError as exc:
            raise SpecError(f"stages.{stage.name}: {exc}") from None


def resolve_stage(spec: RunSpec, stage: StageSpec) -> RunSpec:
    """The resolved spec of a stage whose needs have completed."""
    return validate_spec(stage_raw(spec, stage))
