"""Optimizer with named parameter groups, and the learning-rate schedule, from the spec's train section."""
from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch.optim import lr_scheduler


def param_groups(model: torch.nn.Module, spec) -> list[dict]:
    """One group per `spec.param_groups` entry (first match wins), the rest in a `default` group."""
    groups = {g.name: {"name": g.name, "params": [], "lr_mult": g.lr_mult, "wd_mult": g.weight_decay_mult}
              for g in spec.param_groups}
    default = {"name": "default", "params": [], "lr_mult": 1.0, "wd_mult": 1.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((groups[g.name] for g in spec.param_groups if any(fnmatch(name, m) for m in g.match)), default)
        group["params"].append(param)
    out = []
    for group in [*groups.values(), default]:
        if group["params"]:
            lr_mult, wd_mult = group.pop("lr_mult"), group.pop("wd_mult")
            out.append({**group, "lr": spec.lr * lr_mult, "weight_decay": spec.weight_decay * wd_mult})
    return out


def build_optimizer(model: torch.nn.Module, spec) -> torch.optim.Optimizer:
    groups = param_groups(model, spec)
    if spec.type == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    cls = torch.optim.Adam if spec.type == "adam" else torch.optim.AdamW
    return cls(groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def build_lr_scheduler(optimizer, spec, epochs: int, steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """The schedule of `spec` (epochs) as a torch scheduler stepped once per optimizer step.

    Linear warmup over `warmup_epochs`, then the main schedule over the remaining steps; step and
    multistep milestones stay where the spec puts them, counted from the start of training.
    """
    warmup = round(spec.warmup_epochs * steps_per_epoch)
    total = epochs * steps_per_epoch
    if spec.type == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif spec.type in ("step", "multistep"):
        epochs_at = spec.milestones if spec.type == "multistep" else range(spec.step_size, epochs, spec.step_size)
        milestones = [m * steps_per_epoch - warmup for m in epochs_at]
        main = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=spec.gamma)
    elif spec.type == "linear":
        end = min(1.0, spec.min_lr / optimizer.defaults["lr"])
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=end, total_iters=max(1, total - warmup))
    else:
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=spec.min_lr)
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=spec.warmup_start_factor, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
