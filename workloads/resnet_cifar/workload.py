"""Workload `resnet_cifar`: He et al. 2016 on CIFAR-10, plain-n vs ResNet-n, shortcut A or B."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from bitfleet.workload import Workload
from workloads.resnet_cifar import models

Arch = Literal[tuple(models.ARCHS)]  # type: ignore[valid-type]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Arch = "resnet20"
    shortcut: Literal["A", "B"] = "A"


class ResNetCifar(Workload):
    name = "resnet_cifar"
    ModelConfig = ModelConfig

    def build_model(self, config: ModelConfig, data):
        return models.build(config.arch, config.shortcut, num_classes=data.num_classes, in_channels=data.in_channels)
