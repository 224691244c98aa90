"""Dual BatchNorm (AdvProp / Mixture BN): surgery, routing of every training pass, AdvProp's loss,
and a run that trains, reloads and evaluates through the inference route it was trained for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdef.errors import UserError
from advdef.evaluation.engine import EvalConfig, evaluate_run
from advdef.evaluation.summary import summarize
from advdef.models import build_model
from advdef.models.base import Classifier
from advdef.models.dual_bn import DualBatchNorm, convert_to_dual_bn
from advdef.registry import DATASETS, TRAINING
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import load_run_model, start_run

DIGITS = DATASETS.create("digits").info
CIFAR = DATASETS.create("cifar10").info


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *DIGITS.input_shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def dual_model(route: str = "clean", arch: str = "resnet18:width=4", defense: str = "none") -> Classifier:
    torch.manual_seed(0)
    return build_model(arch, DIGITS, defense, route).model


def duals(model: nn.Module) -> list[DualBatchNorm]:
    return [m for m in model.modules() if isinstance(m, DualBatchNorm)]


def tracked(model: nn.Module) -> tuple[int, int]:
    """Batches seen by the first dual BatchNorm's clean and adversarial copies."""
    first = duals(model)[0]
    return int(first.clean.num_batches_tracked), int(first.adversarial.num_batches_tracked)


def test_every_batchnorm_gets_a_clean_and_an_adversarial_copy():
    plain = build_model("resnet18", CIFAR)
    built = build_model("resnet18", CIFAR, dual_bn="clean")
    batchnorms = [m for m in plain.model.modules() if isinstance(m, nn.BatchNorm2d)]
    affine = sum(m.weight.numel() + m.bias.numel() for m in batchnorms)
    assert len(duals(built.model)) == len(batchnorms) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(p, DualBatchNorm)
                   for p in built.model.modules() for m in p.children())
    assert built.params_added == affine == 9_600  # one extra affine copy per BatchNorm
    assert "net.bn1.clean.weight" in built.model.state_dict()
    assert "net.bn1.adversarial.running_var" in built.model.state_dict()


def test_defense_batchnorms_are_converted_too():
    model = dual_model(defense="fsr")
    fsr_norms = [m for name, m in model.named_modules() if "attached" in name and isinstance(m, DualBatchNorm)]
    assert fsr_norms, "the defense's own BatchNorms need both routes as well"


def test_a_fresh_dual_model_computes_what_the_plain_model_computes():
    torch.manual_seed(0)
    plain = build_model("resnet18:width=4", DIGITS).model.eval()
    dual = dual_model("adversarial").eval()
    x, _ = batch()
    assert torch.equal(plain(x), dual(x))


@pytest.mark.parametrize("route", ["clean", "adversarial"])
def test_route_selects_the_statistics_and_inference_uses_the_chosen_set(route):
    model = dual_model(route)
    x, _ = batch()
    model.train()
    with model.route("clean"):
        model(x)
    assert tracked(model) == (1, 0)
    with model.route("adversarial"):
        model(x)
        model(x)
    assert tracked(model) == (1, 2)
    model(x)  # no route outside training passes: the inference set
    assert tracked(model) == ((2, 2) if route == "clean" else (1, 3))
    # In eval mode the inference set's running statistics decide the output.
    model.eval()
    first = duals(model)[0]
    expected = model(x)
    other = "adversarial" if route == "clean" else "clean"
    getattr(first, other).running_mean.add_(5.0)
    assert torch.equal(model(x), expected)
    getattr(first, route).running_mean.add_(5.0)
    assert not torch.allclose(model(x), expected)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("standard", (1, 0)),
        ("pgd_at:steps=2", (0, 3)),  # train-mode crafting: 2 steps through the adversarial set, then CE(x')
        ("trades:steps=2", (1, 1)),  # eval-mode crafting; natural pass clean, adversarial pass adversarial
        ("mart:steps=2", (1, 1)),
        ("fat:steps=2", (0, 1)),
        ("advprop:steps=2", (1, 3)),  # CE(x) clean; 2 crafting steps + CE(x') adversarial
    ],
)
def test_each_method_routes_clean_and_adversarial_passes(method, expected):
    model = dual_model().train()
    x, y = batch()
    generator = torch.Generator().manual_seed(0)
    loss, logits = TRAINING.create(method).loss(model, x, y, build_model("smallcnn:width=4", DIGITS).defense, generator)
    assert torch.isfinite(loss) and logits.shape == (16, 10)
    assert tracked(model) == expected


def test_advprop_loss_is_clean_ce_plus_adversarial_ce_through_their_own_batchnorms():
    method = TRAINING.create("advprop:steps=1")
    model = dual_model().train()
    x, y = batch()
    defense = build_model("smallcnn:width=4", DIGITS).defense
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, logits = method.loss(model, x, y, defense, torch.Generator().manual_seed(0))
    # Recompute both terms from the same starting state and the same crafted x'.
    model.load_state_dict(state)
    x_adv = method.craft(model, x, y, defense, torch.Generator().manual_seed(0))
    with model.route("clean"):
        clean = model(x)
    with model.route("adversarial"):
        adversarial = model(x_adv)
    expected = nn.functional.cross_entropy(clean, y) + nn.functional.cross_entropy(adversarial, y)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(logits, clean, atol=1e-6)
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6


def test_advprop_defaults_and_selection():
    method = TRAINING.create("advprop")
    assert (method.eps, method.alpha, method.steps) == (pytest.approx(4 / 255), pytest.approx(1 / 255), 5)
    config = TrainConfig(at="advprop")
    assert config.dual_bn_setting == "clean" and config.selection == "val_clean"
    assert TrainConfig(at="advprop", dual_bn="off").dual_bn_setting == "off"
    assert TrainConfig(at="pgd_at").dual_bn_setting == "off"
    assert TrainConfig(at="pgd_at", dual_bn="adversarial").selection == "val_robust"


def test_bad_settings_are_refused_with_the_valid_choices():
    with pytest.raises(UserError, match="valid: off, clean, adversarial"):
        TrainConfig(dual_bn="main").validate()
    with pytest.raises(UserError, match="valid: off, clean, adversarial"):
        build_model("smallcnn:width=4", DIGITS, dual_bn="aux")
    with pytest.raises(ValueError, match="route must be one of clean, adversarial"):
        with dual_model().route("auxiliary"):
            pass
    no_bn = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), (0.5,), (0.5,), (1, 16, 16), 10)
    with pytest.raises(ValueError, match="needs BatchNorm layers"):
        convert_to_dual_bn(no_bn, "clean")


@pytest.mark.parametrize(("at", "dual_bn", "route"), [("advprop:steps=1", None, "clean"),
                                                       ("pgd_at:steps=1", "adversarial", "adversarial")])
def test_a_dual_bn_run_reloads_with_its_inference_route_and_evaluates(at, dual_bn, route, tmp_path):
    store = Store(memory=True)
    config = TrainConfig(data="digits", arch="resnet18:width=4", at=at, dual_bn=dual_bn, epochs=1,
                         limit_train=40, batch_size=20, val_n=10, lr=0.01, device="cpu")
    run_id = start_run(config, store, tmp_path)
    built, card = load_run_model(store.get_run(run_id), torch.device("cpu"))
    assert card["dual_bn"] == route
    assert {m.inference_route for m in duals(built.model)} == {route}
    summary = summarize(store, evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=10, device="cpu")))
    assert summary.complete and summary.clean.n == 10
