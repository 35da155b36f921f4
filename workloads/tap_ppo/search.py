"""The PPO stage: RLlib's PPO picks the TAP codes (b1, b2, s1, s2, s3) of every record point, layer by layer.

An episode walks the record points in network order; each step chooses one layer's codes from
MultiDiscrete([bins, bins, 5, 5, 5]): two breakpoint positions on a grid of `breakpoint_bins` values in
(0, tmax) — sorted, and moved apart when equal, so 0 < b1 < b2 < tmax — and a step in {1, 2, 4, 8, 16}
per segment. The observation is the layer's position and type, its tmax, its code histogram (cumulative
mass at 8 points of [0, tmax]) and the previous layer's choice. After the last layer the student (the
INT8 teacher with TAP at every record point) runs on the calibration split, and the episode's reward is

    R = -(top-1 drop of student vs teacher, as a fraction) - attention_weight * AT(teacher, student)
        + cost_weight * (mean over layers of the saved fraction of output levels)

with AT the attention-transfer distance on the attention layers. Env runners are spread over the cluster
(`scaling.num_workers` of them): evaluating students is the expensive part. Every finished episode is
appended to `episodes.jsonl`; the best one becomes the result file (`tap_ppo.result_file`, the seed's
`--result-file`: `<arch>_ppo_result.json` by default). Only the record points in `tap_ppo.layers` (default:
all, the seed's list) are approximated, walked in network order.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from bitfleet import storage
from bitfleet.engine import preemption
from bitfleet.spec import RunSpec
from workloads.tap_ppo import int8, quant
from workloads.tap_ppo.tap import STEPS, TapCodes, levels, saved_fraction

log = logging.getLogger("workloads.tap_ppo")

EPISODES_FILE, PROGRESS_FILE, CHECKPOINT = "episodes.jsonl", "ppo_progress.json", "ppo_checkpoint"
CHECKPOINT_STATE = "bitfleet.json"  # written last into the checkpoint folder: iterations, episodes, progress
HISTOGRAM_POINTS = 8
OBSERVATION_SIZE = 3 + HISTOGRAM_POINTS + 5


def breakpoint_grid(tmax: int, bins: int) -> np.ndarray:
    """The candidate breakpoints: `bins` integers spread over [1, tmax - 1] (fewer when tmax is small)."""
    return np.unique(np.round(np.linspace(1, tmax - 1, bins)).astype(int))


def decode(action, tmax: int, bins: int) -> TapCodes:
    """One layer's codes from a MultiDiscrete action; equal breakpoints are moved one grid point apart."""
    grid = breakpoint_grid(tmax, bins)
    i, j = sorted(int(a) % len(grid) for a in action[:2])
    if i == j:
        i, j = (i, i + 1) if i + 1 < len(grid) else (i - 1, i)
    return TapCodes(tmax=tmax, b1=int(grid[i]), b2=int(grid[j]), steps=tuple(STEPS[int(a)] for a in action[2:]))


class TapEnv(gym.Env):
    """The layer-by-layer choice of TAP codes for one INT8 network (see the module docstring)."""

    def __init__(self, config: dict):
        spec: RunSpec = config["spec"]  # resolved: its tap_ppo section is the typed Options
        options = spec.options
        stats = json.loads((Path(spec.inputs["qat"]) / int8.INT8_FILE).read_text())
        self.teacher = int8.teacher(spec, spec.inputs["qat"])
        approximated = options.layers or stats["record_points"]
        self.layers = [name for name in stats["record_points"] if name in approximated]  # in network order
        self.bins = options.breakpoint_bins
        self.tmax = stats["tmax"]
        self.attention = options.attention_layers or self.teacher.attention_layers
        self.weights = (options.attention_weight, options.cost_weight)
        self.calibration = int8.calibration_batches(spec.data, options.calibration_batch)
        self.histogram_cdf = {name: self._cdf(np.asarray(stats["histograms"][name], float), self.tmax[name])
                              for name in self.layers}
        self.reference = self._outputs({})  # the teacher's logits and attention features, once
        self.log_path = Path(config["episodes_file"])
        self.action_space = gym.spaces.MultiDiscrete([self.bins, self.bins, len(STEPS), len(STEPS), len(STEPS)])
        self.observation_space = gym.spaces.Box(0.0, 1.0, (OBSERVATION_SIZE,), np.float32)

    @staticmethod
    def _cdf(hist: np.ndarray, tmax: int) -> np.ndarray:
        cumulative = np.cumsum(hist[: tmax + 1]) / max(hist[: tmax + 1].sum(), 1)
        return cumulative[np.linspace(0, tmax, HISTOGRAM_POINTS).astype(int)]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.index, self.choices = 0, {}
        return self._observation(), {}

    def step(self, action):
        name = self.layers[self.index]
        self.choices[name] = decode(action, self.tmax[name], self.bins)
        self.index += 1
        if self.index < len(self.layers):
            return self._observation(), 0.0, False, False, {}
        outcome = self.score(self.choices)
        with open(self.log_path, "a") as log:
            log.write(json.dumps(outcome) + "\n")
        return np.zeros(OBSERVATION_SIZE, np.float32), outcome["reward"], True, False, {}

    def score(self, choices: dict[str, TapCodes]) -> dict:
        """The reward of a full choice, from real teacher and student outputs on the calibration split."""
        logits, features = self._outputs(choices)
        labels = torch.cat([y for _, y in self.calibration])
        teacher_acc = (self.reference[0].argmax(1) == labels).float().mean().item()
        student_acc = (logits.argmax(1) == labels).float().mean().item()
        attention = quant.attention_loss(self.reference[1], features, self.attention).item()
        saved = float(np.mean([saved_fraction(c) for c in choices.values()]))
        drop = teacher_acc - student_acc
        attention_weight, cost_weight = self.weights
        reward = -drop - attention_weight * attention + cost_weight * saved
        return {"reward": reward, "drop": drop, "attention": attention, "saved": saved,
                "teacher_acc": 100 * teacher_acc, "student_acc": 100 * student_acc,
                "layers": {name: {**c.to_dict(), "levels": levels(c)} for name, c in choices.items()}}

    @torch.no_grad()
    def _outputs(self, choices: dict[str, TapCodes]):
        """Logits and (dequantized) attention features over the calibration split, with TAP where chosen."""
        logits, features = [], {name: [] for name in self.attention}
        with quant.apply_tap(self.teacher, choices), quant.RecordPoints(self.teacher, self.attention) as rec:
            for images, _ in self.calibration:
                logits.append(self.teacher(images))
                for name in self.attention:
                    features[name].append(rec.outputs[name].dequantize())
        return torch.cat(logits), {name: torch.cat(f) for name, f in features.items()}

    def _observation(self) -> np.ndarray:
        name = self.layers[self.index]
        previous = self.choices.get(self.layers[self.index - 1]) if self.index else None
        choice = ([previous.b1 / previous.tmax, previous.b2 / previous.tmax] +
                  [np.log2(s) / 4 for s in previous.steps]) if previous else [0.0] * 5
        head = [self.index / max(len(self.layers) - 1, 1), float(name.startswith("conv")), self.tmax[name] / 255]
        return np.asarray(head + list(self.histogram_cdf[name]) + choice, np.float32)


def run_search(spec: RunSpec) -> dict:
    """The PPO stage: train PPO until `episodes` episodes, keep the best choice, write the result file."""
    from ray.rllib.algorithms.ppo import PPOConfig

    options = spec.options
    episodes_file = spec.run_dir / EPISODES_FILE
    ppo = options.ppo
    config = (
        PPOConfig()
        .environment(TapEnv, env_config={"spec": spec, "episodes_file": str(episodes_file)})
        .env_runners(num_env_runners=spec.scaling.max_workers, num_cpus_per_env_runner=spec.scaling.cpus_per_worker)
        .training(lr=ppo.lr, train_batch_size_per_learner=ppo.train_batch_size, minibatch_size=ppo.minibatch_size,
                  num_epochs=ppo.num_epochs, entropy_coeff=ppo.entropy_coeff, gamma=ppo.gamma)
        .debugging(seed=spec.seed)
    )
    algo = config.build_algo()
    try:
        progress = _resume(algo, spec.run_dir, episodes_file, spec.name)
        while _count(episodes_file) < options.episodes:
            start = time.perf_counter()
            result = algo.train()
            progress.append({"iteration": len(progress) + 1, "seconds": time.perf_counter() - start,
                             "episodes": _count(episodes_file),
                             "return_mean": result.get("env_runners", {}).get("episode_return_mean")})
            log.info(f"[{spec.name}] PPO iteration {len(progress)}: {progress[-1]['episodes']} episodes, "
                  f"return {progress[-1]['return_mean']}, {progress[-1]['seconds']:.1f} s")
            stopping = preemption.STOP_REQUESTED.is_set()  # SIGTERM to the pipeline's driver
            if stopping or len(progress) % options.checkpoint_every == 0:
                _checkpoint(algo, spec.run_dir, progress)
            if stopping:
                raise preemption.Stopped(f"stage {spec.name} stopped after PPO iteration {len(progress)}")
    finally:
        algo.stop()
    storage.write_text(str(spec.run_dir / PROGRESS_FILE), json.dumps(progress, indent=1))
    best = max(_episodes(episodes_file), key=lambda e: e["reward"])
    storage.write_text(str(spec.run_dir / options.result_name(spec.model.arch)), json.dumps(best, indent=1))
    seconds = [p["seconds"] for p in progress]
    return {"best_reward": best["reward"], "best_drop": best["drop"], "episodes": _count(episodes_file),
            "iterations": len(progress), "seconds_per_iteration": float(np.median(seconds))}


def _checkpoint(algo, run_dir: Path, progress: list[dict]) -> None:
    """The algorithm (policy, optimizer, connectors) and how far the search got, swapped in whole: saved to
    a new folder, its state file last, then renamed over the previous checkpoint."""
    fresh, folder = run_dir / f"{CHECKPOINT}.new", run_dir / CHECKPOINT
    shutil.rmtree(fresh, ignore_errors=True)
    algo.save_to_path(str(fresh))
    state = {"iterations": len(progress), "episodes": progress[-1]["episodes"], "progress": progress}
    storage.write_text(str(fresh / CHECKPOINT_STATE), json.dumps(state, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    fresh.rename(folder)


def _resume(algo, run_dir: Path, episodes_file: Path, name: str) -> list[dict]:
    """Continue from the search's checkpoint: the algorithm restored, the episode log cut back to the
    episodes it had seen (those after it are searched again, not repeated); without one, from scratch."""
    state_file = run_dir / CHECKPOINT / CHECKPOINT_STATE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        episodes_file.unlink(missing_ok=True)
        return []
    algo.restore_from_path(str(state_file.parent))
    lines = episodes_file.read_text().splitlines(keepends=True) if episodes_file.is_file() else []
    kept = lines[: state["episodes"]]  # complete lines all: the ones after may be cut short by the kill
    storage.write_text(str(episodes_file), "".join(kept))
    log.info(f"[{name}] PPO resumed at iteration {state['iterations']} ({len(kept)} episodes)")
    return state["progress"]


def _episodes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _count(path: Path) -> int:
    return len(_episodes(path))
