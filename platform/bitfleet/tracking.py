"""Experiment tracking of a run, fed by the events its workers send the driver (engine/events.py).

TensorBoard, by default: event files in `<run>/tensorboard/` with each epoch's metrics at the epoch (every
split's objective metrics, lr, images/s, the workload's telemetry: flip ratio, temperatures, alive
ratios), the progress of every `train.print_freq` steps at the global step (`step/loss`, `step/lr`,
`step/images_per_s`, `step/data_wait`) and the histograms a workload offers. Runs in object storage get
their event files written locally and copied there after every epoch. MLflow, when the spec asks
(`tracking: {mlflow: {uri: ...}}`): one MLflow run per bitfleet run, the resolved spec as its params, the
same metrics; a rerun of the run continues the same MLflow run (its id is kept in `<run>/mlflow.json`).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from bitfleet import storage
from bitfleet.dotted import leaves
from bitfleet.spec import TrackingSpec

log = logging.getLogger(__name__)
MLFLOW_FILE = "mlflow.json"
STEP_KEYS = ("loss", "lr", "images_per_s", "data_wait")


class Tracker:
    """The trackers of one run, written from the driver."""

    def __init__(self, tracking: TrackingSpec, run_path: str, name: str):
        self.run_path, self.name = run_path, name
        self.tensorboard = _TensorBoard(run_path) if tracking.tensorboard else None
        self.mlflow = _MLflow(tracking.mlflow, run_path, name) if tracking.mlflow else None

    def progress(self, event: dict) -> None:
        scalars = {f"step/{key}": event[key] for key in STEP_KEYS}
        self._scalars(scalars, event["global_step"])

    def epoch(self, event: dict) -> None:
        metrics = event["metrics"]
        scalars = {key: value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}
        self._scalars(scalars, metrics["epoch"])
        if self.tensorboard is not None:
            for tag, values in event.get("histograms", {}).items():
                self.tensorboard.writer.add_histogram(tag, np.asarray(values), metrics["epoch"])
            self.tensorboard.flush()

    def close(self, status: str = "FINISHED") -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close(status)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.writer.add_scalar(tag, value, step)
        if self.mlflow is not None:
            self.mlflow.log(scalars, step)


class _TensorBoard:
    def __init__(self, run_path: str):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_path, "tensorboard") if storage.is_uri(run_path) else None
        self.local = Path(tempfile.mkdtemp(prefix="bitfleet-tb-")) if self.remote else Path(run_path) / "tensorboard"
        self.writer = SummaryWriter(str(self.local))

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:  # an object store: the event files as they are now
            for path in self.local.iterdir():
                storage.write_bytes(storage.join(self.remote, path.name), path.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _MLflow:
    def __init__(self, config, run_path: str, name: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=config.uri)
        experiment_name = config.experiment or name
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        record = storage.join(run_path, MLFLOW_FILE)
        earlier = json.loads(storage.read_text(record)) if storage.exists(record) else {}
        if earlier.get("uri") == config.uri and earlier.get("experiment_id") == experiment_id:
            self.run_id = earlier["run_id"]  # a rerun of the run: the same MLflow run goes on
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        storage.write_text(record, json.dumps({"uri": config.uri, "experiment_id": experiment_id,
                                               "run_id": self.run_id}))
        self._log_params(run_path)

    def _log_params(self, run_path: str) -> None:
        """The run's resolved spec, flat by dotted path (config.json, which the driver wrote first)."""
        from mlflow.entities import Param

        spec = json.loads(storage.read_text(storage.join(run_path, "config.json")))["spec"]
        params = [Param(path, str(value)[:500]) for path, value in leaves(spec)]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in scalars.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
