"""The `sweep:` section: parsing, every mistake named by its field path, checks against the spec, trial
specs. The Ray Tune objects built from it: test_sweep_tune.py."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from bitfleet import registry
from bitfleet.errors import SpecError, format_validation_error
from bitfleet.resolve import validate_spec
from bitfleet.scheduler.tune_objects import param_space
from bitfleet.spec import RunSpec
from bitfleet.sweeps import (
    Asha,
    Distribution,
    Fifo,
    Pb2,
    Pbt,
    SweepSpec,
    apply_config,
    check_sweep,
)

TMIN = {"rbnn.tmin": {"loguniform": [1e-3, 1e-1]}}
PBT = {"type": "pbt", "perturbation_interval": 2, "mutations": {"train.optimizer.lr": [0.1, 0.01]}}
PB2 = {"type": "pb2", "perturbation_interval": 2, "bounds": {"train.optimizer.lr": [0.001, 0.1]}}
RAW_SPEC = {  # rbnn, 10 epochs, checkpoints every epoch; the user wrote only tmax in the rbnn section
    "name": "sweep-test", "workload": "rbnn", "data": {"dataset": "mnist_sample"},
    "train": {"epochs": 10, "lr_schedule": {"type": "cosine"}}, "rbnn": {"tmax": 10.0},
}


def error(raw: dict) -> str:
    """The message a user sees for a bad `sweep:` section (as RunSpec reports it, prefixed `sweep.`)."""
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate(raw)
    return format_validation_error(info.value, SweepSpec, prefix="sweep")


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("raw,kind,values", [
    ({"uniform": [0, 1]}, "uniform", [0.0, 1.0]),
    ({"loguniform": ["1e-3", 0.1]}, "loguniform", [1e-3, 0.1]),  # YAML 1.1 reads 1e-3 as a string
    ({"randint": [1, 5]}, "randint", [1, 5]),
    ({"choice": ["cosine", "step"]}, "choice", ["cosine", "step"]),
    ({"grid": [1, 2, 5]}, "grid", [1, 2, 5]),
])
def test_each_distribution_parses_and_dumps_as_written(raw, kind, values):
    dist = Distribution.model_validate(raw)
    assert (dist.kind, dist.values) == (kind, values)
    assert dist.model_dump() == {kind: values}
    assert Distribution.model_validate(dist.model_dump()) == dist


def test_defaults():
    sweep = SweepSpec.model_validate({"space": TMIN})
    assert (sweep.metric, sweep.mode, sweep.num_samples, sweep.max_concurrent) == ("test/acc", "max", 8, None)
    assert isinstance(sweep.scheduler, Fifo) and sweep.search.type == "random" and sweep.search.seed is None


@pytest.mark.parametrize("raw,model,attrs", [
    ("fifo", Fifo, {}),
    ("asha", Asha, {"grace_period": 1, "reduction_factor": 3.0, "max_t": None}),
    ({"type": "asha", "grace_period": 20, "reduction_factor": 2, "max_t": 100}, Asha,
     {"grace_period": 20, "reduction_factor": 2.0, "max_t": 100}),
    (PBT, Pbt, {"perturbation_interval": 2, "quantile_fraction": 0.25, "resample_probability": 0.25,
                "synch": False}),
    ({**PBT, "quantile_fraction": 0.5, "resample_probability": 0.0, "synch": True}, Pbt,
     {"quantile_fraction": 0.5, "resample_probability": 0.0, "synch": True}),
    (PB2, Pb2, {"perturbation_interval": 2, "bounds": {"train.optimizer.lr": (0.001, 0.1)}, "quantile_fraction": 0.25}),
])
def test_each_scheduler_parses(raw, model, attrs):
    scheduler = SweepSpec.model_validate({"space": TMIN, "scheduler": raw}).scheduler
    assert type(scheduler) is model
    assert {name: getattr(scheduler, name) for name in attrs} == attrs


def test_pbt_plain_list_is_a_choice_and_space_may_be_empty():
    sweep = SweepSpec.model_validate({"scheduler": PBT})
    assert sweep.space == {}
    assert sweep.scheduler.mutations["train.optimizer.lr"] == Distribution(kind="choice", values=[0.1, 0.01])
    assert SweepSpec.model_validate(sweep.model_dump()) == sweep


@pytest.mark.parametrize("search", ["random", "grid", "optuna", "hyperopt"])
def test_each_search_parses(search):
    space = {"rbnn.rotation_update": {"choice": [1, 2]}}
    sweep = SweepSpec.model_validate({"space": space, "search": {"type": search, "seed": 7}})
    assert (sweep.search.type, sweep.search.seed) == (search, 7)
    assert SweepSpec.model_validate({"space": space, "search": search}).search.type == search


def test_grid_search_runs_the_grid_once_unless_asked():
    space = {"rbnn.rotation_update": {"grid": [1, 2]}}
    assert SweepSpec.model_validate({"space": space, "search": "grid"}).num_samples == 1
    assert SweepSpec.model_validate({"space": space, "search": "grid", "num_samples": 3}).num_samples == 3
    assert SweepSpec.model_validate({"space": space}).num_samples == 8


# --------------------------------------------------------------------------- every mistake, named


def space(dist: dict, path: str = "rbnn.tmin") -> dict:
    return {"space": {path: dist}}


PBT_OPTIONS = "options: perturbation_interval, mutations, quantile_fraction, resample_probability, synch"
BAD_SWEEPS = [  # (id, sweep section, the exact start of the message, substrings it must contain)
    ("uniform-empty", space({"uniform": [0.5, 0.5]}),
     "sweep.space.rbnn.tmin: uniform range is empty (low 0.5 >= high 0.5)", []),
    ("loguniform-empty", space({"loguniform": [0.1, 0.01]}),
     "sweep.space.rbnn.tmin: loguniform range is empty (low 0.1 >= high 0.01)", []),
    ("randint-empty", space({"randint": [3, 3]}, "rbnn.rotation_update"),
     "sweep.space.rbnn.rotation_update: randint range is empty (low 3 >= high 3, high excluded)", []),
    ("loguniform-zero-low", space({"loguniform": [0, 1]}),
     "sweep.space.rbnn.tmin: loguniform needs 0 < low (got low 0.0)", []),
    ("loguniform-negative-low", space({"loguniform": [-1, 1]}), "sweep.space.rbnn.tmin: loguniform needs 0 < low", []),
    ("choice-empty", space({"choice": []}), "sweep.space.rbnn.tmin: choice needs at least one value", []),
    ("grid-empty", space({"grid": []}), "sweep.space.rbnn.tmin: grid needs at least one value", []),
    ("unknown-distribution", space({"normal": [0, 1]}),
     "sweep.space.rbnn.tmin: expected one key out of uniform", ["'normal'"]),
    ("two-keys", space({"uniform": [0, 1], "choice": [1]}), "sweep.space.rbnn.tmin: expected one key", []),
    ("not-a-mapping", space(0.1), "sweep.space.rbnn.tmin: expected one key", ["0.1"]),
    ("three-numbers", space({"uniform": [0, 1, 2]}),
     "sweep.space.rbnn.tmin: uniform takes [low, high], two numbers", []),
    ("uniform-strings", space({"uniform": ["a", "b"]}), "sweep.space.rbnn.tmin: uniform takes [low, high]", []),
    ("uniform-bool", space({"uniform": [False, True]}), "sweep.space.rbnn.tmin: uniform takes [low, high]", []),
    ("randint-fraction", space({"randint": [1, 2.5]}),
     "sweep.space.rbnn.tmin: randint takes [low, high], two integers", []),
    ("choice-not-list", space({"choice": "abc"}), "sweep.space.rbnn.tmin: choice takes a list", []),
    ("nothing-to-sweep", {}, "sweep.space: nothing to sweep", []),
    ("unknown-key", {"space": TMIN, "metirc": "x"}, "sweep.metirc: unknown key; did you mean 'metric'?", []),
    ("bad-mode", {"space": TMIN, "mode": "maximize"}, "sweep.mode:", ["'maximize'"]),
    ("zero-samples", {"space": TMIN, "num_samples": 0}, "sweep.num_samples:", ["greater than or equal to 1"]),
    ("zero-concurrent", {"space": TMIN, "max_concurrent": 0}, "sweep.max_concurrent:", ["greater than or equal to 1"]),
    ("empty-metric", {"space": TMIN, "metric": ""}, "sweep.metric:", ["at least 1 character"]),
    ("unknown-scheduler", {"space": TMIN, "scheduler": "hyperband"},
     "sweep.scheduler.type: expected one of fifo, asha, pbt, pb2 (got 'hyperband')", []),
    ("fifo-option", {"space": TMIN, "scheduler": {"type": "fifo", "grace_period": 3}},
     "sweep.scheduler.grace_period: not an option of scheduler fifo (options: none)", []),
    ("asha-option", {"space": TMIN, "scheduler": {"type": "asha", "perturbation_interval": 3}},
     "sweep.scheduler.perturbation_interval: not an option of scheduler asha "
     "(options: grace_period, reduction_factor, max_t)", []),
    ("pbt-option", {"space": TMIN, "scheduler": {**PBT, "grace_period": 3}},
     f"sweep.scheduler.grace_period: not an option of scheduler pbt ({PBT_OPTIONS})", []),
    ("pb2-option", {"space": TMIN, "scheduler": {**PB2, "resample_probability": 0.5}},
     "sweep.scheduler.resample_probability: not an option of scheduler pb2 (options: perturbation_interval, bounds, "
     "quantile_fraction, synch)", []),
    ("asha-reduction-factor", {"space": TMIN, "scheduler": {"type": "asha", "reduction_factor": 1}},
     "sweep.scheduler.reduction_factor:", ["greater than 1"]),
    ("pbt-no-interval", {"scheduler": {"type": "pbt", "mutations": PBT["mutations"]}},
     "sweep.scheduler.perturbation_interval: Field required", []),
    ("pbt-no-mutations", {"scheduler": {**PBT, "mutations": {}}}, "sweep.scheduler.mutations:", ["at least 1 item"]),
    ("pbt-quantile", {"scheduler": {**PBT, "quantile_fraction": 0.6}}, "sweep.scheduler.quantile_fraction:", ["0.5"]),
    ("pbt-mutation-empty-range", {"scheduler": {**PBT, "mutations": {"rbnn.tmin": {"uniform": [2, 1]}}}},
     "sweep.scheduler.mutations.rbnn.tmin: uniform range is empty (low 2.0 >= high 1.0)", []),
    ("pbt-mutation-bad-distribution", {"scheduler": {**PBT, "mutations": {"rbnn.tmin": {"unifrom": [1, 2]}}}},
     "sweep.scheduler.mutations.rbnn.tmin: expected one key", []),
    ("pbt-mutation-grid", {"scheduler": {**PBT, "mutations": {"rbnn.tmin": {"grid": [1, 2]}}}},
     "sweep.scheduler.mutations.rbnn.tmin: grid is not a mutation; use choice", []),
    ("pb2-empty-bounds", {"scheduler": {**PB2, "bounds": {"rbnn.tmin": [0.1, 0.01]}}},
     "sweep.scheduler.bounds.rbnn.tmin: range is empty (low 0.1 >= high 0.01)", []),
    ("pb2-bounds-not-numbers", {"scheduler": {**PB2, "bounds": {"rbnn.tmin": ["low", 1]}}},
     "sweep.scheduler.bounds.rbnn.tmin: takes [low, high], two numbers (got ['low', 1])", []),
    ("pb2-bounds-not-pairs", {"scheduler": {**PB2, "bounds": {"rbnn.tmin": [0.1]}}},
     "sweep.scheduler.bounds.rbnn.tmin: takes [low, high], two numbers (got [0.1])", []),
    ("pb2-no-bounds", {"scheduler": {**PB2, "bounds": {}}}, "sweep.scheduler.bounds:", ["at least 1 item"]),
    ("grid-search-range", {"space": {**TMIN, "rbnn.rotation_update": {"grid": [1, 2]}}, "search": "grid"},
     "sweep.space.rbnn.tmin: search grid enumerates grid and choice values only (got loguniform)", []),
    ("optuna-grid", {"space": {"rbnn.rotation_update": {"grid": [1, 2]}}, "search": "optuna"},
     "sweep.space.rbnn.rotation_update: search optuna cannot enumerate a grid; use choice", []),
    ("hyperopt-grid", {"space": {"rbnn.rotation_update": {"grid": [1, 2]}}, "search": "hyperopt"},
     "sweep.space.rbnn.rotation_update: search hyperopt cannot enumerate a grid", []),
    ("optuna-choice-of-sections", {"space": {"train.optimizer": {"choice": [{"type": "adam"}]}}, "search": "optuna"},
     "sweep.space.train.optimizer: optuna's choices must be numbers, strings, booleans or null", []),
    ("pbt-with-optuna", {"scheduler": PBT, "search": "optuna"},
     "sweep.search.type: scheduler pbt picks the trials' values itself and takes no searcher", ["(got optuna)"]),
    ("pb2-with-hyperopt", {"scheduler": PB2, "search": {"type": "hyperopt"}},
     "sweep.search.type: scheduler pb2 picks the trials' values itself", []),
    ("unknown-search", {"space": TMIN, "search": "bayes"}, "sweep.search.type:", ["'optuna'", "'bayes'"]),
    ("overlapping-paths", {"space": {"train.optimizer": {"choice": [{"type": "adam"}]},
                                     "train.optimizer.lr": {"uniform": [0.01, 0.1]}}},
     "sweep.space.train.optimizer.lr: overlaps train.optimizer, which is swept as a whole", []),
    ("mutation-inside-a-swept-section",
     {"space": {"train.optimizer": {"choice": [{"type": "adam"}]}}, "scheduler": PBT},
     "sweep.scheduler.mutations.train.optimizer.lr: overlaps train.optimizer", []),
]


@pytest.mark.parametrize("raw,start,contains", [c[1:] for c in BAD_SWEEPS], ids=[c[0] for c in BAD_SWEEPS])
def test_bad_sweep_names_the_field(raw, start, contains):
    message = error(raw)
    assert message.startswith(start), message
    for part in contains:
        assert part in message, message


def test_resolution_reports_sweep_errors_under_sweep_and_the_resolved_spec_round_trips():
    bad = {**RAW_SPEC, "sweep": {"space": TMIN, "scheduler": {**PBT, "grace_period": 3}}}
    with pytest.raises(SpecError) as info:
        validate_spec(bad)
    assert str(info.value) == f"sweep.scheduler.grace_period: not an option of scheduler pbt ({PBT_OPTIONS})"
    spec = validate_spec({**RAW_SPEC, "sweep": {"space": TMIN, "scheduler": PBT}})
    assert isinstance(spec.sweep, SweepSpec)
    dumped = spec.model_dump(mode="json")
    assert dumped["sweep"]["space"] == {"rbnn.tmin": {"loguniform": [1e-3, 1e-1]}}
    assert validate_spec(dumped).sweep == spec.sweep and validate_spec(dumped).options == spec.options


def test_importing_sweeps_does_not_import_ray():
    code = "import sys, bitfleet.sweeps; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- checks against the spec


@pytest.fixture(scope="module")
def resolved() -> dict:
    """RAW_SPEC with every default filled in, rbnn's model and options sections included."""
    spec = registry.workload_class("rbnn").resolve_sections(RunSpec.model_validate(RAW_SPEC))
    return spec.model_dump(mode="json")


def check(sweep: dict, resolved: dict) -> str | None:
    try:
        check_sweep(SweepSpec.model_validate(sweep), resolved)
    except SpecError as exc:
        return str(exc)
    return None


def test_existing_paths_pass_including_workload_defaults(resolved):
    sweep = {"space": {**TMIN,  # rbnn.tmin: not written in the spec, a default of rbnn's options
                       "rbnn.rotation_update": {"randint": [1, 5]}, "model.arch": {"choice": ["resnet20_1w1a"]},
                       "train.lr_schedule.type": {"choice": ["cosine", "step"]}, "train.grad_clip": {"uniform": [1, 5]},
                       "train.optimizer": {"choice": [{"type": "adam", "lr": 0.001}]}}}
    assert check(sweep, resolved) is None
    assert check({"scheduler": PBT}, resolved) is None
    assert check({"scheduler": PB2}, resolved) is None
    assert check({"space": TMIN, "scheduler": {"type": "asha", "grace_period": 2}}, resolved) is None


@pytest.mark.parametrize("sweep,message", [
    ({"space": {"train.lr_scheduel.type": {"choice": ["cosine"]}}},
     "sweep.space.train.lr_scheduel.type: no such field in the spec (did you mean train.lr_schedule.type?)"),
    ({"space": {"rbnn.tminn": {"uniform": [0.01, 0.1]}}},
     "sweep.space.rbnn.tminn: no such field in the spec (did you mean rbnn.tmin?)"),
    ({"space": {"lbpnet.temperature": {"uniform": [0.01, 0.1]}}},
     "sweep.space.lbpnet.temperature: no such field in the spec"),
    ({"space": {"rbnn.teacher.checkpoint": {"choice": ["/x"]}}},
     "sweep.space.rbnn.teacher.checkpoint: no such field in the spec (did you mean rbnn.teacher?)"),
    ({"space": {"train.lr_schedule.milestones.0": {"randint": [1, 5]}}},
     "sweep.space.train.lr_schedule.milestones.0: no such field in the spec "
     "(did you mean train.lr_schedule.milestones?)"),
    ({"scheduler": {**PBT, "mutations": {"train.optimizer.lrr": [0.1]}}},
     "sweep.scheduler.mutations.train.optimizer.lrr: no such field in the spec (did you mean train.optimizer.lr?)"),
    ({"scheduler": {**PB2, "bounds": {"rbnn.tmax2": [1, 2]}}},
     "sweep.scheduler.bounds.rbnn.tmax2: no such field in the spec (did you mean rbnn.tmax?)"),
    ({"space": {"name": {"choice": ["a", "b"]}}},
     "sweep.space.name: name cannot be swept (the run's name; Tune names the trials)"),
    ({"space": {"workload": {"choice": ["rbnn", "lbpnet"]}}},
     "sweep.space.workload: workload cannot be swept "
     "(each workload has its own sections; sweep one workload per spec)"),
    ({"space": {"sweep.num_samples": {"choice": [1, 2]}}},
     "sweep.space.sweep.num_samples: sweep cannot be swept (a sweep does not sweep its own settings)"),
    ({"space": {"train.epochs": {"uniform": [1, 5]}}},
     "sweep.space.train.epochs: uniform draws real numbers but train.epochs is an integer (use randint)"),
    ({"scheduler": {**PB2, "bounds": {"rbnn.rotation_update": [1, 5]}}},
     "sweep.scheduler.bounds.rbnn.rotation_update: pb2 draws real numbers but rbnn.rotation_update is an integer "
     "(use pbt with a randint mutation)"),
    ({"space": {"train.lr_schedule.type": {"uniform": [1, 5]}}},
     "sweep.space.train.lr_schedule.type: uniform draws numbers but train.lr_schedule.type is str 'cosine'"),
    ({"space": {"train.amp": {"randint": [0, 2]}}},
     "sweep.space.train.amp: randint draws numbers but train.amp is bool False"),
    ({"space": TMIN, "scheduler": {"type": "asha", "grace_period": 10}},
     "sweep.scheduler.grace_period: 10 leaves nothing to stop early: it must be below max_t=10 (train.epochs)"),
    ({"space": TMIN, "scheduler": {"type": "asha", "grace_period": 4, "max_t": 4}},
     "sweep.scheduler.grace_period: 4 leaves nothing to stop early: it must be below max_t=4"),
    ({"scheduler": {**PBT, "perturbation_interval": 10}},
     "sweep.scheduler.perturbation_interval: 10 epochs is not below train.epochs=10: nothing would be perturbed"),
])
def test_sweep_against_spec_names_the_field(resolved, sweep, message):
    assert check(sweep, resolved) == message


def test_perturbation_interval_must_fall_on_checkpoints(resolved):
    every_two = {**resolved, "failure": {**resolved["failure"], "checkpoint_every": 2}}
    assert check({"scheduler": {**PBT, "perturbation_interval": 3}}, every_two) == (
        "sweep.scheduler.perturbation_interval: 3 is not a multiple of failure.checkpoint_every=2: "
        "a trial that copies another would restore an older checkpoint")
    assert check({"scheduler": {**PBT, "perturbation_interval": 4}}, every_two) is None


def test_apply_config_sets_nested_values_on_a_copy():
    raw = {"name": "x", "train": {"epochs": 3, "optimizer": {"lr": 0.1}}}
    config = {"train.optimizer.lr": np.float64(0.01), "rbnn.rotation_update": np.int64(5),
              "train.lr_schedule.type": "step"}
    trial = apply_config(raw, config)
    assert trial == {"name": "x", "train": {"epochs": 3, "optimizer": {"lr": 0.01}, "lr_schedule": {"type": "step"}},
                     "rbnn": {"rotation_update": 5}}
    assert type(trial["train"]["optimizer"]["lr"]) is float and type(trial["rbnn"]["rotation_update"]) is int
    assert raw == {"name": "x", "train": {"epochs": 3, "optimizer": {"lr": 0.1}}}
    with pytest.raises(SpecError, match="trial config train.epochs.x: 'epochs' is not a section"):
        apply_config(raw, {"train.epochs.x": 1})


def test_a_sampled_trial_is_a_valid_spec(resolved):
    sweep = SweepSpec.model_validate({"space": {**TMIN, "train.lr_schedule.type": {"choice": ["cosine", "step"]}}})
    check_sweep(sweep, resolved)
    rng = np.random.default_rng(1)
    config = {path: domain.sample(random_state=rng) for path, domain in param_space(sweep).items()}
    spec = RunSpec.model_validate(apply_config(RAW_SPEC, config))
    assert spec.options["tmin"] == config["rbnn.tmin"] and spec.options["tmax"] == 10.0
    assert spec.train.lr_schedule.type == config["train.lr_schedule.type"]
