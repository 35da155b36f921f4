"""`bitfleet submit | logs | stop`: a spec as a Ray Job, followed the way `ray job submit` follows one.

The job runs `bitfleet run SPEC` (a spec with a `sweep:` section: `bitfleet sweep SPEC`). Its submission id
is derived from the run name (`bitfleet-<name>`, then `-2`, `-3`, ... for later submissions of the same
run), so the jobs of one run are easy to find and never collide; `logs` and `stop` take either. Token auth
is Ray's own: the client reads RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token as `ray job` does.

The working dir is uploaded to the cluster, where every job can read it: only the project goes, never a
home directory, and never what a project folder holds beside its code (`EXCLUDES`, the user's `--exclude`s,
the spec's own data and results folders, and what the folder's .gitignore and .rayignore name, which Ray
reads itself).

Following a job streams its logs until it ends and gives its exit code: its entrypoint's (`bitfleet run`:
0 done, 1 failed, 2 a spec the cluster cannot run), 1 when it failed before its entrypoint ran (a runtime
env that could not be built), STOPPED_EXIT when it was stopped.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from bitfleet.address import JOBS_VARIABLES, jobs_address, only
from bitfleet.errors import ClusterError, SpecError

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

STOPPED_EXIT = 143  # as a `bitfleet run` stopped by SIGTERM: it stopped at a checkpoint, the same command continues
INTERRUPTED_EXIT = 130  # Ctrl+C stopped the following, not the job
STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's grace between a job's SIGTERM and its SIGKILL (3 s by default)
STOP_MARGIN_S = 30  # beyond the spec's preemption grace: the stop request is seen within 2 s, then the driver ends
ENDED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def connect(address: str | None) -> JobSubmissionClient:
    """A job client for `--address` (else RAY_API_SERVER_ADDRESS, RAY_ADDRESS), which answered a quick try."""
    address = jobs_address(address)
    with only(address, JOBS_VARIABLES), _asking(address):
        return JobSubmissionClient(address)


def submission_id(name: str, existing: set[str]) -> str:
    base = f"bitfleet-{name}"
    if base not in existing:
        return base
    n = 2
    while f"{base}-{n}" in existing:
        n += 1
    return f"{base}-{n}"


def entrypoint(spec_path: str, overrides: list[str], spec) -> str:
    """`bitfleet run SPEC -o ...`, or `bitfleet sweep ...` for a spec with a `sweep:` section."""
    args = ["bitfleet", "sweep" if spec.sweep is not None else "run", spec_path]
    for item in overrides:
        args += ["-o", item]
    return shlex.join(args)


def runtime_env(file: str | None = None, pip: list[str] = (), env: list[str] = (), excludes: list[str] = ()) -> dict:
    """The job's runtime env besides its working dir: a `--runtime-env` YAML file (as `ray job submit` reads
    one), with the packages, variables and upload excludes of the flags added to it."""
    base = _read_runtime_env(file) if file else {}
    if pip:
        base["pip"] = _with_packages(base.get("pip"), list(pip))
    if env:
        base["env_vars"] = {**(base.get("env_vars") or {}), **dict(_key_value(item) for item in env)}
    if excludes:
        base["excludes"] = [*(base.get("excludes") or []), *excludes]
    return base


def submit(spec_path: str, overrides: list[str], client: JobSubmissionClient, working_dir: str | None = None,
           extra_env: dict | None = None) -> str:
    """Upload `working_dir` and start the spec's run (or sweep) as a job; returns the submission id."""
    from bitfleet.resolve import load_spec  # it imports torch, which following or stopping a job does without

    spec = load_spec(spec_path, overrides)
    extra_env = dict(extra_env or {})
    upload = plan_upload(working_dir or extra_env.get("working_dir") or ".", spec_path, spec,
                         extra_env.get("excludes") or [])
    print(f"bitfleet: {upload}", flush=True)
    # `bitfleet stop` / `ray job stop` SIGTERM the driver, which stops the run at a checkpoint: give it the time
    stop_wait = {STOP_WAIT: str(math.ceil(spec.failure.preemption_grace_s) + STOP_MARGIN_S)}
    with _asking(client.get_address()):
        existing = {job.submission_id for job in client.list_jobs() if job.submission_id}
        try:
            return client.submit_job(
                entrypoint=entrypoint(upload.spec, overrides, spec),
                submission_id=submission_id(spec.name, existing),
                runtime_env={**extra_env, "env_vars": {**stop_wait, **(extra_env.get("env_vars") or {})},
                             "working_dir": str(upload.folder), "excludes": upload.excludes},
                metadata={"bitfleet_run": spec.name, "workload": spec.workload},
            )
        except (TypeError, ValueError) as exc:  # Ray's own check of the runtime env, before anything is sent
            raise SpecError(f"runtime env: {_first_line(exc)}") from None


def find(client: JobSubmissionClient, name: str) -> str:
    """The submission id `name` is, or the newest job of the run called `name`."""
    with _asking(client.get_address()):
        jobs = client.list_jobs()
    if any(job.submission_id == name for job in jobs):
        return name
    runs = [job for job in jobs if (job.metadata or {}).get("bitfleet_run") == name]
    if not runs:
        raise ClusterError(f"no job or run {name!r} on the cluster at {client.get_address()} (`ray job list` "
                           "lists its jobs)")
    return max(runs, key=lambda job: job.start_time or 0).submission_id


def follow(client: JobSubmissionClient, job_id: str) -> int:
    """Stream the job's logs until it ends; its exit code. Ctrl+C stops the following, not the job."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # its INFO line when the stream ends
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nbitfleet: no longer following {job_id}; it goes on (bitfleet logs {job_id} --follow, "
              f"bitfleet stop {job_id})", file=sys.stderr)
        return INTERRUPTED_EXIT
    except RuntimeError as exc:  # the stream broke off (a dashboard restart): the job's status still says how it ended
        print(f"bitfleet: the log stream of {job_id} broke off ({_first_line(exc)}); waiting for the job to end",
              file=sys.stderr)
    return outcome(client, job_id)


def outcome(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0) -> int:
    """Wait for the job to end (its status lands just after its last log line), say how, return its exit code."""
    with _asking(client.get_address()):
        while (info := client.get_job_info(job_id)).status not in ENDED:
            time.sleep(poll_s)
    how = {JobStatus.SUCCEEDED: "succeeded", JobStatus.STOPPED: "was stopped"}.get(info.status, "failed")
    detail = f": {_first_line(info.message)}" if info.status == JobStatus.FAILED and info.message else ""
    print(f"bitfleet: job {job_id} {how}{detail}", file=sys.stderr, flush=True)
    return exit_code(info.status, info.driver_exit_code)


def exit_code(status: JobStatus, driver_exit_code: int | None) -> int:
    if status == JobStatus.SUCCEEDED:
        return 0
    if status == JobStatus.STOPPED:
        return STOPPED_EXIT
    return driver_exit_code or 1


def logs(client: JobSubmissionClient, job_id: str) -> str:
    with _asking(client.get_address()):
        return client.get_job_logs(job_id)


def stop(client: JobSubmissionClient, job_id: str, wait: bool = True) -> int:
    """Ask the job to stop (its driver gets SIGTERM and stops the run at a checkpoint); with `wait`, until it ended."""
    with _asking(client.get_address()):
        if not client.stop_job(job_id):
            status = client.get_job_status(job_id)
            print(f"bitfleet: job {job_id} had already ended ({status.value})", file=sys.stderr)
            return 0
    print(f"bitfleet: asked job {job_id} to stop", file=sys.stderr, flush=True)
    if not wait:
        return 0
    code = outcome(client, job_id)
    return 0 if code == STOPPED_EXIT else code  # it may have ended otherwise meanwhile


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


def plan_upload(working_dir: str, spec_path: str, spec, user_excludes: list[str] = ()) -> Upload:
    """The project folder `working_dir` as a job's working dir, or a SpecError: a home directory (or a folder
    holding one), a link out of the folder, and a spec outside the upload are refused."""
    folder, home = Path(working_dir).resolve(), Path.home().resolve()
    if home.is_relative_to(folder):
        raise SpecError(f"--working-dir: {folder} is {'your home directory' if folder == home else 'above your home'}"
                        "; give the project's folder (your keys, tokens and other projects stay off the cluster)")
    excludes = EXCLUDES + list(user_excludes) + [
        f"/{Path(p).relative_to(folder).as_posix()}" for p in (spec.data.root, spec.storage_path)
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


@contextmanager
def _asking(address: str) -> Iterator[None]:
    """What the job server refuses (an unknown job, a wrong token), or a lost connection, as one ClusterError."""
    try:
        yield
    except ClusterError:
        raise
    except (RuntimeError, ConnectionError) as exc:
        raise ClusterError(f"Ray Jobs at {address}: {_first_line(exc)}") from None


def _read_runtime_env(file: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"--runtime-env {file}: {_first_line(exc)}") from None
    if not isinstance(loaded, dict):
        raise SpecError(f"--runtime-env {file}: expected a YAML mapping of runtime env fields (pip, env_vars, "
                        "excludes, ...)")
    return loaded


def _with_packages(pip, packages: list[str]):
    """The runtime env's pip field with `packages` added, whichever form it had (a list, a requirements file,
    a mapping with `packages`): Ray's own parser reads it."""
    if pip is None:
        return packages
    from ray.runtime_env import RuntimeEnv

    try:
        parsed = RuntimeEnv(pip=pip)["pip"]
    except (TypeError, ValueError, OSError) as exc:
        raise SpecError(f"--runtime-env: pip: {_first_line(exc)}") from None
    return {**parsed, "packages": [*parsed["packages"], *packages]}


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--env {item!r}: expected KEY=VALUE")
    return key, value


def _first_line(exc) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
