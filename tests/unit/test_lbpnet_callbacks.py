"""LBPNet's schedules as callbacks: temperatures, freezes, hard fine-tune, collapse guard, regularisers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfleet.engine.callbacks import TrainState
from workloads.lbpnet import callbacks as cb
from workloads.lbpnet.config import ModelConfig, Options
from workloads.lbpnet.models import LBPNet, lbp_layers, rp_layers
from workloads.lbpnet.workload import regularisation


def setup(options=None, epochs=10):
    torch.manual_seed(0)
    model = LBPNet(ModelConfig.model_validate({"blocks": {"block": "residual"}}), 1, 10, 28)
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    state = TrainState(model, opt, epochs=epochs, steps_per_epoch=4, eval_model=model)
    return model, opt, state, Options.model_validate(options or {})


def step(model, opt, state, callbacks):
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state.global_step += 1
    for c in callbacks:
        c.on_step_end(state)


def test_temperatures_follow_the_cosine_schedule_at_step_resolution():
    model, opt, state, options = setup({"temp_schedule": {"alpha": {"type": "cosine", "start": 1.5, "end": 0.1}}})
    temps = cb.Temperatures(options.temp_schedule)
    temps.on_epoch_start(state)
    assert all(abs(layer.alpha.item() - 1.5) < 1e-6 for layer in lbp_layers(model))
    state.global_step = 20  # half of 10 epochs x 4 steps
    temps.on_step_end(state)
    assert abs(lbp_layers(model)[0].alpha.item() - 0.8) < 1e-6
    assert abs(rp_layers(model)[0].tau.item() - (3.0 + 0.9) / 2) < 1e-6


def test_learning_alpha_under_a_schedule_learns_each_layers_factor_on_the_scheduled_course():
    """alpha = schedule(progress) x a learned factor: the schedule sets the course, learning moves each layer
    off it by its own factor, and the factor persists as the schedule moves on; without learn_alpha alpha
    is the schedule's value exactly."""
    schedule = {"temp_schedule": {"alpha": {"type": "linear", "start": 1.5, "end": 0.5}}}
    for learn in (True, False):
        torch.manual_seed(0)
        config = ModelConfig.model_validate({"blocks": {"block": "residual"}, "lbp_layer": {"learn_alpha": learn,
                                                                                          "soft_forward": True}})
        model = LBPNet(config, 1, 10, 28)
        opt = torch.optim.SGD(model.parameters(), 1.0)
        state = TrainState(model, opt, epochs=10, steps_per_epoch=4)
        temps = cb.Temperatures(Options.model_validate(schedule).temp_schedule)
        temps.on_epoch_start(state)
        for _ in range(3):
            step(model, opt, state, [temps])
        layers = lbp_layers(model)
        scheduled = 1.5 - 3 / 40  # linear over 40 steps
        factors = [layer.alpha_scale.item() for layer in layers]
        for layer, factor in zip(layers, factors):
            assert abs(layer.alpha_base.item() - scheduled) < 1e-6
            assert abs(layer.alpha.item() - scheduled * factor) < 1e-6
        if not learn:
            assert factors == [1.0] * len(layers) and "alpha_scale" not in dict(model.named_parameters())
            continue
        assert all(abs(f - 1.0) > 1e-4 for f in factors)  # learned (the soft forward lets the loss see alpha)
        state.global_step = 20
        temps.on_step_end(state)  # the schedule moved on; each layer keeps its factor
        assert [layer.alpha_scale.item() for layer in layers] == factors
        assert all(abs(layer.alpha.item() - 1.0 * f) < 1e-6 for layer, f in zip(layers, factors))


def test_freeze_keeps_offsets_and_gates_then_thaws_them():
    model, opt, state, options = setup({"freeze_schedule": {"freeze_offsets_epochs": 1,
                                                            "freeze_gates_extra_epochs": 1}})
    freeze = cb.Freeze(options.freeze_schedule)
    offsets, gates = model.blocks[0].lbp.offsets, model.blocks[0].fusion.gate_logits
    before_offsets, before_gates = offsets.detach().clone(), gates.detach().clone()
    freeze.on_epoch_start(state)
    step(model, opt, state, [freeze])
    assert torch.equal(offsets, before_offsets) and torch.equal(gates, before_gates)
    state.epoch = 1
    freeze.on_epoch_start(state)
    assert offsets not in opt.state  # thawed: its moments from the frozen epoch are gone
    step(model, opt, state, [freeze])
    assert not torch.equal(offsets, before_offsets) and torch.equal(gates, before_gates)
    state.epoch = 2
    freeze.on_epoch_start(state)
    step(model, opt, state, [freeze])
    assert not torch.equal(gates, before_gates)


def test_hard_finetune_scales_the_learning_rate_once_and_hardens_forward_passes():
    model, opt, state, options = setup({"hard_finetune": {"start_epoch": 2, "lr_mult": 0.1}})
    for layer in lbp_layers(model):
        layer.soft_forward = True
    hard = cb.HardFinetune(options.hard_finetune)
    hard.on_epoch_start(state)
    assert opt.param_groups[0]["lr"] == 1e-2
    state.epoch = 2
    hard.on_epoch_start(state)
    state.epoch = 3
    hard.on_epoch_start(state)
    assert abs(opt.param_groups[0]["lr"] - 1e-3) < 1e-12
    assert not any(layer.soft_forward for layer in lbp_layers(model))
    restored = cb.HardFinetune(options.hard_finetune)
    restored.load_state_dict(hard.state_dict())
    assert restored.applied


def test_collapse_guard_restores_the_best_weights_and_softens_alpha():
    model, opt, state, options = setup({"stability": {"acc_drop_thr": 0.05, "alive_upper": 0.2, "soften_epochs": 2}})
    temps, freeze = cb.Temperatures(options.temp_schedule), cb.Freeze(options.freeze_schedule)
    guard = cb.CollapseGuard(options.stability, temps, freeze)
    guard.on_eval_end(state, {"test/acc": 90.0})
    best = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt, state, [])
    state.epoch = 1
    guard.on_eval_end(state, {"test/acc": 40.0})  # a collapse with every gate open (alive 1.0 > 0.2)
    assert guard.events == 1 and state.metrics["guard/collapse_events"] == 1.0
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert temps.soften_factor == 2.0 and temps.soften_until == 4 and freeze.alpha_until == 4
    clone = cb.CollapseGuard(options.stability, temps, freeze)
    clone.load_state_dict(guard.state_dict())
    assert clone.events == 1 and clone.best_acc == 90.0


def test_bn_recalibration_reestimates_statistics_on_the_hard_path():
    model, _, _, _ = setup()
    batches = [(torch.randn(16, 1, 28, 28) * 3 + 1, torch.zeros(16)) for _ in range(3)]
    cb.recalibrate_bn(model, batches, batches=3)
    bn = model.blocks[0].bn
    assert bn.num_batches_tracked.item() == 3 and bn.momentum == 0.1
    head = model.head.bn.running_mean
    assert torch.isfinite(head).all() and head.abs().sum() > 0


def test_regularisers_are_zero_when_disabled_and_push_the_right_way():
    model, _, _, _ = setup()
    off = Options.model_validate({"alive_ratio_reg": {"enable": False}, "gate_margin": {"enable": False},
                                  "offset_reg": {"enable": False}})
    assert regularisation(model, off).item() == 0.0
    on = Options.model_validate({"alive_ratio_reg": {"target": 0.1, "weight": 1.0}, "gate_margin": {"enable": False},
                                 "offset_reg": {"enable": False}})
    loss = regularisation(model, on)
    loss.backward()
    assert loss.item() > 0 and (model.blocks[0].fusion.gate_logits.grad > 0).all()  # close gates toward 10%
