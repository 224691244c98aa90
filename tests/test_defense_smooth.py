"""`smooth` (SAT) defense: activation formulas and derivatives, the per-pass surrogate backward,
surgery on every architecture, the adaptive surrogate switch, short training runs, bad specs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advdef.defenses.activations import ACTIVATIONS, SmoothActivation, SurrogateReLU, resolve_activation
from advdef.defenses.smooth import PASSES, Smooth
from advdef.errors import UserError
from advdef.models import build_model
from advdef.models.base import Classifier, DefenseContext
from advdef.registry import DATASETS, DEFENSES
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run
from conftest import TINY

DIGITS = DATASETS.create("digits").info
# A float64 grid with negatives, exact 0 and positives large enough for softplus's linear branch.
GRID = torch.arange(-160, 161, dtype=torch.float64) / 20
SQRT2 = math.sqrt(2.0)
TANH_K = math.sqrt(2.0 / math.pi)


def phi_cdf(x):
    return 0.5 * (1 + torch.erf(x / SQRT2))


def phi_pdf(x):
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


# (act, options) -> (closed form f, analytic f'); written independently of the plugin's table.
CASES = [
    ("softplus", {"beta": 1.0}, lambda x: torch.log1p(torch.exp(x)), torch.sigmoid),
    ("softplus", {"beta": 10.0}, lambda x: torch.log1p(torch.exp(10 * x)) / 10, lambda x: torch.sigmoid(10 * x)),
    ("silu", {}, lambda x: x / (1 + torch.exp(-x)),
     lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
    ("gelu", {"approximate": "none"}, lambda x: x * phi_cdf(x), lambda x: phi_cdf(x) + x * phi_pdf(x)),
    ("gelu", {"approximate": "tanh"}, lambda x: 0.5 * x * (1 + torch.tanh(TANH_K * (x + 0.044715 * x**3))), None),
    ("elu", {"alpha": 1.0}, lambda x: torch.where(x >= 0, x, torch.exp(x) - 1),
     lambda x: torch.where(x > 0, 1.0, torch.exp(x))),
    ("elu", {"alpha": 1.5}, lambda x: torch.where(x >= 0, x, 1.5 * (torch.exp(x) - 1)),
     lambda x: torch.where(x > 0, 1.0, 1.5 * torch.exp(x))),
    ("celu", {"alpha": 1.0}, lambda x: torch.where(x >= 0, x, torch.exp(x) - 1),
     lambda x: torch.where(x > 0, 1.0, torch.exp(x))),
    ("celu", {"alpha": 1.5}, lambda x: torch.where(x >= 0, x, 1.5 * (torch.exp(x / 1.5) - 1)),
     lambda x: torch.where(x > 0, 1.0, torch.exp(x / 1.5))),
    ("smoothrelu", {"init": 400.0}, lambda x: torch.where(x >= 0, x - torch.log(400 * x.clamp(min=0) + 1) / 400, 0.0),
     lambda x: torch.where(x > 0, 400 * x / (1 + 400 * x.clamp(min=0)), 0.0)),
    ("smoothrelu", {"init": 2.0}, lambda x: torch.where(x >= 0, x - torch.log(2 * x.clamp(min=0) + 1) / 2, 0.0),
     lambda x: torch.where(x > 0, 2 * x / (1 + 2 * x.clamp(min=0)), 0.0)),
]
IDS = [f"{act}-{'-'.join(f'{k}{v}' for k, v in opts.items())}" for act, opts, _, _ in CASES]


def module_for(act: str, options: dict) -> SmoothActivation:
    name, resolved = resolve_activation(act, options)
    return SmoothActivation(name, resolved)


def kink_free(act: str, options: dict) -> torch.Tensor:
    """Grid points where f' is defined (ELU with alpha != 1 jumps at 0)."""
    return GRID[GRID != 0] if act == "elu" and options["alpha"] != 1 else GRID


def tiny(defense: str, arch: str = "resnet18"):
    torch.manual_seed(0)
    return build_model(TINY[arch], DIGITS, defense)


def input_gradient(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d sum(CE) / dx) of one forward in the current phase."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, torch.arange(len(x)) % logits.shape[1])
    return logits.detach(), torch.autograd.grad(loss, x)[0]


# -- activation formulas --------------------------------------------------------------------------
def test_every_activation_is_covered_by_a_case():
    assert {act for act, _, _, _ in CASES} == set(ACTIVATIONS)


@pytest.mark.parametrize("act,options,closed,_", CASES, ids=IDS)
def test_forward_matches_the_closed_form(act, options, closed, _):
    out = module_for(act, options)(GRID)
    assert torch.allclose(out, closed(GRID), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("act,options,closed,derivative", CASES, ids=IDS)
def test_autograd_and_table_derivatives_match_the_analytic_ones(act, options, closed, derivative):
    x = kink_free(act, options).clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(module_for(act, options)(x).sum(), x)
    if derivative is None:  # no hand-written form: autograd of the closed form
        reference = x.detach().clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(closed(reference).sum(), reference)
    else:
        expected = derivative(x.detach())
    assert torch.allclose(autograd, expected, atol=1e-9, rtol=1e-6)
    # The table's derivative (the surrogate backward) is the same function.
    name, resolved = resolve_activation(act, options)
    kind = ACTIVATIONS[name]
    scale = {"a": torch.tensor(resolved["init"], dtype=torch.float64)} if kind.learnable else {
        k: v for k, v in resolved.items()}
    assert torch.allclose(kind.derivative(x.detach(), **scale), expected, atol=1e-9, rtol=1e-6)


def test_smoothrelu_learns_a_positive_scale_per_site():
    module = module_for("smoothrelu", {})
    assert [n for n, _ in module.named_parameters()] == ["r"]
    assert module.r.item() == pytest.approx(20.0) and module.scale.item() == pytest.approx(400.0)
    x = torch.linspace(-1, 1, 101)
    module(x).pow(2).sum().backward()
    assert module.r.grad is not None and module.r.grad.abs().item() > 0
    optimizer = torch.optim.SGD(module.parameters(), lr=50.0)
    for _ in range(5):  # large steps that would push an unconstrained a negative
        optimizer.zero_grad()
        (-module(x).sum()).backward()
        optimizer.step()
        assert module.scale.item() > 0 and torch.isfinite(module(x)).all()


# -- surrogate backward per pass -------------------------------------------------------------------
SURROGATE_CASES = [(act, opts, d) for act, opts, _, d in CASES if not ACTIVATIONS[act].learnable and d is not None]


@pytest.mark.parametrize("passes", ["attack", "update", "both"])
@pytest.mark.parametrize("act,options,derivative", SURROGATE_CASES, ids=[
    i for i, (a, _, _, d) in zip(IDS, CASES) if not ACTIVATIONS[a].learnable and d is not None])
def test_surrogate_forward_is_relu_and_backward_is_f_prime_only_in_selected_phases(act, options, derivative, passes):
    context = DefenseContext()
    name, resolved = resolve_activation(act, options)
    module = SurrogateReLU(name, resolved, PASSES[passes], context)
    x = kink_free(act, options)
    for phase in (None, "attack", "update"):
        context.phase = phase
        leaf = x.clone().requires_grad_(True)
        out = module(leaf)
        assert torch.equal(out, torch.relu(x))
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        selected = phase is not None and phase in PASSES[passes]
        expected = derivative(x) if selected else (x > 0).to(x.dtype)
        assert torch.allclose(grad, expected, atol=1e-9, rtol=1e-6), (phase, passes)


def test_surrogate_backward_supports_double_backward():
    context = DefenseContext(phase="attack")
    module = SurrogateReLU("softplus", {"beta": 10.0}, PASSES["attack"], context)
    x = torch.linspace(-1, 1, 21, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    s = torch.sigmoid(10 * x.detach())
    assert torch.allclose(second, 10 * s * (1 - s))


def test_surrogate_mode_on_a_real_model_changes_gradients_in_its_phase_only():
    model = tiny("smooth:act=softplus,beta=10,passes=attack").model.eval()
    x = torch.rand(4, *DIGITS.input_shape, generator=torch.Generator().manual_seed(1))
    plain_logits, plain_grad = input_gradient(model, x)
    with model.phase("attack"):
        attack_logits, attack_grad = input_gradient(model, x)
    with model.phase("update"):
        update_logits, update_grad = input_gradient(model, x)
    assert torch.equal(attack_logits, plain_logits) and torch.equal(update_logits, plain_logits)
    assert not torch.allclose(attack_grad, plain_grad)
    assert torch.equal(update_grad, plain_grad)
    # The ReLU backbone with the same weights gives the same logits and the ReLU gradient.
    relu = tiny("none").model.eval()
    relu.load_state_dict(model.state_dict())
    relu_logits, relu_grad = input_gradient(relu, x)
    assert torch.equal(relu_logits, plain_logits) and torch.allclose(relu_grad, plain_grad)


def test_surrogate_gradients_switch_gradients_not_logits_and_restore():
    model = tiny("smooth:act=softplus,beta=10,passes=update").model.eval()
    x = torch.rand(4, *DIGITS.input_shape, generator=torch.Generator().manual_seed(2))
    plain_logits, plain_grad = input_gradient(model, x)
    with model.phase("update"):
        _, phase_grad = input_gradient(model, x)
    with Smooth.surrogate_gradients(model):
        logits, grad = input_gradient(model, x)
    assert torch.equal(logits, plain_logits)
    assert not torch.allclose(grad, plain_grad) and torch.allclose(grad, phase_grad)
    assert torch.equal(input_gradient(model, x)[1], plain_grad)  # restored
    with pytest.raises(RuntimeError):
        with Smooth.surrogate_gradients(model):
            raise RuntimeError("inside")
    assert torch.equal(input_gradient(model, x)[1], plain_grad)  # restored after an error too
    with pytest.raises(ValueError, match="no surrogate-mode activations"):
        with Smooth.surrogate_gradients(tiny("smooth").model):
            pass


# -- surgery ---------------------------------------------------------------------------------------
def relu_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.ReLU) for m in module.modules())


@pytest.mark.parametrize("spec,module_type,per_site", [
    ("smooth", SmoothActivation, 0),
    ("smooth:act=smoothrelu", SmoothActivation, 1),
    ("smooth:act=softplus,beta=10,passes=both", SurrogateReLU, 0),
])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_attach_replaces_every_relu_on_every_architecture(arch, spec, module_type, per_site):
    before = relu_count(tiny("none", arch).model.net)
    built = tiny(spec, arch)
    net = built.model.net
    assert before > 0 and relu_count(net) == 0
    assert built.defense.replaced == before == sum(isinstance(m, module_type) for m in net.modules())
    assert built.params_added == per_site * before
    pools = [m for m in tiny("none", arch).model.net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == sum(isinstance(m, nn.MaxPool2d) for m in net.modules())  # max-pooling stays


def test_resnet18_has_17_relus_and_smoothrelu_adds_one_parameter_each():
    built = build_model("resnet18", DATASETS.create("cifar10").info, "smooth:act=smoothrelu")
    assert built.defense.replaced == 17 and built.params_added == 17


def test_shared_and_nested_relus_are_replaced_once_each():
    shared = nn.ReLU(inplace=True)
    net = nn.Sequential(nn.Linear(3, 3), shared, nn.Sequential(nn.Linear(3, 3), shared, nn.ReLU()))
    model = Classifier(net, (0.0,), (1.0,), (3,))
    defense = Smooth(act="smoothrelu")
    defense.attach(model)
    assert defense.replaced == 2 and relu_count(net) == 0
    assert net[1] is net[2][1] and net[1] is not net[2][2]


def test_an_architecture_without_relu_modules_is_refused_by_name():
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (0.0,), (1.0,), (1, 8, 8))
    model.arch = "mystery"
    with pytest.raises(ValueError, match="'mystery' has no nn.ReLU"):
        Smooth().attach(model)


# -- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "smooth:act=softplus,beta=10", "smooth:act=silu", "smooth:act=gelu,approximate=tanh", "smooth:act=elu",
    "smooth:act=celu,alpha=1.5", "smooth:act=smoothrelu", "smooth:act=softplus,beta=10,passes=both",
])
def test_each_activation_trains_a_few_steps_without_nan(spec, tmp_path):
    config = TrainConfig(data="digits", arch="smallcnn:width=4", defense=spec, at="pgd_at:steps=1", epochs=1,
                         limit_train=60, batch_size=20, val_n=10, lr=0.05, device="cpu")
    store = Store(memory=True)
    run_id = start_run(config, store, tmp_path)
    assert store.get_run(run_id)["status"] == "trained"
    assert all(math.isfinite(c["metrics"]["train_loss"]) for c in store.checkpoints(run_id))


# -- specs, errors, data -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec,message", [
    ("smooth:act=relu6", "unknown act 'relu6'; valid: celu, elu, gelu, silu, smoothrelu, softplus, swish"),
    ("smooth:act=silu,beta=2", "beta applies to act=softplus only, not act=silu"),
    ("smooth:act=gelu,alpha=1", "alpha applies to act=elu or act=celu only"),
    ("smooth:act=softplus,init=10", "init applies to act=smoothrelu only"),
    ("smooth:act=softplus,beta=0", "beta must be a finite number > 0"),
    ("smooth:act=softplus,beta=abc", "beta must be a finite number"),
    ("smooth:act=elu,alpha=-1", "alpha must be a finite number > 0"),
    ("smooth:act=smoothrelu,init=0", "init must be a finite number > 0"),
    ("smooth:act=gelu,approximate=erf", "approximate must be one of none, tanh"),
    ("smooth:passes=sometimes", "passes must be one of all, attack, update, both"),
    ("smooth:act=smoothrelu,passes=attack", "smoothrelu has a learnable parameter"),
    ("smooth:gamma=1", "gamma"),
])
def test_bad_specs_are_clear_user_errors(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        DEFENSES.create(spec)


def test_canonical_specs_name_one_model_one_way():
    """Aliases resolve, options the act does not take vanish, applicable defaults are filled in."""
    assert DEFENSES.canonical("smooth") == DEFENSES.canonical("smooth:act=swish") == "smooth:act=silu,passes=all"
    assert DEFENSES.canonical("smooth:act=softplus") == DEFENSES.canonical("smooth:act=softplus,beta=1")
    assert DEFENSES.canonical("smooth:act=softplus,beta=10,passes=attack") == "smooth:act=softplus,beta=10.0,passes=attack"
    assert DEFENSES.canonical("smooth:act=gelu") == "smooth:act=gelu,approximate=none,passes=all"
    canonical = DEFENSES.canonical("smooth:act=elu,alpha=1.5")
    assert DEFENSES.canonical(canonical) == canonical  # round-trips
    with pytest.raises(UserError, match="beta applies to act=softplus only"):
        DEFENSES.canonical("smooth:act=silu,beta=3")
    swish = DEFENSES.create("smooth:act=swish")
    assert swish.act == "silu" and swish.options == {}
    assert DEFENSES.create("smooth:act=gelu").options == {"approximate": "none"}
    assert DEFENSES.create("smooth:act=smoothrelu").options == {"init": 400.0}


def test_published_numbers_and_declarations_are_data():
    table = Smooth.published["imagenet"]["resnet50"]["pgd_at"]
    assert table["none"] == {"clean": 68.8, "pgd200": 33.0}
    assert table["smooth:act=silu"] == {"clean": 69.7, "pgd200": 42.3}
    assert table["smooth:act=softplus,beta=10,passes=both"] == {"clean": 68.9, "pgd200": 36.9}
    for spec in table:  # every key is a spec that builds
        assert DEFENSES.create(spec) is not None
    assert "PGD-200" in Smooth.published["protocol"]["evaluation"]
    smooth, surrogate = Smooth().adaptive(), Smooth(act="softplus", beta=10, passes="attack").adaptive()
    assert not smooth.stochastic and not smooth.aux_heads and "apply directly" in smooth.notes
    assert "surrogate_gradients" in surrogate.notes and "16.9 -> 12.9" in surrogate.notes
    assert "catastrophic overfitting" in smooth.notes
    assert "Smooth Adversarial Training" in Smooth.citation and "2006.14536" in Smooth.citation
