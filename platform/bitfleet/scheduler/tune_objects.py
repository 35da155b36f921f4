"""The Ray Tune objects of a `sweep:` section: search-space domains, schedulers with their options, seeded
searchers, TuneConfig, how many trials run at once and how many checkpoints each keeps. No Ray runtime:
they are plain objects until `scheduler.sweep`'s Tuner runs them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2

from bitfleet.sweeps import TIME_ATTR, Asha, Distribution, Pb2, Pbt, SweepSpec


def kept_checkpoints(sweep: SweepSpec, checkpoint_every: int) -> int:
    """How many of a trial's Tune checkpoints are kept. Other schedulers resume a trial from its latest only.
    PBT/PB2 clone a donor's checkpoint of the donor's last perturbation epoch, which the donor (reporting
    one every `checkpoint_every` epochs) may have outgrown by up to interval / every checkpoints before its
    next perturbation points at a newer one: keep those, the one they point at, and one more for the trial
    that has just cloned it and loads it while the donor runs on."""
    if isinstance(sweep.scheduler, (Pbt, Pb2)):
        return sweep.scheduler.perturbation_interval // checkpoint_every + 2
    return 2


def concurrent_trials(sweep: SweepSpec, available: Mapping[str, float], per_trial: Mapping[str, float]) -> int:
    """`max_concurrent` as written, else how many trials the cluster's resources fit (at least one).

    `available`: e.g. `ray.cluster_resources()`; `per_trial`: what one trial takes (its workers' CPUs, GPUs
    and custom resources, plus its driver's)."""
    if sweep.max_concurrent:
        return sweep.max_concurrent
    fits = [int(available.get(name, 0) / amount + 1e-9) for name, amount in per_trial.items() if amount > 0]
    return max(1, min(fits, default=1))


def param_space(sweep: SweepSpec) -> dict[str, Any]:
    """Tune's `param_space`, keyed by dotted spec paths. It holds every path a trial varies: PBT mutations
    and PB2 bounds not in `space` start from their own distribution (PB2 would otherwise start from a
    bound's ends only). Under grid search, choices are enumerated like grids."""
    from ray import tune

    enumerate_choices = sweep.search.type == "grid"
    space = {path: _domain(dist, enumerate_choices) for path, dist in sweep.space.items()}
    for path, dist in getattr(sweep.scheduler, "mutations", {}).items():
        space.setdefault(path, _domain(dist))
    for path, (low, high) in getattr(sweep.scheduler, "bounds", {}).items():
        space.setdefault(path, tune.uniform(low, high))
    return space


def _domain(dist: Distribution, enumerate_choice: bool = False) -> Any:
    from ray import tune

    if dist.kind == "grid" or (dist.kind == "choice" and enumerate_choice):
        return tune.grid_search(list(dist.values))
    if dist.kind == "choice":
        return tune.choice(list(dist.values))
    return getattr(tune, dist.kind)(*dist.values)  # uniform, loguniform, randint: same names and arguments


def _mutation(dist: Distribution) -> Any:
    """PBT perturbs a list by moving to a neighbour but a domain by scaling it: choices must stay lists."""
    return list(dist.values) if dist.kind == "choice" else _domain(dist)


def scheduler(sweep: SweepSpec, max_t: int, metric: str | None = None, mode: str | None = None):
    """The TrialScheduler, in epochs (`training_iteration`). `max_t`: the spec's train.epochs, ASHA's
    max_t unless the sweep sets one. Leave metric and mode None when TuneConfig has them: Tune refuses
    a scheduler that was given them too."""
    s, common = sweep.scheduler, {"time_attr": TIME_ATTR, "metric": metric, "mode": mode}
    if isinstance(s, Asha):
        return ASHAScheduler(**common, max_t=s.max_t or max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if isinstance(s, Pbt):
        return PbtScheduler(
            **common, last_epoch=max_t, perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={path: _mutation(dist) for path, dist in s.mutations.items()},
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability, synch=s.synch)
    if isinstance(s, Pb2):
        return Pb2Scheduler(
            **common, last_epoch=max_t, perturbation_interval=s.perturbation_interval,
            hyperparam_bounds={path: list(pair) for path, pair in s.bounds.items()},
            quantile_fraction=s.quantile_fraction, synch=s.synch)
    return FIFOScheduler()


class _LastEpochLeftAlone:
    """PBT and PB2 would also perturb at a trial's last epoch: the exploited trial restarts from the donor
    with nothing left to train and ends with the donor's result under its own mutated values, values that
    never trained those weights (and a best spec that would not reproduce them). Its last epoch only ends it."""

    def __init__(self, *args, last_epoch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(TIME_ATTR, 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class PbtScheduler(_LastEpochLeftAlone, PopulationBasedTraining):
    pass


class Pb2Scheduler(_LastEpochLeftAlone, PB2):  # PB2 needs scikit-learn when built
    pass


def search_alg(sweep: SweepSpec, metric: str | None = None, mode: str | None = None,
               max_concurrent: int | None = None):
    """The search algorithm with the concurrency cap inside it: random and grid are Tune's
    BasicVariantGenerator (seeded; it takes no metric), optuna and hyperopt their searcher behind a
    ConcurrencyLimiter. TuneConfig's `max_concurrent_trials` is then redundant (Tune warns it is ignored)."""
    kind, seed = sweep.search.type, sweep.search.seed
    if kind in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=max_concurrent or 0, random_state=seed)
    if kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=metric, mode=mode, seed=seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(metric=metric, mode=mode, random_state_seed=seed)
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher


def tune_config(sweep: SweepSpec, epochs: int, max_concurrent: int | None = None):
    """`tune.TuneConfig` of the sweep: metric and mode set here once, for the scheduler and the searcher."""
    from ray import tune

    return tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                           scheduler=scheduler(sweep, max_t=epochs),
                           search_alg=search_alg(sweep, max_concurrent=max_concurrent))
