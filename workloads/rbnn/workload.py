"""Workload `rbnn`: Rotated Binary Neural Networks (Lin et al., NeurIPS 2020): 1-bit weights and activations
with bi-rotation and the training-aware sign approximation; mixup, a BN-only final stage and ReActNet's
distributional loss from a real-valued teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfleet import registry
from bitfleet.data import DataInfo
from bitfleet.data import info as data_info
from bitfleet.engine import checkpoint, objective
from bitfleet.engine.batchnorm import BNRecalibration
from bitfleet.errors import SpecError, spec_warning
from bitfleet.metrics import Metric
from bitfleet.resolve import existing_checkpoint
from bitfleet.workload import Workload, parse_section
from workloads.rbnn import callbacks as cb
from workloads.rbnn import models
from workloads.rbnn.config import ModelConfig, Options, Teacher

METRICS = (  # what the callbacks report each epoch
    Metric("bitfleet_temperature", "gauge", "RBNN: temperature t of the sign approximation", key="rbnn/t"),
    Metric("bitfleet_temperature_k", "gauge", "RBNN: the approximation's k = max(1/t, 1)", key="rbnn/k"),
    Metric("bitfleet_sign_flip_ratio", "gauge", "RBNN: share of binary weights whose sign flipped in the epoch",
           key="rbnn/flip_ratio"),
    Metric("bitfleet_rotation_sin_theta", "gauge", "RBNN: mean |sin theta| of the adjustable rotation",
           key="rbnn/sin_theta"),
    Metric("bitfleet_rotation_error_before", "gauge",
           "RBNN: quantization error ||sign(R1'XR2) - R1'XR2|| before the last rotation update",
           key="rbnn/rotation_error_before"),
    Metric("bitfleet_rotation_error_after", "gauge", "RBNN: the same error after the last rotation update",
           key="rbnn/rotation_error_after"),
    Metric("bitfleet_rotation_seconds", "gauge", "RBNN: wall time of the last rotation update",
           key="rbnn/rotation_time_s"),
    Metric("bitfleet_rbnn_bn_only", "gauge", "RBNN: 1 in the final epochs that train only BatchNorm",
           key="rbnn/bn_only"),
    Metric("bitfleet_weight_near_zero_ratio", "gauge",
           "RBNN: share of rotated, standardised weights within 0.1 of zero (histogram epochs)",
           key="rbnn/weight_near_zero"),
)


class Objective(objective.Classification):
    """Cross-entropy, top-1 and top-5 on every data set: the official code prints Prec@5 on CIFAR-10 too."""

    always_top5 = True


class RBNN(Workload):
    name = "rbnn"
    ModelConfig = ModelConfig
    Options = Options
    Objective = Objective
    metrics = METRICS
    defaults = {  # the official main.py's own defaults (seed 002), whatever the platform's are
        "train": {"epochs": 400, "batch_size": 256, "eval_batch_size": 128,  # --epochs, -b, -bt
                  "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                  "lr_schedule": {"type": "cosine", "warmup_epochs": 0}},  # --lr_type cos
        "data": {"loader_workers": 8},  # --workers
    }

    def validate(self, spec):
        super().validate(spec)
        if spec.options.bn_only_epochs > spec.train.epochs:
            spec_warning(f"rbnn.bn_only_epochs: {spec.options.bn_only_epochs} is more than train.epochs="
                         f"{spec.train.epochs}: every epoch trains BatchNorm only")
        teacher = spec.options.teacher
        if teacher is None:
            return
        if teacher.torchvision is not None:
            weights, classes = _torchvision_weights(teacher), data_info(spec.data).num_classes
            if weights is not None and len(weights.meta["categories"]) != classes:
                raise SpecError(f"rbnn.teacher.weights: {teacher.torchvision}'s {teacher.weights} predicts "
                                f"{len(weights.meta['categories'])} classes; {spec.data.dataset} has {classes}")
            return
        if teacher.workload == self.name:
            raise SpecError("rbnn.teacher.workload: the teacher is a real-valued network of another workload "
                            "(e.g. resnet_cifar)")
        _teacher_model_config(teacher)
        existing_checkpoint(teacher.checkpoint, "rbnn.teacher.checkpoint")

    def setup(self, run):
        self.teacher = _load_teacher(self.options.teacher, run.info) if self.options.teacher else None

    def build_model(self, config: ModelConfig, data):
        return models.build(config.arch, data.num_classes, data.in_channels, data.image_size, a32=config.a32,
                            w32=config.w32, react=config.react)

    def callbacks(self, run):
        options = self.options
        bn_only_from = run.epochs - options.bn_only_epochs
        return [
            cb.Temperature(options.tmin, options.tmax),
            cb.Rotation(options.rotation_update, options.rotation_iterations, options.svd_device, bn_only_from),
            cb.BNOnly(bn_only_from),
            cb.Telemetry(options.weight_hist, run.run_path),
            BNRecalibration(options.bn_recalibration_batches, report_uncalibrated=True),
        ]

    def export(self, model, config: ModelConfig, data):
        from workloads.rbnn import export

        return export.export(model, data)

    def load_engine(self, arrays, input_lut):
        from workloads.rbnn.packed import PackedRBNN

        return PackedRBNN(arrays, input_lut)

    def train_step(self, model, images, labels, loss):
        mixup = self.options.mixup
        if mixup:
            lam = float(torch.distributions.Beta(mixup, mixup).sample())
            order = torch.randperm(len(images), device=images.device)
            images = lam * images + (1 - lam) * images[order]
        logits = model(images)
        if self.teacher is not None:
            return self._distributional_loss(logits, images), logits
        if mixup:
            return lam * loss(logits, labels) + (1 - lam) * loss(logits, labels[order]), logits
        return loss(logits, labels), logits

    def _distributional_loss(self, logits, images):
        """KL(p_teacher ‖ p_student) over the batch (ReActNet: the teacher's distribution is the only target)."""
        self.teacher.to(images.device)
        with torch.no_grad():
            target = F.softmax(self.teacher(images).float(), 1)
        return F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")


def _teacher_model_config(teacher: Teacher):
    """The teacher's `model` section, typed by its own workload."""
    return parse_section(registry.workload_class(teacher.workload).ModelConfig, teacher.model, "rbnn.teacher.model")


def _torchvision_weights(teacher: Teacher):
    """The torchvision weights enum member a teacher names (None: untrained), or a SpecError naming the field."""
    import torchvision

    if teacher.torchvision not in torchvision.models.list_models():
        raise SpecError(f"rbnn.teacher.torchvision: {teacher.torchvision!r} is not a torchvision model "
                        "(torchvision.models.list_models(), e.g. resnet34)")
    if teacher.weights is None:
        return None
    try:
        return torchvision.models.get_model_weights(teacher.torchvision)[teacher.weights]
    except KeyError:
        members = ", ".join(torchvision.models.get_model_weights(teacher.torchvision).__members__)
        raise SpecError(f"rbnn.teacher.weights: {teacher.weights!r} is not one of {teacher.torchvision}'s "
                        f"weights ({members})") from None


def _load_teacher(teacher: Teacher, info: DataInfo) -> torch.nn.Module:
    if teacher.torchvision is not None:
        import torchvision

        weights = _torchvision_weights(teacher)
        model = torchvision.models.get_model(teacher.torchvision, weights=weights,
                                             **({} if weights else {"num_classes": info.num_classes}))
        return model.eval().requires_grad_(False)
    model = registry.get(teacher.workload).build_model(_teacher_model_config(teacher), info)
    with checkpoint.fetched(teacher.checkpoint) as found:  # a folder or an object-store URI
        model.load_state_dict(checkpoint.weights(found))
    return model.eval().requires_grad_(False)
