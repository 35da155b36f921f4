"""The EMA of `train.ema`: parameters averaged, buffers live, warm-up, exact resume, which weights export."""
from __future__ import annotations

import torch
from torch import nn

from bitfleet.engine import checkpoint
from bitfleet.engine.ema import EMA
from bitfleet.spec import EMASpec


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train_steps(model: nn.Module, ema: EMA, steps: int, generator: torch.Generator | None = None) -> None:
    """`steps` SGD steps (stateless: no momentum) on batches drawn from `generator`, each followed by an update."""
    generator = generator or torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.randn(16, 4, generator=generator) * 3 + 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()


def test_parameters_are_averaged_with_the_decay_and_buffers_are_the_live_models():
    model = net()
    ema = EMA(model, EMASpec(decay=0.9))
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        model(torch.randn(16, 4, generator=generator) * 3 + 1).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        for name, p in model.named_parameters():  # the first update copies, then w <- 0.9 w + 0.1 w_model
            expected[name] = p.detach().clone() if step == 0 else 0.9 * expected[name] + 0.1 * p.detach()
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[name])
    # the running statistics come from the model as it is, not from an average starting at mean 0, var 1
    for (name, live), (_, averaged) in zip(model.named_buffers(), ema.module.named_buffers()):
        assert torch.equal(live, averaged), name
    assert model[1].running_mean.abs().max() > 0.1  # the inputs' mean is 1: the statistics moved


def test_warmup_ramps_the_decay_as_tensorflow_does():
    ema = EMA(net(), EMASpec(decay=0.999, warmup=True))
    assert [round(ema.decay_at(t), 4) for t in (0, 1, 10, 100)] == [0.1, round(2 / 11, 4), 0.55, round(101 / 110, 4)]
    assert ema.decay_at(8990) == 0.999 and ema.decay_at(10**6) == 0.999
    assert EMA(net(), EMASpec(decay=0.999)).decay_at(3) == 0.999  # no warm-up: the decay from the start

    model = net()
    warm = EMA(model, EMASpec(decay=0.999, warmup=True))
    cold = EMA(model, EMASpec(decay=0.999))
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(20):
        model(torch.randn(16, 4, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        warm.update()
        cold.update()
        if step == 0:  # what the first update copied
            start = {name: p.detach().clone() for name, p in model.named_parameters()}

    def distance(ema, reference):
        return sum((p - reference[name]).norm() for name, p in ema.module.named_parameters())

    now = {name: p.detach() for name, p in model.named_parameters()}
    # 20 steps at 0.999: the plain average is still its first copy; the warmed-up one follows the weights
    assert distance(cold, start) < 0.05 * distance(cold, now)
    assert distance(warm, now) < 0.5 * distance(cold, now)


def test_a_restored_ema_continues_exactly_as_the_uninterrupted_one(tmp_path):
    whole_model = net()
    whole = EMA(whole_model, EMASpec(decay=0.99, warmup=True))
    train_steps(whole_model, whole, 12)

    generator = torch.Generator().manual_seed(1)
    first_model = net()
    first = EMA(first_model, EMASpec(decay=0.99, warmup=True))
    train_steps(first_model, first, 7, generator)
    torch.save({"model": first_model.state_dict(), "ema": first.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed_model = net()
    resumed_model.load_state_dict(saved["model"])
    resumed = EMA(resumed_model, EMASpec(decay=0.99, warmup=True))
    resumed.load_state_dict(saved["ema"])
    assert resumed.updates == 7
    train_steps(resumed_model, resumed, 5, generator)  # the uninterrupted run's last 5 batches
    whole_weights = {**whole.module.state_dict()}
    for name, value in resumed.module.state_dict().items():
        assert torch.equal(value, whole_weights[name]), name


def test_exported_weights_are_the_emas_only_when_it_is_the_result(tmp_path):
    for is_result in (True, False):
        model = net()
        ema = EMA(model, EMASpec(decay=0.5, evaluate=is_result))
        train_steps(model, ema, 3)
        folder = tmp_path / str(is_result)
        folder.mkdir()
        checkpoint.save(folder, {"model": model.state_dict(), "ema": ema.state_dict()})
        source = ema.module if is_result else model
        exported = checkpoint.weights(folder)
        assert exported.keys() == source.state_dict().keys()
        assert all(torch.equal(exported[k], v) for k, v in source.state_dict().items())
        assert not torch.equal(exported["0.weight"], (model if is_result else ema.module).state_dict()["0.weight"])
