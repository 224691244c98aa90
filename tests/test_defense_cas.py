"""CAS defense: the module's formula, label use by mode, losses, overrides, parameter count, a run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advdef.defenses.cas  # noqa: F401  (registers the plugin until defenses/__init__ imports it)
from advdef.defenses.cas import CAS, DEFAULT_POINTS, CASConfigError, CASModule
from advdef.errors import UserError
from advdef.models import build_model
from advdef.models.base import Classifier, DefenseContext, Tap
from advdef.registry import DATASETS, DEFENSES, MODELS
from advdef.training.methods import TrainingMethod, craft_training_attack

DIGITS = DATASETS.create("digits").info
TINY = "resnet18:width=4"  # stage-4 features: 32 channels at 2x2 on 16x16 digits

def tiny(defense: str = "cas", arch: str = TINY):
    torch.manual_seed(0)
    return build_model(arch, DIGITS, defense)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, *DIGITS.input_shape, generator=generator), torch.arange(n) % DIGITS.num_classes


# -- the module's forward pass --------------------------------------------------------------
def hand_made_module(bias: bool = True) -> tuple[CASModule, DefenseContext]:
    context = DefenseContext()
    module = CASModule("p", channels=3, num_classes=2, context=context, bias=bias, suppress=True)
    with torch.no_grad():
        module.head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 2.0]]))  # rows M_0, M_1
        if bias:
            module.head.bias.copy_(torch.tensor([0.25, -0.25]))
    return module, context


def test_module_matches_the_papers_formula_in_eval_and_training():
    module, context = hand_made_module()
    # Two samples; channel means (GAP) are [1, 0, 0] and [0, 1, 1].
    features = torch.zeros(2, 3, 2, 2)
    features[0, 0] = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    features[1, 1] = 1.0
    features[1, 2] = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    weight, bias = module.head.weight.detach(), module.head.bias.detach()
    pooled = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    logits = pooled @ weight.T + bias  # [[1.25, -1.25], [-1.25, 4.75]] -> predictions 0, 1

    module.eval()
    out = module(features)
    assert torch.allclose(context.aux["cas/p"], logits)
    expected = features * weight[[0, 1]][:, :, None, None]  # rows of the head's own prediction
    assert torch.equal(out, expected)
    assert torch.equal(context.aux["cas/p/mask"], weight[[0, 1]])

    module.train()
    context.labels = torch.tensor([1, 0])  # deliberately the opposite of the predictions
    out = module(features)
    assert torch.equal(out, features * weight[[1, 0]][:, :, None, None])  # rows of the true labels
    assert torch.allclose(context.aux["cas/p"], logits), "the head itself never sees the label"

    module.eval()  # labels left in the context are ignored in eval mode
    assert torch.equal(module(features), expected)


def test_mask_is_signed_and_unnormalised_and_bias_is_optional():
    module, _ = hand_made_module(bias=False)
    assert module.head.bias is None
    module.eval()
    features = torch.ones(1, 3, 1, 1)  # logits [-0.5, 4] -> row M_1 = [-1, 3, 2]
    assert torch.equal(module(features).flatten(), torch.tensor([-1.0, 3.0, 2.0]))


def test_without_suppressing_features_pass_through_but_heads_still_run():
    built = tiny("cas:suppress=false")
    reference = tiny("none")
    x, _ = batch()
    state = {k: v for k, v in built.model.state_dict().items() if ".attached." not in k}
    reference.model.load_state_dict(state)
    built.model.eval()
    reference.model.eval()
    with torch.no_grad():
        assert torch.allclose(built.model(x), reference.model(x))
    assert set(built.model.aux_outputs()) >= {"cas/layer4.0", "cas/layer4.1"}


def test_soft_mask_surrogate_keeps_values_and_adds_gradient_through_the_row():
    module, _ = hand_made_module()
    module.eval()
    holder = CAS()
    holder.modules = [module]
    features = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    hard = module(features)
    x = features.clone().requires_grad_(True)
    with holder.soft_mask_gradients(temperature=2.0):
        soft = module(x)
        grad_soft = torch.autograd.grad(soft.sum(), x)[0]
    assert torch.equal(soft.detach(), hard), "the surrogate changes gradients only"
    assert module.soft_temperature is None
    x = features.clone().requires_grad_(True)
    grad_hard = torch.autograd.grad(module(x).sum(), x)[0]
    assert not torch.allclose(grad_soft, grad_hard)


# -- the model: shapes, modes, labels -------------------------------------------------------
def test_output_shapes_and_aux_outputs():
    built = tiny()
    x, y = batch()
    built.model.train()
    with built.model.labels(y):
        logits = built.model(x)
    aux = built.model.aux_outputs()
    assert logits.shape == (8, 10)
    for point in ("layer4.0", "layer4.1"):
        assert aux[f"cas/{point}"].shape == (8, 10)
        assert aux[f"cas/{point}/mask"].shape == (8, 32)
    assert built.defense.resolved_points == ["layer4.0", "layer4.1"]
    assert built.defense.resolved_beta == 2.0


def test_eval_is_deterministic_label_free_and_refuses_labels():
    built = tiny()
    model = built.model.eval()
    x, y = batch()
    with torch.no_grad():
        first = model(x)
        second = model(x)
        model.context.labels = (y + 1) % 10  # bypass the guard: modules must still ignore labels
        third = model(x)
        model.context.labels = None
    assert torch.equal(first, second) and torch.equal(first, third)
    with pytest.raises(RuntimeError, match="training mode"):
        with model.labels(y):
            pass


def test_training_masks_use_labels_and_eval_masks_use_the_heads_prediction():
    built = tiny()
    model, defense = built.model, built.defense
    x, y = batch()
    model.train()
    with model.labels(y), torch.no_grad():
        model(x)
    for module in defense.modules:
        assert torch.equal(model.aux_outputs()[module.mask_key], module.head.weight[y])
    model.eval()
    with torch.no_grad():
        model(x)
    for module in defense.modules:
        predicted = model.aux_outputs()[module.logits_key].argmax(1)
        assert torch.equal(model.aux_outputs()[module.mask_key], module.head.weight[predicted])


def test_eval_gradients_reach_the_input():
    built = tiny()
    model = built.model.eval()
    x, y = batch()
    x.requires_grad_(True)
    objective = built.defense.objective(model)
    loss = objective(model(x), y).sum()
    assert torch.autograd.grad(loss, x)[0].abs().sum() > 0


# -- losses ---------------------------------------------------------------------------------
def test_aux_loss_is_beta_times_the_mean_head_ce():
    built = tiny("cas:beta=3/2")
    model = built.model.train()
    x, y = batch()
    with model.labels(y):
        model(x)
        loss = built.defense.aux_loss(model, y)
    heads = [model.aux_outputs()[f"cas/{p}"] for p in ("layer4.0", "layer4.1")]
    expected = 1.5 * (F.cross_entropy(heads[0], y) + F.cross_entropy(heads[1], y)) / 2
    assert torch.allclose(loss, expected)


def test_objectives_joint_aux_and_margin():
    built = tiny()
    model, defense = built.model.eval(), built.defense
    x, y = batch()
    with torch.no_grad():
        logits = model(x)
        heads = defense.head_logits(model)
        joint = defense.training_attack_objective(model)(logits, y)
        aux_mean = (F.cross_entropy(heads[0], y, reduction="none") + F.cross_entropy(heads[1], y, reduction="none")) / 2
        assert torch.allclose(joint, F.cross_entropy(logits, y, reduction="none") + 2.0 * aux_mean)
        assert torch.allclose(defense.objective(model, target="aux")(logits, y), aux_mean)
        first_head = defense.objective(model, target="aux", heads=["layer4.0"])(logits, y)
        assert torch.allclose(first_head, F.cross_entropy(heads[0], y, reduction="none"))
        cw = defense.objective(model, loss="margin")(logits, y)
        assert cw.shape == (8,) and (cw <= 0).all()
    assert DEFENSES.create("cas:train_attack=ce").training_attack_objective(model) is None


def test_a_training_step_decreases_the_joint_loss():
    built = tiny()
    model, defense = built.model.train(), built.defense
    x, y = batch(32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss, _ = TrainingMethod.supervised(model, x, y, defense, "clean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    head_grads = [m.head.weight.grad for m in defense.modules]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_training_attack_crafts_on_the_joint_loss_in_either_bn_mode(bn_mode):
    built = tiny()
    model = built.model.train()
    x, y = batch()
    x_adv = craft_training_attack(model, x, y, eps=8 / 255, alpha=2 / 255, steps=2, random_start=True,
                                  bn_mode=bn_mode, generator=torch.Generator().manual_seed(0),
                                  objective=built.defense.training_attack_objective(model))
    assert model.training and model.context.labels is None
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)


# -- parameters and overrides ---------------------------------------------------------------
def test_parameter_overhead_on_cifar_resnet18():
    built = build_model("resnet18", DATASETS.create("cifar10").info, "cas")
    assert built.params_backbone == 11_173_962
    assert built.params_added == 10_260  # 2 x Linear(512, 10) with bias
    assert build_model("resnet18", DATASETS.create("cifar10").info, "cas:bias=false").params_added == 10_240


@pytest.mark.parametrize(("arch", "added"), [("wrn34_10", 2 * (640 * 10 + 10)), ("vgg16_bn", 3 * (512 * 10 + 10))])
def test_parameter_overhead_of_the_papers_other_architectures(arch, added):
    if not MODELS.knows(arch):
        pytest.skip(f"{arch} is not registered")
    assert build_model(arch, DATASETS.create("cifar10").info, "cas").params_added == added


TINY_ARCHS = {
    "resnet18": "resnet18:width=4",
    "preact_resnet18": "preact_resnet18:width=4",
    "wrn34_10": "wrn34_10:width=4,widen_factor=1",
    "wrn28_10": "wrn28_10:width=4,widen_factor=1",
    "vgg16_bn": "vgg16_bn:width=4",
    "smallcnn": "smallcnn:width=4",
}


@pytest.mark.parametrize("arch", sorted(DEFAULT_POINTS))
def test_every_default_table_entry_fits_its_architecture(arch):
    if not MODELS.knows(arch):
        pytest.skip(f"{arch} is not registered")
    built = tiny("cas", arch=TINY_ARCHS[arch])
    model, defense = built.model, built.defense
    assert defense.resolved_points == list(DEFAULT_POINTS[arch])
    channels = [module.head.in_features for module in defense.modules]
    assert built.params_added == sum(c * 10 + 10 for c in channels)
    x, y = batch(4)
    model.train()
    with model.labels(y):
        model(x)
        assert torch.isfinite(defense.aux_loss(model, y))
    with torch.no_grad():
        assert model.eval()(x).shape == (4, 10)


def test_overrides():
    defense = DEFENSES.create("cas:beta=2")
    assert defense.beta == 2.0
    built = tiny("cas:points=layer4.1")
    assert built.defense.resolved_points == ["layer4.1"]
    assert built.params_added == 32 * 10 + 10
    built = tiny("cas:points=layer3.1,layer4.1,beta=5")
    assert built.defense.resolved_points == ["layer3.1", "layer4.1"] and built.defense.resolved_beta == 5.0
    assert built.params_added == (16 + 32) * 10 + 20
    canonical = DEFENSES.canonical("cas:points=layer3.1,layer4.1")  # what run cards store
    assert "points=layer3.1,layer4.1," in canonical
    assert DEFENSES.create(canonical).points == ("layer3.1", "layer4.1")
    small = tiny("cas", arch="smallcnn:width=4")
    assert small.defense.resolved_points == ["block2"]


@pytest.mark.parametrize(
    "spec",
    ["cas:beta=-1", "cas:beta=abc", "cas:train_attack=pgd", "cas:bias=maybe", "cas:points=layer4.1,layer4.1",
     "cas:nonsense=1"],
)
def test_bad_values_are_user_errors(spec):
    with pytest.raises(UserError):
        DEFENSES.create(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("cas:points=layer9", "unknown insertion point.*valid: .*layer4.0"), ("cas:points=layer4,layer4.1", "same insertion point")],
)
def test_bad_points_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message) as caught:
        tiny(spec)
    assert isinstance(caught.value, ValueError)


def test_architecture_without_a_default_needs_explicit_points():
    class Mystery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.tap = Tap()
            self.fc = nn.Linear(4, 3)

        def insertion_points(self):
            return {"conv": self.tap}

        def forward(self, x):
            return self.fc(self.tap(self.conv(x)).mean((2, 3)))

    def model() -> Classifier:
        built = Classifier(Mystery(), (0.5,), (0.5,), (1, 8, 8))
        built.arch = "mystery"
        return built

    with pytest.raises(CASConfigError, match="no default insertion points.*valid: conv"):
        CAS().attach(model())
    explicit = model()
    CAS(points="conv").attach(explicit)
    assert explicit.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert explicit.aux_outputs()["cas/conv"].shape == (2, 3)


def test_adaptive_declaration_and_published_data():
    built = tiny()
    declaration = built.defense.adaptive()
    assert declaration.aux_heads == ("cas/layer4.0", "cas/layer4.1")
    assert declaration.masks == ("cas/layer4.0/mask", "cas/layer4.1/mask")
    assert "2 * mean_s ce" in declaration.joint_loss and not declaration.stochastic
    with torch.no_grad():
        built.model.eval()(batch()[0])
    assert set(declaration.aux_heads) | set(declaration.masks) <= set(built.model.aux_outputs())
    table = CAS.published["cifar10"]["resnet18"]["pgd_at"]
    assert table["last"]["pgd20"] == 48.88 and table["baseline"]["last"]["pgd20"] == 46.50
    assert CAS.published["cifar10"]["resnet18"]["trades"]["best"]["autoattack"] == 48.40
    assert "Bai" in CAS.citation and "protocol" in CAS.published


# -- a real (tiny) run through the trainer and the evaluation ------------------------------
def test_short_training_run_and_evaluation(tmp_path):
    from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run
    from advdef.store import Store
    from advdef.training.config import TrainConfig
    from advdef.training.trainer import start_run

    store = Store(memory=True)
    config = TrainConfig(data="digits", arch="resnet18:width=8", defense="cas", at="pgd_at:steps=2", epochs=1,
                         limit_train=200, batch_size=50, device="cpu", val_n=20, val_attack="pgd:steps=2")
    run_id = start_run(config, store, tmp_path)
    checkpoints = store.checkpoints(run_id)
    assert len(checkpoints) == 1
    metrics = checkpoints[0]["metrics"]
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=20, device="cpu"))
    clean = store.outcomes(eval_id, CLEAN)
    assert len(clean) == 20
    attack = EvalConfig(attacks=["fgsm"]).canonical_attacks()[0]
    assert len(store.outcomes(eval_id, attack)) == 20
