"""Spec validation: every mistake a user can write is one SpecError naming the field, exit code 2 in the CLI."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bitfleet import cli
from bitfleet.data import folders, synthetic
from bitfleet.engine import checkpoint
from bitfleet.errors import SpecError
from bitfleet.resolve import apply_override, load_spec, validate_spec
from bitfleet.spec import RunSpec

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "workloads" / "resnet_cifar" / "specs" / "quickstart.yaml"
SPEC_FILES = sorted(REPO.glob("workloads/*/specs/*.yaml"))

# A YAML file broken on line 5 (the flow list is never closed).
BROKEN_YAML = ("name: broken\nworkload: resnet_cifar\ndata: {dataset: mnist_sample}\ntrain:\n"
               "  epochs: [1,\n  batch_size: 2\n")


@pytest.fixture
def spec_file(tmp_path) -> Path:
    """A copy of the quickstart spec (2 workers, global batch 128, embedded MNIST sample)."""
    path = tmp_path / "spec.yaml"
    path.write_text(QUICKSTART.read_text())
    return path


# (id, overrides, the field the message must start with, substrings it must contain)
BAD_OVERRIDES = [
    ("unknown-nested-key", ["train.epocs=3"], "train.epocs", ["unknown key", "'epochs'"]),
    ("unknown-deeper-key", ["train.optimizer.momentun=0.5"], "train.optimizer.momentun", ["unknown key", "'momentum'"]),
    ("unknown-top-level-key", ["seeed=1"], "seeed", ["unknown key", "'seed'"]),
    ("unknown-model-key", ["model.archh=resnet20"], "model.archh", ["unknown key", "'arch'"]),
    ("wrong-type", ["train.epochs=abc"], "train.epochs", ["integer", "'abc'"]),
    ("negative-batch", ["train.batch_size=-3"], "train.batch_size", ["greater than or equal to 1", "-3"]),
    ("label-smoothing-too-big", ["train.label_smoothing=1.5"], "train.label_smoothing", ["less than 1", "1.5"]),
    ("zero-lr", ["train.optimizer.lr=0"], "train.optimizer.lr", ["greater than 0"]),
    ("bad-schedule-type", ["train.lr_schedule.type=poly"], "train.lr_schedule.type", ["'cosine'", "'poly'"]),
    ("bad-run-name", ["name=a b"], "name", ["pattern", "'a b'"]),
    ("unknown-workload", ["workload=resnet_cifa"], "workload", ["unknown workload", "'resnet_cifar'"]),
    ("unknown-arch", ["model.arch=resnet21"], "model.arch", ["'resnet20'", "'resnet21'"]),
    ("bad-shortcut", ["model.shortcut=C"], "model.shortcut", ["'A'", "'B'", "'C'"]),
    ("cifar-no-root", ["data.dataset=cifar10"], "data.root", ["needs `data.root`"]),
    ("cifar-missing", ["data.dataset=cifar10", "data.root=/nonexistent/bitfleet"], "data.root",
     ["bitfleet data download cifar10", "/nonexistent/bitfleet"]),
    ("cifar100-missing", ["data.dataset=cifar100", "data.root=/nonexistent/bitfleet"], "data.root",
     ["bitfleet data download cifar100"]),
    ("mnist-missing", ["data.dataset=mnist", "data.root=/nonexistent/bitfleet"], "data.root",
     ["bitfleet data download mnist", "train-images-idx3-ubyte"]),
    ("batch-not-divisible", ["scaling.num_workers=2", "train.batch_size=129"], "train.batch_size",
     ["129", "scaling.num_workers=2"]),
    ("workload-section-unknown-key", ["resnet_cifar.depth=3"], "resnet_cifar.depth", ["unknown key"]),
    ("bad-strategy", ["train.strategy=fsdp"], "train.strategy", ["'ddp'", "'deepspeed'", "'fsdp'"]),
    ("zero-stage-3", ["train.strategy=deepspeed", "train.deepspeed.zero_stage=3"], "train.deepspeed.zero_stage",
     ["1 or 2", "3"]),
    ("deepspeed-section-without-strategy", ["train.deepspeed.zero_stage=2"], "train.deepspeed",
     ["strategy: deepspeed", "'ddp'"]),
    ("deepspeed-owned-key", ["train.strategy=deepspeed", "train.deepspeed.config={optimizer: {type: Adam}}"],
     "train.deepspeed.config", ["optimizer is set by train.optimizer"]),
    ("deepspeed-owned-zero-stage",
     ["train.strategy=deepspeed", "train.deepspeed.config={zero_optimization: {stage: 3}}"],
     "train.deepspeed.config", ["zero_optimization.stage is set by train.deepspeed.zero_stage"]),
    ("deepspeed-elastic", ["train.strategy=deepspeed", "scaling.num_workers=[1, 2]"], "scaling.num_workers",
     ["elastic", "fixed number"]),
]


@pytest.mark.parametrize("overrides,field,expected", [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_value_is_one_spec_error_naming_the_field(spec_file, overrides, field, expected):
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, overrides)
    msg = str(info.value)
    assert msg.startswith(f"{field}: "), msg
    for part in expected:
        assert part in msg, msg
    assert "\n" not in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_YAML)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    assert "invalid YAML" in msg and "line " in msg
    line = int(msg.split("line ")[1].split(",")[0])
    assert 5 <= line <= 7, msg  # the error is where the unclosed list runs into the end of the file


def test_yaml_error_line_is_where_the_mistake_is(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nworkload: resnet_cifar\n  bad: 3\n")  # indented mapping under a scalar
    with pytest.raises(SpecError, match=r"line 3, column \d+: invalid YAML"):
        load_spec(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_missing_required_field(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\ndata: {dataset: mnist_sample}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith("workload: "), str(info.value)


def test_workload_without_options_says_what_it_expects(spec_file):
    """A workload with no own section should say so, not end with an empty 'expected one of'."""
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, ["resnet_cifar.depth=3"])
    msg = str(info.value).rstrip()
    assert not msg.endswith("expected one of"), f"message names nothing that is expected: {msg!r}"


# --------------------------------------------------------------------------- overrides


def test_override_parses_yaml_values(spec_file):
    spec = load_spec(spec_file, [
        "train.optimizer.betas=[0.8, 0.95]",
        "train.optimizer.lr=2.5e-2",
        "train.amp=true",
        "train.optimizer.nesterov=yes",
        "train.lr_schedule.milestones=[1, 3]",
        "train.epochs=7",
        "targets.top1=91.25",
    ])
    assert spec.train.optimizer.betas == (0.8, 0.95)
    assert spec.train.optimizer.lr == pytest.approx(0.025)
    assert spec.train.amp is True and spec.train.optimizer.nesterov is True
    assert spec.train.lr_schedule.milestones == [1, 3]
    assert spec.train.epochs == 7
    assert spec.targets["top1"] == 91.25 and spec.targets["test/acc"] == (94.0, 98.5)  # added beside the spec's


def test_override_creates_nested_sections(spec_file):
    raw = yaml.safe_load(spec_file.read_text())
    assert "ema" not in raw["train"]
    spec = load_spec(spec_file, ["train.ema.decay=0.99"])
    assert spec.train.ema is not None and spec.train.ema.decay == pytest.approx(0.99)
    assert spec.train.ema.evaluate is True  # the rest of the new section is its defaults


def test_apply_override_on_raw_dict():
    raw = {"train": {"epochs": 1}}
    apply_override(raw, "a.b.c=[1, 2.5, true, x]")
    apply_override(raw, "train.epochs=3")
    apply_override(raw, "name=has=equals")  # only the first '=' separates path from value
    apply_override(raw, "train.grad_clip=null")
    assert raw == {"train": {"epochs": 3, "grad_clip": None}, "a": {"b": {"c": [1, 2.5, True, "x"]}},
                   "name": "has=equals"}
    assert isinstance(raw["a"]["b"]["c"][1], float)


@pytest.mark.parametrize("item,match", [
    ("train.epochs", "expected dotted.path=value"),
    ("=3", "expected dotted.path=value"),
    ("name.x=3", "'name' is not a section"),
    ("train.epochs=[1", "cannot parse value"),
])
def test_bad_override_syntax(spec_file, item, match):
    with pytest.raises(SpecError, match=match):
        load_spec(spec_file, [item])


def test_overrides_apply_in_order(spec_file):
    assert load_spec(spec_file, ["train.epochs=2", "train.epochs=5"]).train.epochs == 5


# --------------------------------------------------------------------------- every spec shipped validates


def test_there_are_spec_files():
    assert QUICKSTART in SPEC_FILES


@pytest.mark.parametrize("path", SPEC_FILES, ids=[f"{p.parent.parent.name}/{p.name}" for p in SPEC_FILES])
def test_every_shipped_spec_validates(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    dataset = (raw.get("data") or {}).get("dataset", "cifar10")
    overrides = []
    if dataset in folders.NUM_CLASSES:  # JPEG folders as `bitfleet data prepare` leaves them, every class
        classes = folders.NUM_CLASSES[dataset]
        synthetic.write_jpeg_folders("image_folder", tmp_path, classes, 10, np.random.default_rng(0), classes)
        overrides.append(f"data.root={tmp_path}")
    elif dataset != "mnist_sample":  # a real data set: validate against synthetic files in its on-disk format
        synthetic.write(dataset, tmp_path, n_train=10, n_test=10)
        overrides.append(f"data.root={tmp_path}")
    # checkpoints of other runs a spec starts from (a teacher, stage 1): validation checks they exist
    placeholder = tmp_path / "checkpoint"
    placeholder.mkdir()
    checkpoint.save(placeholder, {"model": {}})  # complete: its manifest checks out
    if (raw.get("train") or {}).get("init_from"):
        overrides.append(f"train.init_from={placeholder}")
    if ((raw.get(raw["workload"]) or {}).get("teacher") or {}).get("checkpoint"):
        overrides.append(f"{raw['workload']}.teacher.checkpoint={placeholder}")
    spec = load_spec(path, overrides)
    assert isinstance(spec, RunSpec)
    assert spec.workload == raw["workload"] and spec.name == raw["name"]


def test_quickstart_resolves_as_written():
    spec = load_spec(QUICKSTART)
    assert (spec.name, spec.workload, spec.model.model_dump()) == ("quickstart-resnet20-mnist", "resnet_cifar",
                                                                   {"arch": "resnet20", "shortcut": "A"})
    assert spec.scaling.num_workers == 2 and spec.train.batch_size == 128
    assert spec.train.lr_schedule.type == "cosine" and spec.train.lr_schedule.warmup_epochs == 0.5
    assert spec.run_dir == Path("~/bitfleet_results").expanduser().absolute() / "quickstart-resnet20-mnist"


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("overrides,field,expected", [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES])
def test_cli_validate_exit_2_one_line(spec_file, capsys, overrides, field, expected):
    argv = ["validate", str(spec_file)] + [a for o in overrides for a in ("-o", o)]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"bitfleet: error: {field}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    for part in expected:
        assert part in err


def test_cli_validate_yaml_error(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_YAML)
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitfleet: error: ") and "line " in err and err.count("\n") == 1


def test_cli_validate_ok_without_ray():
    # in a fresh process: this one has imported Ray for other tests
    code = (f"import sys; from bitfleet import cli; assert cli.main(['validate', {str(QUICKSTART)!r}]) == 0; "
            "assert 'ray' not in sys.modules, 'validating a spec must not import (let alone start) Ray'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok (resnet_cifar, resnet20, run quickstart-resnet20-mnist" in out.stdout


# The same through a real process: exit status 2 and no traceback on stderr. Python and torch take
# seconds to start here, so the processes start together when this module starts and are read at the end.
CLI_CASES = {
    "yaml-syntax": (None, ["line "]),
    "unknown-key": (["-o", "train.epocs=3"], ["train.epocs: unknown key", "'epochs'"]),
    "missing-data": (["-o", "data.dataset=mnist", "-o", "data.root=/nonexistent/bitfleet"],
                     ["data.root: ", "bitfleet data download mnist"]),
}


@pytest.fixture(scope="module", autouse=True)
def cli_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    good, broken = folder / "spec.yaml", folder / "broken.yaml"
    good.write_text(QUICKSTART.read_text())
    broken.write_text(BROKEN_YAML)
    procs = {}
    for name, (args, _) in CLI_CASES.items():
        argv = [str(broken)] if args is None else [str(good), *args]
        procs[name] = subprocess.Popen([sys.executable, "-m", "bitfleet.cli", "validate", *argv],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_process_exit_2_without_traceback(cli_processes, name):
    out, err = cli_processes[name].communicate(timeout=120)
    assert cli_processes[name].returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bitfleet: error: "), err
    for part in CLI_CASES[name][1]:
        assert part in lines[0], err


@pytest.mark.parametrize("workers, error", [
    ("[1, 2]", None),
    ("[2, 1]", "scaling.num_workers"),
    ("[0, 2]", "scaling.num_workers"),
    ("[1, 3]", "train.batch_size: 128 is the global batch and must divide evenly over scaling.num_workers=(1, 3) "
               "(not over 3 workers)"),
])
def test_elastic_num_workers_is_a_range_whose_every_size_splits_the_batch(spec_file, workers, error):
    if error is None:
        spec = load_spec(spec_file, [f"scaling.num_workers={workers}"])
        assert spec.scaling.worker_range == (1, 2) and spec.scaling.max_workers == 2
        return
    with pytest.raises(SpecError, match=re.escape(error)):
        load_spec(spec_file, [f"scaling.num_workers={workers}"])


def test_deepspeed_strategy_without_deepspeed_names_the_install(spec_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(SpecError, match=re.escape("train.strategy: deepspeed needs DeepSpeed: "
                                                  "`pip install bitfleet[deepspeed]`")):
        load_spec(spec_file, ["train.strategy=deepspeed"])


# --------------------------------------------------------------------------- workloads' defaults


def test_each_workloads_defaults_are_spec_fields_that_resolve_to_themselves(tmp_path):
    from bitfleet import registry
    from bitfleet.dotted import leaves

    for name in registry.names():
        defaults = registry.workload_class(name).defaults
        raw = {"name": "d", "workload": name, "data": {"dataset": "cifar10", "root": str(tmp_path), "val_size": 16},
               "storage_path": str(tmp_path / "runs")}
        synthetic.write("cifar10", tmp_path, n_train=20, n_test=4)
        dumped = validate_spec(raw).model_dump(mode="json")
        for path, value in leaves(defaults):
            section, *rest = path.split(".")
            node = dumped[section]
            for key in rest:
                node = node[key]
            assert node == (list(value) if isinstance(value, tuple) else value), (name, path)


def test_a_value_the_spec_gives_wins_over_the_workloads_default_even_null(tmp_path):
    from bitfleet.resolve import with_workload_defaults

    raw = {"workload": "lbpnet", "train": {"ema": None, "optimizer": {"lr": 0.5}}, "data": {"dataset": "mnist_sample"}}
    merged = with_workload_defaults(raw)
    optimizer = merged["train"]["optimizer"]
    assert merged["train"]["ema"] is None and (optimizer["type"], optimizer["lr"]) == ("adamw", 0.5)
    assert raw == {"workload": "lbpnet", "train": {"ema": None, "optimizer": {"lr": 0.5}},
                   "data": {"dataset": "mnist_sample"}}  # the spec as written is left alone
    assert with_workload_defaults({"workload": "no_such"}) == {"workload": "no_such"}  # refused later, by name


def test_every_shipped_spec_has_targets_for_every_run_it_starts():
    """A paper figure, the seed's expected range, or null where no figure exists: reports always show the gap
    (or say there is none). A pipeline's training and eval stages each have them, their own or the spec's."""
    missing, without_figure = [], set()
    for path in SPEC_FILES:
        raw = yaml.safe_load(path.read_text())
        runs = [stage for stage in raw.get("stages", []) if stage.get("task") in (None, "eval")] or [{}]
        for stage in runs:
            targets = (stage.get("overrides") or {}).get("targets", raw.get("targets"))
            if not targets:
                missing.append(f"{path.parent.parent.name}/{path.name}:{stage.get('name', '')}")
            elif all(value is None for value in targets.values()):
                without_figure.add(path.name)
    assert missing == []
    # runs with no published figure anywhere, each said so in its spec: RBNN beyond CIFAR-10 and ImageNet, and
    # the INT8 stages of the seed's AlexNet and VGG16 (its comparison table gives their float accuracy only)
    assert without_figure == {"cifar100_resnet20_1w1a.yaml", "cifar100_resnet18_1w1a.yaml",
                              "tinyimagenet_resnet18_1w1a.yaml", "alexnet.yaml", "vgg16.yaml"}
