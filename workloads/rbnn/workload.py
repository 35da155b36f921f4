"""Workload `rbnn`: Rotated Binary Neural Networks (Lin et al., NeurIPS 2020) on CIFAR, MNIST and ImageNet-style
data: 1-bit weights and activations with bi-rotation, the training-aware sign approximation, mixup, a BN-only
final stage."""
from __future__ import annotations

import torch

from bitfleet.data import info
from bitfleet.workload import Workload
from workloads.rbnn import callbacks as cb
from workloads.rbnn import models
from workloads.rbnn.config import ModelConfig, Options


class RBNN(Workload):
    name = "rbnn"
    ModelConfig = ModelConfig
    Options = Options

    def prepare(self, spec):
        self.mixup = self.options(spec).mixup

    def build_model(self, config: ModelConfig, data):
        return models.build(config.arch, data.num_classes, data.in_channels, data.image_size, a32=config.a32)

    def callbacks(self, spec):
        options = self.options(spec)
        bn_only_from = spec.train.epochs - options.bn_only_epochs
        return [
            cb.Temperature(options.tmin, options.tmax),
            cb.Rotation(options.rotation_update, options.rotation_iterations, options.svd_device, bn_only_from),
            cb.BNOnly(bn_only_from),
            cb.Telemetry(options.weight_hist, spec.run_dir),
        ]

    def train_step(self, model, images, labels, criterion):
        if not self.mixup:
            logits = model(images)
            return criterion(logits, labels), logits
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        order = torch.randperm(len(images), device=images.device)
        logits = model(lam * images + (1 - lam) * images[order])
        return lam * criterion(logits, labels) + (1 - lam) * criterion(logits, labels[order]), logits
