"""The fault matrix (issue 19): workloads x faults x strategy on a real local cluster, real signals.

Each workload runs once uninterrupted (its twin) and once per fault, from the same spec (2 workers, 3
epochs of `--steps` steps, a checkpoint every `--every` steps); a row says whether the faulted run ended
with the twin's weights (SHA-256 over the state dict's tensors), how many steps it had to train again
(lost_steps), and how long recovery took (recovery_s: from the fault to the restored worker saying so; for
the driver faults, from the rerun's start).

Faults: worker_sigkill_x3 (SIGKILL of a random worker at three random steps), worker_sigterm (a spot
reclaim), driver_sigterm (`ray job stop`, an eviction; then the same command again), driver_sigkill
(then the same command again), corrupt_newest (the newest checkpoint's state.pt truncated after the run
stopped; the rerun falls back), partial_newest (the newest checkpoint's manifest removed: a write cut
short), node_loss (the run's two workers on two worker nodes, one per node; one node's raylet and workers
SIGKILLed at once, and a replacement node joins).

lost_steps: the global step a fault interrupted, read off the cluster's metrics endpoint just before it
(the restored step of the group plus the steps it reported since, `ray_bitfleet_steps_total`), minus the
step the next group restored at. Up to one metrics flush (REPORT_MS) late, so a lower bound by at most a
step or two; 0 for the SIGTERMs means the checkpoint was taken at the step the signal found.

    python bench/fault_matrix.py [--workloads resnet_cifar lbpnet rbnn] [--strategies ddp deepspeed]
                                 [--faults ...] [--out bench/results/fault_matrix.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402  (its standing cluster: our child, own ports and temp dir)

from bitfleet.engine import checkpoint  # noqa: E402

REPO = Path(__file__).parents[1]
FAULTS = ["worker_sigkill_x3", "worker_sigterm", "driver_sigterm", "driver_sigkill", "corrupt_newest",
          "partial_newest", "node_loss"]
NODE_RESOURCE = "bench_node"  # node_loss: each of the run's workers takes one, offered by the worker nodes only
QUICKSTARTS = {
    "resnet_cifar": ("workloads/resnet_cifar/specs/quickstart.yaml", []),
    "lbpnet": ("workloads/lbpnet/specs/quickstart.yaml", ["lbpnet.hard_finetune.start_epoch=2",
                                                         "lbpnet.hard_finetune.bn_recal_batches=2"]),
    "rbnn": ("workloads/rbnn/specs/quickstart.yaml", ["rbnn.bn_recalibration_batches=2"]),
}
RESTORED = re.compile(r"restored from checkpoint at epoch (\d+)(?:, step (\d+))?[^\n]*\(pid (\d+)\)")


class Run:
    """One `bitfleet run` of a workload's spec under a name, and what its log and endpoint say."""

    def __init__(self, bench, name: str, extra: tuple[str, ...] = ()):
        self.bench, self.name, self.extra = bench, name, list(extra)
        self.run_dir = bench.storage / name
        self.logs: list[Path] = []

    def start(self) -> None:
        log = self.bench.tmp / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log)
        spec, extra = QUICKSTARTS[self.bench.workload]
        overrides = [f"name={self.name}", f"storage_path={self.bench.storage}", *self.bench.common, *extra, *self.extra]
        args = [sys.executable, "-m", "bitfleet.cli", "run", str(REPO / spec), "--address",
                f"127.0.0.1:{overhead.GCS_PORT}", "-v", *[x for o in overrides for x in ("-o", o)]]
        with open(log, "w") as out:
            self.process = subprocess.Popen(args, env=self.bench.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.started = time.time()

    def text(self) -> str:
        return "".join(log.read_text() for log in self.logs)

    def restores(self) -> list[tuple[int, int]]:
        """(pid, global step) of each group that restored, in order."""
        seen, out = set(), []
        for epoch, step, pid in RESTORED.findall(self.text()):
            if pid not in seen:
                seen.add(pid)
                out.append((int(pid), int(epoch) * self.bench.steps + int(step or 0)))
        return out

    def pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"pid=(\d+)\) world_rank=\d+", self.logs[-1].read_text())][-2:]

    def step_now(self) -> int:
        """The global step the current group has reached (its restore point plus its reported steps)."""
        groups = self.restores()
        base = groups[-1][1] if groups and groups[-1][0] in self.pids() else 0
        text = overhead.scrape() or ""
        counts = {s.labels.get("WorkerId"): s.value for family in text_string_to_metric_families(text)
                  for s in family.samples
                  if s.name == "ray_bitfleet_steps_total" and s.labels.get("run") == self.name}
        fresh = [v for worker, v in counts.items() if worker not in self.bench.old_workers]
        return base + int(max(fresh, default=0))

    def forget_workers(self) -> None:
        text = overhead.scrape() or ""
        self.bench.old_workers |= {s.labels.get("WorkerId") for family in text_string_to_metric_families(text)
                                   for s in family.samples if s.name == "ray_bitfleet_steps_total"}

    def newest_step(self) -> int:
        steps = [0]
        for folder in self.run_dir.glob("checkpoint_*/"):
            try:
                steps.append(checkpoint.manifest(folder).get("step") or 0)
            except (OSError, ValueError):
                pass
        return max(steps)

    def wait_restore(self, count: int) -> float:
        overhead.wait_until(lambda: len(self.restores()) >= count or self.process.poll() is not None, 600,
                            f"restore {count} of {self.name}")
        return time.time()

    def finish(self) -> None:
        self.process.wait(timeout=1800)
        assert self.process.returncode == 0, self.text()[-4000:]

    def final_sha(self) -> str:
        result = json.loads((self.run_dir / "result.json").read_text())
        return checkpoint.weights_sha256(checkpoint.load(result["last_checkpoint"])["model"])


class Bench:
    """One workload and strategy: where its runs write, and the overrides every one of them shares."""

    def __init__(self, args, env, tmp: Path, workload: str, strategy: str):
        self.env, self.tmp, self.workload, self.steps = env, tmp, workload, args.steps
        self.storage = tmp / f"results-{workload}-{strategy}"
        self.old_workers: set[str] = set()
        self.common = [f"train.max_steps_per_epoch={args.steps}", "train.epochs=3", "train.batch_size=32",
                       "train.max_eval_steps=2", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                       "data.loader_workers=0", f"failure.checkpoint_every_steps={args.every}", "failure.keep=3",
                       "failure.max_failures=10", f"train.strategy={strategy}"]


def kill_worker(run: Run, sig: int, rng: random.Random) -> tuple[int, float]:
    """Signal a random worker of the current group: (the global step it had reached, when)."""
    at = run.step_now()
    os.kill(rng.choice(run.pids()), sig)
    when = time.time()
    run.forget_workers()  # the next group's workers are the ones not seen by now
    return at, when


def start_node(bench: Bench, attempts: int = 3) -> subprocess.Popen:
    """A worker node of the bench's cluster: its own `ray start --block` (raylet, agents), in its own group,
    once it says it has joined. On a loaded machine a raylet can time out registering with the GCS; the
    node then exits and is started again (a run waiting for both nodes would otherwise time out for good)."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
               f"--address=127.0.0.1:{overhead.GCS_PORT}", "--num-cpus=1",
               f"--resources={json.dumps({NODE_RESOURCE: 1})}", "--disable-usage-stats"]
    for attempt in range(1, attempts + 1):
        log = bench.tmp / f"node-{time.monotonic_ns()}.log"
        with open(log, "w") as out:
            node = subprocess.Popen(command, env=bench.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        overhead.wait_until(lambda n=node, f=log: n.poll() is not None or "Ray runtime started" in f.read_text(), 300,
                            "a worker node to join")
        if node.poll() is None:
            return node
        print(f"worker node failed to start (attempt {attempt}): {log.read_text().strip().splitlines()[-1]}",
              flush=True)
    raise RuntimeError(f"no worker node started in {attempts} attempts (see {bench.tmp}/node-*.log)")


def raylet_group(worker_pid: int) -> int:
    """The process group of the node whose raylet started a worker."""
    parent = int(Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return os.getpgid(parent)


def lose_a_node(run: Run, nodes: list[subprocess.Popen]) -> float:
    """SIGKILL the node of one of the run's workers (raylet and workers at once); a replacement joins."""
    hosts = {raylet_group(pid) for pid in run.pids() if _alive(pid)}
    doomed = next(node for node in nodes if node.pid in hosts)
    os.killpg(doomed.pid, signal.SIGKILL)
    when = time.time()
    doomed.wait()
    run.forget_workers()
    nodes.append(start_node(run.bench))
    return when


def fault_row(bench: Bench, fault: str, rng: random.Random) -> dict:
    nodes = [start_node(bench), start_node(bench)] if fault == "node_loss" else []
    extra = [f"scaling.resources_per_worker={{{NODE_RESOURCE}: 1}}"] if nodes else []
    run = Run(bench, fault, extra)
    run.forget_workers()
    run.start()
    lost, recovery, kills = [], [], 0
    total = 3 * bench.steps
    try:
        if fault == "node_loss":
            overhead.wait_until(lambda: run.newest_step() >= total // 2 and len(run.pids()) == 2, 600, "half the run")
            at, when = run.step_now(), lose_a_node(run, nodes)
            kills = 1
            recovery.append(run.wait_restore(1) - when)
            lost.append(max(0, at - run.restores()[-1][1]))
            run.finish()
        else:
            kills = _fault(run, bench, fault, rng, lost, recovery, total)
    finally:
        for node in nodes:
            overhead.stop_cluster(node)  # `ray start --block` of a worker node stops alike
    return {"fault": fault, "kills": kills, "lost_steps": sum(lost), "recovery_s": round(max(recovery), 2),
            "restored_at": [step for _, step in run.restores()], "sha": run.final_sha()}


def _fault(run: Run, bench: Bench, fault: str, rng: random.Random, lost: list, recovery: list, total: int) -> int:
    """The faults of one node: workers signalled, the driver's end, damaged checkpoints; returns the kills."""
    kills = 0
    if fault in ("worker_sigkill_x3", "worker_sigterm"):
        targets = sorted(rng.sample(range(2, total - 2), 3)) if fault == "worker_sigkill_x3" else [total // 2]
        for target in targets:
            overhead.wait_until(lambda k=kills: len(run.restores()) >= k, 600, "the previous restore")
            overhead.wait_until(lambda t=target: run.newest_step() >= t, 600, f"step {target}")
            overhead.wait_until(lambda: len(run.pids()) == 2, 60, "the worker group")
            at, when = kill_worker(run, signal.SIGKILL if "sigkill" in fault else signal.SIGTERM, rng)
            kills += 1
            restored_at = run.wait_restore(kills)
            recovery.append(restored_at - when)
            lost.append(max(0, at - run.restores()[-1][1]))
        run.finish()
    else:  # the driver's faults and damaged checkpoints: the first driver ends, the same command again
        overhead.wait_until(lambda: run.newest_step() >= total // 2, 600, "half the run")
        at = run.step_now()
        if fault == "driver_sigterm":
            run.process.send_signal(signal.SIGTERM)
            run.process.wait(timeout=600)
            assert run.process.returncode == 143, run.text()[-4000:]
        else:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
            overhead.wait_until(lambda: not any(_alive(p) for p in run.pids()), 120, "the dead driver's workers")
        newest = max(run.run_dir.glob("checkpoint_*/"), key=lambda p: checkpoint.manifest(p)["step"] or 0)
        if fault == "corrupt_newest":
            state = newest / checkpoint.FILE
            state.write_bytes(state.read_bytes()[:1000])
        elif fault == "partial_newest":
            (newest / checkpoint.MANIFEST).unlink()
        kills = 1
        run.forget_workers()
        run.start()
        restored_at = run.wait_restore(1)
        recovery.append(restored_at - run.started)
        lost.append(max(0, at - run.restores()[-1][1]))
        run.finish()
    return kills


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(QUICKSTARTS), choices=list(QUICKSTARTS))
    parser.add_argument("--strategies", nargs="+", default=["ddp"], choices=["ddp", "deepspeed"])
    parser.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch")
    parser.add_argument("--every", type=int, default=3, help="failure.checkpoint_every_steps")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fault_matrix.json"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bf-faults-", dir="/tmp") as tmp:
        cluster, env = overhead.start_cluster(str(Path(tmp) / "ray"), overhead.REPORT_MS)
        env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}
        try:
            for workload in args.workloads:
                for strategy in args.strategies:
                    bench = Bench(args, env, Path(tmp), workload, strategy)
                    twin = Run(bench, "twin")
                    twin.start()
                    twin.finish()
                    for fault in args.faults:
                        row = fault_row(bench, fault, random.Random(f"{workload}{strategy}{fault}"))
                        row.update(workload=workload, strategy=strategy, sha_equal=row.pop("sha") == twin.final_sha())
                        rows.append(row)
                        print(f"{workload:13} {strategy:9} {fault:18} kills={row['kills']} "
                              f"lost_steps={row['lost_steps']} recovery_s={row['recovery_s']:.1f} "
                              f"sha_equal={str(row['sha_equal']).lower()}", flush=True)
        finally:
            overhead.stop_cluster(cluster)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps_per_epoch": args.steps, "checkpoint_every_steps": args.every,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
