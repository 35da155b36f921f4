"""What bitfleet costs, measured side by side in one run (issue 9):

1. Step time of a bitfleet run against a plain PyTorch loop. Same model (resnet_cifar's resnet20, built
   as the workload builds it), same data (synthetic CIFAR-10 pickles, through the same datasets and
   transforms), batch, torch threads (1 Ray Train worker with cpus_per_worker = threads), SGD
   (lr, momentum, weight decay, constant schedule), data.loader_workers=0 on both sides, and the same
   epochs of `--steps` steps. The training set holds exactly steps x batch images, so both loops end on
   the loader's own end (with a shorter max_steps_per_epoch the bitfleet loop would load, and time, one
   batch past the last step). An epoch is timed alike on both sides: from the loader's iterator to the
   end of the last step (bitfleet's `epoch_time_s` in metrics.json, which excludes eval and checkpoints).
   The first epoch is warm-up; the ratio compares the later epochs' seconds per step. Three sides: the
   plain loop in a fresh process at the niceness Ray gives its workers (15, so that on a shared machine
   all compete for the cores at the same priority), the same plain loop as the train function of a
   one-worker Ray Train run (Ray's worker process, its threads and its process group: Ray's part), and a
   bitfleet run (ours on top). `--rounds` rounds, the sides' order turned around every round; each ratio
   is the median of the rounds' ratios, with its range. This part runs on a cluster with Ray's default
   metrics flush interval, as users run. Both parts run on a standing local cluster,
   `ray start --head --block --num-cpus=2` as our child (token auth, own temp dir and ports), driven by
   `bitfleet run --address` in a subprocess: Ray's own processes share the cores, as they do in use.
2. Recovery: the seconds from SIGKILL of the worker to its replacement's first training step. Once epoch
   1's checkpoint is registered the worker is killed (time.time() taken just before). The first step is
   seen on the node's metrics endpoint: a `ray_bitfleet_steps_total` series of the run from a WorkerId not
   seen before the kill, polled every POLL_S. A step reaches the endpoint up to the cluster's
   RAY_metrics_report_interval_ms (REPORT_MS) later, so the figure is an upper bound, late by at most
   REPORT_MS + POLL_S (the "resolution" in the JSON). The moment the driver log says "restored from
   checkpoint" (rank 0 prints it after loading; same polling) splits the restart from the restore.

    python bench/overhead.py [--steps 20] [--batch 128] [--threads 2] [--rounds 3] [--parts step recovery]
                             [--out bench/results/overhead.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from prometheus_client.parser import text_string_to_metric_families
from torch.utils.data import DataLoader

from bitfleet.data import build_datasets, synthetic
from bitfleet.resolve import validate_spec
from workloads.resnet_cifar import models

GCS_PORT, DASHBOARD_PORT, METRICS_PORT = 27379, 27265, 27385  # not the tests' 26379/28265, nor 36379
_OTHER_PORTS = {"--ray-client-server-port": 27380, "--node-manager-port": 27381, "--object-manager-port": 27382,
                "--dashboard-agent-grpc-port": 27383, "--dashboard-agent-listen-port": 27384,
                "--runtime-env-agent-port": 27386}
REPORT_MS, POLL_S = 250, 0.1  # metrics flush interval of the recovery part's cluster; how often we read it
WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))  # Ray's default for its worker processes


def spec_dict(name: str, data_root: Path, storage: Path, args, epochs: int) -> dict:
    return {
        "name": name, "workload": "resnet_cifar", "model": {"arch": "resnet20", "shortcut": "A"},
        "data": {"dataset": "cifar10", "root": str(data_root), "augment": True, "loader_workers": 0},
        "train": {"epochs": epochs, "batch_size": args.batch, "max_steps_per_epoch": args.steps, "max_eval_steps": 1,
                  "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                  "lr_schedule": {"type": "constant"}},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
        # a checkpoint at the run's end only: its background upload would otherwise overlap the next, 6 s
        # epoch's steps, at a rate (every 20 steps) no real run checkpoints at; step_costs.py prices it
        "failure": {"max_failures": 3, "checkpoint_every": epochs, "keep": 1},
        "storage_path": str(storage), "seed": 0,
    }


def plain_loop(raw: dict, epochs: int) -> dict:
    """The reference: torch DataLoader + model + SGD, timed per epoch as bitfleet's loop times it."""
    spec = validate_spec(raw)
    torch.set_num_threads(int(spec.scaling.cpus_per_worker))
    data = build_datasets(spec.data)
    torch.manual_seed(spec.seed)
    model = models.build("resnet20", "A", num_classes=data.info.num_classes, in_channels=data.info.in_channels)
    opt = spec.train.optimizer
    optimizer = torch.optim.SGD(model.parameters(), opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    loader = DataLoader(data.train, spec.train.batch_size, shuffle=True, num_workers=0, drop_last=True)
    model.train()
    epoch_s, step_s = [], []
    for _ in range(epochs):
        start = clock = time.perf_counter()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            now = time.perf_counter()
            step_s.append(now - clock)
            clock = now
        epoch_s.append(time.perf_counter() - start)
    return {"epoch_time_s": epoch_s, "steps": len(step_s) // epochs,
            "median_step_s": statistics.median(step_s[len(loader):])}


def steady_step_s(epoch_times: list[float], steps: int) -> float:
    """Seconds per step over every epoch but the first (warm-up)."""
    return sum(epoch_times[1:]) / (steps * (len(epoch_times) - 1))


def plain_in_ray_train(raw: dict, epochs: int, storage: Path) -> dict:
    """`plain_loop` as the train function of a one-worker Ray Train run (TorchTrainer, the same CPUs per
    worker): the plain loop in Ray's worker process, so Ray's own part of the difference stands apart.
    Run in a fresh process whose environment holds the cluster's address and token (read by Ray on import)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_fn(config: dict) -> None:
        from overhead import plain_loop  # this file, shipped to the worker as its working_dir

        Path(config["out"]).write_text(json.dumps(plain_loop(config["raw"], config["epochs"])))

    here = Path(__file__).parent
    ray.init(logging_level="ERROR", log_to_driver=False,
             runtime_env={"working_dir": str(here), "excludes": ["results/", "__pycache__/"]})
    cpus = raw["scaling"]["cpus_per_worker"]
    out = storage / f"{raw['name']}-ray.json"  # the worker's figures (Ray Train 2 keeps only checkpointed ones)
    trainer = TorchTrainer(train_fn, train_loop_config={"raw": raw, "epochs": epochs, "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(name=f"{raw['name']}-ray", storage_path=str(storage)))
    trainer.fit()
    return json.loads(out.read_text())


def in_fresh_process(function, *args, env: dict | None = None, niceness: int = 0):
    """`function(*args)` in a spawned process (environment `env` added, at `niceness`), its result back."""
    context = multiprocessing.get_context("spawn")
    saved = dict(os.environ)
    os.environ.update(env or {})  # a spawned process starts with the parent's environment of that moment
    try:
        with ProcessPoolExecutor(1, mp_context=context, initializer=os.nice, initargs=(niceness,)) as pool:
            return pool.submit(function, *args).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def bitfleet_epochs(raw: dict, tmp: Path, env: dict) -> list[float]:
    """The epochs' seconds of a `bitfleet run` of `raw` (its metrics.json's epoch_time_s)."""
    log = tmp / f"{raw['name']}.log"
    driver = bitfleet_run(raw, tmp, log, env)
    driver.wait(timeout=1200)
    assert driver.returncode == 0, log.read_text()[-4000:]
    history = json.loads((tmp / "results" / raw["name"] / "metrics.json").read_text())
    return [m["epoch_time_s"] for m in history]


SIDES = ("plain", "ray_train_plain", "bitfleet")


def epoch_seconds(side: str, raw: dict, tmp: Path, env: dict) -> list[float]:
    epochs = raw["train"]["epochs"]
    if side == "plain":
        # at the niceness Ray gives its workers: on a shared machine all sides then compete for the cores
        # at the same priority (on an idle machine niceness changes nothing)
        return in_fresh_process(plain_loop, raw, epochs, niceness=WORKER_NICENESS)["epoch_time_s"]
    if side == "ray_train_plain":
        return in_fresh_process(plain_in_ray_train, raw, epochs, tmp / "ray", env=env)["epoch_time_s"]
    return bitfleet_epochs(raw, tmp, env)


def step_overhead(tmp: Path, args, env: dict) -> dict:
    """Rounds of three sides, their order turned around every round (ABC, CBA, ...) so that drift of a shared
    machine falls on each alike: the plain loop in a fresh process, the plain loop inside a Ray Train worker,
    and a bitfleet run. The ratios are each round's, summarized by their median and range."""
    rounds = []
    for number in range(args.rounds):
        raw = spec_dict(f"overhead-steps-{number}", tmp / "cifar10", tmp / "results", args, args.epochs)
        order = list(SIDES) if number % 2 == 0 else list(SIDES)[::-1]
        step_s = {side: steady_step_s(epoch_seconds(side, raw, tmp, env), args.steps) for side in order}
        rounds.append({**step_s, "order": order})
        print(f"round {number + 1}: " + ", ".join(f"{side} {step_s[side]:.4f} s" for side in SIDES)
              + f" -> bitfleet/plain {step_s['bitfleet'] / step_s['plain']:.3f}x", flush=True)
    ratios = {"bitfleet/plain": ("bitfleet", "plain"), "ray_train_plain/plain": ("ray_train_plain", "plain"),
              "bitfleet/ray_train_plain": ("bitfleet", "ray_train_plain")}
    summary = {}
    for name, (top, bottom) in ratios.items():
        each = [r[top] / r[bottom] for r in rounds]
        summary[name] = {"median": statistics.median(each), "min": min(each), "max": max(each), "rounds": each}
    return {"ratios": summary, "rounds": rounds,
            "median_step_s": {side: statistics.median(r[side] for r in rounds) for side in SIDES}}


# ---------------------------------------------------------------- recovery on a standing cluster
def start_cluster(temp_dir: str, report_ms: int | None) -> tuple[subprocess.Popen, dict]:
    """Our standing cluster; `report_ms` a metrics flush interval other than Ray's default (10 s), which
    only the recovery part asks for: flushing 40 times as often costs the step part CPU time."""
    flush = {"RAY_metrics_report_interval_ms": str(report_ms)} if report_ms else {}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONUNBUFFERED": "1",
           **flush, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           # inherited by Ray's own processes: its helpers that look a cluster up (Train's placement-group
           # cleaner) find ours, not whichever of the machine's other clusters /tmp/ray names
           "RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}"}
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--temp-dir={temp_dir}",
               f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}", "--dashboard-host=127.0.0.1",
               f"--metrics-export-port={METRICS_PORT}", "--num-cpus=2", "--disable-usage-stats",
               *(f"{flag}={port}" for flag, port in _OTHER_PORTS.items())]
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    wait_until(lambda: scrape() is not None or process.poll() is not None, 120, "the cluster's metrics endpoint")
    if process.poll() is not None:
        raise RuntimeError(f"ray start exited with {process.returncode}")
    return process, env


def stop_cluster(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its processes
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left, in our process group only
    except ProcessLookupError:
        pass


def scrape() -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def stepping_workers(run: str) -> set[str]:
    """WorkerIds of the processes that have reported a training step of `run` on the endpoint."""
    text = scrape() or ""
    return {s.labels.get("WorkerId", "") for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "ray_bitfleet_steps_total" and s.labels.get("run") == run and s.value > 0}


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = POLL_S):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
    return value


def bitfleet_run(raw: dict, tmp: Path, log: Path, env: dict) -> subprocess.Popen:
    """`bitfleet run SPEC --address` on our cluster, in its own process group, its output in `log`."""
    spec_path = tmp / f"{raw['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "bitfleet.cli", "run", str(spec_path), "--address",
                                 f"127.0.0.1:{GCS_PORT}", "-v"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


PHASES = {  # Ray Train's controller log line -> the phase of a worker group's (re)start it times
    "failure_detected": re.compile(r"\[FailurePolicy\] RETRY"),
    "placement_group_s": re.compile(r"Placement group ready in ([\d.]+)s"),
    "worker_actors_created_s": re.compile(r"worker actors created in ([\d.]+)s"),  # spawn, import ray
    "train_context_initialized_s": re.compile(r"Train context initialized on workers in ([\d.]+)s"),  # unpickling
    #   the train function and its config: the imports of torch, torchvision, bitfleet and the workload
    "train_function_launched_s": re.compile(r"Train function launched on workers in ([\d.]+)s"),
    "worker_group_startup_s": re.compile(r"Worker group startup completed in ([\d.]+)s total"),
}


def restart_phases(ray_tmp: str, killed_at: float) -> dict:
    """Where the seconds of the restart after `killed_at` went, from Ray Train's controller log (JSON lines
    with their time): the failure detected (seconds after the kill) and each phase of the new group's start."""
    found: dict = {}
    for path in Path(ray_tmp).glob("session_*/logs/train/ray-train-sys-controller-*.log"):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            at = time.mktime(time.strptime(entry["asctime"].split(",")[0], "%Y-%m-%d %H:%M:%S")) + \
                int(entry["asctime"].split(",")[1]) / 1000
            for phase, pattern in PHASES.items():
                match = pattern.search(entry.get("message", ""))
                if at >= killed_at - 1 and match and phase not in found:
                    found[phase] = round(at - killed_at, 2) if phase == "failure_detected" else float(match.group(1))
    return found


def recovery(tmp: Path, args, env: dict, ray_tmp: str) -> dict:
    raw = spec_dict("overhead-recovery", tmp / "cifar10", tmp / "results", args, epochs=3)
    raw["failure"]["checkpoint_every"] = 1  # the worker is killed once epoch 1's checkpoint is registered
    name, log, run_dir = raw["name"], tmp / "recovery.log", tmp / "results" / raw["name"]
    driver = bitfleet_run(raw, tmp, log, env)
    try:
        # Ray hands back only a checkpoint its controller has registered (its snapshot file), as the tests wait.
        wait_until(lambda: (run_dir / "metrics.json").is_file()
                   and (run_dir / "checkpoint_manager_snapshot.json").is_file(),
                   900, "epoch 1's checkpoint", poll_s=0.5)
        seen = wait_until(lambda: stepping_workers(name), 30, "the first worker's steps on the endpoint")
        victim = [int(p) for p in re.findall(r"pid=(\d+)\) world_rank=\d+", log.read_text())][-1]
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        restored = wait_until(lambda: "restored from checkpoint at epoch" in log.read_text() and time.time(), 600,
                              "the restore")
        stepped = wait_until(lambda: stepping_workers(name) - seen and time.time(), 600, "a step from a new worker")
        driver.wait(timeout=1200)
        history = json.loads((run_dir / "metrics.json").read_text())
        assert driver.returncode == 0 and history[-1]["restores"] >= 1, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    return {"kill_to_first_step_s": stepped - killed_at, "kill_to_restore_logged_s": restored - killed_at,
            "phases": restart_phases(ray_tmp, killed_at),
            "resolution_s": REPORT_MS / 1000 + POLL_S, "metrics_report_interval_ms": REPORT_MS, "poll_s": POLL_S,
            "epochs": [m["epoch"] for m in history], "restores": history[-1]["restores"]}


def on_cluster(report_ms: int | None, part):
    """`part(env, ray_tmp)` on a standing cluster of its own, stopped after it."""
    ray_tmp = tempfile.mkdtemp(prefix="bf-oh-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    cluster, env = start_cluster(ray_tmp, report_ms)
    try:
        return part(env, ray_tmp)
    finally:
        stop_cluster(cluster)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of the step-time comparison (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three step-time sides")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=["step", "recovery"], default=["step", "recovery"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="bf-overhead-") as tmp:
        tmp = Path(tmp)
        synthetic.write("cifar10", tmp / "cifar10", n_train=args.steps * args.batch, n_test=args.batch, seed=0)
        steps = rec = None
        if "step" in args.parts:
            steps = on_cluster(None, lambda env, ray_tmp: step_overhead(tmp, args, env))
            print(f"step time, resnet20 batch {args.batch}, {args.threads} threads, epochs 2-{args.epochs} of "
                  f"{args.steps} steps, {args.rounds} rounds: " + ", ".join(
                      f"{name} {r['median']:.3f}x ({r['min']:.3f}-{r['max']:.3f})"
                      for name, r in steps["ratios"].items()), flush=True)
        if "recovery" in args.parts:
            rec = on_cluster(REPORT_MS, lambda env, ray_tmp: recovery(tmp, args, env, ray_tmp))
            print(f"recovery: SIGKILL of the worker -> restore logged {rec['kill_to_restore_logged_s']:.1f} s, "
                  f"-> first step after restore {rec['kill_to_first_step_s']:.1f} s "
                  f"(upper bound, resolution {rec['resolution_s']:.2f} s); Ray's restart: "
                  + ", ".join(f"{phase} {seconds}" for phase, seconds in rec["phases"].items()), flush=True)
    result = {"threads": args.threads, "batch": args.batch, "steps_per_epoch": args.steps, "epochs": args.epochs,
              "rounds": args.rounds,
              "step_time": steps, "recovery": rec}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
