import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advdef.progress import SilentReporter
from advdef.store import Store
from advdef.training import checkpoint
from advdef.training.trainer import best_epoch, start_run, train
from tests.conftest import quick_config


def test_checkpoints_are_safetensors_with_a_json_card(trained_store):
    path, runs = trained_store
    with Store(path) as store:
        run = store.get_run(runs["pgd_at"])
        card_path = checkpoint.paths(Path(run["run_dir"]), run["best_epoch"])["card"]
        card = json.loads(card_path.read_text())
        assert card["format"] == checkpoint.FORMAT
        assert card["arch"] == "smallcnn:width=16" and card["defense"] == "none"
        assert card["at"].startswith("pgd_at:") and "eps=16/255" in card["at"]
        assert card["data"]["input_shape"] == [1, 16, 16]
        weights = load_file(str(card_path.parent / card["weights"]))
        assert "net.head.3.weight" in weights
        assert run["status"] == "trained" and run["epochs_done"] == 6
        assert len(store.checkpoints(run["run_id"])) == 6


def test_training_learns_and_selects_on_validation(trained_store):
    path, runs = trained_store
    with Store(path) as store:
        standard = store.checkpoints(runs["standard"])
        assert standard[-1]["metrics"]["train_loss"] < standard[0]["metrics"]["train_loss"]
        assert max(c["metrics"]["val_clean"] for c in standard) > 0.85
        assert all(c["metrics"]["train_images_per_s"] > 0 and c["metrics"]["epoch_seconds"] > 0 for c in standard)
        robust = store.checkpoints(runs["pgd_at"])
        assert all("val_robust" in c["metrics"] for c in robust)
        assert store.get_run(runs["pgd_at"])["best_epoch"] == best_epoch(robust, "val_robust")


def test_best_epoch_rules():
    rows = [{"epoch": e, "metrics": {"val_clean": c, "val_robust": r}} for e, c, r in [(1, 0.5, 0.3), (2, 0.9, 0.2), (3, 0.8, 0.3)]]
    assert best_epoch(rows, "val_clean") == 2
    assert best_epoch(rows, "val_robust") == 3  # ties go to the later epoch
    assert best_epoch(rows, "last") == 3


class _StopAfterFirstEpoch(SilentReporter):
    """Interrupts training right after epoch 1's checkpoint is written."""

    def message(self, text):
        if text.startswith("epoch 1/"):
            raise KeyboardInterrupt


def test_resumed_training_continues_exactly_from_its_checkpoint(tmp_path):
    config = quick_config(at="pgd_at:steps=2", epochs=2, limit_train=200, batch_size=50)
    store = Store(tmp_path / "s.sqlite")
    straight = start_run(config, store, tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        start_run(config, store, tmp_path / "runs", _StopAfterFirstEpoch())
    interrupted = next(r["run_id"] for r in store.runs() if r["run_id"] != straight)
    assert store.get_run(interrupted)["epochs_done"] == 1
    train(interrupted, store)

    def weights(run_id):
        return load_file(str(checkpoint.paths(Path(store.get_run(run_id)["run_dir"]), 2)["weights"]))

    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert store.get_run(interrupted)["epochs_done"] == 2 and store.get_run(interrupted)["status"] == "trained"


def test_lr_schedule_steps_at_the_papers_milestones():
    config = quick_config(epochs=200, lr=0.1)
    assert config.lr_at(100) == pytest.approx(0.1)
    assert config.lr_at(101) == pytest.approx(0.01)
    assert config.lr_at(151) == pytest.approx(0.001)
