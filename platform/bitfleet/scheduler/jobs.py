"""`bitfleet submit`: a spec as a Ray Job running `bitfleet run SPEC` on the cluster.

The submission id is derived from the run name (`bitfleet-<name>`, then `-2`, `-3`, ... for later
submissions of the same run), so the jobs of one run are easy to find and never collide. Token auth is
Ray's own: the client reads RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token as `ray job` does.

The working dir is uploaded to the cluster, where every job can read it: only the project goes, never a
home directory, and never what a project folder holds beside its code (`EXCLUDES`, the spec's own data
and results folders, and what the folder's .gitignore and .rayignore name, which Ray reads itself).
"""
from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from bitfleet.errors import SpecError
from bitfleet.resolve import load_spec

log = logging.getLogger(__name__)

# gitignore patterns, relative to the working dir (a leading / anchors one at its top)
EXCLUDES = [
    ".git", ".hg", ".svn",  # version control: its history may hold anything ever committed
    ".venv", "venv", "/env", ".tox", ".nox", "node_modules",  # environments: the image has its own
    "__pycache__", "*.py[cod]", "*.egg-info", ".eggs", ".cache", ".pytest_cache", ".ruff_cache", ".mypy_cache",
    ".ipynb_checkpoints",
    "/data", "/datasets", "/results", "/runs", "/bench/results", "bitfleet_results",  # data sets, run results
    "*.ckpt", "*.pt", "*.pth", "*.safetensors",  # weights: runs read them from storage, not from the upload
    ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".ray", ".netrc", ".env", ".config",  # credentials
]


def submission_id(name: str, existing: set[str]) -> str:
    base = f"bitfleet-{name}"
    if base not in existing:
        return base
    n = 2
    while f"{base}-{n}" in existing:
        n += 1
    return f"{base}-{n}"


def entrypoint(spec_path: str, overrides: list[str]) -> str:
    args = ["bitfleet", "run", spec_path]
    for item in overrides:
        args += ["-o", item]
    return shlex.join(args)


def submit(spec_path: str, overrides: list[str], address: str, working_dir: str = ".") -> str:
    """Upload `working_dir` and start `bitfleet run SPEC` as a job; returns the submission id."""
    spec = load_spec(spec_path, overrides)
    upload = plan_upload(working_dir, spec_path, spec)
    print(f"bitfleet: {upload}", flush=True)
    client = JobSubmissionClient(address)
    existing = {job.submission_id for job in client.list_jobs() if job.submission_id}
    return client.submit_job(
        entrypoint=entrypoint(upload.spec, overrides),
        submission_id=submission_id(spec.name, existing),
        runtime_env={"working_dir": str(upload.folder), "excludes": upload.excludes},
        metadata={"bitfleet_run": spec.name, "workload": spec.workload},
    )


def wait(job_id: str, address: str, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Block until the job ends; returns its final status name."""
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if deadline and time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return str(status.value if hasattr(status, "value") else status)


@dataclass(frozen=True)
class Upload:
    """What `submit` ships as the job's working dir, counted as Ray will pack it."""

    folder: Path
    spec: str  # the spec's path inside the folder
    excludes: list[str]
    files: int
    size: int  # bytes

    def __str__(self) -> str:
        return (f"uploading {self.files} files ({self.size:,} bytes) of {self.folder} as the job's working dir (left "
                "out: version control, environments, caches, data, results, weights, credentials, and what "
                ".gitignore and .rayignore name)")


def plan_upload(working_dir: str, spec_path: str, spec) -> Upload:
    """The project folder `working_dir` as a job's working dir, or a SpecError: a home directory (or a folder
    holding one), a link out of the folder, and a spec outside the upload are refused."""
    folder, home = Path(working_dir).resolve(), Path.home().resolve()
    if home.is_relative_to(folder):
        raise SpecError(f"--working-dir: {folder} is {'your home directory' if folder == home else 'above your home'}"
                        "; give the project's folder (your keys, tokens and other projects stay off the cluster)")
    excludes = EXCLUDES + [f"/{Path(p).relative_to(folder).as_posix()}" for p in (spec.data.root, spec.storage_path)
                           if p and Path(p).is_relative_to(folder) and Path(p) != folder]
    files, links_out = _packed_files(folder, excludes)
    if links_out:
        raise SpecError(f"--working-dir: {links_out[0]} links to {links_out[0].resolve()}, outside {folder}; remove "
                        "the link or name it in .rayignore")
    spec_file = Path(spec_path).resolve()
    if spec_file not in set(files):
        raise SpecError(f"{spec_path}: the spec must be inside the uploaded working dir {folder}, and not left out "
                        "by its excludes")
    return Upload(folder, spec_file.relative_to(folder).as_posix(), excludes, len(files),
                  sum(path.stat().st_size for path in files))


def _packed_files(folder: Path, excludes: list[str]) -> tuple[list[Path], list[Path]]:
    """The files Ray packs of `folder` (its own walk, with its default excludes, ours, and the folder's
    .gitignore, unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 as for Ray's job client, and .rayignore), and the
    links among them that lead out of it."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files, links_out = [], []

    def visit(path: Path) -> None:
        if path.is_symlink() and not path.resolve().is_relative_to(folder):
            links_out.append(path)
        elif path.is_file():
            files.append(path)

    _dir_travel(folder, [_get_excludes(folder, ray_constants.get_runtime_env_default_excludes() + excludes)], visit,
                include_gitignore=os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1",
                logger=log)  # Ray's own upload logs the ignore files it reads; once is enough
    return files, links_out
