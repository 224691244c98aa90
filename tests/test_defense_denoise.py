"""Feature denoising plugin: every op against its formula by explicit loops, the block's identity
initialisation, gradients, parameter overhead, insertion points, errors and short training runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advdef.defenses.denoise import DEFAULT_POINTS, OPS, DenoisingBlock, Denoise, NonLocalOp
from advdef.errors import UserError
from advdef.models import build_model
from advdef.registry import DATASETS, DEFENSES, MODELS
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run
from conftest import TINY

DIGITS = DATASETS.create("digits").info
CIFAR = DATASETS.create("cifar10").info
NONLOCAL_OPS = [op for op, spec in OPS.items() if spec[0] == "nonlocal"]


# -- explicit references: plain Python loops over positions ----------------------------------------
def positions(h: int, w: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(h) for b in range(w)]


def embed(weight: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """theta/phi of one feature vector: a 1x1 conv is a matrix product; None = no embedding."""
    return v if weight is None else weight[:, :, 0, 0] @ v


def maxpool2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling of one C x H x W map, the last row/column block clipped at the border."""
    c, h, w = x.shape
    out = torch.empty(c, math.ceil(h / 2), math.ceil(w / 2), dtype=x.dtype)
    for a in range(out.shape[1]):
        for b in range(out.shape[2]):
            out[:, a, b] = x[:, 2 * a:2 * a + 2, 2 * b:2 * b + 2].amax((1, 2))
    return out


def weighted_average(xi_q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], softmax: bool):
    """sum_j w_ij v_j with w = softmax_j(q . k_j / sqrt(d)) or (q . k_j) / |neighbours|."""
    scores = [float(xi_q @ k) for k in keys]
    if softmax:
        top = max(s / math.sqrt(len(xi_q)) for s in scores)
        exps = [math.exp(s / math.sqrt(len(xi_q)) - top) for s in scores]
        weights = [e / sum(exps) for e in exps]
    else:
        weights = [s / len(scores) for s in scores]
    return sum(w * v for w, v in zip(weights, values))


def reference_nonlocal(x: torch.Tensor, op: NonLocalOp) -> torch.Tensor:
    theta = None if op.theta is None else op.theta.weight.detach()
    phi = None if op.phi is None else op.phi.weight.detach()
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        source = maxpool2_ceil(x[n]) if op.subsample == 2 else x[n]
        js = positions(*source.shape[1:])
        keys = [embed(phi, source[:, a, b]) for a, b in js]
        values = [source[:, a, b] for a, b in js]
        for a, b in positions(*x.shape[2:]):
            out[n, :, a, b] = weighted_average(embed(theta, x[n, :, a, b]), keys, values, op.softmax)
    return out


def window_of(a: int, b: int, h: int, w: int, window: int) -> list[tuple[int, int]]:
    r = window // 2
    return [(p, q) for p in range(a - r, a + r + 1) for q in range(b - r, b + r + 1) if 0 <= p < h and 0 <= q < w]


def reference_bilateral(x: torch.Tensor, op) -> torch.Tensor:
    theta = None if op.theta is None else op.theta.weight.detach()
    phi = None if op.phi is None else op.phi.weight.detach()
    out = torch.zeros_like(x)
    h, w = x.shape[2:]
    for n in range(x.shape[0]):
        for a, b in positions(h, w):
            js = window_of(a, b, h, w, op.window)
            keys = [embed(phi, x[n, :, p, q]) for p, q in js]
            values = [x[n, :, p, q] for p, q in js]
            out[n, :, a, b] = weighted_average(embed(theta, x[n, :, a, b]), keys, values, op.softmax)
    return out


def reference_window_stat(x: torch.Tensor, op, stat: str) -> torch.Tensor:
    out = torch.zeros_like(x)
    h, w = x.shape[2:]
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for a, b in positions(h, w):
                vals = sorted(float(x[n, c, p, q]) for p, q in window_of(a, b, h, w, op.window))
                out[n, c, a, b] = sum(vals) / len(vals) if stat == "mean" else vals[(len(vals) - 1) // 2]
    return out


def reference(x: torch.Tensor, block: DenoisingBlock) -> torch.Tensor:
    family = OPS[block.op_name][0]
    if family == "nonlocal":
        return reference_nonlocal(x, block.op)
    if family == "bilateral":
        return reference_bilateral(x, block.op)
    if family in ("mean", "median"):
        return reference_window_stat(x, block.op, family)
    return x.clone()  # null


def features(shape=(2, 4, 3, 5), seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_block(op: str, channels: int = 4, seed: int = 0, **kwargs) -> DenoisingBlock:
    torch.manual_seed(seed)
    block = DenoisingBlock(op, channels, **kwargs).double()
    for module in block.op.modules():  # embeddings large enough that the softmax is far from uniform
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.7)
    return block


CASES = [(op, {}) for op in OPS] + [(op, {"subsample": 2}) for op in NONLOCAL_OPS] + [
    ("bilateral_gaussian", {"window": 5}), ("bilateral_dot", {"window": 5}), ("mean", {"window": 5}),
    ("median", {"window": 5}),
]


# -- the ops -------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,kwargs", CASES, ids=[f"{op}-{kw}" for op, kw in CASES])
def test_each_op_matches_its_formula_by_explicit_loops(op, kwargs):
    block = make_block(op, **kwargs)
    for shape in [(2, 4, 3, 5), (1, 4, 5, 4)]:  # odd sizes: ceil-mode pooling, corners/edges/interior
        x = features(shape)
        assert torch.allclose(block.op(x), reference(x, block), atol=1e-10), (op, kwargs, shape)


@pytest.mark.parametrize("op", ["nonlocal_dot", "nonlocal_embedded_dot"])
@pytest.mark.parametrize("subsample", [1, 2])
def test_dot_product_channel_and_position_forms_agree(op, subsample):
    block = make_block(op, channels=6, subsample=subsample)
    x = features((2, 6, 5, 3))
    block.op.form = "channels"
    channels = block.op(x)
    block.op.form = "positions"
    assert torch.allclose(channels, block.op(x), atol=1e-10)
    block.op.form = None
    assert torch.allclose(channels, block.op(x), atol=1e-10)


def test_the_cheaper_form_is_chosen_automatically():
    op = NonLocalOp(8, embed=False, softmax=False, subsample=1)
    assert op._channels_form(c=8, d=8, positions=16, neighbours=16)  # C < H*W: C x C form
    assert not op._channels_form(c=32, d=32, positions=16, neighbours=16)  # C > H*W: N x N form


def test_median_and_mean_by_hand_at_corner_edge_and_centre():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    median = DenoisingBlock("median", 1).op(x)[0, 0]
    mean = DenoisingBlock("mean", 1).op(x)[0, 0]
    # corner {1,2,4,5}: lower median 2 (even count); edge {1..6}: lower median 3; centre: 5
    assert (median[0, 0].item(), median[0, 1].item(), median[1, 1].item()) == (2.0, 3.0, 5.0)
    assert (mean[0, 0].item(), mean[0, 1].item(), mean[1, 1].item()) == (3.0, 3.5, 5.0)


def test_bilateral_dot_by_hand_on_a_one_channel_row():
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]])  # 1 x 3 image: left edge sees {1,2}, centre {1,2,3}
    out = DenoisingBlock("bilateral_dot", 1).op(x)[0, 0, 0]
    assert torch.allclose(out, torch.tensor([(1 * 1 * 1 + 1 * 2 * 2) / 2, (2 * 1 + 2 * 4 + 2 * 9) / 3,
                                             (3 * 4 + 3 * 9) / 2]))


# -- the block -----------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_block_is_the_identity_at_init_and_not_after_bn_learns(op):
    block = make_block(op)
    x = features((3, 4, 4, 4))
    block.train()
    assert torch.equal(block(x), x)
    block.eval()
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.bn.weight.fill_(0.5)
    assert not torch.allclose(block(x), x)
    block.train()
    assert not torch.allclose(block(x), x)


@pytest.mark.parametrize("op", list(OPS))
def test_gradients_reach_the_input_through_every_op(op):
    block = make_block(op)
    x = features((2, 4, 4, 3)).requires_grad_(True)
    block.op(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if op == "median":  # one selected element per output: the gradient is sparse but complete
        assert x.grad.sum().item() == pytest.approx(x.numel())
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    x.grad = None
    block(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert block.conv.weight.grad is not None and torch.isfinite(block.conv.weight.grad).all()


def test_the_branch_runs_in_float32_under_autocast():
    """fp16 autocast would overflow the dot-product affinities (they grow like C x activation^2)."""
    block = DenoisingBlock("nonlocal_dot", 8)
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    seen = []
    block.op.register_forward_hook(lambda _m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    x = (torch.rand(2, 8, 4, 4) * 300).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert seen == [(torch.float32, torch.float32)]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_block_init_follows_the_official_code():
    block = DenoisingBlock("nonlocal_embedded_gaussian", 64)
    assert block.conv.bias is None and block.op.theta.bias is None and block.op.phi.bias is None
    assert torch.count_nonzero(block.bn.weight) == 0 and torch.count_nonzero(block.bn.bias) == 0
    assert block.op.theta.weight.shape == (32, 64, 1, 1)
    assert block.op.theta.weight.std().item() == pytest.approx(0.01, rel=0.15)
    assert block.conv.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)  # He normal, fan_out
    assert DenoisingBlock("nonlocal_embedded_dot", 1).op.theta.out_channels == 1  # max(1, C // 2)


# -- surgery -------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_block_parameters_are_the_1x1_conv_bn_and_any_embeddings(op):
    embedded = OPS[op][1]
    count = sum(p.numel() for p in DenoisingBlock(op, 64).parameters())
    assert count == 64 * 64 + 2 * 64 + (2 * 64 * 32 if embedded else 0)


@pytest.mark.parametrize("op,embedded", [("nonlocal_dot", False), ("nonlocal_embedded_gaussian", True)])
def test_resnet18_cifar10_parameter_overhead(op, embedded):
    built = build_model("resnet18", CIFAR, f"denoise:op={op}")
    assert built.params_backbone == 11_173_962
    expected = sum(c * c + 2 * c + (2 * c * (c // 2) if embedded else 0) for c in (64, 128, 256, 512))
    assert built.params_added == expected
    taps = [getattr(built.model.net, f"layer{k}")[-1].tap for k in range(1, 5)]
    assert [len(t.attached) for t in taps] == [1, 1, 1, 1]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_default_points_resolve_on_every_architecture(arch):
    assert arch in MODELS.names() and set(DEFAULT_POINTS) == set(TINY)
    built = build_model(TINY[arch], DIGITS, "denoise")
    taps = built.model.insertion_points()
    assert all(len(taps[p].attached) == 1 for p in DEFAULT_POINTS[arch])
    assert sum(isinstance(m, DenoisingBlock) for m in built.model.modules()) == len(DEFAULT_POINTS[arch])
    assert built.defense.adaptive().notes.count(",".join(DEFAULT_POINTS[arch])) == 1


def test_spec_example_and_explicit_points():
    built = build_model("resnet18:width=4", DIGITS, "denoise:op=nonlocal_embedded_gaussian,points=layer2,layer3")
    blocks = [m for m in built.model.modules() if isinstance(m, DenoisingBlock)]
    assert [b.op_name for b in blocks] == ["nonlocal_embedded_gaussian"] * 2
    assert [b.conv.in_channels for b in blocks] == [8, 16]
    with pytest.raises(UserError, match=r"unknown insertion point 'layer9'.*valid: .*layer4"):
        build_model("resnet18:width=4", DIGITS, "denoise:points=layer9")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("denoise:op=gauss", r"invalid defense spec 'denoise:op=gauss': op must be one of nonlocal_dot, .*median, null"),
        ("denoise:op=mean,window=4", "window must be an odd integer >= 3, got 4"),
        ("denoise:op=median,window=1", "window must be an odd integer >= 3, got 1"),
        ("denoise:op=mean,window=3.0", "window must be an odd integer >= 3"),
        ("denoise:op=nonlocal_gaussian,window=3", r"window applies to the local ops only \(bilateral_gaussian, .*\)"),
        ("denoise:op=mean,subsample=2", r"subsample applies to the non-local ops only \(nonlocal_dot, .*\)"),
        ("denoise:subsample=3", "subsample must be 1 or 2, got 3"),
        ("denoise:points=layer4,layer4", "lists a name twice"),
    ],
)
def test_bad_values_are_one_line_user_errors_naming_the_valid_values(spec, message):
    with pytest.raises(UserError, match=message) as error:
        DEFENSES.create(spec)
    assert "\n" not in str(error.value)


# -- behaviour inside a model --------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_eval_mode_is_deterministic_and_batch_independent(op):
    torch.manual_seed(0)
    model = build_model("smallcnn:width=4", DIGITS, f"denoise:op={op}").model
    for block in (m for m in model.modules() if isinstance(m, DenoisingBlock)):
        with torch.no_grad():  # a trained-looking BN so the denoised branch matters
            block.bn.weight.uniform_(0.5, 1.5)
            block.bn.running_var.uniform_(1.0, 5.0)
    model.eval()
    x = torch.rand(5, *DIGITS.input_shape, generator=torch.Generator().manual_seed(1))
    first = model(x)
    assert torch.equal(first, model(x))
    assert torch.allclose(model(x[2:3]), first[2:3], atol=1e-5)


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    split = DATASETS.create("digits").load("train", limit=40, seed=0)
    return split.float_images(), split.labels


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_trains_a_few_adversarial_steps_on_digits_without_nan(op, digits_batch):
    """Two PGD-AT-style steps (one FGSM step inside, BN in train mode) on 40 real digits."""
    torch.manual_seed(0)
    model = build_model("smallcnn:width=4", DIGITS, f"denoise:op={op}").model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = digits_batch
    for step in range(2):
        x, y = images[step * 20:][:20], labels[step * 20:][:20]
        x_adv = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = (x + 8 / 255 * grad.sign()).clamp(0, 1)
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())
    blocks = [m for m in model.modules() if isinstance(m, DenoisingBlock)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.count_nonzero(b.bn.weight) > 0 for b in blocks)  # the denoised branch switched on
    model.eval()
    assert torch.isfinite(model(images)).all()


def test_a_short_pgd_at_run_trains_through_the_pipeline(tmp_path):
    config = TrainConfig(data="digits", arch="smallcnn:width=4", defense="denoise:op=nonlocal_embedded_gaussian",
                         at="pgd_at:steps=1", epochs=1, limit_train=40, batch_size=20, val_n=10, lr=0.05,
                         device="cpu")
    store = Store(memory=True)
    run_id = start_run(config, store, tmp_path)
    assert store.get_run(run_id)["status"] == "trained"
    assert math.isfinite(store.checkpoints(run_id)[0]["metrics"]["train_loss"])


def test_declarations_and_published_numbers_are_data():
    declaration = Denoise(op="median").adaptive()
    assert not declaration.stochastic and not declaration.aux_heads and not declaration.masks
    assert "arg-median" in declaration.notes and "op=null" in declaration.notes and "Square" in declaration.notes
    imagenet = Denoise.published["imagenet"]
    assert imagenet["official_resnet152"]["pgd_at_targeted"]["pgd10_targeted"] == 52.5
    assert imagenet["official_resnet152_denoise4_nonlocal_gaussian"]["pgd_at_targeted"]["pgd2000_targeted"] == 42.6
    assert Denoise.published["cifar10"]["official_cifar_simple_denoise"]["pgd_at"] == {
        "clean": 84.3, "pgd20": 45.2, "pgd100": 44.6}
    assert not set(Denoise.published["cifar10"]) & set(MODELS.names())
    assert "TARGETED" in Denoise.published["protocol"]["imagenet"]["white_box"]
    assert "Feature Denoising" in Denoise.citation and "thesis" in Denoise.citation


def test_subsampled_nonlocal_gaussian_on_a_32x32_map_uses_a_quarter_of_the_keys():
    block = DenoisingBlock("nonlocal_embedded_gaussian", 16, subsample=2)
    x = torch.randn(2, 16, 32, 32)
    seen = []
    handle = block.op.phi.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    out = block.op(x)
    handle.remove()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert seen == [(2, 8, 16, 16)]  # x_j pooled 2x2 (then embedded), x_i at full 32x32
