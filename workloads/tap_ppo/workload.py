"""Workload `tap_ppo`: float -> INT8 QAT -> PPO search of per-layer tri-segment approximation (TAP) -> INT8
eval, the seed's four modes as the four stages of one pipeline spec.

The training stages are ordinary bitfleet runs: `tap_ppo.stage: float` trains the float network,
`tap_ppo.stage: qat` fine-tunes its QAT copy (`torch.ao.quantization`) from the float stage's weights
(`init_from`) and, at its end, converts it to INT8 and records histograms and tmax. The `ppo` and `eval`
stages are this workload's tasks.
"""
from __future__ import annotations

import copy
from pathlib import Path

from bitfleet.errors import SpecError
from bitfleet.metrics import Metric
from bitfleet.workload import Workload
from workloads.tap_ppo import int8, models, quant, search
from workloads.tap_ppo.config import ModelConfig, Options


class TapPPO(Workload):
    name = "tap_ppo"
    ModelConfig = ModelConfig
    Options = Options
    datasets = ("cifar10", "cifar100")  # 3x32x32: the seed's networks are CIFAR variants
    metrics = (  # the qat stage's last epoch: calibration accuracy of the fake-quantized and the INT8 network
        Metric("bitfleet_qat_fakequant_calib_accuracy", "gauge", "TAP: calibration accuracy with fake quantization",
               key="qat/fakequant_calib_acc"),
        Metric("bitfleet_qat_int8_calib_accuracy", "gauge", "TAP: calibration accuracy of the INT8 network",
               key="qat/int8_calib_acc"),
    )

    def validate(self, spec):
        super().validate(spec)
        options, arch = spec.options, spec.model.arch
        if spec.data.val_size < 16:
            raise SpecError("data.val_size: tap_ppo holds a calibration split out of training (histograms, the "
                            "PPO reward); set it, e.g. 1000")
        if options.stage == "qat" and not spec.train.init_from and not spec.stages:
            raise SpecError("tap_ppo.stage: qat starts from the float stage's weights; set train.init_from "
                            "(in a pipeline: the stage's `init_from: float`)")
        points = models.ARCHS[arch].record_points
        for field in ("attention_layers", "layers"):
            unknown = [name for name in getattr(options, field) or [] if name not in points]
            if unknown:
                raise SpecError(f"tap_ppo.{field}: {unknown[0]!r} is not a record point of {arch} "
                                f"({', '.join(points)})")
        if options.config_path and not Path(options.config_path).is_file():
            raise SpecError(f"tap_ppo.config_path: {options.config_path} is not a file (a ppo stage's "
                            f"{options.result_name(arch)})")

    @property
    def qat(self) -> bool:
        return self.options.stage == "qat"

    def build_model(self, config: ModelConfig, data):
        self.arch = config.arch  # the float network whose weights `load_initial_weights` may receive
        model = models.build(config.arch, data.num_classes, data.in_channels)
        return quant.prepare_qat(model) if self.qat else model

    def load_initial_weights(self, model, weights):
        if self.qat:  # float weights: load them into the float network, then make its QAT copy
            weights = quant.qat_from_float(self.arch, weights).state_dict()
        model.load_state_dict(weights)

    def eval_model(self, model):
        """The QAT stage deploys its network as INT8 (what the PPO and eval stages take as their teacher):
        `bitfleet eval` measures that, on the CPU, with the checkpoint's observer ranges."""
        if not self.qat:
            return model
        return quant.convert_int8(quant.freeze(copy.deepcopy(model).cpu()))

    def callbacks(self, run):
        return [int8.Int8Snapshot(run.data, Path(run.run_path), self.options.calibration_batch)] if self.qat else []

    def tasks(self):
        return {"ppo": search.run_search, "eval": int8.evaluate}
