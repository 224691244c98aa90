"""Feature denoising blocks (Xie, Wu, van der Maaten, Yuille & He, CVPR 2019; Xie's thesis ch. 4).

At each insertion point a denoising block replaces the features x (N x C x H x W) by

    y = x + BN(Conv1x1(D(x)))          Conv1x1: C -> C, no bias;  BN: gamma = 0, beta = 0 at init

so the block is exactly the identity when it is created (train and eval mode) and the network
learns how much of the denoised signal to add. D is one of (i, j index the H*W positions):

    nonlocal_gaussian            y_i = sum_j softmax_j(x_i . x_j / sqrt(C)) x_j
    nonlocal_embedded_gaussian   y_i = sum_j softmax_j(theta(x_i) . phi(x_j) / sqrt(d)) x_j   (thesis "Gaussian")
    nonlocal_dot                 y_i = 1/K sum_j (x_i . x_j) x_j                               (thesis "dot product")
    nonlocal_embedded_dot        y_i = 1/K sum_j (theta(x_i) . phi(x_j)) x_j
    bilateral_gaussian           the embedded Gaussian over the in-image window Omega(i) only
    bilateral_dot                y_i = 1/|Omega(i)| sum_{j in Omega(i)} (x_i . x_j) x_j
    mean                         per-channel mean over the in-image window
    median                       per-channel median over the in-image window
    null                         D(x) = x: the 1x1 conv + BN residual alone (the thesis's control)

theta, phi are 1x1 convs C -> d = max(1, C // 2) without bias, initialised N(0, 0.01) as in the
official code. The weighted average always runs over the raw x_j (no g embedding), so output
channels correspond to input channels. K is the number of x_j: H*W, or the 2x2 max-pooled count
with `subsample=2` (non-local ops only; x_i stays full size).

Everything the paper leaves open, and where paper and official code
(github.com/facebookresearch/ImageNet-Adversarial-Training) differ, is listed in docs/defenses.md
(section `denoise`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advdef.defenses.base import AdaptiveDeclaration, Defense, InsertionPointError, point_list, resolve_points
from advdef.models.base import Classifier
from advdef.registry import DEFENSES

# op name -> (family, embed, softmax). One table drives construction, validation and the docs.
OPS: dict[str, tuple[str, bool, bool]] = {
    "nonlocal_dot": ("nonlocal", False, False),
    "nonlocal_gaussian": ("nonlocal", False, True),
    "nonlocal_embedded_gaussian": ("nonlocal", True, True),
    "nonlocal_embedded_dot": ("nonlocal", True, False),
    "bilateral_gaussian": ("bilateral", True, True),
    "bilateral_dot": ("bilateral", False, False),
    "mean": ("mean", False, False),
    "median": ("median", False, False),
    "null": ("null", False, False),
}
LOCAL_FAMILIES = ("bilateral", "mean", "median")
DEFAULT_WINDOW = 3  # the thesis's 3x3 local filters
SUBSAMPLES = (1, 2)

# One block after the last residual block of each stage (thesis: res2..res5 of ResNet-152) or,
# for WRNs, the official cifar10.py layout (after conv0 and after each of the 3 stages).
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),  # thesis: end of res2..res5
    "preact_resnet18": ("layer1", "layer2", "layer3", "layer4"),  # thesis: end of res2..res5 (residual stream)
    "wrn34_10": ("stem", "block1", "block2", "block3"),  # official cifar10.py: after conv0 + each stage
    "wrn28_10": ("stem", "block1", "block2", "block3"),  # official cifar10.py layout
    "vgg16_bn": ("block0", "block1", "block2", "block3", "block4"),  # not in the thesis: after each conv stage
    "smallcnn": ("block1", "block2"),  # not in the thesis: after each of its two blocks
}


def affinity_weights(
    scores: torch.Tensor, *, softmax: bool, scale: float, valid: torch.Tensor | None = None, dim: int = -1
) -> torch.Tensor:
    """Normalise pairwise scores f(x_i, x_j) into averaging weights over the neighbours on `dim`.

    Shared by the non-local (all positions) and bilateral (window) ops: Gaussian = softmax of the
    scaled scores, dot product = scores / number of neighbours. `valid` marks real neighbours;
    out-of-image ones get weight 0 and are not counted, so borders are not pulled towards zero
    padding.
    """
    if softmax:
        scaled = scores * scale
        if valid is not None:
            scaled = scaled.masked_fill(~valid, float("-inf"))  # the centre is always valid: no all -inf row
        return torch.softmax(scaled, dim)
    if valid is None:
        return scores / scores.shape[dim]
    return scores * valid / valid.sum(dim, keepdim=True)


def embedding(channels: int) -> nn.Conv2d:
    """theta / phi of the embedded ops: 1x1 conv C -> max(1, C // 2), no bias, N(0, 0.01) as in the official code."""
    conv = nn.Conv2d(channels, max(1, channels // 2), 1, bias=False)
    nn.init.normal_(conv.weight, std=0.01)
    return conv


def window_validity(height: int, width: int, window: int, device: torch.device) -> torch.Tensor:
    """(1, window^2, H*W) bool: which entries of each position's unfolded window lie inside the image."""
    ones = torch.ones(1, 1, height, width, device=device)
    return F.unfold(ones, window, padding=window // 2) > 0.5


class NonLocalOp(nn.Module):
    """Non-local means over all positions: y_i = sum_j w(x_i, x_j) x_j (Gaussian or dot-product weights)."""

    def __init__(self, channels: int, *, embed: bool, softmax: bool, subsample: int) -> None:
        super().__init__()
        self.theta = embedding(channels) if embed else None
        self.phi = embedding(channels) if embed else None
        self.softmax = softmax
        self.subsample = subsample
        # None: pick the cheaper exact form; "channels" / "positions" force one (tests compare them).
        self.form: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # x_j: optionally 2x2 max-pooled (ceil mode keeps odd and 1x1 maps); x_i stays full size.
        keys_in = F.max_pool2d(x, 2, 2, ceil_mode=True) if self.subsample > 1 else x
        query = (self.theta(x) if self.theta is not None else x).flatten(2)  # (n, d, P)
        key = (self.phi(keys_in) if self.phi is not None else keys_in).flatten(2)  # (n, d, K)
        value = keys_in.flatten(2)  # (n, C, K): the raw x_j, so channels correspond
        d, positions, neighbours = query.shape[1], query.shape[2], key.shape[2]
        if not self.softmax and self._channels_form(c, d, positions, neighbours):
            # 1/K sum_j (q_i . k_j) v_j = 1/K (V K^T) q_i: exact by associativity, O(K d C) not O(P K).
            out = torch.bmm(torch.bmm(value, key.transpose(1, 2)), query) / neighbours
        else:
            scores = torch.bmm(query.transpose(1, 2), key)  # (n, P, K)
            weights = affinity_weights(scores, softmax=self.softmax, scale=d**-0.5)
            out = torch.bmm(value, weights.transpose(1, 2))  # (n, C, P)
        return out.reshape(n, c, h, w)

    def _channels_form(self, c: int, d: int, positions: int, neighbours: int) -> bool:
        """Use the C x d form when it needs fewer multiply-adds (C < H*W for the plain dot product)."""
        if self.form is not None:
            return self.form == "channels"
        return c * d * (positions + neighbours) < positions * neighbours * (d + c)

    def extra_repr(self) -> str:
        kind = "gaussian" if self.softmax else "dot"
        return f"{kind}, embed={self.theta is not None}, subsample={self.subsample}"


class BilateralOp(nn.Module):
    """Bilateral filter: the non-local weights restricted to the in-image window around each position."""

    def __init__(self, channels: int, *, embed: bool, softmax: bool, window: int) -> None:
        super().__init__()
        self.theta = embedding(channels) if embed else None
        self.phi = embedding(channels) if embed else None
        self.softmax = softmax
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        area, pad = self.window * self.window, self.window // 2
        query = self.theta(x) if self.theta is not None else x
        key_in = self.phi(x) if self.phi is not None else x
        d = query.shape[1]
        values = F.unfold(x, self.window, padding=pad).reshape(n, c, area, h * w)
        keys = values if self.phi is None else F.unfold(key_in, self.window, padding=pad).reshape(n, d, area, h * w)
        scores = (query.reshape(n, d, 1, h * w) * keys).sum(1)  # (n, window^2, P)
        valid = window_validity(h, w, self.window, x.device)  # zero padding must not count as neighbours
        weights = affinity_weights(scores, softmax=self.softmax, scale=d**-0.5, valid=valid, dim=1)
        return (weights.unsqueeze(1) * values).sum(2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"{'gaussian' if self.softmax else 'dot'}, embed={self.theta is not None}, window={self.window}"


class MeanOp(nn.Module):
    """Per-channel mean over the in-image window (TF 'SAME' average pooling also excludes padding)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.window, stride=1, padding=self.window // 2, count_include_pad=False)

    def extra_repr(self) -> str:
        return f"window={self.window}"


class MedianOp(nn.Module):
    """Per-channel median over the in-image window; the gradient reaches only the selected element.

    Out-of-image entries are NaN and ignored by `nanmedian`. Border windows of a 3x3 filter hold
    4 or 6 values; for an even count `nanmedian` returns the lower of the two middle values.
    """

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pad = self.window // 2
        padded = F.pad(x, (pad, pad, pad, pad), value=float("nan"))
        patches = F.unfold(padded, self.window).reshape(n, c, self.window * self.window, h * w)
        return torch.nanmedian(patches, dim=2).values.reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"window={self.window}"


def make_op(op: str, channels: int, window: int, subsample: int) -> nn.Module:
    """The denoising operation D of one block, from the OPS table."""
    family, embed, softmax = OPS[op]
    if family == "nonlocal":
        return NonLocalOp(channels, embed=embed, softmax=softmax, subsample=subsample)
    if family == "bilateral":
        return BilateralOp(channels, embed=embed, softmax=softmax, window=window)
    if family == "mean":
        return MeanOp(window)
    if family == "median":
        return MedianOp(window)
    return nn.Identity()


class DenoisingBlock(nn.Module):
    """y = x + BN(Conv1x1(D(x))), with BN gamma = 0 so the block starts as the identity (thesis Fig. 4.4)."""

    def __init__(self, op: str, channels: int, *, window: int = DEFAULT_WINDOW, subsample: int = 1) -> None:
        super().__init__()
        self.op_name = op
        self.op = make_op(op, channels, window, subsample)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        # The official tensorpack code: variance_scaling(2.0, fan_out) = He normal over the output fan.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The branch runs in (at least) float32 even under CUDA fp16 autocast: the dot-product
        # affinities grow like C x activation^2 and overflow fp16; BN brings the result back to a
        # safe range before it joins the residual stream in the stream's dtype.
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        with torch.autocast(device_type=x.device.type, enabled=False):
            branch = self.bn(self.conv(self.op(wide)))
        return x + branch.to(x.dtype)

    def extra_repr(self) -> str:
        return f"op={self.op_name!r}"


@DEFENSES.register("denoise")
class Denoise(Defense):
    """Feature denoising (Xie et al. 2019): residual x + BN(1x1(D(x))) blocks; D = non-local dot product by default."""

    citation = (
        "Cihang Xie, Yuxin Wu, Laurens van der Maaten, Alan Yuille, Kaiming He. Feature Denoising for Improving "
        "Adversarial Robustness. CVPR 2019. arXiv:1812.03411. "
        "Code: https://github.com/facebookresearch/ImageNet-Adversarial-Training. "
        "Also: Cihang Xie, Towards Robust Representation Learning and Beyond, PhD thesis, "
        "Johns Hopkins University, 2020, chapter 4."
    )

    # dataset -> arch -> AT method -> accuracy (%), plus the reserved key "protocol". None of the
    # architectures is one of ours: the ImageNet rows are the authors' ResNet-152 models, the
    # CIFAR-10 rows the "LIMITED" results the authors posted in GitHub issue #4 of the official repo.
    published: dict[str, Any] = {
        "imagenet": {
            "official_resnet152": {
                "pgd_at_targeted": {"clean": 62.32, "pgd10_targeted": 52.5, "pgd2000_targeted": 39.2,
                                    "caad2017_blackbox": 43.1},
                "standard": {"clean": 78.91},
            },
            "official_resnet152_denoise4_nonlocal_gaussian": {
                "pgd_at_targeted": {"clean": 65.30, "pgd10_targeted": 55.7, "pgd2000_targeted": 42.6,
                                    "caad2017_blackbox": 46.4},
                "standard": {"clean": 79.08},
            },
            "official_resnet152_denoise4_nonlocal_dot": {"pgd_at_targeted": {"caad2017_blackbox": 46.2}},
            "official_resnet152_denoise4_null": {"pgd_at_targeted": {"caad2017_blackbox": 44.1}},
            "official_resnet152_denoise_all_nonlocal_gaussian": {"pgd_at_targeted": {"caad2017_blackbox": 49.5}},
        },
        "cifar10": {
            "official_cifar_simple": {"pgd_at": {"clean": 83.8, "pgd20": 44.1, "pgd100": 43.5}},
            "official_cifar_simple_denoise": {"pgd_at": {"clean": 84.3, "pgd20": 45.2, "pgd100": 44.6}},
            "official_cifar_wide": {"pgd_at": {"clean": 86.2, "pgd20": 46.7, "pgd100": 46.4}},
        },
        "protocol": {
            "unit": "top-1 accuracy in percent",
            "imagenet": {
                "source": "thesis ch. 4 prose (Fig. 4.6 values), Sec. 4.6 clean accuracies, Table 4.2 (black-box)",
                "denoise_blocks": "4 blocks, one after the last residual block of res2..res5; 'all' = after every "
                "residual block with 2x2 sub-sampled x_j",
                "training": "targeted PGD-30 AT, eps 16, step 1 (0-255 pixel units), random wrong-class target, "
                "20% clean / 80% uniform-noise start, adversarial images only, 110 epochs, label smoothing 0.1, "
                "batch 4096",
                "white_box": "TARGETED PGD towards a uniformly random wrong class, Linf eps 16/255 (paper: 16 in "
                "0-255 units), step 1 (1.6 for 10 iterations), random start; accuracy counts the true class. "
                "Much weaker than untargeted PGD and not comparable to RobustBench/AutoAttack numbers",
                "caad2017_blackbox": "5 best CAAD 2017 attackers, eps 32/255, all-or-nothing (correct under every "
                "attacker)",
                "test_set": "50k ImageNet-val (white-box)",
                "independent_check": "100-restart PGD (eps 16, step 2, 100 iterations, 4000 images; issue #1): "
                "baseline 39.20 -> 34.38, denoise 42.60 -> 37.25",
            },
            "cifar10": {
                "source": "authors' 'LIMITED' results, GitHub issue #4 of the official repo (2019); the 'Wide "
                "Denoise' row is missing from the stored copy",
                "attacks": "20- and 100-step PGD; the issue states neither eps nor targeting. The official "
                "cifar10.py trains and evaluates with UNTARGETED Linf PGD, eps 8 (0-255 units = 8/255), step 2, "
                "random start, BN in inference mode",
                "architectures": "'Simple' and 'Wide' are the authors' models, not defined in the issue; the "
                "official script's net is a WRN-style net (16-channel stem, 3 stages of 5 units, widths "
                "160/320/640) with a dot-product non-local block after conv0 and after each stage",
            },
            "seeds": "single runs; the README quotes +-0.3 fluctuation from random targets and starts",
        },
    }

    def __init__(
        self,
        *,
        op: str = "nonlocal_dot",
        points: list[str] | str | None = None,
        window: int | None = None,
        subsample: int = 1,
    ) -> None:
        """
        op: the denoising operation D (see OPS); the default `nonlocal_dot` is the official CIFAR-10
            script's choice, `nonlocal_embedded_gaussian` the thesis's main ImageNet version.
        points: insertion point name(s); None = DEFAULT_POINTS[arch].
        window: side of the local window for bilateral_*, mean and median (odd, >= 3; default 3).
        subsample: 2 max-pools the x_j of the non-local ops 2x2 (the thesis's "all blocks" variant).
        """
        if not isinstance(op, str) or op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
        family = OPS[op][0]
        local = family in LOCAL_FAMILIES
        if window is not None and not local:
            names = ", ".join(name for name, spec in OPS.items() if spec[0] in LOCAL_FAMILIES)
            raise ValueError(f"window applies to the local ops only ({names}), not op={op}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 3
                                   or window % 2 == 0):
            raise ValueError(f"window must be an odd integer >= 3, got {window!r}")
        if isinstance(subsample, bool) or subsample not in SUBSAMPLES:
            raise ValueError(f"subsample must be 1 or 2, got {subsample!r}")
        if subsample != 1 and family != "nonlocal":
            names = ", ".join(name for name, spec in OPS.items() if spec[0] == "nonlocal")
            raise ValueError(f"subsample applies to the non-local ops only ({names}), not op={op}")
        self.op = op
        self.points = point_list(points)
        self.window = window if window is not None else DEFAULT_WINDOW
        self.subsample = int(subsample)
        self._attached: tuple[str, ...] = ()

    def attach(self, model: Classifier) -> None:
        """Put one denoising block on each chosen tap, sized by the channels there."""
        taps = model.insertion_points()
        points = resolve_points(model, self.points, DEFAULT_POINTS, "denoise")
        shapes = model.feature_shapes(list(points))
        for point in points:
            shape = shapes[point]
            if len(shape) != 3:
                raise InsertionPointError(f"denoise needs C x H x W features; '{point}' gives shape {shape}")
            block = DenoisingBlock(self.op, int(shape[0]), window=self.window, subsample=self.subsample)
            taps[point].attached.append(block)
        self._attached = points

    def adaptive(self) -> AdaptiveDeclaration:
        points = ",".join(self._attached or self.points or ("<default points>",))
        return AdaptiveDeclaration(
            stochastic=False,
            notes=(
                "Deterministic and differentiable end to end (no heads, masks or randomness), so standard "
                "white-box attacks on the final logits apply: PGD with restarts, APGD-CE/DLR, AutoAttack. "
                "op=median passes gradient only through the arg-median of each window (sparse, piecewise "
                "gradients): add BPDA-style checks (e.g. the mean filter as backward surrogate), EOT over random "
                "starts and the black-box Square attack. Expect about +1 point over the undefended AT baseline "
                "at CIFAR scale (authors' CIFAR-10: PGD-20 44.1 -> 45.2), not the +3 of ImageNet, whose numbers "
                "are targeted PGD at eps 16/255. To credit denoising rather than the extra parameters, compare "
                f"with `denoise:op=null,points={points}` (same 1x1 conv + BN) and with the undefended baseline "
                "under the same AT method and seed."
            ),
        )
