"""storage: local folders and URIs (through pyarrow, as Ray Train's checkpoints), and what specs accept."""
from __future__ import annotations

import pytest

from bitfleet import storage
from bitfleet.errors import SpecError
from bitfleet.resolve import validate_spec


def test_uris_and_paths_join_and_round_trip(tmp_path):
    assert storage.is_uri("s3://bucket/x") and storage.is_uri("file:///tmp/x") and not storage.is_uri("/tmp/x")
    assert storage.join("s3://bucket/runs/", "a", "metrics.json") == "s3://bucket/runs/a/metrics.json"
    assert storage.join(str(tmp_path), "a", "b.json") == str(tmp_path / "a" / "b.json")
    for where in (str(tmp_path / "local"), f"file://{tmp_path}/uri"):
        path = storage.join(where, "run", "metrics.json")
        assert not storage.exists(path)
        storage.write_text(path, '{"epoch": 1}')
        assert storage.exists(path) and storage.read_text(path) == '{"epoch": 1}'
    assert (tmp_path / "uri" / "run" / "metrics.json").read_text() == '{"epoch": 1}'
    assert not list(tmp_path.rglob("*.tmp"))


def test_run_path_keeps_a_uri_whole(mnist_root, tmp_path):
    raw = {"name": "r", "workload": "resnet_cifar", "data": {"dataset": "mnist", "root": str(mnist_root)}}
    uri = f"file://{tmp_path}/store"  # resolution reads the store (an existing run?): one this machine reaches
    assert storage.run_path(validate_spec({**raw, "storage_path": uri})) == f"{uri}/r"
    assert storage.run_path(validate_spec({**raw, "storage_path": "/results"})) == "/results/r"
    assert storage.join("s3://bucket/bitfleet/", "r", "metrics.json") == "s3://bucket/bitfleet/r/metrics.json"


def test_sweeps_and_pipelines_refuse_uris(mnist_root):
    raw = {"name": "r", "workload": "resnet_cifar", "data": {"dataset": "mnist", "root": str(mnist_root)},
           "storage_path": "gs://bucket/x", "stages": [{"name": "a"}, {"name": "b", "needs": ["a"]}]}
    with pytest.raises(SpecError, match="storage_path: gs://bucket/x is a URI; single runs write there"):
        validate_spec(raw)
