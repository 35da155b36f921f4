"""The project's hostile corpus: specs and `-o` values written to break the loader, the validation or the
machine (issue 21). Every case goes through `bitfleet validate`, `bitfleet run` and `bitfleet sweep`, each of
which must exit 2 with exactly one stderr line naming the field (or the file and line), no traceback, no
Ray started, within a time and memory bound. In process, all of them (memory measured by tracemalloc); in a
real process, a representative case of each class, under RLIMIT_DATA, with RAY_ADDRESS at a closed port.
"""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from bitfleet.cli import main
from bitfleet.strict_yaml import MAX_BYTES

pytestmark = pytest.mark.timeout(300)

BASE = "name: hostile\nworkload: lbpnet\ndata: {dataset: mnist_sample}\nstorage_path: STORAGE\n"
COMMANDS = ("validate", "run", "sweep")
SECONDS = 60  # each command of a case, in process (a busy machine included): the blow-ups took minutes and GBs
PEAK_BYTES = 64 << 20  # Python allocations of one command (a billion laughs grew ~100 MB/s)
CHILD_DATA_BYTES = 3 << 29  # 1.5 GiB of heap for a whole `bitfleet` process, torch imported


@dataclass(frozen=True)
class Case:
    id: str
    body: str | bytes  # appended to BASE, or the whole file with base=False
    field: str  # what the one error line names
    overrides: tuple[str, ...] = ()
    base: bool = True


def laughs(levels: int = 6, width: int = 10) -> str:
    """A flow list whose aliases expand to width**levels values: harmless while shared, huge once copied."""
    anchors = [f"&l0 [{', '.join(['lol'] * width)}]"]
    anchors += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(anchors)}]"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def block(depth: int) -> str:
    return "".join("  " * (i + 1) + f"k{i}:\n" for i in range(depth)) + "  " * (depth + 1) + "leaf: 1\n"


SWEEP = "sweep: {space: {train.epochs: {choice: [1, 2]}}}\n"
DEEPSPEED = "train: {strategy: deepspeed, deepspeed: {config: {x: %s}}}\n"
PIPELINE = "stages: [{name: a}, {name: b, needs: [a]}]\n"

CASES = [
    # YAML itself: syntax, documents, top level
    Case("syntax-unclosed-flow", "train: {epochs: 3\n", "spec.yaml: line 6"),
    Case("syntax-bad-indent", "train:\n  epochs: 3\n    lr: 1\n", "spec.yaml: line 7"),
    Case("syntax-tab", "train:\n\tepochs: 3\n", "spec.yaml: line 6"),
    Case("two-documents", "---\nname: other\n", "invalid YAML"),
    Case("top-level-list", "- name\n- workload\n", "at the top level", base=False),
    Case("top-level-scalar", "just words\n", "at the top level", base=False),
    # keys written twice
    Case("duplicate-top-level", "name: again\n", "name: duplicate key 'name' on lines 1 and 5"),
    Case("duplicate-flow", "train: {epochs: 1, epochs: 2}\n", "train.epochs: duplicate key 'epochs' on line 5, "
         "columns 9 and 20"),
    Case("duplicate-block", "train:\n  epochs: 1\n  batch_size: 8\n  epochs: 2\n", "train.epochs: duplicate key"),
    Case("duplicate-section", "train: {epochs: 1}\ntrain: {epochs: 2}\n", "train: duplicate key 'train' on lines 5 "
         "and 6"),
    Case("duplicate-in-config", "train: {deepspeed: {config: {a: 1, a: 2}}}\n", "train.deepspeed.config.a"),
    Case("duplicate-sweep-path", "sweep: {space: {train.epochs: {choice: [1]}, train.epochs: {choice: [2]}}}\n",
         "sweep.space.train.epochs: duplicate key"),
    # aliases: expansion budget, recursion, nesting through aliases
    Case("laughs-sweep-choice", "sweep: {space: {train.epochs: {choice: " + laughs() + "}}}\n",
         "sweep.space.train.epochs.choice"),
    Case("laughs-deepspeed-sweep", DEEPSPEED % laughs() + SWEEP, "train.deepspeed.config.x"),
    Case("laughs-deepspeed-pipeline", DEEPSPEED % laughs() + PIPELINE, "train.deepspeed.config.x"),
    Case("laughs-stage-overrides", "stages: [{name: a, overrides: {train.epochs: " + laughs() + "}}]\n",
         "stages.0.overrides.train.epochs"),
    Case("laughs-targets", "targets: {test/acc: " + laughs(levels=5) + "}\n", "targets.test/acc"),
    Case("recursive-mapping", "train: &t {deepspeed: {config: {again: *t}}}\n", "train.deepspeed.config.again"),
    Case("recursive-list", "targets: &t [*t]\n", "targets.0: an alias inside its own anchor"),
    Case("deep-through-aliases", "targets: {a: &a " + "[" * 20 + "1" + "]" * 20 + ", b: " + "[" * 20 + "*a"
         + "]" * 20 + "}\n", "targets.b.0.0.0"),
    # size: nesting, values, bytes
    Case("deep-flow-100000", DEEPSPEED % nested(100_000), "train.deepspeed.config.x.0.0.0.0.…: nested deeper than 32"),
    Case("deep-block", "train:\n  deepspeed:\n    config:\n" + "".join("  " * (i + 3) + f"k{i}:\n" for i in range(40))
         + "  " * 43 + "leaf: 1\n", "train.deepspeed.config.k0.k1.k2"),
    Case("many-values", "train: {lr_schedule: {milestones: [" + ", ".join(["1"] * 12_000) + "]}}\n",
         "train.lr_schedule.milestones"),
    Case("file-too-large", "# " + "x" * MAX_BYTES + "\n", f"larger than {MAX_BYTES:,} bytes"),
    # bytes that are not a UTF-8 spec
    Case("utf-16", b"\xff\xfe" + BASE.encode("utf-16-le"), "not UTF-8: byte 0 (0xff)", base=False),
    Case("latin-1-byte", b"seed: 1 # caf\xe9\n", "not UTF-8: byte "),
    Case("truncated-sequence", b"seed: 1 # \xe2\x82\n", "not UTF-8"),
    Case("nul-byte", b"seed: 1\x00\n", "spec.yaml: line 5: invalid YAML: character '\\x00'"),
    Case("escape-byte", b"seed: \x1b[2J1\n", "character '\\x1b' is not allowed"),
    # NUL in a string: no path holds one
    Case("nul-storage-path", 'name: n\nworkload: lbpnet\ndata: {dataset: mnist_sample}\nstorage_path: "/tmp/a\\0b"\n',
         "storage_path: a NUL character", base=False),
    Case("nul-data-root", 'name: n\nworkload: lbpnet\ndata: {dataset: mnist, root: "/data\\0/x"}\n',
         "data.root: a NUL character", base=False),
    Case("nul-init-from", 'train: {init_from: "ckpt\\0"}\n', "train.init_from: a NUL character"),
    Case("nul-key", '"na\\0me": 1\n', "a key holds a NUL character"),
    Case("nul-override", "", "storage_path: a NUL character", ('storage_path="/tmp/x\\0y"',)),
    # numbers that are not finite
    Case("lr-inf", "train: {optimizer: {lr: .inf}}\n", "train.optimizer.lr: .inf is not a finite number"),
    Case("weight-decay-nan", "train: {optimizer: {weight_decay: .nan}}\n", "train.optimizer.weight_decay"),
    Case("cpus-minus-inf", "scaling: {cpus_per_worker: -.inf}\n", "scaling.cpus_per_worker"),
    Case("warmup-inf", "train: {lr_schedule: {warmup_epochs: .Inf}}\n", "train.lr_schedule.warmup_epochs"),
    Case("target-nan", "targets: {test/acc: .NaN}\n", "targets.test/acc"),
    Case("target-range-inf", "targets: {test/acc: [0, .inf]}\n", "targets.test/acc.1"),
    Case("grad-clip-overflow", "train: {grad_clip: 1.0e+999}\n", "train.grad_clip: 1.0e+999 is not a finite"),
    Case("sweep-bound-nan", "sweep: {space: {train.optimizer.lr: {loguniform: [.nan, 0.1]}}}\n",
         "sweep.space.train.optimizer.lr.loguniform.0"),
    Case("sweep-bound-inf", "sweep: {space: {train.optimizer.lr: {uniform: [0.1, .inf]}}}\n",
         "sweep.space.train.optimizer.lr.uniform.1"),
    Case("pb2-bound-nan", "sweep: {scheduler: {type: pb2, perturbation_interval: 1, bounds: "
         "{train.optimizer.lr: [.nan, 1.0]}}}\n", "sweep.scheduler.bounds.train.optimizer.lr.0"),
    Case("override-inf", "", "train.optimizer.lr: .inf is not a finite number", ("train.optimizer.lr=.inf",)),
    # integers: 64 bits, then each count's own bound
    Case("batch-2-pow-64", "train: {batch_size: 18446744073709551616}\n",
         "train.batch_size: 18446744073709551616 does not fit in 64 bits"),
    Case("epochs-googol", "train: {epochs: 1" + "0" * 100 + "}\n", "train.epochs: 1000"),
    Case("int-5000-digits", "seed: " + "9" * 5000 + "\n", "seed: 999"),
    Case("epochs-bound", "train: {epochs: 1000000}\n", "train.epochs: Input should be less than or equal to 100000"),
    Case("batch-bound", "train: {batch_size: 2097152}\n",
         "train.batch_size: Input should be less than or equal to 1048576"),
    Case("workers-bound", "scaling: {num_workers: 5000}\n", "scaling.num_workers: expected a number of workers "
         "from 1 to 4096"),
    Case("elastic-workers-bound", "scaling: {num_workers: [1, 100000]}\n", "scaling.num_workers"),
    Case("loader-workers-override", "", "data.loader_workers: Input should be less than or equal to 256",
         ("data.loader_workers=1000",)),
    Case("steps-bound", "train: {max_steps_per_epoch: 10000000000}\n", "train.max_steps_per_epoch"),
    Case("checkpoint-steps-bound", "failure: {checkpoint_every_steps: 10000000000}\n",
         "failure.checkpoint_every_steps"),
    Case("num-samples-bound", SWEEP.replace("space", "num_samples: 10000000, space"), "sweep.num_samples"),
    Case("grace-period-bound", "sweep: {scheduler: {type: asha, grace_period: 1000000}, space: "
         "{train.epochs: {choice: [1]}}}\n", "sweep.scheduler.grace_period"),
    Case("stages-bound", "stages: [" + ", ".join(f"{{name: s{i}}}" for i in range(101)) + "]\n",
         "stages: List should have at most 100 items"),
    # a boolean is not a number
    Case("epochs-true", "train: {epochs: true}\n", "train.epochs: expected a number, not a boolean"),
    Case("workers-true", "scaling: {num_workers: true}\n", "scaling.num_workers: expected a number"),
    Case("batch-false", "train: {batch_size: false}\n", "train.batch_size: expected a number"),
    Case("betas-bool", "train: {optimizer: {type: adam, betas: [true, 0.9]}}\n", "train.optimizer.betas"),
    Case("milestones-bool", "train: {lr_schedule: {milestones: [10, yes]}}\n", "train.lr_schedule.milestones"),
    Case("zero-stage-true", "train: {strategy: deepspeed, deepspeed: {zero_stage: true}}\n",
         "train.deepspeed.zero_stage: expected a number"),
    Case("num-samples-true", SWEEP.replace("space", "num_samples: true, space"),
         "sweep.num_samples: expected a number"),
    Case("workload-option-bool", "model: {blocks: {stages: true}}\n", "model.blocks.stages: expected a number"),
    Case("resources-bool", "scaling: {resources_per_worker: {accelerator: on}}\n", "scaling.resources_per_worker"),
    Case("override-true", "", "train.epochs: expected a number", ("train.epochs=true",)),
    # sweep values checked against the field at validation, not when a trial starts
    Case("sweep-choice-epochs", "sweep: {space: {train.epochs: {choice: [-1, 0]}}}\n",
         "sweep.space.train.epochs: the value -1 is refused: train.epochs"),
    Case("sweep-randint-epochs", "sweep: {space: {train.epochs: {randint: [0, 5]}}}\n",
         "sweep.space.train.epochs: the value 0 is refused"),
    Case("sweep-uniform-momentum", "sweep: {space: {train.optimizer.momentum: {uniform: [0.5, 1.5]}}}\n",
         "sweep.space.train.optimizer.momentum: the value 1.4999"),
    Case("sweep-choice-bool", "sweep: {space: {train.epochs: {choice: [true, 2]}}}\n",
         "sweep.space.train.epochs: the value True is refused"),
    Case("sweep-choice-dataset", "sweep: {space: {data.dataset: {choice: [mnist_sample, svhn]}}}\n",
         "sweep.space.data.dataset: the value 'svhn'"),
    Case("sweep-choice-batch-workers", "scaling: {num_workers: 2}\nsweep: {space: {train.batch_size: "
         "{choice: [64, 63]}}}\n", "sweep.space.train.batch_size: the value 63 is refused"),
    Case("pbt-mutation-batch", "sweep: {scheduler: {type: pbt, perturbation_interval: 1, mutations: "
         "{train.batch_size: [0, 64]}}}\n", "sweep.scheduler.mutations.train.batch_size: the value 0"),
    Case("pb2-bound-negative-lr", "sweep: {scheduler: {type: pb2, perturbation_interval: 1, bounds: "
         "{train.optimizer.lr: [-1.0, 1.0]}}}\n", "sweep.scheduler.bounds.train.optimizer.lr: the value -1.0"),
    Case("deepspeed-checkpoint-engine", "train: {strategy: deepspeed, deepspeed: {config: {checkpoint: "
         "{load_universal: true}}}}\n", "train.deepspeed.config: checkpoint is set by bitfleet's checkpoints"),
    # the workload
    Case("workload-typo", "name: w\nworkload: lbpnett\ndata: {dataset: mnist_sample}\nlbpnet: {}\n",
         "workload: unknown workload 'lbpnett'; did you mean 'lbpnet'?", base=False),
    Case("workload-unknown", "name: w\nworkload: xgboost\ndata: {dataset: mnist_sample}\n",
         "workload: unknown workload 'xgboost'; expected one of lbpnet, rbnn", base=False),
    Case("workload-not-a-name", "name: w\nworkload: [lbpnet]\ndata: {dataset: mnist_sample}\n", "workload:",
         base=False),
    # what YAML reads as other types, and keys that are not names
    Case("timestamp", "seed: 2024-01-01\n", "seed: '2024-01-01' reads as a YAML timestamp"),
    Case("python-tag", "seed: !!python/object/apply:os.system [ls]\n", "seed: a YAML python/object/apply"),
    Case("python-name-tag", "seed: !!python/name:os.system ''\n", "seed: '' reads as a YAML python/name"),
    Case("binary-tag", "seed: !!binary aGk=\n", "seed: 'aGk=' reads as a YAML binary"),
    Case("set-tag", "targets: !!set {test/acc}\n", "targets: a YAML set"),
    Case("custom-tag", "seed: !evil 1\n", "seed: '1' reads as a YAML !evil"),
    Case("bool-key", "train: {on: 1}\n", "train.on: this key reads as a YAML bool"),
    Case("int-key", "targets: {1: 2}\n", "targets.1: this key reads as a YAML int"),
    Case("complex-key", "? [a, b]\n: 1\n", "<top level>: a key is a name"),
    Case("newline-key", '"na\\nme": 1\n', "error: na\\nme: unknown key; did you mean 'name'?\n"),
    Case("escape-key", '"\\e[31mred": 1\n', "error: \\x1b[31mred: unknown key; expected one of name,"),
    Case("name-leaves-storage", "", "name: String should match pattern", ("name=../../etc",)),
    # overrides themselves
    Case("override-syntax", "", "override train.epochs: cannot parse value '[1'", ("train.epochs=[1",)),
    Case("override-not-a-path", "", "override 'train.epochs': expected dotted.path=value", ("train.epochs",)),
    Case("override-not-a-section", "", "override name.x: 'name' is not a section", ("name.x=1",)),
    Case("override-laughs", "", "train.deepspeed.config.x", (f"train.deepspeed.config.x={laughs()}",)),
]
# Representative cases (aliases, nesting, encoding, NUL, booleans, sweep values, workload) as the real `bitfleet`
# process, each under `run` or `sweep`: a process costs seconds (torch's import), the in-process test covers all.
IN_A_PROCESS = {"laughs-sweep-choice": "sweep", "laughs-deepspeed-pipeline": "run", "deep-flow-100000": "run",
                "utf-16": "sweep", "nul-override": "run", "epochs-true": "run", "sweep-choice-epochs": "sweep",
                "workload-typo": "sweep"}


def test_the_corpus_covers_every_class():
    assert len(CASES) >= 60 and len({case.id for case in CASES}) == len(CASES)
    assert set(IN_A_PROCESS) <= {case.id for case in CASES}


def _write(case: Case, folder: Path) -> Path:
    base = BASE.replace("STORAGE", str(folder / "results"))
    body = case.body if isinstance(case.body, bytes) else case.body.encode()
    path = folder / "spec.yaml"
    path.write_bytes((base.encode() if case.base else b"") + body)
    return path


def _argv(command: str, spec: Path, case: Case) -> list[str]:
    return [command, str(spec)] + [a for item in case.overrides for a in ("-o", item)]


def _assert_one_line(err: str, case: Case, where: str):
    assert "Traceback" not in err, (where, err[-2000:])
    assert err.endswith("\n") and err.count("\n") == 1, (where, err[-2000:])
    assert err.startswith("bitfleet: error: ") and case.field in err, (where, err)
    assert err[:-1].isprintable(), (where, err)  # no control character reaches the terminal


@pytest.fixture
def no_ray(monkeypatch):
    """Ray must not start: a closed port as its address, and `ray.init` failing the test if called."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    yield
    assert not ray.is_initialized()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_each_case_is_refused_in_one_line_by_every_command(case, tmp_path, capsys, no_ray):
    spec = _write(case, tmp_path)
    for command in COMMANDS:
        tracemalloc.start()
        start = time.perf_counter()
        try:
            rc = main(_argv(command, spec, case))
        finally:
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        err = capsys.readouterr().err
        assert rc == 2, (command, err)
        _assert_one_line(err, case, command)
        assert elapsed < SECONDS and peak < PEAK_BYTES, (command, elapsed, peak)
    assert not (tmp_path / "results").exists()  # nothing was written for the run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_DATA, (CHILD_DATA_BYTES, CHILD_DATA_BYTES))


@pytest.mark.parametrize("case_id", sorted(IN_A_PROCESS))
def test_representative_cases_in_a_real_process_under_memory_and_time_limits(case_id, tmp_path):
    (case,) = [c for c in CASES if c.id == case_id]
    spec = _write(case, tmp_path)
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run([sys.executable, "-m", "bitfleet.cli", *_argv(IN_A_PROCESS[case_id], spec, case)],
                          capture_output=True, text=True, env=env, timeout=120, preexec_fn=_limit_memory, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    _assert_one_line(done.stderr, case, IN_A_PROCESS[case_id])
    assert done.stdout == ""
    assert not (tmp_path / "results").exists()
