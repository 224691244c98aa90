"""CIFS (Yan et al. 2021): the module's definition, its train/eval semantics, losses and plumbing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import advdef.defenses.cifs  # noqa: F401  (registers the plugin)
from advdef.defenses.cifs import (
    CIFS,
    DEFAULTS,
    CIFSModule,
    InsertionPointError,
    LinearProbe,
    MLPProbe,
    select_classes,
)
from advdef.errors import UserError
from advdef.models import build_model
from advdef.models.base import Classifier, DefenseContext
from advdef.registry import DATASETS, DEFENSES, MODELS
from advdef.training.methods import StandardTraining

DIGITS = DATASETS.create("digits").info
CIFAR = DATASETS.create("cifar10").info
TINY = "resnet18:width=8"


def tiny(defense: str = "cifs", arch: str = TINY):
    torch.manual_seed(0)
    return build_model(arch, DIGITS, defense)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *DIGITS.input_shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def module(probe: torch.nn.Module, context: DefenseContext | None = None, **options) -> CIFSModule:
    settings = dict(k=2, imgf="softmax", temperature=1.0, alpha=1.0, mask_scale=1.0, train_topk="replace",
                    mask_grad="probe")
    settings.update(options)
    return CIFSModule("p", probe.double(), context or DefenseContext(), **settings)


# -- the module's definition on hand-made tensors ------------------------------------------------

# z: 2 examples, 3 channels, 2x2 positions. Channel means: [1, 2, 3] and [4, 0, -1].
Z = torch.tensor(
    [
        [[[1.0, 1.0], [1.0, 1.0]], [[0.0, 4.0], [2.0, 2.0]], [[3.0, 3.0], [3.0, 3.0]]],
        [[[4.0, 4.0], [4.0, 4.0]], [[1.0, -1.0], [0.0, 0.0]], [[-1.0, -1.0], [-1.0, -1.0]]],
    ],
    dtype=torch.float64,
)
# A linear probe, 3 channels -> 4 classes.
W = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [-1.0, 0.5, 1.0], [0.2, 0.2, 0.2]], dtype=torch.float64)
B = torch.tensor([0.0, 0.1, 0.0, 0.3], dtype=torch.float64)


def linear_probe() -> LinearProbe:
    probe = LinearProbe(3, 4).double()
    with torch.no_grad():
        probe.fc.weight.copy_(W)
        probe.fc.bias.copy_(B)
    return probe


def test_hand_computed_logits_and_classes():
    # Example 0: means [1,2,3] -> logits [2.5, 2.1, 3.0, 1.5]: top-2 = classes 2, 0.
    # Example 1: means [4,0,-1] -> logits [3.5, 0.1, -5.0, 0.9]: top-2 = classes 0, 3.
    logits = linear_probe()(Z)
    assert torch.allclose(logits, torch.tensor([[2.5, 2.1, 3.0, 1.5], [3.5, 0.1, -5.0, 0.9]], dtype=torch.float64))
    assert select_classes(logits, 2, None).tolist() == [[2, 0], [0, 3]]


def test_eval_mask_is_softmax_of_summed_top2_gradients_linear_probe():
    # d logit_j / d z[c,h,w] = W[j,c] / 4; summed over the 4 positions: g = W[a] + W[b].
    cifs = module(linear_probe()).eval()
    out = cifs(Z)
    mask = cifs.context.aux["cifs/p/mask"]
    g = torch.stack([W[2] + W[0], W[0] + W[3]])
    expected = torch.exp(g) / torch.exp(g).sum(1, keepdim=True)
    assert torch.allclose(mask, expected)
    assert torch.allclose(out, Z * expected[:, :, None, None])
    assert torch.allclose(cifs.context.aux["cifs/p/logits"], linear_probe()(Z))


def test_mlp_mask_matches_eq1_by_channel_perturbation():
    # Eq. 1: g = d/d delta sum_{top-k} A(z + delta 1^T) at delta = 0, per channel (finite differences).
    torch.manual_seed(1)
    probe = MLPProbe(3, 5, 4).double()
    cifs = module(probe).eval()
    cifs(Z)
    mask = cifs.context.aux["cifs/p/mask"]
    chosen = select_classes(probe(Z), 2, None)
    h = 1e-6
    g = torch.zeros(2, 3, dtype=torch.float64)
    for c in range(3):
        delta = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
        delta[0, c] = h
        up = probe(Z + delta).gather(1, chosen).sum(1)
        down = probe(Z - delta).gather(1, chosen).sum(1)
        g[:, c] = (up - down) / (2 * h)
    assert torch.allclose(mask, torch.softmax(g, 1), atol=1e-8)
    # The closed form through Softplus(beta=5): g = U^T [sigmoid(5 (U a + c)) * (V[i] + V[j])].
    pooled = Z.mean((2, 3))
    gate = torch.sigmoid(5 * (pooled @ probe.fc1.weight.T + probe.fc1.bias))
    rows = probe.fc2.weight[chosen].sum(1)
    closed = (gate * rows) @ probe.fc1.weight
    assert torch.allclose(closed, g, atol=1e-6)


def test_training_mode_replaces_top1_by_the_label():
    context = DefenseContext()
    cifs = module(linear_probe(), context).train()
    # Example 0: label 1 replaces top-1 (class 2), keeping class 0. Example 1: label 3 is the
    # 2nd-ranked class, so "replace" (paper's wording and the code) counts it twice.
    context.labels = torch.tensor([1, 3])
    cifs(Z)
    g = torch.stack([W[1] + W[0], 2 * W[3]])
    assert torch.allclose(context.aux["cifs/p/mask"], torch.softmax(g, 1))
    distinct = module(linear_probe(), context, train_topk="distinct").train()
    distinct(Z)
    g = torch.stack([W[1] + W[2], W[3] + W[0]])
    assert torch.allclose(context.aux["cifs/p/mask"], torch.softmax(g, 1))


def test_eval_mode_ignores_labels_even_if_present():
    context = DefenseContext(labels=torch.tensor([1, 3]))
    cifs = module(linear_probe(), context).eval()
    cifs(Z)
    g = torch.stack([W[2] + W[0], W[0] + W[3]])
    assert torch.allclose(context.aux["cifs/p/mask"], torch.softmax(g, 1))


@pytest.mark.parametrize(
    ("imgf", "alpha", "transform"),
    [
        ("sigmoid", 10.0, lambda g: torch.sigmoid(10 * g)),
        ("softplus", 5.0, lambda g: torch.log1p(torch.exp(5 * g)) / 5),
        ("softmax", 1.0, lambda g: torch.softmax(g / 0.5, 1)),
    ],
)
def test_other_mask_functions_and_scale(imgf, alpha, transform):
    cifs = module(linear_probe(), imgf=imgf, alpha=alpha, temperature=0.5, mask_scale=2.0).eval()
    cifs(Z)
    g = torch.stack([W[2] + W[0], W[0] + W[3]])
    assert torch.allclose(cifs.context.aux["cifs/p/mask"], 2 * transform(g))


# -- the defended model -----------------------------------------------------------------------------


def test_output_shapes_and_aux_outputs():
    built = tiny()
    model = built.model.eval()
    x, _ = batch(5)
    with torch.no_grad():
        logits = model(x)
    aux = model.aux_outputs()
    assert logits.shape == (5, 10)
    assert set(aux) == {f"cifs/{p}/{kind}" for p in ("layer4.0", "layer4.1") for kind in ("logits", "mask")}
    assert aux["cifs/layer4.0/logits"].shape == (5, 10) and aux["cifs/layer4.1/mask"].shape == (5, 64)
    assert torch.allclose(aux["cifs/layer4.1/mask"].sum(1), torch.ones(5))  # softmax over channels
    assert built.defense.adaptive().aux_heads == ("cifs/layer4.0/logits", "cifs/layer4.1/logits")


def test_eval_is_deterministic_label_free_and_no_grad_safe():
    model = tiny().model.eval()
    x, y = batch()
    with torch.no_grad():
        first = model(x)
    model.context.labels = (y + 1) % 10  # a stray label must not matter in eval mode
    second = model(x)
    model.context.labels = None
    assert torch.equal(first, second.detach())
    assert torch.isfinite(first).all()
    with pytest.raises(RuntimeError):
        with model.labels(y):
            pass


def test_training_mode_uses_labels():
    model = tiny().model.train()
    x, y = batch()
    with model.labels(y):
        model(x)
        with_labels = model.aux_outputs()["cifs/layer4.1/mask"].detach()
    model(x)
    without = model.aux_outputs()["cifs/layer4.1/mask"].detach()
    assert not torch.allclose(with_labels, without)


def test_attack_gradients_are_finite_nonzero_and_leave_parameters_alone():
    model = tiny().model.eval()
    x, y = batch()
    x.requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (gradient,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # Default masks are detached from the input (the code's semantics) ...
    mask = model.aux_outputs()["cifs/layer4.0/mask"]
    assert torch.autograd.grad(mask.sum(), x, allow_unused=True)[0] is None


def test_undetached_masks_depend_on_the_input():
    built = tiny()
    model, defense = built.model.eval(), built.defense
    x, y = batch()
    x.requires_grad_(True)
    default = torch.autograd.grad(F.cross_entropy(model(x), y), x)[0]
    with defense.undetached_masks(model):
        full = torch.autograd.grad(F.cross_entropy(model(x), y), x)[0]
        model(x)
        (mask_gradient,) = torch.autograd.grad(model.aux_outputs()["cifs/layer4.0/mask"][:, 0].sum(), x)
        with torch.no_grad():  # still works without a graph
            assert torch.isfinite(model(x)).all()
    assert mask_gradient.abs().sum() > 0
    # Relative: at initialisation the softmax masks shrink features ~1/C per layer, so gradients are tiny.
    assert (default - full).norm() > 1e-5 * default.norm()
    assert all(m.mask_grad == "probe" for m in CIFS.modules_of(model))
    assert defense.mask_detached and "mask_detached=True" in defense.adaptive().notes


def test_final_loss_trains_the_probe_through_the_mask_only_in_probe_mode():
    x, y = batch()
    grads = {}
    for mode in ("probe", "constant"):
        built = tiny(f"cifs:mask_grad={mode}")
        model = built.model.train()
        with model.labels(y):
            F.cross_entropy(model(x), y).backward()  # final CE only: no probe CE
        probe = CIFS.modules_of(model)[-1].probe
        grads[mode] = probe.fc.weight.grad
    assert grads["probe"] is not None and grads["probe"].abs().sum() > 0
    assert grads["constant"] is None


def test_aux_loss_and_training_objective_follow_eq3():
    built = tiny()
    model, defense = built.model.train(), built.defense
    x, y = batch()
    with model.labels(y):
        logits = model(x)
        heads = [model.aux_outputs()[f"cifs/{p}/logits"] for p in ("layer4.0", "layer4.1")]
        aux = defense.aux_loss(model, y)
        objective = defense.training_attack_objective(model)(logits, y)
    probe_ce = [F.cross_entropy(h, y, reduction="none") for h in heads]
    assert torch.allclose(aux, (2 / 2) * sum(p.mean() for p in probe_ce))
    final = F.cross_entropy(logits, y, reduction="none")
    # Eq. 3 up to its 1/(1+beta) scale, which sign-gradient PGD does not see.
    assert torch.allclose(objective, final + 2 / 2 * sum(probe_ce))
    assert torch.allclose(defense.joint_objective(model, math.inf)(logits, y), sum(probe_ce) / 2)
    assert torch.allclose(defense.joint_objective(model, math.inf, heads=[0])(logits, y), probe_ce[0])
    assert DEFENSES.create("cifs:attack_beta=0").training_attack_objective(model) is None


def test_a_training_step_decreases_the_joint_loss():
    built = tiny()
    model, defense = built.model.train(), built.defense
    x, y = batch(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method, generator = StandardTraining(), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(6):
        loss, _ = method.loss(model, x, y, defense, generator)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


# -- parameters, defaults and overrides -----------------------------------------------------------


def test_resnet18_cifar_parameter_overhead_is_72084():
    built = build_model("resnet18", CIFAR, "cifs")
    assert built.params_backbone == 11_173_962
    assert built.params_added == 72_084  # MLP 512->128->10 (66,954) + linear 512->10 (5,130)


@pytest.mark.parametrize("arch", sorted(DEFAULTS))
def test_default_points_exist_for_every_architecture(arch):
    if arch not in MODELS.names():
        pytest.skip(f"{arch} not registered")
    small = {"wrn34_10": "widen_factor=1", "wrn28_10": "widen_factor=1"}.get(arch, "width=8")
    built = build_model(f"{arch}:{small}", DIGITS, "cifs")
    modules = CIFS.modules_of(built.model)
    assert [m.point for m in modules] == list(DEFAULTS[arch][0])
    assert isinstance(modules[-1].probe, LinearProbe) and isinstance(modules[0].probe, MLPProbe)
    with torch.no_grad():
        assert torch.isfinite(built.model.eval()(batch(2)[0])).all()


@pytest.mark.parametrize(
    ("spec", "added"),
    [
        ("cifs:points=layer4.1", 5_130),
        ("cifs:probes=linear", 2 * 5_130),
        ("cifs:hidden=64", 512 * 64 + 64 + 64 * 10 + 10 + 5_130),
        ("cifs:points=layer3.1,layer4.1", 256 * 64 + 64 + 64 * 10 + 10 + 5_130),
    ],
)
def test_overrides_change_the_modules(spec, added):
    assert build_model("resnet18", CIFAR, spec).params_added == added


@pytest.mark.parametrize(
    "spec",
    ["cifs:imgf=relu", "cifs:k=0", "cifs:beta=-1", "cifs:temperature=0", "cifs:mask_grad=some",
     "cifs:train_topk=first", "cifs:probes=conv", "cifs:attack_beta=-2", "cifs:hidden=0",
     "cifs:points=layer4.0,layer4.1,probes=mlp,mlp,linear", "cifs:mask_scale=0", "cifs:unknown=1"],
)
def test_bad_values_are_user_errors(spec):
    with pytest.raises(UserError):
        DEFENSES.create(spec)


@pytest.mark.parametrize("spec", ["cifs:points=layer9", "cifs:points=layer4,layer4.1", "cifs:k=11"])
def test_bad_points_for_a_model_are_user_errors(spec):
    with pytest.raises(UserError, match="layer|k=11"):
        build_model(TINY, DIGITS, spec)


def test_architecture_without_default_names_the_fix():
    net = MODELS.get("smallcnn").factory(in_channels=1, num_classes=10, width=4)
    model = Classifier(net, DIGITS.mean, DIGITS.std, DIGITS.input_shape)
    model.arch = "mystery"
    with pytest.raises(InsertionPointError, match="points="):
        DEFENSES.create("cifs").attach(model)
    DEFENSES.create("cifs:points=block2").attach(model)  # explicit points work on any architecture
    assert [m.point for m in CIFS.modules_of(model)] == ["block2"]


def test_canonical_spec_and_published_data():
    canonical = DEFENSES.canonical("cifs")
    assert canonical.startswith("cifs:") and "beta=2.0" in canonical and "k=2" in canonical
    assert CIFS.published["cifar10"]["resnet18"]["pgd_at"]["pgd20"] == 51.23
    assert "Yan" in CIFS.citation and "ICML 2021" in CIFS.citation


# -- end to end on the embedded digits ------------------------------------------------------------


def test_short_training_run_and_evaluation(tmp_path):
    from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run
    from advdef.store import Store
    from advdef.training.config import TrainConfig
    from advdef.training.trainer import start_run

    store = Store(memory=True)
    config = TrainConfig(data="digits", arch=TINY, defense="cifs", at="pgd_at:steps=2", epochs=1,
                         limit_train=100, batch_size=50, device="cpu", val_attack="pgd:steps=2", val_n=10)
    run_id = start_run(config, store, tmp_path)
    checkpoint = store.checkpoints(run_id)[-1]
    assert math.isfinite(checkpoint["metrics"]["train_loss"])
    eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=20, device="cpu"))
    assert len(store.outcomes(eval_id, CLEAN)) == 20
    attack = EvalConfig(attacks=["fgsm"]).canonical_attacks()[0]
    assert len(store.outcomes(eval_id, attack)) == 20
