"""The LBPNet engine's numba kernels against numpy references: RP fused per pixel (popcount against the
threshold) equals the fusion of each code; the residual add and 2x2 average keep torch's float32 order;
the one-thread and the pooled kernels give the same bits; codes wider than 16 bits; batch 1 = batch N."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bitfleet.data import mnist
from bitfleet.data.transforms import normalise
from tests.unit.test_lbpnet_engine import PRESETS, digits, engine_of, preset_model
from workloads.lbpnet import intengine, kernels

RNG = np.random.default_rng(0)
CHANNELS, H, W, B = 5, 6, 8, 33


def _rp(bits: int = 16, k: int = 4):
    codes = RNG.integers(0, 1 << bits, (H, W, B), dtype=np.uint64).astype(intengine._code_type(bits))
    routes = np.stack([RNG.choice(bits, k, replace=False) for _ in range(CHANNELS)])
    masks = np.bitwise_or.reduce(np.uint64(1) << routes.astype(np.uint64), axis=1).astype(codes.dtype)
    gates = RNG.random(CHANNELS) > 0.3
    thresholds = np.where(gates, 2, bits + 2).astype(np.int64)
    counts = np.bitwise_count(codes[None].astype(np.uint64) & masks[:, None, None, None].astype(np.uint64))
    return codes, masks, thresholds, counts.astype(np.int64), gates


def _both_ways(kernel, *args):
    """Run a kernel with one thread and with the pool (work below and above the threshold): same bits."""
    outs = [[a.copy() if isinstance(a, np.ndarray) and a.flags.writeable and a.base is None else a for a in args]
            for _ in range(2)]
    kernel(0, *outs[0])
    kernel(kernels.PARALLEL_WORK, *outs[1])
    return outs


@pytest.mark.parametrize("pool", [False, True])
def test_macfree_rp_is_the_shifted_relu_of_the_count(pool):
    codes, masks, thresholds, counts, gates = _rp()
    expected = np.maximum(counts - 2 + 1, 0) * gates[:, None, None, None]
    if pool:
        expected = np.maximum(np.maximum(expected[:, 0::2, 0::2], expected[:, 0::2, 1::2]),
                              np.maximum(expected[:, 1::2, 0::2], expected[:, 1::2, 1::2]))
    rows = np.array([4, 0, 2, 1, 3])  # written in place at any rows of the stage's array
    out = np.zeros((CHANNELS, *expected.shape[1:]), np.uint8)
    tables = np.zeros((CHANNELS, 17), np.uint8)
    for args in _both_ways(kernels.fuse, codes, masks, thresholds, True, tables, rows, out, pool):
        assert np.array_equal(args[6][rows], expected)


@pytest.mark.parametrize("pool", [False, True])
def test_residual_rp_adds_and_averages_in_torchs_order(pool):
    codes, masks, thresholds, counts, gates = _rp()
    bn = RNG.normal(size=(CHANNELS, 2)).astype(np.float32)
    previous = RNG.normal(size=(3, H, W, B)).astype(np.float32)
    tiled = np.arange(CHANNELS) % 3
    fired = (counts >= 2) & gates[:, None, None, None]
    full = torch.from_numpy(np.where(fired, bn[:, 1, None, None, None], bn[:, 0, None, None, None])
                            + previous[tiled])
    expected = torch.nn.functional.avg_pool2d(full.permute(3, 0, 1, 2), 2).permute(1, 2, 3, 0) if pool else full
    out = np.zeros((CHANNELS, *expected.shape[1:]), np.float32)
    rows = np.arange(CHANNELS)
    for args in _both_ways(kernels.residual, codes, masks, thresholds, True, bn, rows, out, previous, tiled, pool):
        assert np.array_equal(args[6], expected.numpy())


def test_sums_of_rp_and_of_tables_are_the_maps_sums():
    codes, masks, thresholds, counts, gates = _rp()
    bn = RNG.normal(size=(CHANNELS, 2)).astype(np.float32)
    fired = (counts >= 2) & gates[:, None, None, None]
    expected = np.where(fired, bn[:, 1, None, None, None], bn[:, 0, None, None, None]).astype(np.float64).sum((1, 2))
    for args in _both_ways(kernels.sums, codes, masks, thresholds, bn, np.zeros((CHANNELS, B))):
        assert np.allclose(args[4], expected, rtol=1e-12)
    keys = RNG.integers(0, 40, (H, W, B)).astype(np.int32)
    columns = RNG.normal(size=(40, CHANNELS))
    for args in _both_ways(kernels.table_sums, keys, columns, np.zeros((B, CHANNELS))):
        assert np.allclose(args[2], columns[keys].sum((0, 1)), rtol=1e-12)


def test_codes_take_the_narrowest_unsigned_type():
    assert [intengine._code_type(u) for u in (1, 8, 9, 16, 17, 32, 33, 64)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32, np.uint64, np.uint64]


@pytest.mark.parametrize("fusion", ["rp_paper", "conv1x1"])
def test_codes_wider_than_16_bits(fusion, tmp_path: Path):
    """24 comparisons a pixel: 32-bit codes, and distinct codes by sorting instead of a presence table."""
    model, _ = preset_model("quickstart.yaml", {"lbp_layer": {"num_patterns": 3}, "blocks": {"fusion_type": fusion},
                                                "rp_config": {"n_bits_per_out": 8}})
    codes, _ = digits(40)
    with torch.no_grad():
        expected = model(normalise(mnist.MEAN, mnist.STD)(codes)).argmax(1).numpy()
    engine = engine_of(model, tmp_path)
    assert len(engine.blocks[0]["channels"]) == 24
    assert np.array_equal(engine.predict(codes.numpy()), expected)


@pytest.mark.parametrize("preset", ["quickstart (macfree, RP, flatten)", "paper_mnist_rp (residual, RP, gap)"])
def test_one_image_at_a_time_gives_the_batchs_logits(preset, tmp_path: Path):
    """Batch 1 runs the one-thread kernels, a batch of 300 the pooled ones: the same logits."""
    model, _ = preset_model(*PRESETS[preset])
    codes, _ = digits(300)
    engine = engine_of(model, tmp_path)
    batch = engine.logits(codes.numpy())
    for i in (0, 123, 299):
        assert np.allclose(engine.logits(codes.numpy()[i:i + 1])[0], batch[i], rtol=1e-6, atol=1e-6)


def test_a_macfree_stage_pools_uncomputed_channels_from_its_codes(tmp_path: Path):
    """Channels pooled straight from the codes (and the input's through its own pool) equal the pool of the
    full-resolution map, whichever channels were computed before."""
    model, _ = preset_model(*PRESETS["quickstart (macfree, RP, flatten)"])
    codes, _ = digits(20)
    engine = engine_of(model, tmp_path)
    maps = np.ascontiguousarray(codes.numpy().transpose(1, 2, 3, 0))

    def stage():
        return intengine._stage(engine.blocks[0], intengine.Input(maps, engine.input_lut, engine.dtype))

    full = stage().all_values()
    expected = np.maximum(np.maximum(full[:, 0::2, 0::2], full[:, 0::2, 1::2]),
                          np.maximum(full[:, 1::2, 0::2], full[:, 1::2, 1::2]))
    partly = stage()
    partly.rows(np.array([0, 3, 7]))  # some computed at full resolution first, the others never
    channels = np.arange(partly.channels)
    out = np.zeros((len(channels), *expected.shape[1:]), expected.dtype)
    partly.max_pooled(channels, out, channels[::-1].copy())
    assert np.array_equal(out[::-1], expected)
