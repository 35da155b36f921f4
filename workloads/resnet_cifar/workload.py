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
    defaults = {  # seed 004's train_cifar.py: its defaults, AMP on (`--no-amp` turns it off; torch.cuda.amp: GPUs)
        "train": {"epochs": 200, "batch_size": 128, "amp": "gpu",
                  "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                  "lr_schedule": {"type": "multistep", "milestones": [100, 150], "gamma": 0.1}},
    }

    def build_model(self, config: ModelConfig, data):
        return models.build(config.arch, config.shortcut, num_classes=data.num_classes, in_channels=data.in_channels)
