"""One checkpoint format: a directory with `state.pt` holding every stateful piece of a run, and a manifest.

model, optimizer, lr scheduler, AMP grad scaler, EMA, callbacks, the epoch/step counters and the metric
history. A sharded strategy (DeepSpeed ZeRO) keeps the optimizer in per-rank shards beside it
(engine/strategy.py); `state.pt` still holds the full weights. Randomness needs no saved generator
state: the loop reseeds every epoch from (seed, epoch, rank), and the samplers derive their order from
(seed, epoch), so a run restored at an epoch boundary draws exactly what the uninterrupted run would
have drawn.

A mid-epoch checkpoint (a step checkpoint, engine/loop.py) adds one part per rank: its random streams
and partial sums (`worker.rank<k>.pt`), vouched for by that rank's manifest part.

A checkpoint is complete only when its manifest checks out: every rank that writes into it adds, after
its own files, a manifest part naming them with their sizes and SHA-256 (`manifest.json` from rank 0,
which also records the epoch, the step and how many parts there are; `manifest.rank<k>.json` from the
others). Ray merges the ranks' folders in no particular order, and a write can die half way: a missing
part, a missing or truncated file, or a changed byte makes the checkpoint incomplete, and every reader
(`find`, `newest`, the restart path) passes over it with one warning naming it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from bitfleet import storage
from bitfleet.engine.ema import IS_RESULT

log = logging.getLogger(__name__)
FILE = "state.pt"
MANIFEST = "manifest.json"
SHARDS = "deepspeed"  # the sub-folder of a sharded strategy's per-rank files (DeepSpeed ZeRO)
TAG = "state"  # their DeepSpeed tag: one checkpoint per Ray checkpoint folder
Fetch = Callable[[Path], None]  # completes a candidate checkpoint folder of a local copy before it is checked
NO_SHARDS = (f"no DeepSpeed shards ({SHARDS}/{TAG}); a DeepSpeed run resumes only a DeepSpeed checkpoint "
             "(train.init_from takes the weights of any checkpoint)")


def has_shards(directory: str | Path) -> bool:
    return (Path(directory) / SHARDS / TAG).is_dir()


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    """A complete one-part checkpoint: `state.pt` and the manifest that vouches for it."""
    path = write_state(directory, state)
    write_manifest(directory, [FILE], rank=0, parts=1, epoch=state.get("epoch"), step=state.get("global_step"))
    return path


def write_state(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / FILE
    torch.save(state, path)
    return path


def load(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / FILE, map_location="cpu", weights_only=True)


def write_manifest(directory: str | Path, files: Iterable[str], rank: int, parts: int, epoch: int | None = None,
                   step: int | None = None, spec_digest: str | None = None) -> None:
    """This rank's manifest part, written after its files (`files`: paths relative to `directory`)."""
    directory = Path(directory)
    entry = {"rank": rank, "files": {name: _fingerprint(directory / name) for name in sorted(files)}}
    if rank == 0:
        entry.update(parts=parts, epoch=epoch, step=step, spec_digest=spec_digest)
    (directory / _part(rank)).write_text(json.dumps(entry, indent=1))


def problem(directory: str | Path) -> str | None:
    """Why `directory` is not a complete checkpoint, or None when every manifest part checks out."""
    directory = Path(directory)
    head = _read_part(directory, 0)
    if isinstance(head, str):
        return head
    for rank in range(head.get("parts", 1)):
        part = head if rank == 0 else _read_part(directory, rank)
        if isinstance(part, str):
            return part
        for name, expected in part["files"].items():
            try:
                path = storage.inside(directory, name, _part(rank))
            except ValueError:
                return f"{_part(rank)} names {name!r}, a file outside the checkpoint"
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"] or _fingerprint(path)["sha256"] != expected["sha256"]:
                return f"{name} differs from its manifest (truncated or corrupt)"
    return None


def manifest(directory: str | Path) -> dict[str, Any]:
    """Rank 0's manifest part: parts, epoch, step, spec digest and its files."""
    return json.loads((Path(directory) / MANIFEST).read_text())


def newest(candidates: Iterable[str | Path], fetch: Fetch | None = None) -> Path | None:
    """The newest complete checkpoint among `candidates`, by its recorded epoch and step, warning about each
    damaged one passed over on the way; None when none is complete. Only the candidates down to the first
    complete one are hashed (and fetched, see `fetched`): a run's older checkpoints (hundreds of MB each on
    ImageNet) are not read."""
    folders = {Path(p).resolve() for p in candidates if Path(p).is_dir()}  # not Ray's snapshot file
    for candidate in sorted(folders, key=_recorded_position, reverse=True):
        why = _checked(candidate, fetch)
        if why is None:
            return candidate
        log.warning("bitfleet: skipping checkpoint %s: %s", candidate, why)
    return None


def _recorded_position(folder: Path) -> tuple:
    """(epoch, step, name) from the manifest. A missing or unreadable one (most likely the newest, its write
    cut short) sorts newest: it is passed over, with its warning, without reading any other file."""
    try:
        head = manifest(folder)
        return (0, head.get("epoch") or 0, head.get("step") or 0, folder.name)
    except (OSError, ValueError):
        return (1, 0, 0, folder.name)


def size_estimate(state: Any) -> int:
    """Bytes `state` takes in `state.pt`: its tensors, and a margin for the rest."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(size_estimate(v) for v in state.values()) + 1024
    if isinstance(state, (list, tuple)):
        return sum(size_estimate(v) for v in state) + 1024
    return 64


def _part(rank: int) -> str:
    return MANIFEST if rank == 0 else f"manifest.rank{rank}.json"


def _read_part(directory: Path, rank: int) -> dict | str:
    path = directory / _part(rank)
    if not path.is_file():
        return f"no {path.name} (its write did not finish)"
    try:
        part = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{path.name} is unreadable (truncated)"
    files = part.get("files") if isinstance(part, dict) else None
    if not (isinstance(files, dict) and all(isinstance(f, dict) and isinstance(f.get("size"), int)
                                            and isinstance(f.get("sha256"), str) for f in files.values())
            and isinstance(part.get("parts", 1), int)):
        return f"{path.name} is not a manifest (files with their size and sha256)"
    return part


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def for_ray(state: dict[str, Any] | None, write_shard=None, *, rank: int = 0, parts: int = 1,
            spec_digest: str | None = None) -> Path:
    """A new temporary folder holding this rank's part of a checkpoint for `ray.train.report`: `state`
    (rank 0's; None on the other ranks), what `write_shard(directory)` writes, then this rank's manifest
    part (`parts`: how many ranks write into the checkpoint). Ray merges the ranks' folders into one and
    removes them once uploaded (`delete_local_checkpoint_after_upload`): an asynchronous upload outlives
    the report."""
    folder = Path(tempfile.mkdtemp(prefix="bitfleet-ckpt-"))
    if state is not None:
        write_state(folder, state)
    if write_shard is not None:
        write_shard(folder)
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    epoch, step = (state.get("epoch"), state.get("global_step")) if state is not None else (None, None)
    write_manifest(folder, files, rank, parts, epoch, step, spec_digest)
    return folder


def dense(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with its tensors in the default (contiguous) layout: a checkpoint holds the same layout
    whatever the run's `train.channels_last`, for readers that `view` weights (export, engines). A tensor
    already contiguous is returned itself: without channels_last nothing changes."""
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The weights a user wants from a checkpoint: the EMA's when the run kept one as its result
    (`train.ema.evaluate`; runs of older bitfleets have no flag and always did), else the model's."""
    state = load(directory)
    ema = state.get("ema")
    return weights_of(state, ema=bool(ema) and ema.get(IS_RESULT, True))


def weights_of(state: dict[str, Any], ema: bool = True) -> dict[str, torch.Tensor]:
    """A loaded checkpoint's weights: its EMA's when it holds one and `ema`, else the model's."""
    averaged = state.get("ema") if ema else None
    if averaged:
        return {k.removeprefix("module."): v for k, v in averaged.items() if k.startswith("module.")}
    return state["model"]


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's tensors (names, dtypes, shapes and bytes, in name order): two runs ended
    with the same weights exactly when their digests are equal."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state_dict[name].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def find(path: str | Path, fetch: Fetch | None = None, shown: str | None = None) -> Path:
    """The complete checkpoint `path` names: itself, or a run folder's best one (`result.json`), else its
    newest complete one. FileNotFoundError naming what is wrong otherwise (`path` named as `shown`).

    `fetch(folder)`, when given, completes a candidate checkpoint folder before it is checked: `path` is a
    local copy of a run's small files (see `fetched`)."""
    path = Path(path)
    shown = shown or str(path)
    if (path / FILE).is_file() or (path / MANIFEST).is_file():
        why = problem(path)
        if why is not None:
            raise FileNotFoundError(f"{shown}: an incomplete or corrupt checkpoint: {why}")
        return path
    best = _recorded_best(path)
    if best is not None and _checked(best, fetch) is None:
        return best
    found = newest(path.glob("checkpoint_*"), fetch)
    if found is None:
        raise FileNotFoundError(f"{shown}: neither a checkpoint ({FILE}) nor a run folder with complete checkpoints")
    return found


def _recorded_best(run_folder: Path) -> Path | None:
    """The best checkpoint a run folder's `result.json` names: the run's own folder of that name (the path
    was recorded by the driver, perhaps on another machine or in an object store); never one outside it."""
    result = run_folder / "result.json"
    if not result.is_file():
        return None
    try:
        best = json.loads(result.read_text()).get("best_checkpoint")
    except (ValueError, AttributeError):
        log.warning("bitfleet: %s is unreadable (truncated); taking the newest complete checkpoint", result)
        return None
    if not isinstance(best, str):
        return None
    try:
        own = storage.inside(run_folder, PurePosixPath(best).name, str(result))
    except ValueError:
        own = None
    if own is None or not own.is_dir():
        log.warning("bitfleet: %s names %s, outside the run folder or gone; taking its newest complete checkpoint",
                    result, best)
        return None
    return own


def _checked(folder: Path, fetch: Fetch | None) -> str | None:
    if fetch is not None:
        fetch(folder)
    return problem(folder)


@contextmanager
def fetched(path: str | Path) -> Iterator[Path]:
    """`find(path)` as a local folder for the block: for a local path, the checkpoint itself; for an
    object-store URI (s3://, gs://, file://, ... through pyarrow, as runs write them), a temporary copy
    chosen by the same rules, removed when the block ends. The copy starts with the run's small files (its
    JSON files and every checkpoint's manifests), then takes the files of each checkpoint as `find` comes
    to check it: the chosen one, and any damaged one passed over on the way, are the only ones read."""
    path = str(path)
    if not storage.is_uri(path):
        yield find(path)
        return
    names = storage.list_files(path)
    whole = FILE in names or MANIFEST in names  # a checkpoint itself, not a run folder
    with storage.local_folder(path, lambda name: whole or (name.endswith(".json") and name.count("/") <= 1)) as local:
        for name in names:  # every checkpoint folder, even one without a manifest (passed over, with a warning)
            (local / name).parent.mkdir(parents=True, exist_ok=True)

        def fetch(folder: Path) -> None:
            prefix = f"{folder.resolve().relative_to(local.resolve()).as_posix()}/"
            storage.download(path, [n for n in names if n.startswith(prefix) and not (local / n).is_file()], local)

        yield find(local, fetch, shown=path)
