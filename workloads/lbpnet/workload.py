"""Workload `lbpnet`: LBPNet (Lin et al., WACV 2020) on MNIST — the seed's network and the paper's MAC-free
block, RP or 1x1 fusion, with the seed's temperature, freeze, hard fine-tune and stability schedules."""
from __future__ import annotations

import torch

from bitfleet.errors import SpecError
from bitfleet.metrics import Metric
from bitfleet.workload import Workload
from workloads.lbpnet import callbacks as cb
from workloads.lbpnet.config import ModelConfig, Options
from workloads.lbpnet.models import LBPNet, lbp_layers, rp_layers
from workloads.lbpnet.paper_metrics import QUANTITIES

METRICS = (  # what the callbacks report each epoch
    Metric("bitfleet_lbp_alpha", "gauge", "LBPNet: mean comparison temperature alpha", key="lbp/alpha"),
    Metric("bitfleet_rp_tau", "gauge", "LBPNet: mean gate temperature tau of the RP fusion", key="rp/tau"),
    Metric("bitfleet_gate_alive_ratio", "gauge", "LBPNet: share of RP gates open on the hard path",
           key="rp/alive_hard"),
    Metric("bitfleet_gate_alive_ratio_soft", "gauge", "LBPNet: mean soft opening of the RP gates",
           key="rp/alive_soft"),
    Metric("bitfleet_collapse_guard_events", "gauge", "LBPNet: times the collapse guard restored the best weights",
           key="guard/collapse_events"),
    Metric("bitfleet_frozen_tensors", "gauge", "LBPNet: parameter tensors held by the freeze schedule",
           key="freeze/frozen_tensors"),
    Metric("bitfleet_hard_finetune_active", "gauge", "LBPNet: 1 while the hard (integer-path) fine-tune runs",
           key="hard_finetune/active"),
    *(Metric(f"bitfleet_lbpnet_{name}", "gauge", f"LBPNet: {text} (the paper's Table 3)", key=f"paper/{name}")
      for name, text in QUANTITIES.items()),
)


class LBPNetWorkload(Workload):
    name = "lbpnet"
    ModelConfig = ModelConfig
    Options = Options
    metrics = METRICS

    def validate(self, spec):
        super().validate(spec)
        config = spec.model
        if config.blocks.block == "conv" and config.blocks.fusion_type != "rp_paper":
            raise SpecError("model.blocks.fusion_type: the float `conv` baseline has no fusion; leave it at rp_paper")

    def build_model(self, config: ModelConfig, data):
        return LBPNet(config, data.in_channels, data.num_classes, data.image_size)

    def callbacks(self, run):
        options = self.options
        temperatures = cb.Temperatures(options.temp_schedule)
        freeze = cb.Freeze(options.freeze_schedule)
        hard = cb.HardFinetune(options.hard_finetune)
        out = [temperatures, freeze, hard,
               cb.BNRecalibration(options.hard_finetune.bn_recal_batches,
                                  options.hard_finetune.bn_recal == "every_eval", hard)]
        if options.stability.collapse_guard:
            out.append(cb.CollapseGuard(options.stability, temperatures, freeze))
        out.append(cb.Telemetry(run.info.image_size))
        return out

    def train_step(self, model, images, labels, loss):
        logits = model(images)
        return loss(logits, labels) + regularisation(getattr(model, "module", model), self.options), logits

    def export(self, model, config: ModelConfig, data):
        from workloads.lbpnet import intexport

        return intexport.export(model, data)

    def load_engine(self, arrays, input_lut):
        from workloads.lbpnet.intengine import IntegerLBPNet

        return IntegerLBPNet(arrays, input_lut)


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
