"""The rbnn spec sections: `model:` (arch, a32) and the `rbnn:` options, named after the seed's flags."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from bitfleet.paths import absolute_path
from bitfleet.spec import Strict
from workloads.rbnn.models import ARCHS

Arch = Literal[tuple(ARCHS)]  # type: ignore[valid-type]
PLAIN_ARCHS = ("resnet20_1w1a", "vgg_small_1w1a")  # no Bi-Real blocks


class ModelConfig(Strict):
    arch: Arch = "resnet20_1w1a"
    a32: bool = False  # w1a32: real activations (the seed's --a32)
    w32: bool = False  # w32a1: real weights, binary activations (ReActNet's first stage)
    react: bool = False  # ReActNet's RSign and RPReLU in the Bi-Real blocks

    @model_validator(mode="after")
    def _something_binary(self):
        if self.a32 and self.w32:
            raise ValueError("w32: a32 and w32 together leave nothing binary; "
                             "use the resnet_cifar workload for float nets")
        if self.react and self.arch in PLAIN_ARCHS:
            raise ValueError(f"react: ReActNet's activations sit in Bi-Real blocks, which {self.arch} has not "
                             f"(plain blocks: {', '.join(PLAIN_ARCHS)})")
        return self


class Teacher(Strict):
    """A trained real-valued network whose output distribution the student matches (ReActNet's loss): a run
    of another workload (`workload`, `model`, `checkpoint`), or a torchvision model with its published weights
    (`torchvision`, `weights`: ReActNet's ImageNet teacher is torchvision's pretrained ResNet-34)."""

    workload: str | None = None  # e.g. resnet_cifar
    model: dict = {}  # that workload's model section
    checkpoint: str | None = None  # a checkpoint folder or a run folder (its best checkpoint)
    torchvision: str | None = None  # e.g. resnet34: torchvision.models.get_model(name, weights=weights)
    weights: str | None = "DEFAULT"  # its weights enum member (fetched into the torch hub cache on first use)

    _checkpoint_absolute = field_validator("checkpoint")(absolute_path)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.torchvision is None) == (self.workload is None):
            raise ValueError("workload: name either a run of another workload (workload, model, checkpoint) or a "
                             "torchvision model (torchvision, weights)")
        if self.workload is not None and self.checkpoint is None:
            raise ValueError("checkpoint: the trained run of the teacher's workload (a checkpoint or run folder)")
        return self


class Options(Strict):
    tmin: float = Field(1e-2, gt=0)  # --Tmin: t of the sign approximation at the first epoch
    tmax: float = Field(10.0, gt=0)  # --Tmax: at the last; log-linear in between, k = max(1/t, 1); equal: constant
    rotation_update: int = Field(2, ge=0)  # --rotation_update: rotations re-fit every n epochs (0: never)
    rotation_iterations: int = Field(3, ge=1)  # alternating B/R1/R2 steps per update
    svd_device: Literal["cpu", "device"] = "cpu"  # --use_gpu: SVD on the worker's device instead of the CPU
    mixup: float = Field(0.0, ge=0)  # --mixup: Beta(alpha, alpha) mixing of each batch; 0 = off
    weight_hist: int = Field(0, ge=0)  # --weight_hist: histogram PNG and metrics every n epochs; 0 = off
    bn_only_epochs: int = Field(0, ge=0)  # the last n epochs: binary weights and scales fixed, BN trained only
    # before every evaluation, BN running statistics re-estimated on this many training batches (0 = off, the
    # paper's protocol): the MobileNets' running statistics trail the batch statistics early in a run (README,
    # "BN recalibration"); when on, the accuracy before it is reported too (uncalibrated/<split>/*)
    bn_recalibration_batches: int = Field(0, ge=0)
    teacher: Teacher | None = None  # when set, the loss is KL(teacher || student) instead of cross-entropy

    @model_validator(mode="after")
    def _range(self):
        if self.tmin > self.tmax:
            raise ValueError(f"tmin: must not exceed tmax={self.tmax} (got {self.tmin})")
        return self
