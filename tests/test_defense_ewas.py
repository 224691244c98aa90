"""EWAS defense plugin: the paper's module, its label discipline, losses, overrides and a real run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import advdef.defenses.ewas  # noqa: F401  (registers the plugin)
from advdef.defenses.ewas import DEFAULT_POINTS, EWAS, EWASModule, InsertionPointError
from advdef.errors import UserError
from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run
from advdef.models import build_model
from advdef.models.base import Classifier, DefenseContext
from advdef.models.smallcnn import SmallCNN
from advdef.registry import DATASETS, DEFENSES, MODELS
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run

DIGITS = DATASETS.create("digits").info
CIFAR = DATASETS.create("cifar10").info

def tiny(defense: str = "ewas", arch: str = "resnet18:width=4"):
    torch.manual_seed(0)
    return build_model(arch, DIGITS, defense)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *DIGITS.input_shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_resnet18_cifar10_adds_exactly_the_papers_alc():
    built = build_model("resnet18", CIFAR, "ewas")
    assert built.params_backbone == 11_173_962
    assert built.params_added == 81_930  # Linear(512*4*4 -> 10) with bias
    alc = built.model.net.layer4[0].tap.attached[0].alc
    assert (alc.in_features, alc.out_features) == (8192, 10)


def test_module_forward_is_the_papers_formula_on_hand_made_tensors():
    context = DefenseContext()
    module = EWASModule("ewas/p", (2, 1, 2), 3, "default", context)
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0], [0.0, -3.0, 1.0, 1.0]])
    bias = torch.tensor([0.0, 0.1, -0.2])
    with torch.no_grad():
        module.alc.weight.copy_(weight)
        module.alc.bias.copy_(bias)
    z = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[0.0, -1.0]], [[1.0, 0.0]]]])  # N=2, C=2, H=1, W=2
    scores = z.flatten(1) @ weight.T + bias  # s_hat = W flatten(z) + b
    predicted = scores.argmax(1)
    labels = torch.tensor([1, 2])
    assert not torch.equal(predicted, labels), "the test needs labels that differ from the prediction"

    # Training stage: the true label's row, reshaped row-major to C x H x W (paper Fig. 3).
    module.train()
    context.labels = labels
    out = module(z)
    expected_row1 = torch.tensor([[[-1.0, 0.5]], [[0.0, 2.0]]])  # W[1] as (C=2, H=1, W=2)
    assert torch.equal(out[0], z[0] * expected_row1)
    assert torch.equal(out, z * weight[labels].view(2, 2, 1, 2))
    assert torch.allclose(context.aux["ewas/p"], scores)
    assert torch.equal(context.aux["ewas/p/selected"], labels)

    # Inference stage: the ALC's own argmax, even if a label is (wrongly) present in the context.
    module.eval()
    out = module(z)
    assert torch.equal(out, z * weight[predicted].view(2, 2, 1, 2))
    assert torch.equal(context.aux["ewas/p/selected"], predicted)

    # Training mode without labels (no `model.labels` block) falls back to the inference rule.
    module.train()
    context.labels = None
    assert torch.equal(module(z), z * weight[predicted].view(2, 2, 1, 2))


def test_output_shapes_and_aux_outputs():
    built = tiny()
    model = built.model.eval()
    x, _ = batch(5)
    logits = model(x)
    assert logits.shape == (5, 10)
    aux = model.aux_outputs()
    assert aux["ewas/layer4.0"].shape == (5, 10)
    assert aux["ewas/layer4.0/selected"].shape == (5,)
    module = model.net.layer4[0].tap.attached[0]
    assert module.shape == (32, 2, 2)  # width 4 -> 32 channels; 16x16 digits -> 2x2 at layer4
    assert built.defense.adaptive().aux_heads == ("ewas/layer4.0",)
    assert built.defense.adaptive().masks == ("ewas/layer4.0/selected",)


def test_eval_mode_is_deterministic_and_label_free():
    model = tiny().model.eval()
    x, y = batch(8)
    first = model(x)
    assert torch.equal(first, model(x))
    with pytest.raises(RuntimeError):
        with model.labels(y):
            pass
    model.context.labels = (y + 1) % 10  # a label leaked into the context is ignored in eval mode
    assert torch.equal(first, model(x))
    model.context.labels = None

    # In training mode the labels do select the mask (same batch, same BN batch statistics).
    model.train()
    with model.labels(y):
        with_labels = model(x)
        selected = model.aux_outputs()["ewas/layer4.0/selected"]
    without = model(x)
    assert torch.equal(selected, y)
    assert not torch.allclose(with_labels, without)


def test_aux_loss_and_training_attack_objective_are_the_papers():
    built = tiny("ewas:lam=0.5")
    model, defense = built.model.train(), built.defense
    x, y = batch(6)
    with model.labels(y):
        logits = model(x)
        alc = model.aux_outputs()["ewas/layer4.0"]
        loss = defense.aux_loss(model, y)
        objective = defense.training_attack_objective(model)
        per_example = objective(logits, y)
    assert torch.allclose(loss, 0.5 * F.cross_entropy(alc, y))
    expected = F.cross_entropy(logits, y, reduction="none") + 0.5 * F.cross_entropy(alc, y, reduction="none")
    assert torch.allclose(per_example, expected)
    assert DEFENSES.create("ewas:attack_lam=0").training_attack_objective(model) is None
    assert DEFENSES.create("ewas:lam=0.2,attack_lam=3").attack_lam == 3.0


def test_a_training_step_decreases_the_joint_loss_on_a_fixed_batch():
    built = tiny("ewas:lam=0.1")
    model, defense = built.model.train(), built.defense
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = batch(8)

    def joint() -> torch.Tensor:
        with model.labels(y):
            return F.cross_entropy(model(x), y) + defense.aux_loss(model, y)

    losses = []
    for _ in range(4):
        loss = joint()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    alc = model.net.layer4[0].tap.attached[0].alc
    assert alc.weight.grad is not None and alc.weight.grad.abs().sum() > 0
    assert all(math.isfinite(v) for v in losses)
    assert joint().item() < losses[0]


def test_overrides_and_smallcnn_default():
    defense = DEFENSES.create("ewas:lam=0.05,points=layer3.1,bias=zero")
    assert (defense.lam, defense.points, defense.bias, defense.attack_lam) == (0.05, ("layer3.1",), "zero", 0.05)
    built = build_model("resnet18:width=4", DIGITS, "ewas:points=layer3.1,layer4.0")
    assert [len(t.attached) for t in (built.model.net.layer3[1].tap, built.model.net.layer4[0].tap)] == [1, 1]
    assert built.params_added == (16 * 4 * 4 * 10 + 10) + (32 * 2 * 2 * 10 + 10)
    zero_bias = build_model("resnet18:width=4", DIGITS, "ewas:bias=zero").model.net.layer4[0].tap.attached[0]
    assert torch.count_nonzero(zero_bias.alc.bias) == 0
    assert build_model("resnet18:width=4", DIGITS, "ewas:bias=absent").params_added == 32 * 2 * 2 * 10
    small = build_model("smallcnn:width=4", DIGITS, "ewas")
    assert len(small.model.net.tap1.attached) == 1  # smallcnn default: block1 (8 x 8 x 8 on digits)
    assert small.params_added == 8 * 8 * 8 * 10 + 10


@pytest.mark.parametrize(
    "spec",
    ["ewas:lam=-1", "ewas:lam=abc", "ewas:lam=nan", "ewas:attack_lam=-0.5", "ewas:bias=maybe", "ewas:points=3",
     "ewas:points=layer4.0,layer4.0"],
)
def test_bad_values_are_user_errors(spec):
    with pytest.raises(UserError):
        DEFENSES.create(spec)


def test_bad_points_and_unknown_architectures_name_the_valid_points():
    with pytest.raises(UserError, match=r"unknown insertion point 'layer9\.0'.*valid: .*layer4\.0"):
        build_model("resnet18:width=4", DIGITS, "ewas:points=layer9.0")
    with pytest.raises(InsertionPointError, match="same insertion point"):
        build_model("resnet18:width=4", DIGITS, "ewas:points=layer4,final")
    model = Classifier(SmallCNN(1, 10, width=4), DIGITS.mean, DIGITS.std, DIGITS.input_shape)
    model.arch = "mystery"
    with pytest.raises(ValueError, match="no default insertion points for architecture 'mystery'.*block1, block2"):
        EWAS().attach(model)
    EWAS(points="block2").attach(model)  # an explicit point works on any architecture


@pytest.mark.parametrize("arch", sorted(DEFAULT_POINTS))
def test_default_points_exist_on_every_registered_architecture(arch):
    if arch not in MODELS.names():
        pytest.skip(f"{arch} is not registered yet")
    params = MODELS.resolve(arch)[1]
    small = {k: v for k, v in {"width": 4, "widen_factor": 1}.items() if k in params}
    spec = arch + (":" + ",".join(f"{k}={v}" for k, v in small.items()) if small else "")
    plugin = MODELS.get(arch)
    net = plugin.factory(**small, in_channels=3, num_classes=10)
    assert set(DEFAULT_POINTS[arch]) <= set(net.insertion_points()), spec


def test_relaxed_selection_is_a_differentiable_surrogate_that_restores():
    built = tiny()
    model = built.model.eval()
    x, _ = batch(4)
    hard = model(x)
    with EWAS.relaxed(model, temperature=1e-4):
        assert torch.allclose(model(x), hard, atol=1e-5)  # T -> 0 recovers the argmax mask
    with EWAS.relaxed(model, temperature=10.0):
        soft_x = x.clone().requires_grad_(True)
        soft = model(soft_x)
        assert not torch.allclose(soft, hard)
        alc_logits = model.aux_outputs()["ewas/layer4.0"]
        # Through the soft mask, the final logits depend on the ALC scores themselves.
        grad = torch.autograd.grad(soft.sum(), alc_logits, retain_graph=True, allow_unused=True)[0]
        assert grad is not None and grad.abs().sum() > 0
    assert torch.equal(model(x), hard)
    with pytest.raises(ValueError):
        with EWAS.relaxed(model, temperature=0):
            pass


def test_published_numbers_and_declarations_are_data():
    table = EWAS.published["cifar10"]["resnet18"]["pgd_at"]
    assert (table["clean"], table["pgd20"], table["cw"]) == (84.73, 64.84, 82.35)
    assert EWAS.published["svhn"]["resnet18"]["pgd_at"]["cw"] == 69.67
    assert EWAS.published["protocol"]["lam"] == {"cifar10": 0.01, "svhn": 0.05}
    assert EWAS.attack_lam_sweep["cifar10"]["resnet18"]["by_attack_lam"][1][2] == 46.95
    declaration = EWAS().adaptive()
    assert "0.01" in declaration.joint_loss and not declaration.stochastic
    assert "46.9" in declaration.notes
    assert "Element-Wise Activation Scaling" in EWAS.citation


def test_short_pgd_at_run_on_digits_trains_and_evaluates(tmp_path):
    config = TrainConfig(data="digits", arch="resnet18:width=8", defense="ewas", at="pgd_at:steps=2", epochs=1,
                         limit_train=200, batch_size=50, device="cpu")
    store = Store(memory=True)
    run_id = start_run(config, store, tmp_path)
    checkpoints = store.checkpoints(run_id)
    assert checkpoints and all(math.isfinite(c["metrics"]["train_loss"]) for c in checkpoints)
    eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=20, device="cpu"))
    assert len(store.outcomes(eval_id, CLEAN)) == 20
    spec = EvalConfig(attacks=["fgsm"], n=20, device="cpu").canonical_attacks()[0]
    assert len(store.outcomes(eval_id, spec)) == 20
