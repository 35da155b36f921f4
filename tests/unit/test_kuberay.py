"""The KubeRay manifests (cluster/kuberay/) and cluster/README.md, checked offline: no Kubernetes API server.

The KubeRay CRD schemas ship in no package of the registries this project uses, so the RayCluster/RayJob
fields are checked against the field names of KubeRay's ray.io/v1 API types, listed below; the pod
templates and the PVC are built with the `kubernetes` client's API models.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest

from tests.unit.test_cluster_definitions import CLUSTER, METRICS_PORT, ROOT, TOKEN_SECRET, _instr, _load, _ray_up

KUBERAY = CLUSTER / "kuberay"


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


def _assert_token_file(container: dict, volumes: list[dict], where: str):
    """Token auth, the token read from the Secret's key mounted read-only as a file (RAY_AUTH_TOKEN_PATH),
    readable by the pod's group only: never an environment variable that every process inherits."""
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token", where
    assert "RAY_AUTH_TOKEN" not in env, where
    token = Path(env["RAY_AUTH_TOKEN_PATH"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token.parent)]
    assert mount["readOnly"] is True and token.name == TOKEN_SECRET["key"], where
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == TOKEN_SECRET["name"], where
    assert volume["secret"]["defaultMode"] & 0o007 == 0, where  # nothing for other users


def _assert_least_privilege(pod: dict, container: dict, where: str, writable=("/tmp",)):
    """Not root, no way to become root, no capability, a read-only root filesystem; `writable`: volumes."""
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, where
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False, where
    assert context["capabilities"] == {"drop": ["ALL"]}, where
    assert context["readOnlyRootFilesystem"] is True, where
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for path in writable:
        assert mounts.get(path) in empty_dirs, (where, path)


def _check_cluster_spec(spec: dict):
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER
    assert spec["rayVersion"].startswith("2.") and tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52)
    autoscaler, head_pod = spec["autoscalerOptions"], spec["headGroupSpec"]["template"]["spec"]
    _assert_token_file(autoscaler, head_pod["volumes"], "autoscaler")  # a container of the head pod
    _assert_least_privilege(head_pod, autoscaler, "autoscaler", writable=("/tmp", "/home/ray"))
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
        _assert_token_file(container, pod["volumes"], name)
        # Ray writes /tmp/ray and caches under the home folder; the object store and results have their volumes
        _assert_least_privilege(pod, container, name, writable=("/tmp", "/home/ray"))
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
        pod = spec["submitterPodTemplate"]["spec"]
        _assert_token_file(submitter, pod["volumes"], "submitter")
        _assert_least_privilege(pod, submitter, "submitter")


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
    autoscaler = cluster["autoscalerOptions"]
    for i, env in enumerate(autoscaler["env"]):
        _k8s_model("V1EnvVar", env, f"autoscalerOptions.env[{i}]")
    for i, mount in enumerate(autoscaler["volumeMounts"]):
        _k8s_model("V1VolumeMount", mount, f"autoscalerOptions.volumeMounts[{i}]")
    _k8s_model("V1SecurityContext", autoscaler["securityContext"], "autoscalerOptions.securityContext")
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
