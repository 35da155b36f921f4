"""`bitfleet submit`: a spec as a Ray Job running `bitfleet run SPEC` on the cluster.

The submission id is derived from the run name (`bitfleet-<name>`, then `-2`, `-3`, ... for later
submissions of the same run), so the jobs of one run are easy to find and never collide. Token auth is
Ray's own: the client reads RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token as `ray job` does.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from bitfleet.errors import SpecError
from bitfleet.resolve import load_spec

_EXCLUDES = [".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]


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
    work = Path(working_dir).resolve()
    try:
        relative = Path(spec_path).resolve().relative_to(work)
    except ValueError:
        raise SpecError(f"{spec_path}: the spec must be inside the uploaded working dir {work}") from None
    client = JobSubmissionClient(address)
    existing = {job.submission_id for job in client.list_jobs() if job.submission_id}
    return client.submit_job(
        entrypoint=entrypoint(relative.as_posix(), overrides),
        submission_id=submission_id(spec.name, existing),
        runtime_env={"working_dir": str(work), "excludes": _EXCLUDES},
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
