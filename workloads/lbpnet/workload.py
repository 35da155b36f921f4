"""Workload `lbpnet`: LBPNet (Lin et al., WACV 2020) on MNIST — the seed's network and the paper's MAC-free
block, RP or 1x1 fusion, with the seed's temperature, freeze, hard fine-tune and stability schedules."""
from __future__ import annotations

from pathlib import Path

import torch

from bitfleet.data import info
from bitfleet.spec import SpecError
from bitfleet.workload import Workload
from workloads.lbpnet import callbacks as cb
from workloads.lbpnet.config import ModelConfig, Options
from workloads.lbpnet.models import LBPNet, lbp_layers, rp_layers


class LBPNetWorkload(Workload):
    name = "lbpnet"
    ModelConfig = ModelConfig
    Options = Options

    def validate(self, spec):
        super().validate(spec)
        config = self.model_config(spec)
        if config.blocks.block == "conv" and config.blocks.fusion_type != "rp_paper":
            raise SpecError("model.blocks.fusion_type: the float `conv` baseline has no fusion; leave it at rp_paper")

    def prepare(self, spec):
        self.loss_options = self.options(spec)  # the regularisers of `train_step`

    def build_model(self, config: ModelConfig, data):
        return LBPNet(config, data.in_channels, data.num_classes, data.image_size)

    def callbacks(self, spec):
        options = self.options(spec)

        temperatures = cb.Temperatures(options.temp_schedule)
        freeze = cb.Freeze(options.freeze_schedule)
        hard = cb.HardFinetune(options.hard_finetune)
        out = [temperatures, freeze, hard, cb.BNRecalibration(options.hard_finetune.bn_recal_batches, options.hard_finetune.bn_recal == "every_eval", hard)]
        if options.stability.collapse_guard:
            out.append(cb.CollapseGuard(options.stability, temperatures, freeze))
        out.append(cb.Telemetry(info(spec.data).image_size))
        return out

    def train_step(self, model, images, labels, criterion):
        logits = model(images)
        return criterion(logits, labels) + regularisation(getattr(model, "module", model), self.loss_options), logits

    def export(self, model, config: ModelConfig, data, path: Path) -> dict:
        from workloads.lbpnet import intengine

        return intengine.export(model, data, path)


def regularisation(model, options: Options) -> torch.Tensor:
    """Offset radius, alive-ratio target and gate margin penalties, weighted as the spec says."""
    total = torch.zeros((), device=next(model.parameters()).device)
    lbps, rps = lbp_layers(model), rp_layers(model)
    if options.offset_reg.enable and lbps:
        penalty = sum(layer.offset_penalty(options.offset_reg.target_radius) for layer in lbps) / len(lbps)
        total = total + options.offset_reg.weight * penalty
    if rps:
        logits = torch.cat([layer.gate_logits for layer in rps])
        if options.alive_ratio_reg.enable:
            taus = torch.cat([layer.tau.expand(layer.out_channels) for layer in rps])
            alive = torch.sigmoid(logits / taus).mean()
            total = total + options.alive_ratio_reg.weight * (alive - options.alive_ratio_reg.target).square()
        if options.gate_margin.enable:
            margin = torch.relu(options.gate_margin.margin - logits.abs()).mean()
            total = total + options.gate_margin.weight * margin
    return total
