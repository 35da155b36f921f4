"""Workload `rbnn`: Rotated Binary Neural Networks (Lin et al., NeurIPS 2020): 1-bit weights and activations
with bi-rotation and the training-aware sign approximation; mixup, a BN-only final stage and ReActNet's
distributional loss from a real-valued teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfleet import registry
from bitfleet.data import info
from bitfleet.engine import checkpoint
from bitfleet.engine.batchnorm import BNRecalibration
from bitfleet.spec import RunSpec, SpecError, existing_checkpoint
from bitfleet.workload import Workload
from workloads.rbnn import callbacks as cb
from workloads.rbnn import models
from workloads.rbnn.config import ModelConfig, Options, Teacher


class RBNN(Workload):
    name = "rbnn"
    ModelConfig = ModelConfig
    Options = Options

    def validate(self, spec):
        super().validate(spec)
        teacher = self.options(spec).teacher
        if teacher is not None:
            if teacher.workload == self.name:
                raise SpecError("rbnn.teacher.workload: the teacher is a real-valued network of another workload (e.g. resnet_cifar)")
            _teacher_workload(teacher).model_config(_teacher_spec(spec, teacher))
            existing_checkpoint(teacher.checkpoint, "rbnn.teacher.checkpoint")

    def prepare(self, spec):
        options = self.options(spec)
        self.mixup = options.mixup
        self.teacher = _load_teacher(spec, options.teacher) if options.teacher else None

    def build_model(self, config: ModelConfig, data):
        return models.build(config.arch, data.num_classes, data.in_channels, data.image_size, a32=config.a32, w32=config.w32)

    def callbacks(self, spec):
        options = self.options(spec)
        bn_only_from = spec.train.epochs - options.bn_only_epochs
        return [
            cb.Temperature(options.tmin, options.tmax),
            cb.Rotation(options.rotation_update, options.rotation_iterations, options.svd_device, bn_only_from),
            cb.BNOnly(bn_only_from),
            cb.Telemetry(options.weight_hist, spec.run_path),
            BNRecalibration(options.bn_recalibration_batches),
        ]

    def train_step(self, model, images, labels, criterion):
        if self.mixup:
            lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            order = torch.randperm(len(images), device=images.device)
            images = lam * images + (1 - lam) * images[order]
        logits = model(images)
        if self.teacher is not None:
            return self._distributional_loss(logits, images), logits
        if self.mixup:
            return lam * criterion(logits, labels) + (1 - lam) * criterion(logits, labels[order]), logits
        return criterion(logits, labels), logits

    def _distributional_loss(self, logits, images):
        """KL(p_teacher ‖ p_student) over the batch (ReActNet: the teacher's distribution is the only target)."""
        self.teacher.to(images.device)
        with torch.no_grad():
            target = F.softmax(self.teacher(images).float(), 1)
        return F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")


def _teacher_workload(teacher: Teacher):
    return registry.get(teacher.workload)


def _teacher_spec(spec: RunSpec, teacher: Teacher) -> RunSpec:
    """The student's spec with the teacher's workload and model section: what that workload parses."""
    return spec.model_copy(update={"workload": teacher.workload, "model": teacher.model})


def _load_teacher(spec: RunSpec, teacher: Teacher) -> torch.nn.Module:
    workload = _teacher_workload(teacher)
    model = workload.build_model(workload.model_config(_teacher_spec(spec, teacher)), info(spec.data))
    model.load_state_dict(checkpoint.weights(checkpoint.find(teacher.checkpoint)))
    return model.eval().requires_grad_(False)
