"""Known-answer test (evaluation-rigor §6 item 44): attacks on a model whose exact robustness is known.

For a linear classifier z = W x + b and an l-inf ball that never meets the [0,1] box, the smallest
achievable margin against class j is z_y - z_j - eps ||w_y - w_j||_1, reached at the vertex
delta = -eps sign(w_y - w_j). So point i is robust iff it is correctly classified and
min_{j != y} (z_y - z_j) / ||w_y - w_j||_1 > eps: the exact per-point answer, no attack needed.

The points are kept away from the boundary (ratio below 0.8 eps or above 1.25 eps). CE is convex
in x for a linear model, and gradient ascent on a convex function can stop at a vertex that is
not the best one: measured on this model, PGD-CE and APGD-CE miss one point whose ratio is 0.9
eps. Within the band, the strong attacks must find the exact set of robust points.
"""

from fractions import Fraction

import pytest
import torch
from torch import nn

from advdef.attacks import LogitsView
from advdef.registry import ATTACKS

CLASSES, SHAPE = 10, (3, 8, 8)
DIM = 3 * 8 * 8
EPS = Fraction(2, 255)
N, CLEAN_ERRORS = 120, 12

EXACT = ["pgd:steps=100", "apgd", "apgd:loss=dlr", "apgd:targeted=true"]
SOUND_ONLY = ["mim", "mim:loss=margin", "square", "noise", "fgsm"]


class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(DIM, CLASSES)
        self.layer.weight.data.copy_(weight)
        self.layer.bias.data.copy_(bias)

    def forward(self, x):
        return self.layer(x.flatten(1))


def min_ratio(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point, min_{j != y} (z_y - z_j) / ||w_y - w_j||_1 and the class j attaining it (float64)."""
    z = x @ weight.T + bias
    gap = z.gather(1, y[:, None]) - z
    l1 = (weight[y][:, None, :] - weight[None, :, :]).abs().sum(2)
    ratio = gap / l1.clamp_min(1e-300)
    ratio[torch.arange(len(y)), y] = float("inf")
    return ratio.min(1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: intra-op threads only add overhead (measured: Square 3 s with one thread,
    60 s with two on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem():
    """A float32 linear model, points in [0.25, 0.75] away from the boundary, and the exact answer."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(CLASSES, DIM, generator=generator).float().double()  # float32-exact values
    bias = torch.randn(CLASSES, generator=generator).float().double()
    x = (0.25 + 0.5 * torch.rand(4 * N, DIM, generator=generator)).float().double()
    y = (x @ weight.T + bias).argmax(1)
    ratio, _ = min_ratio(weight, bias, x, y)
    eps = float(EPS)
    clear = (ratio < 0.8 * eps) | (ratio > 1.25 * eps)
    x, y = x[clear][:N], y[clear][:N].clone()
    y[:CLEAN_ERRORS] = (y[:CLEAN_ERRORS] + 1) % CLASSES  # clean errors: non-robust with no attack
    ratio, nearest = min_ratio(weight, bias, x, y)
    clean = (x @ weight.T + bias).argmax(1) == y
    robust = clean & (ratio > eps)
    view = LogitsView(Linear(weight.float(), bias.float()).eval())
    return dict(view=view, x=x.float().view(-1, *SHAPE), y=y, clean=clean, robust=robust,
                weight=weight, nearest=nearest)


@pytest.fixture(scope="module")
def outcomes(problem):
    """Per attack spec, whether each point survived (computed once per spec)."""
    cache: dict[str, torch.Tensor] = {}

    def survived(spec: str) -> torch.Tensor:
        if spec not in cache:
            view, x, y = problem["view"], problem["x"], problem["y"]
            x_adv = ATTACKS.create(spec, eps=EPS)(view, x, y, seed=0)
            with torch.no_grad():
                cache[spec] = view(x_adv).argmax(1) == y
        return cache[spec]

    return survived


def test_the_known_answer_is_exact_and_non_trivial(problem):
    x, robust, clean = problem["x"], problem["robust"], problem["clean"]
    assert x.min() >= 0.25 and x.max() <= 0.75 and EPS <= Fraction(1, 4), "the [0,1] box must never bind"
    assert clean.sum() == N - CLEAN_ERRORS
    assert 0.3 <= robust.float().mean() <= 0.7 and robust.sum() < clean.sum()
    # The formula is attained: the optimal vertex against the nearest class breaks every
    # correctly classified non-robust point.
    view, y = problem["view"], problem["y"]
    weight, nearest = problem["weight"], problem["nearest"]
    direction = (weight[y] - weight[nearest]).sign().float().view(-1, *SHAPE)
    with torch.no_grad():
        survives_vertex = view(x - float(EPS) * direction).argmax(1) == y
    assert torch.equal(survives_vertex[clean], robust[clean])


@pytest.mark.parametrize("spec", EXACT)
def test_strong_attacks_find_exactly_the_analytic_robust_points(problem, outcomes, spec):
    survived = outcomes(spec)
    robust = problem["robust"]
    assert torch.equal(survived, robust), (
        f"{spec}: broke {int((robust & ~survived).sum())} robust points, "
        f"missed {int((~robust & survived).sum())} non-robust ones"
    )


@pytest.mark.parametrize("spec", EXACT + SOUND_ONLY)
def test_no_attack_breaks_an_analytically_robust_point(problem, outcomes, spec):
    survived = outcomes(spec)
    assert survived[problem["robust"]].all()
    assert not survived[~problem["clean"]].any(), "clean errors are never robust"


def test_square_breaks_most_non_robust_points_without_gradients(problem, outcomes):
    target = ~problem["robust"] & problem["clean"]
    broken = (~outcomes("square"))[target]
    assert broken.float().mean() >= 0.8


def test_the_known_answer_catches_a_weak_attack(problem, outcomes):
    """The check has teeth: PGD with too few steps of eps/4 cannot reach the optimal vertices."""
    survived = outcomes("pgd:steps=3")
    assert survived[problem["robust"]].all()
    assert (survived & ~problem["robust"]).any()
