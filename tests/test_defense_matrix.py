"""Every defense x every paper architecture: builds, trains a step with PGD-AT, and evaluates
through the same label-free view as any model (table-driven: a new defense or architecture is
covered with no test edits)."""

import pytest
import torch

from advdef.evaluation.engine import EvalConfig, evaluate_run
from advdef.evaluation.summary import summarize
from advdef.models import build_model
from advdef.registry import DATASETS, DEFENSES, MODELS
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run
from conftest import TINY

DIGITS = DATASETS.create("digits").info


def test_every_architecture_has_a_tiny_variant():
    assert set(MODELS.names()) == set(TINY)


@pytest.mark.parametrize("defense", DEFENSES.names())
@pytest.mark.parametrize("arch", sorted(TINY))
def test_defense_trains_and_evaluates_on_architecture(arch, defense, tmp_path):
    store = Store(memory=True)
    config = TrainConfig(data="digits", arch=TINY[arch], defense=defense, at="pgd_at:steps=1", epochs=1,
                         limit_train=40, batch_size=20, val_n=10, lr=0.01, device="cpu")
    run_id = start_run(config, store, tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "trained"
    metrics = store.checkpoints(run_id)[0]["metrics"]
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    summary = summarize(store, evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=10, device="cpu")))
    assert summary.complete and summary.clean.n == 10


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_eval_mode_is_deterministic_and_label_free(defense):
    torch.manual_seed(0)
    model = build_model(TINY["resnet18"], DIGITS, defense).model.eval()
    x = torch.rand(6, *DIGITS.input_shape)
    first, second = model(x), model(x)
    with pytest.raises(RuntimeError, match="training mode"):
        with model.labels(torch.zeros(6, dtype=torch.long)):
            pass
    if DEFENSES.create(defense).stochastic:
        # A declared stochastic defense really draws anew each pass (its evaluation then needs EOT).
        assert not torch.equal(first, second)
        return
    assert torch.equal(first, second)
    # Batch composition does not change a sample's logits in eval mode.
    assert torch.allclose(model(x[:1]), first[:1], atol=1e-5)
