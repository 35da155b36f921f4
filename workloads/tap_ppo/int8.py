"""The INT8 side of the pipeline: what the QAT stage leaves behind, the INT8 teacher rebuilt from it, the
calibration and test batches, and the eval stage (the seed's `eval_ppo_int8`).

The QAT stage's last epoch writes, into its run folder, `qat_final.pt` (the QAT network's weights and
observer state) and `int8.json` (each record point's 256-bin histogram of output codes on the calibration
split and its tmax, and the fake-quant and INT8 accuracies there). The PPO and eval stages rebuild the
same INT8 network from `qat_final.pt`, so all three see one teacher.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bitfleet import storage
from bitfleet.data import build_datasets
from bitfleet.engine.callbacks import Callback
from bitfleet.errors import SpecError
from bitfleet.report import against_targets
from bitfleet.spec import DataSpec
from workloads.tap_ppo import models, quant
from workloads.tap_ppo.tap import TapCodes, levels, tmax_from_histogram

log = logging.getLogger("workloads.tap_ppo")

QAT_WEIGHTS, INT8_FILE, EVAL_FILE = "qat_final.pt", "int8.json", "eval.json"


def batches(dataset, batch_size: int) -> list:
    """A data set as a list of CPU batches: INT8 kernels run on the CPU, and every episode re-reads them."""
    return list(DataLoader(dataset, batch_size=batch_size, shuffle=False))


def calibration_batches(data: DataSpec, batch_size: int) -> list:
    """The `val` split: `data.val_size` images held out of training (validated to exist)."""
    return batches(build_datasets(data).val, batch_size)


def int8_network(arch: str, qat_weights: dict) -> torch.nn.Module:
    qat = quant.prepare_qat(models.build(arch))
    qat.load_state_dict(qat_weights)
    return quant.convert_int8(quant.freeze(qat))


def teacher(spec, qat_dir: str | Path) -> torch.nn.Module:
    """The INT8 network of a finished QAT stage."""
    weights = torch.load(Path(qat_dir) / QAT_WEIGHTS, map_location="cpu", weights_only=True)
    return int8_network(spec.model.arch, weights)


def snapshot(qat_model: torch.nn.Module, calibration: list, run_dir: Path) -> dict:
    """Convert a QAT network, record its histograms and tmax, and write both files of the QAT stage."""
    qat = quant.freeze(copy.deepcopy(qat_model).cpu())
    int8 = quant.convert_int8(qat)
    layers = qat_model.record_points
    hists = quant.histograms(int8, calibration, layers)
    record = {
        "record_points": layers,
        "tmax": {name: tmax_from_histogram(h) for name, h in hists.items()},
        "histograms": {name: h.tolist() for name, h in hists.items()},
        "fakequant_calib_acc": quant.accuracy(qat, calibration),
        "int8_calib_acc": quant.accuracy(int8, calibration),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(qat.state_dict(), run_dir / QAT_WEIGHTS)
    storage.write_text(str(run_dir / INT8_FILE), json.dumps(record))
    return record


class Int8Snapshot(Callback):
    """At the end of the QAT stage (rank 0): the INT8 network, its histograms and tmax (`snapshot`)."""

    def __init__(self, data: DataSpec, run_dir: Path, batch_size: int):
        self.data, self.run_dir, self.batch_size = data, run_dir, batch_size

    def on_epoch_end(self, state, metrics):
        if state.epoch < state.epochs or state.rank != 0:
            return
        record = snapshot(state.model, calibration_batches(self.data, self.batch_size), self.run_dir)
        state.metrics.update({"qat/fakequant_calib_acc": record["fakequant_calib_acc"],
                              "qat/int8_calib_acc": record["int8_calib_acc"]})


def read_codes(path: Path) -> dict[str, TapCodes]:
    layers = json.loads(Path(path).read_text())["layers"]
    return {name: TapCodes.from_dict(c) for name, c in layers.items()}


def result_path(spec) -> Path:
    """The codes the eval stage applies: `tap_ppo.config_path` (the seed's --config-path), else the result
    file of the ppo stage it needs."""
    options = spec.options
    if options.config_path:
        return Path(options.config_path)
    if "ppo" not in spec.inputs:
        raise SpecError("tap_ppo.config_path: the eval stage needs a result file: set it, or make the stage need "
                        "the ppo stage (needs: [qat, ppo])")
    return Path(spec.inputs["ppo"]) / options.result_name(spec.model.arch)


def evaluate(spec) -> dict:
    """The eval stage: INT8 teacher and TAP student accuracy on the test split, and the drop."""
    int8 = teacher(spec, spec.inputs["qat"])
    codes = read_codes(result_path(spec))
    test = batches(build_datasets(spec.data).test, spec.train.eval_batch_size)
    teacher_acc = quant.accuracy(int8, test)
    with quant.apply_tap(int8, codes):
        student_acc = quant.accuracy(int8, test)
    values = {"teacher_int8/acc": teacher_acc, "student_tap/acc": student_acc, "drop": teacher_acc - student_acc}
    result = {**values, "levels": {name: levels(c) for name, c in codes.items()},
              "targets": against_targets(values, spec.targets)}
    storage.write_text(str(spec.run_dir / EVAL_FILE), json.dumps(result, indent=1))
    log.info(f"[{spec.name}] teacher INT8 {teacher_acc:.2f}%  student TAP {student_acc:.2f}%  "
          f"drop {teacher_acc - student_acc:.2f} points")
    return result
