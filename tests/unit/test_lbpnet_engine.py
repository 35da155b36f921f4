"""LBPNet's bit-packed engine: every block kind, fusion and head of the presets predicts what the model's hard
path predicts, with its block outputs equal bit for bit; export/load round trip; `bitfleet eval --engine`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bitfleet import cli, registry
from bitfleet.data import mnist
from bitfleet.data.transforms import normalise
from bitfleet.errors import SpecError
from bitfleet.export import evaluate_engine, load_engine, write_engine
from bitfleet.spec import DataSpec
from workloads.lbpnet import intengine
from workloads.lbpnet.config import ModelConfig
from workloads.lbpnet.intengine import IntegerLBPNet
from workloads.lbpnet.models import LBPNet

SPECS = Path(__file__).parents[2] / "workloads" / "lbpnet" / "specs"
SAMPLE = DataSpec(dataset="mnist_sample")
PRESETS = {  # spec file, model overrides
    "quickstart (macfree, RP, flatten)": ("quickstart.yaml", {}),
    "macfree, 1x1, gap": ("quickstart.yaml", {"blocks": {"fusion_type": "conv1x1"}, "head": {"pool": "gap"}}),
    "paper_mnist_rp (residual, RP, gap)": ("paper_mnist_rp.yaml", {}),
    "paper_mnist_1x1 (residual, 1x1, gap)": ("paper_mnist_1x1.yaml", {}),
    "paper_mnist_rp_full60k, k=8, flatten": ("paper_mnist_rp_full60k.yaml",
                                             {"rp_config": {"n_bits_per_out": 8}, "head": {"pool": "flatten"}}),
}


def preset_model(spec_file: str, overrides: dict, seed: int = 0) -> tuple[LBPNet, ModelConfig]:
    """The preset's network, untrained but not trivial: random gates and BN statistics and affines."""
    raw = yaml.safe_load((SPECS / spec_file).read_text())["model"]
    for section, values in overrides.items():
        raw[section].update(values)
    config = ModelConfig.model_validate(raw)
    torch.manual_seed(seed)
    model = LBPNet(config, 1, 10, 28)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gate_logits"):
                module.gate_logits.normal_()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.5)
                module.bias.normal_(0, 0.5)
    return model.eval(), config


def digits(n: int):
    _, (codes, labels) = mnist.embedded_sample()
    return codes[:n], labels[:n]


def engine_of(model, tmp_path: Path) -> IntegerLBPNet:
    write_engine(registry.get("lbpnet"), model, None, SAMPLE, tmp_path / "engine.npz")
    return IntegerLBPNet(tmp_path / "engine.npz")


@pytest.mark.parametrize("preset", PRESETS)
def test_engine_equals_the_hard_path_for_every_preset(preset, tmp_path):
    model, _ = preset_model(*PRESETS[preset])
    codes, _ = digits(300)
    engine = engine_of(model, tmp_path)
    with torch.no_grad():
        expected = model(normalise(mnist.MEAN, mnist.STD)(codes)).numpy()  # as the loader normalises
    logits = engine.logits(codes.numpy())
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.allclose(logits, expected, atol=1e-5, rtol=1e-5)  # the float head's rounding only


def test_every_blocks_output_is_bit_exact(tmp_path):
    """Block by block, the engine's maps equal torch's (residual stream floats included), not just the argmax."""
    for spec_file, overrides in (PRESETS["paper_mnist_rp (residual, RP, gap)"],
                                 PRESETS["paper_mnist_1x1 (residual, 1x1, gap)"]):
        model, _ = preset_model(spec_file, overrides)
        codes, _ = digits(64)
        engine = engine_of(model, tmp_path)
        stage = intengine.Input(np.ascontiguousarray(codes.numpy().transpose(1, 2, 3, 0)), engine.input_lut,
                                engine.dtype)
        x = normalise(mnist.MEAN, mnist.STD)(codes)
        for block, layer in zip(engine.blocks, model.blocks):
            stage = intengine._stage(block, stage)
            with torch.no_grad():
                x = layer(x)
            assert np.array_equal(stage.all_values(), x.numpy().transpose(1, 2, 3, 0)), spec_file


def test_any_number_of_routed_bits_per_output(tmp_path):
    for k in (1, 3, 8, 16):
        model, _ = preset_model("quickstart.yaml", {"rp_config": {"n_bits_per_out": k}})
        codes, _ = digits(50)
        with torch.no_grad():
            expected = model(normalise(mnist.MEAN, mnist.STD)(codes)).argmax(1).numpy()
        assert np.array_equal(engine_of(model, tmp_path).predict(codes.numpy()), expected), k


def test_the_float_baseline_is_refused_with_the_field_to_change(tmp_path):
    model, _ = preset_model("quickstart.yaml", {"blocks": {"block": "conv"}})
    with pytest.raises(SpecError, match="model.blocks.block"):
        write_engine(registry.get("lbpnet"), model, None, SAMPLE, tmp_path / "x.npz")


def test_export_load_round_trip_and_header(tmp_path):
    model, _ = preset_model("quickstart.yaml", {})
    summary = write_engine(registry.get("lbpnet"), model, None, SAMPLE, tmp_path / "e.npz", {"run": "r"})
    engine, header = load_engine(tmp_path / "e.npz")
    assert header["workload"] == "lbpnet" and header["data"]["dataset"] == "mnist_sample" and header["run"] == "r"
    assert summary["bytes"] == (tmp_path / "e.npz").stat().st_size
    codes, _ = digits(20)
    assert np.array_equal(engine.logits(codes.numpy()), IntegerLBPNet(tmp_path / "e.npz").logits(codes.numpy()))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SpecError, match="cannot read"):
        load_engine(tmp_path / "bad.npz")


def test_bitfleet_eval_engine_reports_the_models_accuracy(tmp_path, capsys):
    model, _ = preset_model("quickstart.yaml", {"blocks": {"channels_per_stage": [8, 8, 8]}})
    write_engine(registry.get("lbpnet"), model, None, SAMPLE, tmp_path / "e.npz")
    codes, labels = digits(1000)
    with torch.no_grad():
        expected = 100.0 * (model(normalise(mnist.MEAN, mnist.STD)(codes)).argmax(1) == labels).float().mean().item()
    assert cli.main(["eval", "--engine", str(tmp_path / "e.npz")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["test/n"] == 1000 and result["test/acc"] == pytest.approx(expected)
    assert "test/acc5" not in result  # 10 classes: top-1 only, as training reports it
    assert json.loads(capsys.readouterr().out)["test/acc"] == result["test/acc"]
    train = evaluate_engine(tmp_path / "e.npz", "train", out=tmp_path / "out" / "train.json")
    assert train["train/n"] == 4000 and (tmp_path / "out" / "train.json").is_file()
    assert cli.main(["eval", "--engine", str(tmp_path / "e.npz"), "--split", "val"]) == 2  # no val split: one line
    assert "data.val_size" in capsys.readouterr().err
    assert cli.main(["eval", "--engine", str(tmp_path / "e.npz"), "-o", "train.epochs=1"]) == 2
