"""When a training step ends in a checkpoint, and whether the run goes on after it: the same answer on
every rank.

A step ends in a checkpoint when `failure.checkpoint_every_steps` divides the global step, when
`failure.checkpoint_every_minutes` have passed since the last one (rank 0's clock), when Ray gives notice
that a worker's node is about to be preempted (then training goes on: Ray restarts the group from that
checkpoint when the node goes), and before each of the two ways a run is asked to end:
- **SIGTERM to a worker** (a spot reclaim, a Kubernetes eviction): the group checkpoints and raises
  `Preempted`, and Ray's controller restarts it from that checkpoint (a restart counts toward
  `failure.max_failures`). A worker that has not got there within `failure.preemption_grace_s` is
  ended as Ray would have ended it.
- **SIGTERM to the driver** (`bitfleet run` or `sweep`, or `ray job stop`): the driver writes a stop request
  into the folder of each run it drives (a pipeline's running stages; a sweep's folder, which each trial
  passes on to its run); the workers checkpoint, and the runs return. Rerunning the same command continues.

Ranks agree by one small all-reduce per step (max of each rank's flags), so a signal seen by one rank
stops all of them at the same step; with one worker there is nothing to agree on.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from bitfleet import storage

STOP_FILE = "stop-requested"  # in the run folder: the driver's request that the workers stop
LOOK_EVERY_S = 2.0  # rank 0 looks for the stop request, and asks Ray about preemption, this often
SIGTERMED = threading.Event()  # set by this process's SIGTERM handler (module-level: Ray runs it on the main thread)

CHECKPOINT, NOTICED, STOP, PREEMPTED = "checkpoint", "noticed", "stop", "preempted"


class Preempted(RuntimeError):
    """A worker was sent SIGTERM; the group checkpointed at the step it had reached."""


class Stopped(RuntimeError):
    """The run stopped at a checkpoint because its driver was asked to stop (SIGTERM)."""


def _install_sigterm_handler(grace_s: float) -> None:
    """On the process's main thread (the only one signals reach): the first SIGTERM sets SIGTERMED and
    gives the worker `grace_s` to checkpoint; the second — or the grace running out — is handled as it was
    before (Ray's worker exits)."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if not SIGTERMED.is_set():
            SIGTERMED.set()
            timer = threading.Timer(grace_s, os.kill, (os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()
        elif callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def watch_sigterm(grace_s: float) -> None:
    """Catch this worker's SIGTERM. Ray Train runs the training function in a thread of the worker actor,
    whose main thread serves the actor's calls: the handler is installed through one of them."""
    SIGTERMED.clear()
    if threading.current_thread() is threading.main_thread():
        _install_sigterm_handler(grace_s)
        return
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
    except RuntimeError:  # Ray Train's local mode: no actor, nobody to send the signal
        return
    ray.get(actor.execute.remote(_install_sigterm_handler, grace_s))


class Control:
    """Asked after every training step: None, or CHECKPOINT (a periodic one), NOTICED (a checkpoint on Ray's
    preemption notice: training goes on), STOP (checkpoint, then return) or PREEMPTED (checkpoint, then
    raise)."""

    def __init__(self, failure, run_path: str, rank: int, world: int, device: torch.device):
        self.every_steps = failure.checkpoint_every_steps
        self.every_s = failure.checkpoint_every_minutes * 60 if failure.checkpoint_every_minutes else None
        self.stop_file = storage.join(run_path, STOP_FILE)
        self.rank, self.world, self.device = rank, world, device
        self.last_checkpoint = self.last_look = time.monotonic()
        self.noticed = False  # a preemption notice already answered with a checkpoint

    def after_step(self, global_step: int) -> str | None:
        sigterm, stop, overdue, look = self._agreed_flags()
        if sigterm:
            return PREEMPTED
        if stop:
            return STOP
        if look and self._preemption_notice():
            return NOTICED
        if overdue or (self.every_steps and global_step % self.every_steps == 0):
            return CHECKPOINT
        return None

    def saved(self) -> None:
        self.last_checkpoint = time.monotonic()

    def _agreed_flags(self) -> list[int]:
        flags = [int(SIGTERMED.is_set()), 0, 0, 0]
        if self.rank == 0:
            now = time.monotonic()
            look = now - self.last_look >= LOOK_EVERY_S
            if look:
                self.last_look = now
                flags[1] = int(storage.exists(self.stop_file))
            flags[2] = int(self.every_s is not None and now - self.last_checkpoint >= self.every_s)
            flags[3] = int(look)
        if self.world > 1:
            agreed = torch.tensor(flags, dtype=torch.int32, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        return flags

    def _preemption_notice(self) -> bool:
        """Ray's notice that a node of the group is being drained (a barrier: every rank asks at the same
        step, as `look` is agreed). Answered once with a checkpoint; older Rays have no such notice."""
        import ray.train

        ask = getattr(ray.train, "get_preemption_info", None)
        if ask is None or self.noticed:
            return False
        try:
            self.noticed = ask() is not None
        except RuntimeError:  # not inside a Ray Train worker group (local mode)
            return False
        return self.noticed


STOP_REQUESTED = threading.Event()  # this driver process was sent SIGTERM: what it drives stops at a checkpoint
_driving: set[str] = set()  # folders of the runs (and sweeps) this driver drives now, whichever thread drives them
_driving_lock = threading.RLock()  # re-entered by the handler when the signal lands inside `driving`


def _request_stop(folder: str) -> None:
    storage.write_text(storage.join(folder, STOP_FILE), "SIGTERM to the driver\n")


def _on_driver_sigterm(signum, frame):
    if STOP_REQUESTED.is_set():
        raise SystemExit(128 + signum)
    STOP_REQUESTED.set()
    with _driving_lock:
        for folder in _driving:
            _request_stop(folder)


_claimed = threading.Event()  # inside driver_stops_on_sigterm


@contextmanager
def driver_stops_on_sigterm():
    """Around everything a driver does, on its main thread (the only one signals reach): the first SIGTERM
    writes the stop request into the folder of every run it drives — a single run, a pipeline's running
    stages, a sweep — and of any it starts later; each checkpoints at its next step and returns. A second
    SIGTERM ends the driver at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_driver_sigterm)
    _claimed.set()
    try:
        yield
    finally:
        _claimed.clear()
        signal.signal(signal.SIGTERM, previous)
        STOP_REQUESTED.clear()


def claim_sigterm() -> None:
    """Put the driver's handler back after `ray.init`, which installs Ray's own (it ends the process)."""
    if _claimed.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_driver_sigterm)


@contextmanager
def driving(folder: str):
    """A run (or sweep) folder this driver drives, from any thread: it gets the stop request when the driver
    is asked to stop (at once if it already was). A request left behind by a stopped run is not this run's:
    it is cleared before, and after."""
    storage.remove(storage.join(folder, STOP_FILE))
    with _driving_lock:
        _driving.add(folder)
        if STOP_REQUESTED.is_set():
            _request_stop(folder)
    try:
        yield
    finally:
        with _driving_lock:
            _driving.discard(folder)
        storage.remove(storage.join(folder, STOP_FILE))
