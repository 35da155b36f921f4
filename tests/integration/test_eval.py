"""`bitfleet eval` against what real runs reported, and runs read from object storage (file:// URIs: pyarrow's
local filesystem behind the URI code path of s3:// and gs://).

Tiny quickstarts on the embedded MNIST digits, evaluated on the whole test split (no train.max_eval_steps).
One worker is the strict case: the same batches in the same order, so the loss is equal to its last bit. Two
workers evaluate half the split each and sum their counts: the accuracy is still equal, the loss to float
rounding (its sum is added in another order). lbpnet keeps an EMA and evaluates it on its hard path after
BN recalibration; rbnn recalibrates BN before every evaluation: both hold in the checkpoints written after.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitfleet import cli, evaluation, export, report
from bitfleet.engine import checkpoint
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TINY = ["train.epochs=3", "train.max_steps_per_epoch=8", "train.batch_size=32", "scaling.cpus_per_worker=1",
        "data.loader_workers=0", "failure.max_failures=2", "failure.keep=2"]
RUNS = {  # name -> spec, workers, extra overrides
    "resnet_cifar": ("workloads/resnet_cifar/specs/quickstart.yaml", 1, ["train.optimizer.lr=0.02"]),
    "rbnn": ("workloads/rbnn/specs/quickstart.yaml", 2, ["rbnn.bn_recalibration_batches=2"]),
    "lbpnet": ("workloads/lbpnet/specs/quickstart.yaml", 2, ["lbpnet.hard_finetune.start_epoch=2",
                                                          "lbpnet.hard_finetune.bn_recal_batches=2"]),
}


def run(cluster, tmp_path: Path, workload: str, storage: str) -> None:
    spec, workers, extra = RUNS[workload]
    overrides = [f"name={workload}", f"storage_path={storage}", f"scaling.num_workers={workers}", *TINY, *extra]
    args = ["run", spec, "--address", cluster.address, *[x for o in overrides for x in ("-o", o)]]
    finish(bitfleet(cluster, tmp_path / f"{workload}.log", *args))


def checkpoints(folder: Path) -> list[Path]:
    return [path for path in folder.glob("checkpoint_*") if path.is_dir()]  # not Ray's snapshot file


def test_one_worker_eval_equals_the_run_to_the_last_bit_and_reads_the_run_from_object_storage(
        ray_cluster, tmp_path, capsys):
    store = tmp_path / "store"
    run(ray_cluster, tmp_path, "resnet_cifar", f"file://{store}")
    folder, uri = store / "resnet_cifar", f"file://{store}/resnet_cifar"
    reported = read_metrics(folder)
    assert reported[-1]["test/acc"] > 20  # learnt something: chance is 10%

    out = finish(bitfleet(ray_cluster, tmp_path / "eval.log", "eval", uri))
    result = json.loads((folder / "eval.json").read_text())  # written into the run, in object storage
    epoch = result["epoch"]
    at = reported[epoch - 1]
    assert (result["test/acc"], result["test/loss"]) == (at["test/acc"], at["test/loss"])  # bit for bit
    assert result["checkpoint"].startswith(uri) and f"acc {result['test/acc']:.6g}" in out

    for kept in checkpoints(folder):  # each kept checkpoint, named by its URI
        named = evaluation.evaluate_run(f"{uri}/{kept.name}", out=str(tmp_path / "e.json"))
        assert named["test/acc"] == reported[named["epoch"] - 1]["test/acc"] == named["reported"]["test/acc"]

    assert report.write([uri]) == uri
    assert json.loads((folder / "summary.json").read_text())[0]["final_test_acc"] == reported[-1]["test/acc"]

    best = Path(json.loads((folder / "result.json").read_text())["best_checkpoint"])
    state = folder / best.name / checkpoint.FILE
    state.write_bytes(state.read_bytes()[:-64])  # the best checkpoint, truncated
    assert cli.main(["eval", f"{uri}/{best.name}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"bitfleet: error: {uri}/{best.name}: an incomplete or corrupt checkpoint: state.pt differs "
                    "from its manifest (truncated or corrupt)")
    fallback = evaluation.evaluate_run(uri, out=str(tmp_path / "e.json"))  # the run: its other, complete one
    assert fallback["epoch"] != epoch and fallback["test/acc"] == reported[fallback["epoch"] - 1]["test/acc"]


@pytest.mark.parametrize("workload", ["rbnn", "lbpnet"])
def test_two_worker_eval_equals_the_runs_accuracy_at_each_checkpoint(ray_cluster, tmp_path, workload):
    run(ray_cluster, tmp_path, workload, str(tmp_path / "runs"))
    folder = tmp_path / "runs" / workload
    reported = read_metrics(folder)
    results = [evaluation.evaluate_run(str(c), out=str(tmp_path / "e.json")) for c in checkpoints(folder)]
    assert len(results) == 2  # failure.keep
    for result in results:
        at = reported[result["epoch"] - 1]
        ema = "ema/" if workload == "lbpnet" else ""  # lbpnet's run evaluates its EMA: reported as ema/test/*
        assert result["weights"] == ("ema" if ema else "model")
        assert result["test/acc"] == at[f"{ema}test/acc"]
        assert result["test/loss"] == pytest.approx(at[f"{ema}test/loss"], rel=1e-5)
        assert result["reported"] == {k.removeprefix("ema/"): v for k, v in at.items() if k.startswith(f"{ema}test/")}
    assert results[0]["test/loss"] != results[1]["test/loss"]  # the comparison tells checkpoints apart

    if workload == "lbpnet":  # its exporter reads a run in object storage too
        written = export.export(f"file://{folder}", tmp_path / "engine.npz")
        assert written["bytes"] == (tmp_path / "engine.npz").stat().st_size > 0
