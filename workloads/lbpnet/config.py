"""The lbpnet spec sections, with the names and defaults of the seed's preset `paper_mnist_rp_full60k`.

`model:` holds the network (`lbp_layer`, `blocks`, `rp_config`, `rp_layer`, `head`); the top-level
`lbpnet:` section holds the training schedules and guards (`Options`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from bitfleet.schedules import ScheduleSpec
from bitfleet.spec import Strict


class LBPLayerConfig(Strict):
    num_patterns: int = Field(2, ge=1)
    num_points: int = Field(8, ge=1)
    window: int = Field(3, ge=3)
    share_across_channels: bool = True
    alpha_init: float = Field(0.2, gt=0)
    learn_alpha: bool = True
    offset_init_std: float = Field(0.8, ge=0)
    surrogate: Literal["ste", "tanh"] = "tanh"  # gradient of the hard comparison
    soft_forward: bool = False  # relaxed comparisons in the forward pass until the hard fine-tune

    @model_validator(mode="after")
    def _odd_window(self):
        if self.window % 2 == 0:
            raise ValueError(f"window: must be odd, the window is centred on the pivot pixel (got {self.window})")
        return self


class BlocksConfig(Strict):
    stages: int = Field(3, ge=1)
    channels_per_stage: list[int] = [39, 40, 80]
    downsample_at: list[int] = [1, 2]  # stage indices (0-based) followed by a 2x2 pooling
    fusion_type: Literal["rp_paper", "conv1x1"] = "rp_paper"
    block: Literal["residual", "macfree", "conv"] = "residual"  # seed's network, paper's MAC-free block, float CNN

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.channels_per_stage) != self.stages:
            raise ValueError(f"channels_per_stage: expected {self.stages} widths, one per stage "
                             f"(got {self.channels_per_stage})")
        bad = [s for s in self.downsample_at if not 0 <= s < self.stages]
        if bad:
            raise ValueError(f"downsample_at: stage indices must be in [0, {self.stages - 1}] (got {bad})")
        return self


class RPConfig(Strict):
    n_bits_per_out: int = Field(8, ge=1)  # seed 001 since its 2025-09-08 update (4 before)
    seed: int = 42
    threshold: int | None = Field(None, ge=1)  # None: ceil(n_bits_per_out / 2)
    tau: float = Field(3.0, gt=0)  # gate STE scale (its inverse); the forward gate is always hard
    use_ste: bool = True  # False: gates keep their initial state
    soft_forward: bool = False  # relaxed gates in the forward pass until the hard fine-tune

    @model_validator(mode="after")
    def _threshold_in_range(self):
        if self.threshold is not None and self.threshold > self.n_bits_per_out:
            raise ValueError(f"threshold: at most n_bits_per_out={self.n_bits_per_out} (got {self.threshold})")
        return self


class RPLayerConfig(Strict):
    gate_logits_init: float = 0.3


class HeadConfig(Strict):
    pool: Literal["gap", "flatten"] = "gap"  # gap: the seed's global average pool; flatten: keep the final map
    hidden: int = Field(256, ge=1)
    dropout_rate: float = Field(0.0, ge=0, lt=1)
    use_bn: bool = True


class ModelConfig(Strict):
    lbp_layer: LBPLayerConfig = LBPLayerConfig()
    blocks: BlocksConfig = BlocksConfig()
    rp_config: RPConfig = RPConfig()
    rp_layer: RPLayerConfig = RPLayerConfig()
    head: HeadConfig = HeadConfig()


# ---------------------------------------------------------------------------------------- lbpnet: section


class TempSchedule(Strict):
    """alpha: LBP comparison temperature (STE scale 1/alpha); tau: gate STE temperature."""

    alpha: ScheduleSpec | None = ScheduleSpec(type="cosine", start=1.5, end=0.10)
    tau: ScheduleSpec | None = ScheduleSpec(type="cosine", start=3.0, end=0.90)


class FreezeSchedule(Strict):
    freeze_offsets_epochs: int = Field(8, ge=0)  # offsets and alpha
    freeze_gates_extra_epochs: int = Field(4, ge=0)  # gates stay frozen this much longer
    freeze_gate_epochs: int | None = Field(None, ge=0)  # when set, the gates' total instead

    @property
    def gate_epochs(self) -> int:
        if self.freeze_gate_epochs is not None:
            return self.freeze_gate_epochs
        return self.freeze_offsets_epochs + self.freeze_gates_extra_epochs


class Stability(Strict):
    """Collapse guard: accuracy fell by `acc_drop_thr` (fraction) below the best of the last `window`
    epochs while more than `alive_upper` of the gates are open -> restore the best weights, raise alpha
    by `soften_factor` and hold it for `soften_epochs`."""

    collapse_guard: bool = True
    window: int = Field(5, ge=1)
    acc_drop_thr: float = Field(0.05, gt=0, le=1)
    alive_upper: float = Field(0.26, ge=0, le=1)
    soften_factor: float = Field(2.0, ge=1)
    soften_epochs: int = Field(2, ge=0)


class HardFinetune(Strict):
    enable: bool = True
    start_epoch: int = Field(260, ge=0)
    lr_mult: float = Field(0.1, gt=0)
    hard_forward_bits: bool = True  # sampling positions rounded in training too
    hard_forward_gates: bool = True  # gates are hard in every forward pass; kept for the seed's name
    bn_mode: Literal["track", "frozen"] = "track"
    bn_recal_batches: int = Field(200, ge=0)  # BN statistics re-estimated on the hard path before evaluation
    # when: during the hard fine-tune (and before the final evaluation), or before every evaluation —
    # needed when an EMA is evaluated, since averaged BN statistics do not match the averaged weights
    bn_recal: Literal["hard_finetune", "every_eval"] = "hard_finetune"


class AliveRatioReg(Strict):
    enable: bool = True
    target: float = Field(0.5, ge=0, le=1)
    weight: float = Field(1e-3, ge=0)


class GateMargin(Strict):
    enable: bool = True
    margin: float = Field(1.0, ge=0)
    weight: float = Field(1e-3, ge=0)


class OffsetReg(Strict):
    enable: bool = True
    weight: float = Field(1e-4, ge=0)
    target_radius: float | None = None  # None: pull offsets towards the pivot


class Options(Strict):
    temp_schedule: TempSchedule = TempSchedule()
    freeze_schedule: FreezeSchedule = FreezeSchedule()
    stability: Stability = Stability()
    hard_finetune: HardFinetune = HardFinetune()
    alive_ratio_reg: AliveRatioReg = AliveRatioReg()
    gate_margin: GateMargin = GateMargin()
    offset_reg: OffsetReg = OffsetReg()
