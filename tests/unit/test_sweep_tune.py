"""The Ray Tune objects of a `sweep:` section: search-space domains, schedulers with their options, seeded
searchers, TuneConfig, concurrency. No Ray runtime: they are plain objects until a Tuner runs them."""
from __future__ import annotations

import numpy as np
import pytest

from bitfleet.scheduler.tune_objects import (
    concurrent_trials,
    kept_checkpoints,
    param_space,
    scheduler,
    search_alg,
    tune_config,
)
from bitfleet.sweeps import SweepSpec
from tests.unit.test_sweeps import PB2, PBT, TMIN


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
    assert param_space(sweep) == {"rbnn.rotation_update": {"grid_search": [1, 2]},
                                  "train.batch_size": {"grid_search": [64]}}


def test_param_space_starts_pbt_and_pb2_paths_from_their_distributions():
    from ray.tune.search.sample import Categorical, Float

    pbt = param_space(SweepSpec.model_validate({"space": TMIN, "scheduler": {
        **PBT, "mutations": {"rbnn.tmin": {"uniform": [0.5, 0.6]}, "train.optimizer.lr": [0.1, 0.01]}}}))
    assert pbt["rbnn.tmin"].lower == 1e-3  # the space's own distribution wins
    assert isinstance(pbt["train.optimizer.lr"], Categorical) and pbt["train.optimizer.lr"].categories == [0.1, 0.01]
    pb2 = param_space(SweepSpec.model_validate({"scheduler": PB2}))
    assert (isinstance(pb2["train.optimizer.lr"], Float)
            and (pb2["train.optimizer.lr"].lower, pb2["train.optimizer.lr"].upper) == (0.001, 0.1))


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
    assert isinstance(pbt, PopulationBasedTraining) and pbt.last_epoch == 10
    assert (pbt._time_attr, pbt._perturbation_interval, pbt._quantile_fraction) == ("training_iteration", 2, 0.5)
    assert pbt._hyperparam_mutations["train.optimizer.lr"] == [0.1, 0.01]  # a list: PBT shifts to a neighbour
    assert isinstance(pbt._hyperparam_mutations["rbnn.tmin"], Float)
    assert pbt._resample_probability == 0.25 and pbt._metric is None  # metric and mode come from TuneConfig
    assert not pbt._synch
    assert scheduler(SweepSpec.model_validate({"scheduler": {**PBT, "synch": True}}), max_t=10)._synch
    named = scheduler(SweepSpec.model_validate({"scheduler": PBT}), max_t=10, metric="val/loss", mode="min")
    assert (named._metric, named._mode) == ("val/loss", "min")

    pb2 = scheduler(SweepSpec.model_validate({"scheduler": PB2}), max_t=10)
    assert isinstance(pb2, PB2Scheduler)
    assert (pb2._time_attr, pb2._perturbation_interval) == ("training_iteration", 2)
    assert pb2._hyperparam_bounds == {"train.optimizer.lr": [0.001, 0.1]}
    assert scheduler(SweepSpec.model_validate({"scheduler": {**PB2, "synch": True}}), max_t=10)._synch


class OnePopulation:
    """What PBT asks of Tune's controller, for a population of the given trials."""

    search_alg = None

    def __init__(self, *trials):
        self.trials = list(trials)

    def get_trials(self):
        return self.trials


@pytest.mark.parametrize("raw", [PBT, PB2], ids=["pbt", "pb2"])
def test_population_based_schedulers_perturb_at_every_interval_but_the_last_epoch(raw):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    pbt = scheduler(SweepSpec.model_validate({"scheduler": raw}), max_t=4, metric="test/acc", mode="max")
    trial = Trial("run_trial", config={"train.optimizer.lr": 0.1}, stub=True)
    trial.set_status(Trial.RUNNING)
    pbt.on_trial_add(OnePopulation(trial), trial)
    state = pbt._trial_state[trial]
    assert pbt.on_trial_result(OnePopulation(trial), trial, {"training_iteration": 2, "test/acc": 5.0}) \
        == TrialScheduler.CONTINUE
    assert (state.last_perturbation_time, state.last_score) == (2, 5.0)  # a perturbation epoch: ranked
    assert pbt.on_trial_result(OnePopulation(trial), trial, {"training_iteration": 4, "test/acc": 9.0}) \
        == TrialScheduler.CONTINUE
    assert (state.last_perturbation_time, state.last_score) == (2, 5.0)  # the last one: left alone


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
    raw = {"space": {"rbnn.rotation_update": {"choice": [1, 2]}, "train.batch_size": {"grid": [64, 128]}},
           "search": "grid"}
    once = trial_configs(SweepSpec.model_validate(raw))
    assert (sorted((c["rbnn.rotation_update"], c["train.batch_size"]) for c in once)
            == [(1, 64), (1, 128), (2, 64), (2, 128)])
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




def test_kept_checkpoints_cover_a_donor_up_to_one_perturbation_interval_old():
    assert kept_checkpoints(SweepSpec.model_validate({"space": TMIN}), checkpoint_every=1) == 2  # latest only
    pbt = SweepSpec.model_validate({"space": TMIN, "scheduler": {**PBT, "perturbation_interval": 6}})
    assert kept_checkpoints(pbt, checkpoint_every=1) == 8
    assert kept_checkpoints(pbt, checkpoint_every=3) == 4  # 2 checkpoints an interval, the donor's, one spare
    pb2 = SweepSpec.model_validate({"space": TMIN, "scheduler": PB2})
    assert kept_checkpoints(pb2, checkpoint_every=2) == 3
