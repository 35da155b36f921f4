"""LR schedules against closed-form formulas, and named parameter groups."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bitfleet.engine.optim import build_lr_scheduler, build_optimizer, param_groups
from bitfleet.spec import LRScheduleSpec, OptimizerSpec

LR = 0.1
EPOCHS, STEPS_PER_EPOCH = 4, 5


def expected_lr(step: int, s: LRScheduleSpec, lr: float, epochs: int, spe: int) -> float:
    """The lr used by optimizer step `step` (0-based), written from the spec's documented meaning."""
    warmup = round(s.warmup_epochs * spe)
    if step < warmup:  # linear from warmup_start_factor * lr to lr
        return lr * (s.warmup_start_factor + (1 - s.warmup_start_factor) * step / warmup)
    if s.type == "constant":
        return lr
    if s.type == "multistep":  # milestones in epochs counted from the start of training
        return lr * s.gamma ** sum(step >= m * spe for m in s.milestones)
    if s.type == "step":
        return lr * s.gamma ** (step // (s.step_size * spe))
    total = epochs * spe  # cosine or linear over the steps after warmup, from lr down to min_lr
    if s.type == "linear":
        return lr + (s.min_lr - lr) * (step - warmup) / (total - warmup)
    return s.min_lr + (lr - s.min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def lrs_seen(schedule: LRScheduleSpec, epochs=EPOCHS, spe=STEPS_PER_EPOCH, lr=LR, n_groups=1):
    """The lr of every param group at every optimizer step, stepping the scheduler after each."""
    layers = [nn.Linear(3, 2) for _ in range(n_groups)]
    groups = [{"params": layer.parameters(), "lr": lr * (i + 1)} for i, layer in enumerate(layers)]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    scheduler = build_lr_scheduler(opt, schedule, epochs, spe)
    seen = []
    x = torch.randn(4, 3)
    for _ in range(epochs * spe):
        seen.append([g["lr"] for g in opt.param_groups])
        loss = sum(layer(x).square().mean() for layer in layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
    return seen


SCHEDULES = {
    "multistep": dict(type="multistep", milestones=[2, 3], gamma=0.1),
    "step": dict(type="step", step_size=1, gamma=0.5),
    "cosine": dict(type="cosine", min_lr=0.01),
    "cosine-to-zero": dict(type="cosine"),
    "constant": dict(type="constant"),
    "linear": dict(type="linear", min_lr=0.001),
    "linear-to-zero": dict(type="linear"),
}
WARMUPS = {"no-warmup": 0.0, "warmup-1-epoch": 1.0, "warmup-0.4-epoch": 0.4}


@pytest.mark.parametrize("warmup", list(WARMUPS.values()), ids=list(WARMUPS))
@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_lr_at_every_step_matches_closed_form(kind, warmup):
    spec = LRScheduleSpec(**SCHEDULES[kind], warmup_epochs=warmup, warmup_start_factor=0.01)
    seen = lrs_seen(spec)
    want = [expected_lr(i, spec, LR, EPOCHS, STEPS_PER_EPOCH) for i in range(EPOCHS * STEPS_PER_EPOCH)]
    assert [g[0] for g in seen] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_reference_formula_has_the_expected_shape():
    """Guard the reference itself: a few hand-computed points."""
    s = LRScheduleSpec(type="multistep", milestones=[2, 3], gamma=0.1, warmup_epochs=1, warmup_start_factor=0.01)
    assert expected_lr(0, s, 0.1, 4, 5) == pytest.approx(0.001)
    assert expected_lr(5, s, 0.1, 4, 5) == pytest.approx(0.1)
    assert expected_lr(10, s, 0.1, 4, 5) == pytest.approx(0.01)
    assert expected_lr(19, s, 0.1, 4, 5) == pytest.approx(0.001)
    c = LRScheduleSpec(type="cosine", min_lr=0.01)
    assert expected_lr(10, c, 0.1, 4, 5) == pytest.approx(0.055)


@pytest.mark.parametrize("kind", ["multistep", "cosine"])
def test_every_param_group_follows_its_own_base_lr(kind):
    spec = LRScheduleSpec(**SCHEDULES["multistep" if kind == "multistep" else "cosine-to-zero"], warmup_epochs=1)
    for lrs in lrs_seen(spec, n_groups=2):
        assert lrs[1] == pytest.approx(2 * lrs[0], rel=1e-6)


def test_milestone_inside_warmup_still_decays():
    """A milestone reached during warmup must apply once warmup ends (the spec allows warmup_epochs > milestone)."""
    spec = LRScheduleSpec(type="multistep", milestones=[2, 3], gamma=0.1, warmup_epochs=2.4)
    seen = [g[0] for g in lrs_seen(spec)]
    want = [expected_lr(i, spec, LR, EPOCHS, STEPS_PER_EPOCH) for i in range(EPOCHS * STEPS_PER_EPOCH)]
    assert seen == pytest.approx(want, rel=1e-6)


def test_scheduler_state_dict_resumes_the_schedule():
    spec = LRScheduleSpec(type="cosine", min_lr=0.01, warmup_epochs=1)
    full = lrs_seen(spec)

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = build_lr_scheduler(opt, spec, EPOCHS, STEPS_PER_EPOCH)
    for _ in range(7):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()

    opt2 = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=LR)
    sched2 = build_lr_scheduler(opt2, spec, EPOCHS, STEPS_PER_EPOCH)
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)
    rest = []
    for _ in range(7, EPOCHS * STEPS_PER_EPOCH):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx([g[0] for g in full[7:]], rel=1e-6)


# --------------------------------------------------------------------------- parameter groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_by_glob():
    model = Net()
    spec = OptimizerSpec(lr=0.2, weight_decay=1e-3, param_groups=[
        {"name": "no_decay", "match": ["*.bias", "bn.*"], "weight_decay_mult": 0.0},
        {"name": "head", "match": ["head.*"], "lr_mult": 10.0, "weight_decay_mult": 0.5},  # head.bias went to no_decay
        {"name": "unused", "match": ["nothing.*"], "lr_mult": 3.0},
    ])
    groups = param_groups(model, spec)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["no_decay", "head", "default"]  # empty groups are dropped
    assert _names(model, by_name["no_decay"]) == ["bn.bias", "bn.weight", "body.bias", "head.bias", "stem.bias"]
    assert _names(model, by_name["head"]) == ["head.weight"]  # first matching group wins
    assert _names(model, by_name["default"]) == ["body.weight", "stem.weight"]
    assert (by_name["no_decay"]["lr"], by_name["no_decay"]["weight_decay"]) == pytest.approx((0.2, 0.0))
    assert (by_name["head"]["lr"], by_name["head"]["weight_decay"]) == pytest.approx((2.0, 5e-4))
    assert (by_name["default"]["lr"], by_name["default"]["weight_decay"]) == pytest.approx((0.2, 1e-3))
    # every trainable parameter is in exactly one group, frozen ones in none
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not {id(p) for p in model.frozen.parameters()} & set(ids)


def test_param_groups_order_decides_the_match():
    model = Net()
    spec = OptimizerSpec(param_groups=[
        {"name": "head", "match": ["head.*"], "lr_mult": 10.0},
        {"name": "no_decay", "match": ["*.bias"], "weight_decay_mult": 0.0},
    ])
    by_name = {g["name"]: g for g in param_groups(model, spec)}
    assert _names(model, by_name["head"]) == ["head.bias", "head.weight"]
    assert "head.bias" not in _names(model, by_name["no_decay"])


def test_optimizer_uses_the_groups():
    model = Net()
    spec = OptimizerSpec(type="sgd", lr=0.05, momentum=0.8, weight_decay=1e-2, param_groups=[
        {"name": "head", "match": ["head.*"], "lr_mult": 2.0, "weight_decay_mult": 0.0}])
    opt = build_optimizer(model, spec)
    assert [(g["name"], g["lr"], g["weight_decay"], g["momentum"]) for g in opt.param_groups] == [
        ("head", pytest.approx(0.1), 0.0, 0.8), ("default", pytest.approx(0.05), pytest.approx(1e-2), 0.8)]
    # one SGD step with momentum on a fresh buffer is p - lr * (grad + wd * p)
    x = torch.randn(5, 4)
    before = model.head.weight.detach().clone(), model.body.weight.detach().clone()
    model.head(model.body(x)).sum().backward()
    grads = model.head.weight.grad.clone(), model.body.weight.grad.clone()
    opt.step()
    assert torch.allclose(model.head.weight, before[0] - 0.1 * grads[0])
    assert torch.allclose(model.body.weight, before[1] - 0.05 * (grads[1] + 1e-2 * before[1]))


@pytest.mark.parametrize("kind,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_variants(kind, cls):
    opt = build_optimizer(Net(), OptimizerSpec(type=kind, lr=1e-3, betas=(0.8, 0.9)))
    assert type(opt) is cls and opt.param_groups[0]["betas"] == (0.8, 0.9)
