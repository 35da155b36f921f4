"""Pipeline specs: stage resolution (overrides, folders, inputs, init_from) and every way a `stages:`
section can be wrong, reported before any Ray work with the stage and field named."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bitfleet.errors import SpecError
from bitfleet.resolve import load_spec, stage_raw, validate_spec
from bitfleet.scheduler import pipeline

BASE = {"name": "pipe", "workload": "resnet_cifar", "model": {"arch": "resnet20"}, "data": {"dataset": "mnist_sample"},
        "train": {"epochs": 3, "batch_size": 32}, "storage_path": "/tmp/bf-pipe"}


def spec_with(stages):
    return {**BASE, "stages": stages}


def test_a_stage_is_the_pipeline_spec_with_its_overrides_folder_and_inputs():
    spec = validate_spec(spec_with([
        {"name": "float"},
        {"name": "tune", "needs": ["float"], "init_from": "float",
         "overrides": {"train.epochs": 1, "model.arch": "plain20"}},
        {"name": "report", "task": "report", "needs": ["float", "tune"]},
    ]))
    tune = stage_raw(spec, spec.stages[1])
    assert tune["name"] == "tune" and tune["storage_path"] == "/tmp/bf-pipe/pipe"
    assert tune["train"]["epochs"] == 1 and tune["train"]["batch_size"] == 32 and tune["model"]["arch"] == "plain20"
    assert tune["inputs"] == {"float": "/tmp/bf-pipe/pipe/float"}
    assert tune["train"]["init_from"] == "/tmp/bf-pipe/pipe/float" and "stages" not in tune
    first = stage_raw(spec, spec.stages[0])
    assert first["train"]["epochs"] == 3 and first["inputs"] == {} and first["train"].get("init_from") is None
    assert pipeline.completed(spec, spec.stages[0]) is None


@pytest.mark.parametrize("stages,message", [
    ([{"name": "a"}, {"name": "a"}], "stages.1.name: 'a' names two stages"),
    ([{"name": "a", "needs": ["b"]}], "stages.0.needs: 'b' is not another stage"),
    ([{"name": "a", "needs": ["a"]}], "stages.0.needs: 'a' is not another stage"),
    ([{"name": "a", "needs": ["b"]}, {"name": "b", "needs": ["a"]}], "stages: the needs form a cycle"),
    ([{"name": "a"}, {"name": "b", "init_from": "a"}], "stages.1.init_from: 'a' must be one of the stages it needs"),
    ([{"name": "a", "task": "ppo"}], "stages.a.task: 'ppo' is not a task of resnet_cifar"),
    ([{"name": "a", "overrides": {"train.epochs": 0}}],
     "stages.a: train.epochs: Input should be greater than or equal to 1"),
    ([{"name": "a", "overrides": {"model.arch": "resnet21"}}], "stages.a: model.arch: "),
    ([{"name": "a", "overrides": {"train.epochs.x": 1}}],
     "stages.a.overrides.train.epochs.x: 'epochs' is not a section"),
    ([{"name": "a", "recipe": 1}], "stages.0.recipe: unknown key"),
    ([{"name": "bad name"}], "stages.0.name: "),
])
def test_bad_stages_fail_validation_naming_the_stage(tmp_path, stages, message):
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(spec_with(stages)))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(message), str(info.value)


def test_cpus_count_each_stage_with_its_own_scaling():
    spec = validate_spec(spec_with([{"name": "a"}, {"name": "b", "overrides": {"scaling.num_workers": 2,
                                                                               "scaling.cpus_per_worker": 1.5}}]))
    assert pipeline._cpus(spec, spec.stages[:1]) == 1.0 and pipeline._cpus(spec, spec.stages) == 4.0


def test_the_reproduction_suite_runs_four_independent_stages_then_the_report():
    raw = yaml.safe_load(Path("workloads/resnet_cifar/specs/cifar10_reproduction_suite.yaml").read_text())
    stages = {s["name"]: s for s in raw["stages"]}
    assert ([s.get("overrides", {}).get("model.arch") for s in raw["stages"][:4]]
            == ["plain20", "plain56", "resnet20", "resnet56"])
    assert not any(s.get("needs") for s in raw["stages"][:4])
    assert stages["report"] == {"name": "report", "task": "report",
                                "needs": ["plain20", "plain56", "resnet20", "resnet56"]}
