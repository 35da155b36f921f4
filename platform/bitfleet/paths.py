"""Where the paths a spec names point: resolved on the driver (Ray workers run in other working directories)."""
from __future__ import annotations

import os

DATA_ROOT_ENV, DATA_ROOT_DEFAULT = "BITFLEET_DATA", "~/data"


def absolute_path(path: str | None) -> str | None:
    """`path` absolute, `~` expanded, against the working directory (URIs are left alone)."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def data_path(path: str | None) -> str | None:
    """A data set's folder, absolute: a bare relative path (`cifar10`) is under the data root — $BITFLEET_DATA,
    else ~/data — for every workload alike; `./x` and `../x` are relative to the working directory, `~/x`
    to the home folder, and absolute paths and URIs stay as written."""
    as_written = path is None or "://" in path or os.path.isabs(path) or path in (".", "..")
    if as_written or path.startswith(("~", "./", "../")):
        return absolute_path(path)
    return absolute_path(os.path.join(os.environ.get(DATA_ROOT_ENV) or DATA_ROOT_DEFAULT, path))
