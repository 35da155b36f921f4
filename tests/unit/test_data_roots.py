"""Where a spec's data root points: a bare relative name under $BITFLEET_DATA (default ~/data), the same for
every workload and every `bitfleet data` command."""
from __future__ import annotations

from pathlib import Path

from bitfleet import cli
from bitfleet.data import synthetic
from bitfleet.resolve import validate_spec
from bitfleet.spec import DataSpec


def test_a_bare_relative_data_root_is_under_bitfleet_data_else_home_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BITFLEET_DATA", str(tmp_path / "datasets"))
    root = lambda value: DataSpec(dataset="cifar10", root=value).root  # noqa: E731
    assert root("cifar10") == str(tmp_path / "datasets" / "cifar10")
    assert root("./cifar10") == str(tmp_path / "cifar10")  # explicitly relative to the working directory
    assert root("../cifar10") == str(tmp_path.parent / "cifar10")
    assert root("/srv/cifar10") == "/srv/cifar10" and root("s3://bucket/cifar10") == "s3://bucket/cifar10"
    assert root("~/cifar10") == str(Path.home() / "cifar10")
    monkeypatch.delenv("BITFLEET_DATA")
    assert root("imagenet") == str(Path.home() / "data" / "imagenet")
    monkeypatch.setenv("BITFLEET_DATA", "relative-root")  # itself relative: to the working directory
    assert root("mnist") == str(tmp_path / "relative-root" / "mnist")


def test_every_workload_and_the_data_commands_resolve_data_roots_alike(tmp_path, monkeypatch):
    monkeypatch.setenv("BITFLEET_DATA", str(tmp_path))
    for workload, dataset in (("resnet_cifar", "cifar10"), ("rbnn", "cifar10"), ("lbpnet", "mnist"),
                              ("tap_ppo", "cifar10")):
        synthetic.write(dataset, tmp_path / dataset, n_train=10, n_test=10)
        raw = {"name": "r", "workload": workload, "data": {"dataset": dataset, "root": dataset, "val_size": 16},
               "storage_path": str(tmp_path / "runs")}
        assert validate_spec(raw).data.root == str(tmp_path / dataset)
    assert cli.main(["data", "synth", "cifar100", "c100", "--train", "4", "--test", "4"]) == 0
    assert (tmp_path / "c100" / "cifar-100-python" / "train").is_file()
