"""The `sweep:` section: parsing, every mistake named by its field path, and the Ray Tune objects built from it.

No Ray runtime: Tune's domains, schedulers and searchers are plain objects until a Tuner runs them.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from bitfleet import registry
from bitfleet.spec import RunSpec, SpecError, format_validation_error
from bitfleet.scheduler.sweep import concurrent_trials, param_space, scheduler, search_alg, tune_config
from bitfleet.sweeps import (
    Asha, Distribution, Fifo, Pb2, Pbt, SweepSpec, apply_config, check_sweep, resolved_spec,
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
    (PBT, Pbt, {"perturbation_interval": 2, "quantile_fraction": 0.25, "resample_probability": 0.25}),
    ({**PBT, "quantile_fraction": 0.5, "resample_probability": 0.0}, Pbt,
     {"quantile_fraction": 0.5, "resample_probability": 0.0}),
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


PBT_OPTIONS = "options: perturbation_interval, mutations, quantile_fraction, resample_probability"
BAD_SWEEPS = [  # (id, sweep section, the exact start of the message, substrings it must contain)
    ("uniform-empty", space({"uniform": [0.5, 0.5]}), "sweep.space.rbnn.tmin: uniform range is empty (low 0.5 >= high 0.5)", []),
    ("loguniform-empty", space({"loguniform": [0.1, 0.01]}),
     "sweep.space.rbnn.tmin: loguniform range is empty (low 0.1 >= high 0.01)", []),
    ("randint-empty", space({"randint": [3, 3]}, "rbnn.rotation_update"),
     "sweep.space.rbnn.rotation_update: randint range is empty (low 3 >= high 3, high excluded)", []),
    ("loguniform-zero-low", space({"loguniform": [0, 1]}), "sweep.space.rbnn.tmin: loguniform needs 0 < low (got low 0.0)", []),
    ("loguniform-negative-low", space({"loguniform": [-1, 1]}), "sweep.space.rbnn.tmin: loguniform needs 0 < low", []),
    ("choice-empty", space({"choice": []}), "sweep.space.rbnn.tmin: choice needs at least one value", []),
    ("grid-empty", space({"grid": []}), "sweep.space.rbnn.tmin: grid needs at least one value", []),
    ("unknown-distribution", space({"normal": [0, 1]}), "sweep.space.rbnn.tmin: expected one key out of uniform", ["'normal'"]),
    ("two-keys", space({"uniform": [0, 1], "choice": [1]}), "sweep.space.rbnn.tmin: expected one key", []),
    ("not-a-mapping", space(0.1), "sweep.space.rbnn.tmin: expected one key", ["0.1"]),
    ("three-numbers", space({"uniform": [0, 1, 2]}), "sweep.space.rbnn.tmin: uniform takes [low, high], two numbers", []),
    ("uniform-strings", space({"uniform": ["a", "b"]}), "sweep.space.rbnn.tmin: uniform takes [low, high]", []),
    ("uniform-bool", space({"uniform": [False, True]}), "sweep.space.rbnn.tmin: uniform takes [low, high]", []),
    ("randint-fraction", space({"randint": [1, 2.5]}), "sweep.space.rbnn.tmin: randint takes [low, high], two integers", []),
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
     "sweep.scheduler.perturbation_interval: not an option of scheduler asha (options: grace_period, reduction_factor, max_t)", []),
    ("pbt-option", {"space": TMIN, "scheduler": {**PBT, "grace_period": 3}},
     f"sweep.scheduler.grace_period: not an option of scheduler pbt ({PBT_OPTIONS})", []),
    ("pb2-option", {"space": TMIN, "scheduler": {**PB2, "resample_probability": 0.5}},
     "sweep.scheduler.resample_probability: not an option of scheduler pb2 (options: perturbation_interval, bounds, "
     "quantile_fraction)", []),
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
    ("mutation-inside-a-swept-section", {"space": {"train.optimizer": {"choice": [{"type": "adam"}]}}, "scheduler": PBT},
     "sweep.scheduler.mutations.train.optimizer.lr: overlaps train.optimizer", []),
]


@pytest.mark.parametrize("raw,start,contains", [c[1:] for c in BAD_SWEEPS], ids=[c[0] for c in BAD_SWEEPS])
def test_bad_sweep_names_the_field(raw, start, contains):
    message = error(raw)
    assert message.startswith(start), message
    for part in contains:
        assert part in message, message


def test_runspec_reports_sweep_errors_under_sweep_and_round_trips():
    bad = {**RAW_SPEC, "sweep": {"space": TMIN, "scheduler": {**PBT, "grace_period": 3}}}
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate(bad)
    message = format_validation_error(info.value, RunSpec)
    assert message == f"sweep.scheduler.grace_period: not an option of scheduler pbt ({PBT_OPTIONS})"
    spec = RunSpec.model_validate({**RAW_SPEC, "sweep": {"space": TMIN, "scheduler": PBT}})
    dumped = spec.model_dump(mode="json")
    assert dumped["sweep"]["space"] == {"rbnn.tmin": {"loguniform": [1e-3, 1e-1]}}
    assert RunSpec.model_validate(dumped).sweep == spec.sweep


def test_importing_sweeps_does_not_import_ray():
    code = "import sys, bitfleet.sweeps; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- checks against the spec


@pytest.fixture(scope="module")
def resolved() -> dict:
    """RAW_SPEC with every default filled in, rbnn's model and options sections included."""
    spec = RunSpec.model_validate(RAW_SPEC)
    return resolved_spec(spec, registry.get("rbnn"))


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
    ({"space": {"rbnn.tminn": {"uniform": [0.01, 0.1]}}}, "sweep.space.rbnn.tminn: no such field in the spec (did you mean rbnn.tmin?)"),
    ({"space": {"lbpnet.temperature": {"uniform": [0.01, 0.1]}}}, "sweep.space.lbpnet.temperature: no such field in the spec"),
    ({"space": {"rbnn.teacher.checkpoint": {"choice": ["/x"]}}}, "sweep.space.rbnn.teacher.checkpoint: no such field in the spec (did you mean rbnn.teacher?)"),
    ({"space": {"train.lr_schedule.milestones.0": {"randint": [1, 5]}}},
     "sweep.space.train.lr_schedule.milestones.0: no such field in the spec (did you mean train.lr_schedule.milestones?)"),
    ({"scheduler": {**PBT, "mutations": {"train.optimizer.lrr": [0.1]}}},
     "sweep.scheduler.mutations.train.optimizer.lrr: no such field in the spec (did you mean train.optimizer.lr?)"),
    ({"scheduler": {**PB2, "bounds": {"rbnn.tmax2": [1, 2]}}}, "sweep.scheduler.bounds.rbnn.tmax2: no such field in the spec (did you mean rbnn.tmax?)"),
    ({"space": {"name": {"choice": ["a", "b"]}}}, "sweep.space.name: name cannot be swept (the run's name; Tune names the trials)"),
    ({"space": {"workload": {"choice": ["rbnn", "lbpnet"]}}}, "sweep.space.workload: workload cannot be swept (each workload has its own sections; sweep one workload per spec)"),
    ({"space": {"sweep.num_samples": {"choice": [1, 2]}}}, "sweep.space.sweep.num_samples: sweep cannot be swept (a sweep does not sweep its own settings)"),
    ({"space": {"train.epochs": {"uniform": [1, 5]}}},
     "sweep.space.train.epochs: uniform draws real numbers but train.epochs is an integer (use randint)"),
    ({"scheduler": {**PB2, "bounds": {"rbnn.rotation_update": [1, 5]}}},
     "sweep.scheduler.bounds.rbnn.rotation_update: pb2 draws real numbers but rbnn.rotation_update is an integer "
     "(use pbt with a randint mutation)"),
    ({"space": {"train.lr_schedule.type": {"uniform": [1, 5]}}},
     "sweep.space.train.lr_schedule.type: uniform draws numbers but train.lr_schedule.type is str 'cosine'"),
    ({"space": {"train.amp": {"randint": [0, 2]}}}, "sweep.space.train.amp: randint draws numbers but train.amp is bool False"),
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


# --------------------------------------------------------------------------- Ray Tune objects


def test_param_space_domains_and_ranges():
    from ray.tune.search.sample import Categorical, Float, Integer

    sweep = SweepSpec.model_validate({"space": {
        "rbnn.tmin": {"loguniform": [1e-3, 1e-1]}, "train.optimizer.lr": {"uniform": [0.01, 0.2]},
        "rbnn.rotation_update": {"randint": [1, 4]}, "train.lr_schedule.type": {"choice": ["cosine", "step"]},
        "train.batch_size": {"grid": [64, 128]}}})
    space = param_space(sweep)
    assert set(space) == set(sweep.space)
    tmin, lr, rotation, schedule = (space[k] for k in ("rbnn.tmin", "train.optimizer.lr", "rbnn.rotation_update",
                                                        "train.lr_schedule.type"))
    assert isinstance(tmin, Float) and (tmin.lower, tmin.upper) == (1e-3, 1e-1)
    assert isinstance(tmin.get_sampler(), Float._LogUniform)
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (0.01, 0.2)
    assert isinstance(lr.get_sampler(), Float._Uniform)
    assert isinstance(rotation, Integer) and (rotation.lower, rotation.upper) == (1, 4)
    assert isinstance(schedule, Categorical) and schedule.categories == ["cosine", "step"]
    assert space["train.batch_size"] == {"grid_search": [64, 128]}
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert 1e-3 <= tmin.sample(random_state=rng) <= 1e-1 and 0.01 <= lr.sample(random_state=rng) <= 0.2
        assert rotation.sample(random_state=rng) in (1, 2, 3)  # high excluded
        assert schedule.sample(random_state=rng) in ("cosine", "step")
    median = np.median(tmin.sample(size=400, random_state=rng))
    assert 0.005 < median < 0.02  # log-uniform: the geometric middle 1e-2 (uniform's would be 0.05)


def test_grid_search_enumerates_choices():
    sweep = SweepSpec.model_validate({"space": {"rbnn.rotation_update": {"choice": [1, 2]},
                                                "train.batch_size": {"grid": [64]}}, "search": "grid"})
    assert param_space(sweep) == {"rbnn.rotation_update": {"grid_search": [1, 2]}, "train.batch_size": {"grid_search": [64]}}


def test_param_space_starts_pbt_and_pb2_paths_from_their_distributions():
    from ray.tune.search.sample import Categorical, Float

    pbt = param_space(SweepSpec.model_validate({"space": TMIN, "scheduler": {
        **PBT, "mutations": {"rbnn.tmin": {"uniform": [0.5, 0.6]}, "train.optimizer.lr": [0.1, 0.01]}}}))
    assert pbt["rbnn.tmin"].lower == 1e-3  # the space's own distribution wins
    assert isinstance(pbt["train.optimizer.lr"], Categorical) and pbt["train.optimizer.lr"].categories == [0.1, 0.01]
    pb2 = param_space(SweepSpec.model_validate({"scheduler": PB2}))
    assert isinstance(pb2["train.optimizer.lr"], Float) and (pb2["train.optimizer.lr"].lower, pb2["train.optimizer.lr"].upper) == (0.001, 0.1)


def test_schedulers_carry_their_options():
    from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining
    from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler
    from ray.tune.schedulers.pb2 import PB2 as PB2Scheduler
    from ray.tune.search.sample import Float

    assert isinstance(scheduler(SweepSpec.model_validate({"space": TMIN}), max_t=10), FIFOScheduler)

    asha = scheduler(SweepSpec.model_validate({"space": TMIN, "scheduler": {
        "type": "asha", "grace_period": 2, "reduction_factor": 3}}), max_t=20)
    assert isinstance(asha, AsyncHyperBandScheduler)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("training_iteration", 20, 3)
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [18, 6, 2]  # grace_period 2, x3 up to max_t
    assert scheduler(SweepSpec.model_validate({"space": TMIN, "scheduler": {
        "type": "asha", "max_t": 7}}), max_t=20)._max_t == 7

    pbt = scheduler(SweepSpec.model_validate({"scheduler": {**PBT, "quantile_fraction": 0.5, "mutations": {
        "train.optimizer.lr": [0.1, 0.01], "rbnn.tmin": {"loguniform": [1e-3, 1e-1]}}}}), max_t=10)
    assert type(pbt) is PopulationBasedTraining
    assert (pbt._time_attr, pbt._perturbation_interval, pbt._quantile_fraction) == ("training_iteration", 2, 0.5)
    assert pbt._hyperparam_mutations["train.optimizer.lr"] == [0.1, 0.01]  # a list: PBT shifts to a neighbour
    assert isinstance(pbt._hyperparam_mutations["rbnn.tmin"], Float)
    assert pbt._resample_probability == 0.25 and pbt._metric is None  # metric and mode come from TuneConfig
    named = scheduler(SweepSpec.model_validate({"scheduler": PBT}), max_t=10, metric="val/loss", mode="min")
    assert (named._metric, named._mode) == ("val/loss", "min")

    pb2 = scheduler(SweepSpec.model_validate({"scheduler": PB2}), max_t=10)
    assert isinstance(pb2, PB2Scheduler)
    assert (pb2._time_attr, pb2._perturbation_interval) == ("training_iteration", 2)
    assert pb2._hyperparam_bounds == {"train.optimizer.lr": [0.001, 0.1]}


def trial_configs(sweep: SweepSpec) -> list[dict]:
    """The configs Tune's search algorithm hands out for this sweep (no Ray runtime needed)."""
    from ray.tune.experiment import Experiment

    alg = search_alg(sweep)
    alg.add_configurations([Experiment("e", run=lambda config: None, config=param_space(sweep),
                                       num_samples=sweep.num_samples)])
    configs = []
    while (trial := alg.next_trial()) is not None:
        configs.append(trial.config)
    return configs


def test_random_and_grid_search_are_seeded_basic_variant_generators():
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep = SweepSpec.model_validate({"space": TMIN, "num_samples": 3, "search": {"type": "random", "seed": 3}})
    alg = search_alg(sweep, max_concurrent=4)
    assert isinstance(alg, BasicVariantGenerator) and alg.max_concurrent == 4
    assert search_alg(sweep).max_concurrent == 0  # Tune's "no limit"
    configs = trial_configs(sweep)
    assert len(configs) == 3 and all(1e-3 <= c["rbnn.tmin"] <= 1e-1 for c in configs)
    assert trial_configs(sweep) == configs  # the seed makes the sweep reproducible
    other = sweep.model_copy(update={"search": sweep.search.model_copy(update={"seed": 4})})
    assert trial_configs(other) != configs


def test_grid_search_trials_are_the_grid_times_num_samples():
    raw = {"space": {"rbnn.rotation_update": {"choice": [1, 2]}, "train.batch_size": {"grid": [64, 128]}}, "search": "grid"}
    once = trial_configs(SweepSpec.model_validate(raw))
    assert sorted((c["rbnn.rotation_update"], c["train.batch_size"]) for c in once) == [(1, 64), (1, 128), (2, 64), (2, 128)]
    assert len(trial_configs(SweepSpec.model_validate({**raw, "num_samples": 2}))) == 8


@pytest.mark.parametrize("search,module,cls", [("optuna", "ray.tune.search.optuna", "OptunaSearch"),
                                               ("hyperopt", "ray.tune.search.hyperopt", "HyperOptSearch")])
def test_model_based_searchers_suggest_values_in_the_space(search, module, cls):
    pytest.importorskip(search, reason=f"`pip install {search}` to use search {search}")
    from ray.tune.search import ConcurrencyLimiter

    searcher_cls = getattr(__import__(module, fromlist=[cls]), cls)
    sweep = SweepSpec.model_validate({"space": {**TMIN, "rbnn.rotation_update": {"randint": [1, 4]},
                                                "train.lr_schedule.type": {"choice": ["cosine", "step"]}},
                                      "search": {"type": search, "seed": 0}})
    assert isinstance(search_alg(sweep), searcher_cls)
    limited = search_alg(sweep, sweep.metric, sweep.mode, max_concurrent=2)
    assert isinstance(limited, ConcurrencyLimiter) and isinstance(limited.searcher, searcher_cls)
    assert limited.max_concurrent == 2
    assert limited.set_search_properties(sweep.metric, sweep.mode, param_space(sweep))  # what the Tuner does
    config = limited.suggest("trial-1")
    assert set(config) == {"rbnn.tmin", "rbnn.rotation_update", "train.lr_schedule.type"}
    assert 1e-3 <= config["rbnn.tmin"] <= 1e-1 and config["rbnn.rotation_update"] in (1, 2, 3)
    assert config["train.lr_schedule.type"] in ("cosine", "step")


def test_tune_config_sets_metric_mode_and_samples_once():
    from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler

    sweep = SweepSpec.model_validate({"space": TMIN, "metric": "val/loss", "mode": "min", "num_samples": 5,
                                      "scheduler": "asha"})
    config = tune_config(sweep, epochs=12, max_concurrent=3)
    assert (config.metric, config.mode, config.num_samples) == ("val/loss", "min", 5)
    assert isinstance(config.scheduler, AsyncHyperBandScheduler) and config.scheduler._max_t == 12
    assert config.search_alg.max_concurrent == 3 and config.max_concurrent_trials is None


def test_concurrent_trials():
    sweep = SweepSpec.model_validate({"space": TMIN})
    assert concurrent_trials(sweep, {"CPU": 16, "GPU": 2}, {"CPU": 3, "GPU": 1}) == 2  # the GPUs run out first
    assert concurrent_trials(sweep, {"CPU": 16}, {"CPU": 5}) == 3
    assert concurrent_trials(sweep, {"CPU": 0.9}, {"CPU": 0.3}) == 3  # no float rounding down
    assert concurrent_trials(sweep, {"CPU": 16}, {"CPU": 1, "GPU": 1}) == 1  # no GPU: still one trial (Tune waits)
    capped = SweepSpec.model_validate({"space": TMIN, "max_concurrent": 5})
    assert concurrent_trials(capped, {"CPU": 1}, {"CPU": 4}) == 5


def test_apply_config_sets_nested_values_on_a_copy():
    raw = {"name": "x", "train": {"epochs": 3, "optimizer": {"lr": 0.1}}}
    config = {"train.optimizer.lr": np.float64(0.01), "rbnn.rotation_update": np.int64(5), "train.lr_schedule.type": "step"}
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
