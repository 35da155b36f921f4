"""The tap_ppo spec sections: `model:` (arch) and the `tap_ppo:` options of the seed's four modes."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from bitfleet.paths import absolute_path
from bitfleet.spec import Strict


class ModelConfig(Strict):
    arch: Literal["lenet5", "alexnet", "vgg16"] = "lenet5"


class PPOSettings(Strict):
    """RLlib PPO hyper-parameters of the search (one episode = one choice per record point)."""

    lr: float = Field(3e-4, gt=0)
    train_batch_size: int = Field(128, ge=8)  # env steps per PPO iteration
    minibatch_size: int = Field(32, ge=4)
    num_epochs: int = Field(8, ge=1)  # SGD passes over each batch
    entropy_coeff: float = Field(0.01, ge=0)
    gamma: float = Field(1.0, gt=0, le=1)  # the reward comes at the episode's end: no discounting


class Options(Strict):
    stage: Literal["float", "qat"] = "float"  # training stages: --mode train_float | train_qat (from init_from)
    calibration_images: int = Field(512, ge=16)  # held out of training: histograms and the PPO reward
    calibration_batch: int = Field(256, ge=1)
    episodes: int = Field(1000, ge=1)  # --episodes
    checkpoint_every: int = Field(1, ge=1)  # PPO iterations between checkpoints: a killed search continues
    breakpoint_bins: int = Field(16, ge=3)  # b1, b2 are picked from this many positions in (0, tmax)
    attention_weight: float = Field(1.0, ge=0)  # reward: - weight x attention-transfer distance (0..2)
    cost_weight: float = Field(0.05, ge=0)  # reward: + weight x saved fraction of output levels
    attention_layers: list[str] | None = None  # default: the model's (LeNet-5: conv2, fc1)
    # the record points TAP approximates, the seed's LENET5_LAYERS list; None: every one (LeNet-5: conv1, conv2,
    # fc1, fc2 — the seed's list; ["conv1", "conv2"] approximates the convolutions only, its FAQ's variant)
    layers: list[str] | None = Field(None, min_length=1)
    result_file: str | None = None  # --result-file: the ppo stage's best codes (None: <arch>_ppo_result.json)
    config_path: str | None = None  # --config-path: the codes the eval stage applies (None: the ppo stage's)
    ppo: PPOSettings = PPOSettings()

    _config_path_absolute = field_validator("config_path")(absolute_path)

    @field_validator("result_file")
    @classmethod
    def _file_name(cls, value):
        if value is not None and (Path(value).name != value or not value.endswith(".json")):
            raise ValueError(f"a .json file name, written in the ppo stage's folder (got {value!r})")
        return value

    def result_name(self, arch: str) -> str:
        return self.result_file or f"{arch}_ppo_result.json"
