"""A run's identity: the fields of its resolved spec that decide its result. Two runs with the same digest
may share checkpoints (a rerun continues, a checkpoint's manifest records it); any other change is another run
(`bitfleet.resolve.check_existing_run` lists it)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from bitfleet.dotted import leaves
from bitfleet.spec import RunSpec

# what a rerun of a run may change without changing its result: where and how it runs, what it is compared
# with, and (larger only) its epochs; everything else makes it another run (see resolve.check_existing_run).
# compile and channels_last only change how the same model executes (its sums' order, to the last bits; the
# checkpoint's keys and layout are the same), so a run resumes with either toggled
NEUTRAL = ("name", "storage_path", "scaling", "failure", "targets", "tracking", "stages", "inputs", "trial_of",
           "sweep", "train.epochs", "train.print_freq", "train.init_from", "train.resume_from", "data.root",
           "train.compile", "train.channels_last")


def result_fields(dumped: dict[str, Any]) -> dict[str, Any]:
    """The fields of a dumped resolved spec that decide the run's result, flat by dotted path."""
    return {path: value for path, value in leaves(dumped)
            if not any(path == n or path.startswith(n + ".") for n in NEUTRAL)}


def spec_digest(spec: RunSpec) -> str:
    """SHA-256 of `result_fields`: two runs that may share checkpoints have the same digest."""
    fields = result_fields(spec.model_dump(mode="json"))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
