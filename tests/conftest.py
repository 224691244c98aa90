"""Shared fixtures: small real models trained once per session on the embedded digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"

# Two threads at most: CI and developer machines here have 2 cores (measured: the suite takes
# 75 s with two threads, 87 s with one, on an idle machine).
torch.set_num_threads(min(2, torch.get_num_threads()))


# CPU-size variants of each architecture (same topology, fewer channels), for table-driven tests.
TINY = {
    "smallcnn": "smallcnn:width=4",
    "resnet18": "resnet18:width=4",
    "preact_resnet18": "preact_resnet18:width=4",
    "wrn34_10": "wrn34_10:widen_factor=1,width=4",
    "wrn28_10": "wrn28_10:widen_factor=1,width=4",
    "vgg16_bn": "vgg16_bn:width=4",
}


def quick_config(**overrides) -> TrainConfig:
    """A SmallCNN config that trains in seconds on CPU."""
    base = dict(data="digits", arch="smallcnn:width=16", defense="none", at="standard", epochs=4,
                batch_size=64, lr=0.05, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A store file with a standard-trained and a PGD-AT-trained SmallCNN (run ids by method)."""
    root = tmp_path_factory.mktemp("trained")
    path = root / "advdef.sqlite"
    with Store(path) as store:
        runs = {
            "standard": start_run(quick_config(at="standard", epochs=6), store, root / "runs"),
            "pgd_at": start_run(quick_config(at="pgd_at:eps=16/255", epochs=6), store, root / "runs"),
        }
    return path, runs


@pytest.fixture()
def store(tmp_path) -> Store:
    with Store(tmp_path / "advdef.sqlite") as opened:
        yield opened


@pytest.fixture()
def eval_store(trained_store, tmp_path) -> tuple[Store, dict[str, str]]:
    """A private copy of the trained store, so evaluations never leak between tests."""
    import shutil

    path, runs = trained_store
    source = Store(path)
    source.conn.execute("PRAGMA wal_checkpoint(FULL)")
    source.close()
    copy = tmp_path / "copy.sqlite"
    shutil.copy(path, copy)
    return Store(copy), runs
