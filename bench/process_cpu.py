"""Where the cores go while a one-worker run trains: CPU seconds of every process of the cluster and of the
driver over a window of steady training, for the plain loop inside Ray Train and for a bitfleet run.

`bench/overhead.py` times the steps of the two sides; this names what runs beside the worker during them.
On a 2-core machine whose worker trains with 2 threads, every CPU second another process takes is a second
the worker's threads wait: Ray's own processes (GCS, raylet, dashboard and its agent, log monitor, Ray
Train's controller and helper actors) on both sides, and ours on the bitfleet side (its driver, the events
queue's actor). Processes are those descended from the cluster's `ray start` and from the driver, read from
/proc (utime + stime) at the window's two ends, after the first epoch's warm-up.

    python bench/process_cpu.py [--window 40] [--steps 40] [--out bench/results/process_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402  (its standing cluster and the sides' specs)

from bitfleet.data import synthetic  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
OUT = Path(__file__).parent / "results" / "process_cpu.json"


def processes() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, command line) of every process we may read."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        found[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, command.strip())
    return found


def descendants(roots: set[int]) -> dict[int, tuple[float, str]]:
    """CPU seconds and command of `roots` and every process below them."""
    table = processes()
    keep, grew = set(roots), True
    while grew:
        below = {pid for pid, (parent, _, _) in table.items() if parent in keep} - keep
        keep |= below
        grew = bool(below)
    return {pid: table[pid][1:] for pid in keep if pid in table}


def label(command: str) -> str:
    """A process's name for the table: Ray's `ray::Actor.method` titles, else the program or module run."""
    if command.startswith("ray::"):
        return command.split()[0].split(".")[0]
    if "bitfleet.cli" in command:
        return "bitfleet driver"
    if "plain_in_ray_train" in command:
        return "plain driver"
    words = command.split()
    if "-m" in words:
        return words[words.index("-m") + 1]
    program = [w for w in words[1:] if not w.startswith("-")] if Path(words[0]).name.startswith("python") else words
    return Path(program[0] if program else words[0]).name  # a script run by python, else the program


def driver(side: str, raw: dict, tmp: Path, env: dict) -> subprocess.Popen:
    if side == "bitfleet":
        return overhead.bitfleet_run(raw, tmp, tmp / "bitfleet.log", env)
    code = ("import json, sys; from pathlib import Path; import overhead; "
            f"overhead.plain_in_ray_train(json.loads(sys.argv[1]), {raw['train']['epochs']}, Path(sys.argv[2]))"
            " # plain_in_ray_train")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(raw), str(tmp / "ray")], env=env,
                            cwd=Path(__file__).parent, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def window(side: str, raw: dict, tmp: Path, env: dict, cluster: int, seconds: float) -> dict[str, float]:
    """CPU seconds by process name over `seconds` of this side's steady training."""
    run = driver(side, raw, tmp, env)
    try:
        overhead.wait_until(lambda: any("RayTrainWorker" in c for _, c in descendants({cluster}).values()),
                            300, "the train worker")
        time.sleep(seconds / 2)  # past process start and the first steps' warm-up
        before = descendants({cluster, run.pid})
        time.sleep(seconds)
        after = descendants({cluster, run.pid})
        used: dict[str, float] = {}
        for pid, (cpu, command) in after.items():
            name = label(command)
            used[name] = used.get(name, 0.0) + cpu - before.get(pid, (0.0, ""))[0]
        run.wait(timeout=1800)
        return dict(sorted(used.items(), key=lambda item: -item[1]))
    finally:
        if run.poll() is None:
            run.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=40.0, help="seconds of training measured per side")
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch (4 epochs)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    args.epochs = 4
    with tempfile.TemporaryDirectory(prefix="bitfleet-cpu-") as name:
        tmp = Path(name)
        synthetic.write("cifar10", tmp / "cifar10", n_train=args.steps * args.batch, n_test=args.batch, seed=0)
        cluster, env = overhead.start_cluster(str(tmp / "raytmp"), None)
        try:
            sides = {}
            for side in ("ray_train_plain", "bitfleet"):
                raw = overhead.spec_dict(f"cpu-{side}", tmp / "cifar10", tmp / "results", args, args.epochs)
                sides[side] = window(side, raw, tmp, env, cluster.pid, args.window)
        finally:
            overhead.stop_cluster(cluster)
    for side, used in sides.items():
        worker = used.get("ray::RayTrainWorker", 0.0)
        print(f"{side}: {args.window:.0f} s window, worker {worker:.1f} CPU s, everything else "
              f"{sum(used.values()) - worker:.2f} CPU s")
        for name, seconds in [item for item in used.items() if item[0] != "ray::RayTrainWorker"][:15]:
            print(f"  {seconds:6.2f}  {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"window_s": args.window, "cpu_s": sides}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
