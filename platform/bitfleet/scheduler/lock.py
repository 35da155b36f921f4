"""One driver per run: a lock file in the run folder, held for as long as the driver runs.

A spec submitted twice would otherwise start two drivers on one run folder, each resuming the other's
checkpoints. The lock names its holder (host, pid, start) and carries a heartbeat (its mtime, touched every
`HEARTBEAT_S`): a second driver refuses while the holder lives, and takes over a lock whose holder is gone
— a dead pid on this host, or a heartbeat older than `STALE_S` from another host. Local and mounted
folders only: object stores have no exclusive create, and a URI run is not locked.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from bitfleet import storage
from bitfleet.errors import SpecError

LOCK_FILE = "driver.lock"
HEARTBEAT_S = 20.0
STALE_S = 90.0


@contextmanager
def hold(storage_path: str, name: str):
    """Hold the lock of run `name` under `storage_path` inside the `with`; SpecError if a live driver has it."""
    if storage.is_uri(storage_path):
        yield None
        return
    path = Path(storage_path) / name / LOCK_FILE
    created = not path.parent.exists()  # a run refused before it starts leaves no folder behind
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _acquire(path, name)
    except SpecError:
        _remove_if_empty(path.parent, created)
        raise
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join(timeout=5)
        if _holder(path).get("token") == _TOKEN:
            path.unlink(missing_ok=True)
        _remove_if_empty(path.parent, created)


def _remove_if_empty(folder: Path, created: bool) -> None:
    if created:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: the run wrote into it


_TOKEN = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"  # this process's claim


def check_unheld(storage_path: str, name: str) -> None:
    """SpecError if a live driver holds run `name` (before its folder is moved aside by --fresh)."""
    path = Path(storage_path) / name / LOCK_FILE
    if not storage.is_uri(storage_path) and path.exists() and _alive(path, _holder(path)):
        raise _held(name, path, _holder(path))


def _held(name: str, path: Path, holder: dict) -> SpecError:
    return SpecError(f"{name}: the run folder {path.parent} is held by a running driver (pid {holder.get('pid')} "
                     f"on {holder.get('host')}, since {holder.get('since')}): wait for it or stop it, or give "
                     "this run another name")


def _acquire(path: Path, name: str) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": _TOKEN,
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):  # a stale lock is removed once, then created anew
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if _alive(path, holder):
                raise _held(name, path, holder) from None
            path.unlink(missing_ok=True)  # its holder is gone: take it over
            continue
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        return
    raise SpecError(f"{name}: could not take the lock {path}: another driver took it at the same moment")


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # removed meanwhile, or cut short by a crash: nobody holds it


def _alive(path: Path, holder: dict) -> bool:
    """The holder still runs: its heartbeat is fresh and, on this host, its pid exists."""
    try:
        fresh = time.time() - path.stat().st_mtime < STALE_S
    except FileNotFoundError:
        return False
    if not holder or not fresh:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        pass  # someone else's process, or an odd record: assume it lives while its heartbeat does
    return True


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except FileNotFoundError:
            return
