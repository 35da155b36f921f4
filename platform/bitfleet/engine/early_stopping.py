"""Early stopping (`train.early_stopping`): the run ends once its metric has not improved by more than
`min_delta` for `patience` epochs in a row.

The decision is a function of the run's metric history alone, which every rank holds identically (the
metrics are all-reduced) and every checkpoint carries: each rank stops after the same epoch, that epoch's
checkpoint is written, and a restored or rerun run decides the same again — one that had stopped ends at
once, having trained nothing more. Without a held-out split the default metric is the test split's, as
for checkpoint ranking (the seeds monitor what they have).
"""
from __future__ import annotations

from bitfleet.spec import EarlyStoppingSpec


class EarlyStopping:
    def __init__(self, spec: EarlyStoppingSpec, metric: str, mode: str):
        self.patience, self.min_delta, self.metric, self.mode = spec.patience, spec.min_delta, metric, mode

    def reason(self, history: list[dict]) -> str | None:
        """Why the run stops after the last epoch of `history`, or None while it goes on."""
        values = [(m["epoch"], m[self.metric]) for m in history if self.metric in m]
        best_epoch, best, waited = None, None, 0
        for epoch, value in values:
            if best is None or (value - best if self.mode == "max" else best - value) > self.min_delta:
                best_epoch, best, waited = epoch, value, 0
            else:
                waited += 1
        if best is None or waited < self.patience:
            return None
        return (f"early stopping: {self.metric} has not improved by more than {self.min_delta:g} for {waited} "
                f"epochs (best {best:.4g} at epoch {best_epoch})")


def build(spec: EarlyStoppingSpec | None, checkpoint_score: tuple[str, str] | None,
          modes: dict[str, str]) -> EarlyStopping | None:
    """`spec`'s metric (else the one that ranks the checkpoints) and mode (else that metric's direction)."""
    if spec is None:
        return None
    assert checkpoint_score is not None, "the scheduler hands every run its checkpoint metric"
    metric = spec.metric or checkpoint_score[0]
    mode = spec.mode or (checkpoint_score[1] if metric == checkpoint_score[0] else modes[metric.rsplit("/", 1)[1]])
    return EarlyStopping(spec, metric, mode)
