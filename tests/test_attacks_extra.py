"""The MIM, APGD, Square and noise attack plugins: budget, determinism, specs, errors, strength.

Table-driven over the four attacks (APGD in its three modes), on the SmallCNN trained by the
session fixture, with small sizes so the file stays fast on a loaded 2-core machine.
"""

from fractions import Fraction

import pytest
import torch
from torch import nn

from advdef.attacks import LogitsView, eval_mode
from advdef.attacks.autoattack import AutoAttack
from advdef.data.base import iterate_batches
from advdef.errors import UserError
from advdef.registry import ATTACKS, DATASETS
from advdef.specs import parse_spec

EPS = Fraction(16, 255)  # digits need a larger budget than CIFAR (as in test_attacks.py)

# Small settings of each attack; `lowers` = must lower accuracy by at least 10 points.
CASES = {
    "mim": ("mim", True),
    "mim-margin": ("mim:loss=margin,steps=5,random_start=true,restarts=2", True),
    "apgd-ce": ("apgd:steps=10", True),
    "apgd-dlr": ("apgd:loss=dlr,steps=10", True),
    "apgd-t": ("apgd:targeted=true,steps=5", True),
    "square": ("square:queries=1000", True),
    "noise": ("noise:draws=10", False),
}

DEFAULT_SPECS = {
    "mim": "mim:alpha=4/1275,loss=ce,mu=1.0,random_start=false,restarts=1,steps=10",
    "apgd": "apgd:loss=ce,restarts=1,rho=0.75,steps=100,targeted=false",
    "square": "square:p_init=0.8,queries=5000,restarts=1",
    "noise": "noise:draws=100",
}

BAD = [
    ("mim:steps=0", "steps"),
    ("mim:steps=2.5", "steps"),
    ("mim:mu=-1", "mu"),
    ("mim:alpha=0", "alpha"),
    ("mim:loss=dlr", "loss"),
    ("mim:random_start=maybe", "random_start"),
    ("mim:restarts=2", "random_start"),
    ("apgd:loss=margin", "loss"),
    ("apgd:steps=0", "steps"),
    ("apgd:restarts=0", "restarts"),
    ("apgd:rho=1.5", "rho"),
    ("apgd:targeted=2", "targeted"),
    ("square:queries=0", "queries"),
    ("square:p_init=0", "p_init"),
    ("square:restarts=true", "restarts"),
    ("noise:draws=0", "draws"),
    ("noise:draws=none", "draws"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models and many tiny operations: intra-op threads only add overhead on a loaded
    2-core machine (measured: Square 10x slower with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def standard_model():
    """A small CNN trained on the digits in ~3 s (the session fixture's PGD-AT model is not needed
    here and takes minutes to train on a loaded machine)."""
    split = DATASETS.create("digits").load("train")
    x, y = split.float_images(), split.labels
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(16 * x.shape[-2] * x.shape[-1], 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 128):
            rows = order[start:start + 128]
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    split = DATASETS.create("digits").load("test", limit=64, seed=0)
    x, y, _ = next(iterate_batches(split, 64))
    return x, y


def accuracy(view, x, y) -> float:
    with torch.no_grad():
        return (view(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("case", CASES)
def test_attack_is_in_budget_deterministic_and_keeps_the_callers_rng(standard_model, batch, case):
    spec, lowers = CASES[case]
    x, y = batch
    with eval_mode(standard_model) as view:
        clean = accuracy(view, x, y)
        rng = torch.get_rng_state()
        x_adv = ATTACKS.create(spec, eps=EPS)(view, x, y, seed=3)
        assert torch.equal(torch.get_rng_state(), rng), "the caller's global RNG must be left alone"
        again = ATTACKS.create(spec, eps=EPS)(view, x, y, seed=3)
        robust = accuracy(view, x_adv, y)
    assert not torch.isnan(x_adv).any()
    assert (x_adv - x).abs().max() <= float(EPS) + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv, again), "same seed, same result"
    assert clean > 0.8, "the fixture model must be trained"
    assert robust <= clean
    if lowers:
        assert robust < clean - 0.1, f"{spec}: clean {clean:.2f}, robust {robust:.2f}"


@pytest.mark.parametrize("spec", sorted({spec for spec, _ in CASES.values()} | set(DEFAULT_SPECS)))
def test_spec_is_canonical_and_round_trips(spec):
    attack = ATTACKS.create(spec, eps=Fraction(8, 255))
    text = attack.spec()
    assert ATTACKS.create(text, eps=Fraction(8, 255)).spec() == text
    # The registry's canonical form is the same attack plus the (default) eps it was built with.
    assert parse_spec(ATTACKS.canonical(text)).params == {**parse_spec(text).params, "eps": Fraction(8, 255)}
    if spec in DEFAULT_SPECS:
        assert text == DEFAULT_SPECS[spec]


def test_equivalent_spellings_give_one_spec():
    assert ATTACKS.create("apgd:rho=3/4", eps=EPS).spec() == ATTACKS.create("apgd", eps=EPS).spec()
    assert ATTACKS.create("square:p_init=4/5", eps=EPS).spec() == ATTACKS.create("square", eps=EPS).spec()
    targeted = ATTACKS.create("apgd:targeted=true", eps=EPS).spec()
    assert "loss" not in targeted, "APGD-T always uses the targeted DLR loss"


@pytest.mark.parametrize("spec, name", BAD)
def test_bad_parameters_are_one_line_errors(spec, name):
    with pytest.raises(UserError) as error:
        ATTACKS.create(spec, eps=EPS)
    message = str(error.value)
    assert name in message and "\n" not in message


def test_implementation_names_the_official_code():
    assert ATTACKS.create("apgd", eps=EPS).implementation.startswith("pyautoattack 0.2.0 APGDAttack")
    assert "APGDAttack_targeted" in ATTACKS.create("apgd:targeted=true", eps=EPS).implementation
    assert ATTACKS.create("square", eps=EPS).implementation.startswith("pyautoattack 0.2.0 SquareAttack")
    assert ATTACKS.create("mim", eps=EPS).implementation.startswith("advdef")


def test_mim_without_momentum_and_one_step_is_fgsm(standard_model, batch):
    x, y = batch
    with eval_mode(standard_model) as view:
        mim = ATTACKS.create("mim:mu=0,steps=1", eps=EPS)(view, x, y)
        fgsm = ATTACKS.create("fgsm", eps=EPS)(view, x, y)
    assert torch.equal(mim, fgsm)


def test_apgd_is_the_official_apgd_with_the_seed_from_the_generator(standard_model, batch):
    from pyautoattack.autopgd_base import APGDAttack

    x, y = batch[0][:24], batch[1][:24]
    with eval_mode(standard_model) as view:
        ours = ATTACKS.create("apgd:loss=dlr,steps=10", eps=EPS)(view, x, y, seed=7)
        seed = AutoAttack.seed_from(torch.Generator().manual_seed(7))
        official = APGDAttack(view, n_iter=10, eps=float(EPS), loss="dlr", seed=seed, device="cpu").perturb(x, y)
    assert torch.equal(ours, official)


class _Constant(nn.Module):
    """Logits that ignore the input: every gradient is zero."""

    def forward(self, x):
        return torch.arange(10.0).expand(len(x), 10) + 0 * x.flatten(1)[:, :1]


def test_apgd_keeps_the_official_zero_gradient_warning():
    attack = ATTACKS.create("apgd:loss=dlr,steps=2", eps=EPS)
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([9, 9, 9])
    attack(LogitsView(_Constant().eval()), x, y)
    assert any("zero gradient" in w for w in attack.warnings)
    assert "warnings" not in attack.spec()


class _Threshold(nn.Module):
    """Class 1 iff the first pixel exceeds 0.5 + 0.9 eps: rare under uniform noise of size eps."""

    def forward(self, x):
        s = x.flatten(1)[:, :1] - (0.5 + 0.9 * float(EPS))
        return torch.cat([-s, s], 1)


def test_noise_returns_the_misclassified_draw_else_the_last():
    x, y = torch.full((6, 1, 2, 2), 0.5), torch.zeros(6, dtype=torch.long)
    view = LogitsView(_Threshold().eval())
    found = ATTACKS.create("noise:draws=100", eps=EPS)(view, x, y)
    assert (view(found).argmax(1) == 1).all(), "a 5% chance per draw: 100 draws find one"
    missed = ATTACKS.create("noise:draws=1", eps=EPS)(view, x, y, seed=1)
    assert not torch.equal(missed, x), "without a hit, the last draw (not the clean point) is returned"


@pytest.mark.parametrize("spec", ["apgd:loss=dlr", "apgd:targeted=true", "aa:version=custom,attacks=apgd-t",
                                  "aa:version=custom,attacks=fab-t", "square:queries=10"])
def test_official_attacks_run_on_channels_last_rgb_models(spec):
    """advdef runs models channels_last; the official code flattens input gradients with .view,
    which failed on 3-channel inputs ("view size is not compatible") until gradients were made
    contiguous on the way back (advdef.attacks.official.PlainLogits)."""
    from advdef.attacks import eval_mode
    from advdef.data.base import DataInfo
    from advdef.device import prepare
    from advdef.models import build_model
    from conftest import TINY

    info = DataInfo("toy", (3, 16, 16), 10, tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = build_model(TINY["resnet18"], info).model.to(memory_format=torch.channels_last).eval()
    x = prepare(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.device("cpu"), True)
    assert not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x).argmax(1)
    with eval_mode(model) as view:
        x_adv = ATTACKS.create(spec, eps=Fraction(8, 255))(view, x, y, seed=0)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 8 / 255 + 1e-6
