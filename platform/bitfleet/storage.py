"""Where runs keep their files: a local folder, a folder every node mounts (NFS, EFS, GCS Fuse), or an
object-store URI (s3://, gs://, abfs://, file://) through pyarrow's filesystems, the ones Ray Train
uses for its checkpoints.

On a cluster of several nodes every worker writes checkpoints to `storage_path`, so a folder only the
head can see loses them: `check_shared` refuses one before a run starts.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bitfleet.errors import SpecError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str) -> bool:
    return bool(_URI.match(path))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def run_path(spec) -> str:
    """A run's folder or URI: `storage_path/name`."""
    return join(spec.storage_path, spec.name)


def inside(root: str | Path, name: str, source: str) -> Path:
    """`root/name` for a relative path that a file lists (`source`: an annotation file, a label file, a
    manifest), resolved; a ValueError naming `source` when it leads out of `root` (`..`, an absolute path,
    a symbolic link out): such a file does not decide what is read, moved or loaded."""
    root = Path(root).resolve()
    path = (root / name).resolve() if "\0" not in name else root
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"{source}: {name!r} is not a path inside {root}")
    return path


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file; a reader never sees half of it (a local rename; an object store's single put)."""
    if not is_uri(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")  # one per writer
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it visible: no empty file after a crash
        tmp.replace(target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself
        finally:
            os.close(directory)
        return
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as out:
        out.write(data)


def check_free_space(run_path: str, needed: int) -> None:
    """Before a checkpoint: room for it in the temporary folder it is written to first and, for a local
    `storage_path`, in the run folder Ray copies it to. An OSError naming the path and the bytes otherwise."""
    places = [tempfile.gettempdir()] + ([] if is_uri(run_path) else [run_path])
    for place in places:
        existing = Path(place)
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if free < needed * 1.1:  # a margin for the manifest, DeepSpeed's shards are counted by their writer
            raise OSError(f"bitfleet: no room for a checkpoint in {place}: {free:,} bytes free, about "
                          f"{needed:,} needed; free some space or point storage_path (or TMPDIR) elsewhere")


def read_text(path: str) -> str:
    if not is_uri(path):
        return Path(path).read_text()
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read().decode()


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    return filesystem.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def list_files(uri: str) -> list[str]:
    """The files under a folder URI, as '/'-separated paths relative to it. FileNotFoundError when there is
    no such folder."""
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(uri)
    inner = inner.rstrip("/")
    if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such folder")
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    return sorted(info.path[len(inner) + 1:] for info in found if info.type == pyarrow.fs.FileType.File)


def download(uri: str, names: Iterable[str], local: Path) -> None:
    """Copy the files `names` (relative to the folder URI `uri`) into the local folder `local`, keeping
    their layout."""
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(uri)
    for name in names:
        target = local / name
        inside(local, name, uri)  # a listing names no file outside the copy
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(f"{inner.rstrip('/')}/{name}") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 24)


@contextmanager
def local_folder(path: str, select: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """A run's folder (or any folder) as a local one for the block: `path` itself when it is local; for an
    object-store URI a temporary copy of the files under it that `select(relative path)` accepts, removed
    when the block ends."""
    if not is_uri(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="bitfleet-") as scratch:
        local = Path(scratch) / path.rstrip("/").rsplit("/", 1)[-1]
        local.mkdir()
        download(path, [name for name in list_files(path) if select(name)], local)
        yield local


def remove(path: str) -> None:
    """Delete a file if it is there."""
    if not is_uri(path):
        Path(path).unlink(missing_ok=True)
        return
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_file(inner)


def check_shared(storage_path: str, field: str = "storage_path") -> None:
    """On a cluster of several nodes, a local `storage_path` must be the same folder on every node: a
    marker written here must be visible from a task pinned to each node. Raises SpecError otherwise."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if is_uri(storage_path) or len(nodes) < 2:
        return
    marker = Path(storage_path) / f".bitfleet-shared-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    sees = ray.remote(num_cpus=0)(os.path.exists)  # a zero-CPU probe, pinned to each node in turn
    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                        .remote(str(marker)) for node in nodes], timeout=120)
    finally:
        marker.unlink()
    blind = [f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})" for node, ok in zip(nodes, seen) if not ok]
    if blind:
        raise SpecError(
            f"{field}: {storage_path} is a folder of this machine only: node(s) {', '.join(blind)} of the "
            f"{len(nodes)}-node cluster cannot see it, and their checkpoints would be lost. Use a folder "
            "mounted at the same path on every node (NFS, EFS, GCS Fuse) or an object-store URI "
            "(s3://bucket/path, gs://bucket/path)")

