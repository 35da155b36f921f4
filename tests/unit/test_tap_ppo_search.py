"""The PPO environment of tap_ppo: actions decode to valid TAP codes, observations stay in their box, and
the reward is the one computed apart from real INT8 teacher and TAP student outputs."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from bitfleet.data import synthetic
from bitfleet.resolve import validate_spec
from workloads.tap_ppo import int8, models, quant
from workloads.tap_ppo.search import OBSERVATION_SIZE, TapEnv, breakpoint_grid, decode
from workloads.tap_ppo.tap import STEPS, saved_fraction


@pytest.mark.parametrize("tmax", [3, 4, 10, 37, 255])
def test_every_action_decodes_to_valid_codes(tmax):
    bins = 8
    for a1, a2, s in itertools.product(range(bins), range(bins), [(0, 2, 4), (4, 4, 0)]):
        codes = decode((a1, a2, *s), tmax, bins)
        assert 0 < codes.b1 < codes.b2 < codes.tmax == tmax
        assert codes.steps == tuple(STEPS[i] for i in s)
    assert breakpoint_grid(255, 16).tolist() == sorted(set(np.round(np.linspace(1, 254, 16)).astype(int)))


@pytest.fixture(scope="module")
def qat_stage(tmp_path_factory):
    """A QAT stage's folder: a LeNet-5 QAT network calibrated on synthetic CIFAR, snapshotted to INT8."""
    tmp = tmp_path_factory.mktemp("tap")
    synthetic.write("cifar10", tmp / "cifar", n_train=200, n_test=40, seed=0)
    spec = validate_spec({
        "name": "ppo", "workload": "tap_ppo", "model": {"arch": "lenet5"}, "storage_path": str(tmp / "runs"),
        "data": {"dataset": "cifar10", "root": str(tmp / "cifar"), "val_size": 48},
        "tap_ppo": {"calibration_batch": 16, "attention_weight": 2.0, "cost_weight": 0.3, "breakpoint_bins": 8},
    })
    torch.manual_seed(0)
    qat = quant.prepare_qat(models.build("lenet5"))
    calibration = int8.calibration_batches(spec.data, 16)
    with torch.no_grad():
        for images, _ in calibration:  # observers see the data: realistic ranges and codes
            qat(images)
    int8.snapshot(qat, calibration, tmp / "qat")
    return spec.model_copy(update={"inputs": {"qat": str(tmp / "qat")}}), tmp


def test_the_reward_is_computed_from_real_teacher_and_student_outputs(qat_stage):
    spec, tmp = qat_stage
    env = TapEnv({"spec": spec, "episodes_file": str(tmp / "episodes.jsonl")})
    observation, _ = env.reset(seed=0)
    actions = [(0, 7, 4, 3, 2), (1, 5, 2, 2, 2), (3, 3, 1, 0, 4), (6, 2, 0, 1, 2)]
    for i, action in enumerate(actions):
        assert observation.shape == (OBSERVATION_SIZE,) and env.observation_space.contains(observation)
        observation, reward, done, truncated, _ = env.step(np.array(action))
        assert done == (i == len(actions) - 1) and not truncated
        if not done:
            assert reward == 0.0

    # the same episode, computed apart: INT8 teacher and TAP student accuracy, attention distance, levels
    stats = json.loads((tmp / "qat" / int8.INT8_FILE).read_text())
    choices = {name: decode(a, stats["tmax"][name], 8) for name, a in zip(stats["record_points"], actions)}
    teacher = int8.teacher(spec, tmp / "qat")
    calibration = int8.calibration_batches(spec.data, 16)
    teacher_acc = quant.accuracy(teacher, calibration)
    images = torch.cat([x for x, _ in calibration])
    with torch.no_grad(), quant.RecordPoints(teacher, ["conv2", "fc1"]) as rec:
        teacher(images)
        feats_t = dict(rec.outputs)
    with torch.no_grad(), quant.apply_tap(teacher, choices), quant.RecordPoints(teacher, ["conv2", "fc1"]) as rec:
        student_acc = quant.accuracy(teacher, calibration)  # hooks in order: TAP first, then the recording
        teacher(images)
        feats_s = dict(rec.outputs)
    attention = quant.attention_loss(feats_t, feats_s, ["conv2", "fc1"]).item()
    saved = np.mean([saved_fraction(c) for c in choices.values()])
    expected = -(teacher_acc - student_acc) / 100 - 2.0 * attention + 0.3 * saved
    assert reward == pytest.approx(expected, abs=1e-5)
    assert attention > 0 and 0 < saved < 1

    logged = json.loads((tmp / "episodes.jsonl").read_text().splitlines()[-1])
    assert logged["reward"] == reward and logged["student_acc"] == pytest.approx(student_acc)
    assert {name: c["b1"] for name, c in logged["layers"].items()} == {n: c.b1 for n, c in choices.items()}


def test_identity_codes_cost_nothing_but_save_nothing(qat_stage):
    spec, tmp = qat_stage
    env = TapEnv({"spec": spec, "episodes_file": str(tmp / "identity.jsonl")})
    outcome = env.score({name: decode((0, 1, 0, 0, 0), t, 8) for name, t in env.tmax.items()})
    # steps of 1 keep every code up to tmax: the only change is clipping above tmax (rare by construction)
    assert outcome["drop"] <= 0.05 and outcome["saved"] == 0.0


def test_only_the_chosen_layers_are_approximated_and_the_result_file_is_named_as_the_seeds(qat_stage, tmp_path):
    from bitfleet.errors import SpecError

    spec, tmp = qat_stage
    convs = spec.model_copy(update={"tap_ppo": spec.options.model_copy(update={"layers": ["conv2", "conv1"]})})
    env = TapEnv({"spec": convs, "episodes_file": str(tmp / "convs.jsonl")})
    env.reset(seed=0)
    assert env.layers == ["conv1", "conv2"]  # in network order: an episode is two steps
    env.step(np.array((0, 7, 4, 3, 2)))
    *_, done, _, _ = env.step(np.array((1, 5, 2, 2, 2)))
    logged = json.loads((tmp / "convs.jsonl").read_text().splitlines()[-1])
    assert done and set(logged["layers"]) == {"conv1", "conv2"}

    raw = {**spec.model_dump(mode="json", exclude={"inputs"}), "storage_path": str(tmp_path)}
    with pytest.raises(SpecError, match="tap_ppo.layers: 'fc3' is not a record point of lenet5"):
        validate_spec({**raw, "tap_ppo": {**raw["tap_ppo"], "layers": ["conv1", "fc3"]}})
    with pytest.raises(SpecError, match="tap_ppo.result_file: .*a .json file name"):
        validate_spec({**raw, "tap_ppo": {**raw["tap_ppo"], "result_file": "out/best.json"}})
    with pytest.raises(SpecError, match="tap_ppo.config_path: .* is not a file"):
        validate_spec({**raw, "tap_ppo": {**raw["tap_ppo"], "config_path": str(tmp_path / "none.json")}})

    assert spec.options.result_name("lenet5") == "lenet5_ppo_result.json"  # the seed's --result-file
    stage = spec.model_copy(update={"inputs": {"qat": str(tmp / "qat"), "ppo": str(tmp_path / "ppo")}})
    assert int8.result_path(stage) == tmp_path / "ppo" / "lenet5_ppo_result.json"
    elsewhere = tmp_path / "from_another_run.json"  # the seed's --config-path: any result file
    elsewhere.write_text(json.dumps(logged))
    given = validate_spec({**raw, "tap_ppo": {**raw["tap_ppo"], "config_path": str(elsewhere)}})
    assert int8.result_path(given.model_copy(update={"inputs": {"qat": str(tmp / "qat")}})) == elsewhere
    with pytest.raises(SpecError, match="tap_ppo.config_path: the eval stage needs a result file"):
        int8.result_path(spec)
