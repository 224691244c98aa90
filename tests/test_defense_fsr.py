"""FSR defense: the paper's module and losses, eval-mode determinism, surgery, overrides, a short run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advdef.defenses.fsr  # noqa: F401  (registers the plugin)
from advdef.defenses.fsr import (
    DEFAULT_POINTS,
    FSR,
    LOGITS_KEY,
    FSRBlock,
    InsertionPointError,
    aux_key,
    fsr_blocks,
    top_wrong_class,
)
from advdef.errors import UserError
from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run
from advdef.evaluation.summary import summarize
from advdef.models import build_model
from advdef.models.base import DefenseContext
from advdef.registry import DATASETS, DEFENSES, MODELS
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run

DIGITS = DATASETS.create("digits").info
CIFAR = DATASETS.create("cifar10").info
TINY = "fsr:hidden=8"


def tiny_model(defense: str = TINY, arch: str = "smallcnn:width=4"):
    torch.manual_seed(0)
    return build_model(arch, DIGITS, defense)


def digits_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, *DIGITS.input_shape, generator=generator), torch.arange(n) % DIGITS.num_classes


class Fixed(nn.Module):
    """Stands in for the separation net: returns a hand-made robustness map."""

    def __init__(self, r: torch.Tensor) -> None:
        super().__init__()
        self.r = r

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.r.expand_as(f)


class Affine(nn.Module):
    """Stands in for the recalibration net: a known element-wise map."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return 3 * f - 1


def hand_block(r: torch.Tensor, tau: float = 0.1, **options) -> tuple[FSRBlock, DefenseContext]:
    settings = dict(tau=tau, hidden=4, rec_final_act="bn_relu", aux_hidden=0, ablation=None)
    settings.update(options)
    block = FSRBlock("p", r.shape[1], 3, **settings)
    if block.separation is not None:
        block.separation = Fixed(r)
    if block.recalibration is not None:
        block.recalibration = Affine()
    context = DefenseContext()
    object.__setattr__(block, "context", context)
    return block.eval(), context


# -- the module's formulas -------------------------------------------------------------------

def test_eval_mask_is_sigmoid_r_over_tau_and_equals_eq2_at_fixed_noise():
    r = torch.tensor([[-3.0, -0.2, 0.0, 0.05, 0.4, 2.5]]).view(1, 6, 1, 1)
    block, _ = hand_block(r, tau=0.1)
    mask = block.mask(r)
    assert torch.allclose(mask, torch.sigmoid(r / 0.1), atol=0, rtol=0)
    # Eq. 2 verbatim with both noises fixed at u_c = 0.5: a two-class softmax.
    g = -math.log(-math.log(0.5))
    s = torch.sigmoid(r)
    two_class = torch.softmax(torch.stack([(torch.log(s) + g) / 0.1, (torch.log(1 - s) + g) / 0.1]), 0)[0]
    assert torch.allclose(mask, two_class, atol=1e-6)
    assert torch.equal(block.mask(r), mask)  # no noise in eval


def test_training_mask_is_the_two_class_gumbel_softmax_of_eq2():
    r = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    block, _ = hand_block(r[:1], tau=0.5)
    block.train()
    torch.manual_seed(7)
    u1, u2 = torch.rand(r.shape), torch.rand(r.shape)
    g1, g2 = -torch.log(-torch.log(u1)), -torch.log(-torch.log(u2))
    s = torch.sigmoid(r)
    expected = torch.softmax(torch.stack([(torch.log(s) + g1) / 0.5, (torch.log(1 - s) + g2) / 0.5]), 0)[0]
    torch.manual_seed(7)
    assert torch.allclose(block.mask(r), expected, atol=1e-5)
    assert not torch.equal(block.mask(r), block.mask(r))  # fresh noise per call in training


def test_separation_and_recalibration_follow_the_papers_formulas():
    r = torch.tensor([-1.0, -0.05, 0.0, 0.1, 1.0]).view(1, 5, 1, 1)
    block, context = hand_block(r, tau=0.1)
    f = torch.arange(1.0, 11.0).view(2, 5, 1, 1)
    out = block(f)
    m = torch.sigmoid(r / 0.1)
    f_pos, f_neg = m * f, (1 - m) * f
    f_neg_rec = f_neg + (1 - m) * (3 * f_neg - 1)  # f~- = f- + m- (x) R(f-)
    assert torch.allclose(out, f_pos + f_neg_rec)  # f~ = f+ + f~-
    assert torch.allclose(out, f + (1 - m) * (3 * ((1 - m) * f) - 1))  # = f + m- (x) R(m- (x) f)
    head = block.aux
    assert torch.allclose(context.aux[aux_key("p", "robust")], head(f_pos))
    assert torch.allclose(context.aux[aux_key("p", "nonrobust")], head(f_neg))
    assert torch.allclose(context.aux[aux_key("p", "recalibrated")], head(f_neg_rec))
    assert torch.equal(context.aux[aux_key("p", "mask")], m.expand_as(f))
    assert isinstance(head[-1], nn.Linear) and head[-1].in_features == 5  # GAP + Linear(C, K), shared


def test_ablations_of_table_6():
    r = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    f = torch.rand(3, 2, 2, 2)
    no_rec, context = hand_block(r, ablation="no_rec")
    assert torch.allclose(no_rec(f), torch.sigmoid(r / 0.1) * f)  # only f+ goes on
    assert no_rec.recalibration is None and aux_key("p", "recalibrated") not in context.aux
    no_sep, context = hand_block(r, ablation="no_sep")
    assert torch.allclose(no_sep(f), f + 3 * f - 1)  # the whole map is recalibrated
    assert no_sep.separation is None and set(context.aux) == {aux_key("p", "recalibrated")}


@pytest.mark.parametrize("options", ["ablation=no_sep", "ablation=no_rec", "aux_hidden=16,rec_final_act=none"])
def test_variants_give_a_finite_loss_with_gradients(options):
    built = tiny_model(f"{TINY},{options}")
    model, defense = built.model.train(), built.defense
    x, y = digits_batch()
    with model.labels(y):
        loss = F.cross_entropy(model(x), y) + defense.aux_loss(model, y)
    loss.backward()
    assert torch.isfinite(loss)
    block = fsr_blocks(model)[0]
    assert all(p.grad is not None for p in block.parameters())


def test_top_wrong_class_is_top1_unless_correct_then_top2():
    logits = torch.tensor([[5.0, 1.0, 3.0], [0.0, 4.0, 2.0], [1.0, 2.0, 9.0]])
    labels = torch.tensor([0, 2, 1])
    assert top_wrong_class(logits, labels).tolist() == [2, 1, 2]


def test_aux_loss_is_the_weighted_separation_plus_recalibration_loss():
    built = tiny_model("fsr:hidden=8,lam_sep=0.7,lam_rec=1.3")
    model, defense = built.model, built.defense
    x, y = digits_batch()
    model.train()
    with model.labels(y):
        logits = model(x)
        loss = defense.aux_loss(model, y)
    aux = model.aux_outputs()
    assert torch.equal(aux[LOGITS_KEY], logits)
    wrong = top_wrong_class(logits, y)
    point = defense.attached_points[0]
    expected = 0.7 * (F.cross_entropy(aux[aux_key(point, "robust")], y)
                      + F.cross_entropy(aux[aux_key(point, "nonrobust")], wrong)) \
        + 1.3 * F.cross_entropy(aux[aux_key(point, "recalibrated")], y)
    assert torch.allclose(loss, expected)


def test_aux_loss_averages_over_several_points():
    built = tiny_model("fsr:hidden=8,points=block1,block2")
    model, defense = built.model, built.defense
    x, y = digits_batch()
    model.train()
    torch.manual_seed(3)
    with model.labels(y):
        model(x)
        loss = defense.aux_loss(model, y)
    aux = model.aux_outputs()
    wrong = top_wrong_class(aux[LOGITS_KEY], y)
    per_point = [
        F.cross_entropy(aux[aux_key(p, "robust")], y) + F.cross_entropy(aux[aux_key(p, "nonrobust")], wrong)
        + F.cross_entropy(aux[aux_key(p, "recalibrated")], y)
        for p in ("block1", "block2")
    ]
    assert torch.allclose(loss, (per_point[0] + per_point[1]) / 2)


# -- the defended model --------------------------------------------------------------------

def test_output_shapes_on_digits_and_cifar_resnet():
    x, _ = digits_batch(4)
    for arch in ("smallcnn:width=4", "resnet18:width=4"):
        model = tiny_model(arch=arch).model.eval()
        assert model(x).shape == (4, 10)
        aux = model.aux_outputs()
        point = fsr_blocks(model)[0].point
        c, h, w = model.feature_shapes([point])[point]
        assert aux[aux_key(point, "mask")].shape == (4, c, h, w)
        for kind in ("robust", "nonrobust", "recalibrated"):
            assert aux[aux_key(point, kind)].shape == (4, 10)
    model = build_model("resnet18:width=4", CIFAR, TINY).model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert model.aux_outputs()[aux_key("layer4", "mask")].shape == (2, 32, 4, 4)


@pytest.mark.parametrize("arch", sorted(DEFAULT_POINTS))
def test_default_point_of_every_architecture(arch):
    if not MODELS.knows(arch):
        pytest.skip(f"architecture {arch} is not registered in this checkout")
    built = tiny_model(arch=f"{arch}:width=4")
    (block,) = fsr_blocks(built.model)
    assert (block.point,) == DEFAULT_POINTS[arch]
    assert built.model.insertion_points()[block.point].attached[0] is block
    x, _ = digits_batch(2)
    assert built.model.eval()(x).shape == (2, 10)


def test_eval_mode_is_deterministic_and_label_free():
    model = tiny_model().model
    x, y = digits_batch()
    model.eval()
    first = model(x)
    assert torch.equal(model(x), first)
    model.context.labels = (y + 1) % 10  # even a leaked label cannot change the eval output
    assert torch.equal(model(x), first)
    model.context.labels = None
    with pytest.raises(RuntimeError):
        with model.labels(y):
            pass
    # Training mode is stochastic (Gumbel noise from the global RNG) but ignores labels too.
    model.train()
    outputs = []
    for labels in (y, (y + 3) % 10):
        torch.manual_seed(5)
        with model.labels(labels):
            outputs.append(model(x))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(model(x), model(x))


def test_a_training_step_decreases_the_joint_loss_on_a_fixed_batch():
    built = tiny_model()
    model, defense = built.model, built.defense
    x, y = digits_batch(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()

    def joint_loss() -> torch.Tensor:
        torch.manual_seed(11)  # the same Gumbel noise at every step
        with model.labels(y):
            logits = model(x)
            return F.cross_entropy(logits, y) + defense.aux_loss(model, y)

    losses = []
    for step in range(5):
        loss = joint_loss()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            block = fsr_blocks(model)[0]
            for net in (block.separation, block.recalibration, block.aux):
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_parameter_count_on_cifar_resnet18():
    code = build_model("resnet18", CIFAR, "fsr")
    assert code.params_backbone == 11_173_962
    assert code.params_added == 1_259_018  # default = official code: R ends with a bare conv
    paper = build_model("resnet18", CIFAR, "fsr:rec_final_act=bn_relu")
    assert paper.params_added == 1_259_018 + 2 * 512  # paper's R ends with BN(512)-ReLU: +1,024 affine


def test_surgery_keeps_backbone_weight_names_and_survives_deepcopy():
    plain = tiny_model("none").model
    defended = tiny_model().model
    keys = set(defended.state_dict())
    assert set(plain.state_dict()) <= keys
    assert all(k.startswith("net.tap2.attached.0.") for k in keys - set(plain.state_dict()))
    x, _ = digits_batch()
    defended.eval()
    clone = copy.deepcopy(defended).eval()
    assert torch.equal(clone(x), defended(x))
    assert LOGITS_KEY in clone.aux_outputs() and fsr_blocks(clone)[0].context is clone.context


def test_mask_temperature_surrogate_keeps_values_and_changes_gradients():
    built = tiny_model()
    model = built.model.eval()
    x, y = digits_batch()

    def input_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        z = x.clone().requires_grad_(True)
        logits = model(z)
        return logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y), z)[0]

    logits, grad = input_gradient()
    with FSR.mask_temperature(model, 5.0):
        assert fsr_blocks(model)[0].surrogate_tau == 5.0
        surrogate_logits, surrogate_grad = input_gradient()
    assert torch.allclose(surrogate_logits, logits, atol=1e-5)
    assert not torch.allclose(surrogate_grad, grad)
    assert fsr_blocks(model)[0].surrogate_tau is None
    objective = FSR.joint_objective(model, beta=2.0)
    z_logits = model(x)
    assert objective(z_logits, y).shape == (len(y),)


def test_adaptive_declaration_and_published_data():
    built = tiny_model()
    declaration = built.defense.adaptive()
    assert declaration.aux_heads == tuple(aux_key("block2", k) for k in ("robust", "nonrobust", "recalibrated"))
    assert declaration.masks == (aux_key("block2", "mask"),)
    assert declaration.joint_loss is None and not declaration.stochastic and "tau" in declaration.notes
    assert not built.defense.stochastic
    assert built.defense.training_attack_objective(built.model) is None
    published = FSR.published
    assert published["cifar10"]["resnet18"]["pgd_at"]["aa"] == 46.41
    assert published["cifar10"]["resnet18"]["pgd_at"]["pgd20"] == 52.47
    assert FSR.published_baselines["cifar10"]["resnet18"]["pgd_at"]["aa"] == 44.11
    assert "eps 8/255" in published["protocol"]["threat_model"]
    assert "CVPR 2023" in FSR.citation


# -- spec handling ----------------------------------------------------------------------------

def test_overrides_reach_the_module():
    defense = DEFENSES.create("fsr:tau=0.5,lam_sep=2,lam_rec=0,hidden=16,points=layer3,rec_final_act=none")
    assert (defense.tau, defense.lam_sep, defense.lam_rec, defense.hidden) == (0.5, 2.0, 0.0, 16)
    assert defense.points == ("layer3",) and defense.rec_final_act is None
    built = build_model("resnet18:width=4", DIGITS, "fsr:points=layer3,tau=0.5,hidden=16,rec_final_act=none")
    (block,) = fsr_blocks(built.model)
    assert block.point == "layer3" and block.tau == 0.5
    assert block.separation[0].out_channels == 16 and isinstance(block.recalibration[-1], nn.Conv2d)
    assert built.model.net.layer3[-1].tap.attached[0] is block
    canonical = DEFENSES.canonical("fsr:points=block1,block2")
    assert DEFENSES.create(canonical).points == ("block1", "block2")


@pytest.mark.parametrize("spec", [
    "fsr:tau=0", "fsr:tau=-1", "fsr:lam_sep=-0.5", "fsr:lam_rec=x", "fsr:hidden=0", "fsr:hidden=2.5",
    "fsr:aux_hidden=-1", "fsr:rec_final_act=relu", "fsr:ablation=half", "fsr:points=3", "fsr:points=a,a",
    "fsr:temperature=0.1",
])
def test_bad_values_are_user_errors(spec):
    with pytest.raises(UserError):
        DEFENSES.create(spec)


def test_bad_insertion_points_name_the_valid_ones():
    with pytest.raises(UserError, match="valid: .*layer4"):
        build_model("resnet18:width=4", DIGITS, "fsr:points=layer9")
    with pytest.raises(UserError, match="same insertion point"):
        build_model("resnet18:width=4", DIGITS, "fsr:points=layer4,final")
    model = tiny_model("none").model
    model.arch = "mystery_net"
    with pytest.raises(InsertionPointError, match="no default insertion point.*block1"):
        FSR().attach(model)


# -- end to end -------------------------------------------------------------------------------

def test_short_pgd_at_run_on_digits_then_evaluates(tmp_path):
    config = TrainConfig(data="digits", arch="resnet18:width=4", defense="fsr:hidden=8", at="pgd_at:steps=2",
                         epochs=1, limit_train=200, batch_size=50, device="cpu", select="last")
    store = Store(memory=True)
    run_id = start_run(config, store, tmp_path)  # raises on a non-finite loss
    run = store.get_run(run_id)
    assert run["status"] == "trained"
    metrics = store.checkpoints(run_id)[0]["metrics"]
    assert math.isfinite(metrics["train_loss"])
    eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=20, device="cpu"))
    assert len(store.outcomes(eval_id, CLEAN)) == 20 and len(store.outcomes(eval_id, "fgsm")) > 0
    assert summarize(store, eval_id).worst.n == 20
