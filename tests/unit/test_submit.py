"""`bitfleet submit`'s upload: only the project, counted as Ray packs it, never a home directory (no cluster)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from bitfleet.errors import SpecError
from bitfleet.resolve import load_spec
from bitfleet.scheduler.jobs import plan_upload

SPEC = "name: up\nworkload: lbpnet\ndata: {{dataset: mnist_sample}}\nstorage_path: {storage}\n"
PROJECT = ["spec.yaml", "platform/bitfleet/data/cifar.py", "workloads/x/specs/a.yaml", "README.md"]
LEFT_OUT = [".git/config", ".venv/bin/python", "venv/lib/x.py", "data/cifar10/batch", "results/run/state.pt",
            "platform/bitfleet/__pycache__/a.cpython-311.pyc", "model.pt", "notes/weights.safetensors",
            ".ssh/id_ed25519", ".aws/credentials", ".ray/auth_token", ".env", ".pytest_cache/v/x",
            "my_runs/earlier/metrics.json", "ignored_by_git.log"]


def _project(root: Path, storage: str = "my_runs") -> tuple[Path, object]:
    for name in PROJECT + LEFT_OUT:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"contents of {name}\n")
    (root / ".gitignore").write_text("*.log\n")
    (root / "spec.yaml").write_text(SPEC.format(storage=root / storage))
    return root / "spec.yaml", load_spec(root / "spec.yaml")


def test_only_the_project_is_uploaded_and_counted_as_ray_packs_it(tmp_path):
    spec_path, spec = _project(tmp_path / "project")
    upload = plan_upload(str(tmp_path / "project"), str(spec_path), spec)
    assert upload.spec == "spec.yaml" and "/my_runs" in upload.excludes  # the spec's storage_path, inside it
    expected = sorted(PROJECT + [".gitignore"])
    assert upload.files == len(expected)
    assert upload.size == sum((tmp_path / "project" / name).stat().st_size for name in expected)
    assert f"uploading {len(expected)} files ({upload.size:,} bytes)" in str(upload)
    # What Ray's own packer zips with these excludes is exactly that list.
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _zip_files
    _zip_files(str(upload.folder), ray_constants.get_runtime_env_default_excludes() + upload.excludes,
               str(tmp_path / "job.zip"), include_gitignore=True)
    with zipfile.ZipFile(tmp_path / "job.zip") as packed:
        assert sorted(n for n in packed.namelist() if not n.endswith("/")) == expected


@pytest.mark.parametrize("where", ["home", "above home"])
def test_a_home_directory_is_never_the_working_dir(tmp_path, monkeypatch, where):
    home = tmp_path / "home" / "me"
    spec_path, spec = _project(home)
    monkeypatch.setenv("HOME", str(home))
    folder = home if where == "home" else home.parent
    with pytest.raises(SpecError, match=f"--working-dir: {folder} is .*(home).*project's folder"):
        plan_upload(str(folder), str(spec_path), spec)


def test_a_link_out_of_the_project_is_refused(tmp_path):
    spec_path, spec = _project(tmp_path / "project")
    (tmp_path / "secrets").mkdir()
    os.symlink(tmp_path / "secrets", tmp_path / "project" / "platform" / "keys")
    with pytest.raises(SpecError, match="platform/keys links to .*secrets, outside"):
        plan_upload(str(tmp_path / "project"), str(spec_path), spec)


def test_a_spec_left_out_of_the_upload_is_refused(tmp_path):
    spec_path, spec = _project(tmp_path / "project")
    with pytest.raises(SpecError, match="inside the uploaded working dir"):
        plan_upload(str(tmp_path / "project" / "platform"), str(spec_path), spec)
    (tmp_path / "project" / "data" / "spec.yaml").write_text(spec_path.read_text())
    with pytest.raises(SpecError, match="not left out by its excludes"):
        plan_upload(str(tmp_path / "project"), str(tmp_path / "project" / "data" / "spec.yaml"), spec)
