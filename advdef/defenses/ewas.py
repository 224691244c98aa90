"""EWAS: Element-Wise Activation Scaling (Zhang, Ren, He, Zhou & Liu, FGCS 2023; arXiv 2202.11898).

One auxiliary linear classifier (ALC) reads the flattened activation z (C*H*W) at an insertion
point; the ALC weight row of one class, reshaped to C x H x W, multiplies z element-wise and the
scaled activation continues through the network (paper Eqs. 2-3):

    s_hat = W flatten(z) + b                      (ALC logits, written to model.context.aux)
    m     = reshape(W[y])            in training  (true label; only via `model.labels(y)`)
          = reshape(W[argmax s_hat]) in inference (the ALC's own prediction; label-free)
    z~    = z * m

The training loss adds lam * CE(s_hat, y) to the AT method's loss, and the paper's (and official
code's) training attack maximises CE(main) + lam * CE(s_hat) (Eq. 4). The mask is the raw weight
row: no normalisation, activation or clipping, exactly as in the official code.

Everything here that the paper leaves open, or where paper and official code
(github.com/ieslab-ynu/EWAS, a51f473) differ, is listed in docs/defenses.md (section `ewas`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from advdef.attacks.losses import cross_entropy, margin
from advdef.defenses.base import AdaptiveDeclaration, Defense, InsertionPointError, point_list, resolve_points
from advdef.models.base import Classifier, DefenseContext
from advdef.registry import DEFENSES
from advdef.validation import number

AUX_PREFIX = "ewas/"

# Default insertion point per architecture. The paper puts one module at "layer L" = after the
# L-th 3x3 convolution (1x1 shortcuts not counted): ResNet-18 layer 15, WRN-28-10 layer 19 and
# "WideResNet" (WRN-32-10 in the paper = the WRN-34-10 topology, 5 blocks/stage) layer 25, i.e.
# the output of the first block(s) of the last stage, before the remaining blocks of that stage.
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer4.0",),  # paper+code: after layer4[0], 512x4x4 post-ReLU (layer 15)
    "wrn34_10": ("block3.1",),  # paper+code: the paper's "WRN-32-10" layer 25 = after 2 of 5 stage-3 blocks
    "wrn28_10": ("block3.0",),  # paper "layer 19" = after 1 of 4 stage-3 blocks (no official code path)
    "preact_resnet18": ("layer4.0",),  # not in the paper: same position as ResNet-18 (residual stream)
    "vgg16_bn": ("block3",),  # not in the paper: before the last conv stage, 512x4x4 at 32x32 like ResNet-18
    "smallcnn": ("block1",),  # not in the paper: before the last block, for fast runs and tests
}

# The paper's layer index of each insertion point (Tables 10-11), for the docs and reports.
PAPER_LAYER_INDEX: dict[str, dict[str, int]] = {
    "resnet18": {"layer3.0": 11, "layer3.1": 13, "layer4.0": 15, "layer4.1": 17},
    "wrn34_10": {"block2": 21, "block3.0": 23, "block3.1": 25, "block3.2": 27, "block3.3": 29, "block3.4": 31},
    "wrn28_10": {"block3.0": 19},
}

# Per-architecture ALC bias initialisation of the official code: the WRN class zeroes every Linear
# bias in its init loop (the ALC included); the ResNet class keeps PyTorch's default init.
CODE_BIAS_INIT: dict[str, str] = {"wrn34_10": "zero", "wrn28_10": "zero"}
BIAS_CHOICES = ("default", "zero", "absent")  # "off" would parse as the boolean false



class EWASModule(nn.Module):
    """One EWAS module at one insertion point: ALC logits + element-wise scaling by a weight row."""

    def __init__(
        self, key: str, shape: tuple[int, int, int], num_classes: int, bias: str, context: DefenseContext
    ) -> None:
        super().__init__()
        if bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {', '.join(BIAS_CHOICES)}, got '{bias}'")
        self.key = key
        self.shape = tuple(int(s) for s in shape)
        # Default nn.Linear init (U(+-1/sqrt(fan_in))) as in the official code: the mask starts tiny
        # (~+-0.011 for 512x4x4) and the next BatchNorm re-normalises the scaled activation.
        self.alc = nn.Linear(math.prod(self.shape), num_classes, bias=bias != "absent")
        if bias == "zero":
            nn.init.zeros_(self.alc.bias)
        # A plain attribute, not a submodule: the context is shared state, not part of the weights.
        object.__setattr__(self, "context", context)
        # Set only by `EWAS.relaxed` (adaptive attacks): softmax(s_hat/T)-weighted mix of W rows.
        self.temperature: float | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scores = self.alc(z.flatten(1))  # flatten is row-major over (C, H, W), even for channels_last
        labels = self.context.labels if self.training else None
        weight = self.alc.weight
        if labels is not None:
            if labels.shape != (z.shape[0],):
                raise RuntimeError(f"EWAS: {tuple(labels.shape)} labels for a batch of {z.shape[0]}")
            selected = labels
            rows = weight[selected]
        else:
            selected = scores.argmax(1)
            if self.temperature is None:
                rows = weight[selected]
            else:
                rows = torch.softmax(scores.float() / self.temperature, 1).to(weight.dtype) @ weight
        self.context.aux[self.key] = scores
        self.context.aux[self.key + "/selected"] = selected.detach()
        mask = rows.view(-1, *self.shape)  # "reformat" of the paper: a plain row-major reshape
        return z * mask.to(z.dtype)

    def extra_repr(self) -> str:
        return f"key={self.key!r}, shape={self.shape}"


@DEFENSES.register("ewas")
class EWAS(Defense):
    """EWAS (Zhang et al. 2023): scale features element-wise by an auxiliary linear classifier's weight row; lam 0.01."""

    citation = (
        "Zhi-Yuan Zhang, Hao Ren, Zhenli He, Wei Zhou, Di Liu. Improving Robustness of Convolutional "
        "Neural Networks Using Element-Wise Activation Scaling. Future Generation Computer Systems, 2023. "
        "doi:10.1016/j.future.2023.07.013. arXiv:2202.11898. Code: https://github.com/ieslab-ynu/EWAS"
    )

    # dataset -> arch -> AT method -> accuracy (%) under the paper's protocol (Tables 3-5), plus the
    # reserved key "protocol" describing how these numbers were measured. `wrn34_10` holds the
    # paper's "WideResNet"/"WRN-32-10" rows: the official class builds 5 blocks per stage, the
    # WRN-34-10 topology.
    # The paper's own attacks (L(main) + 0.01 L(ALC): PGD-20 (CE) and CW (margin) at step eps/4).
    paper_attacks = ("fgsm", "adaptive:mode=joint,weight=0.01,steps=20", "adaptive:mode=joint,weight=0.01,loss=margin,steps=30")

    published: dict[str, Any] = {
        "cifar10": {
            "resnet18": {
                "pgd_at": {"clean": 84.73, "fgsm": 65.78, "pgd20": 64.84, "cw": 82.35, "apgd_square": 55.60},
                "trades": {"clean": 80.35, "fgsm": 61.85, "pgd20": 61.29, "cw": 74.92},
                "mart": {"clean": 81.80, "fgsm": 65.31, "pgd20": 64.01, "cw": 79.67},
            },
            "wrn28_10": {
                "pgd_at": {"clean": 85.29, "fgsm": 62.23, "pgd20": 55.66, "cw": 67.07},
            },
            "wrn34_10": {
                "pgd_at": {"clean": 87.12, "fgsm": 64.05, "pgd20": 59.90, "cw": 73.01},
                "trades": {"clean": 83.96, "fgsm": 64.50, "pgd20": 62.39, "cw": 74.88},
                "mart": {"clean": 80.84, "fgsm": 63.19, "pgd20": 65.40, "cw": 76.72},
            },
        },
        "svhn": {
            "resnet18": {"pgd_at": {"clean": 92.18, "fgsm": 71.57, "pgd20": 59.01, "cw": 69.67}},
        },
        "protocol": {
            "unit": "accuracy in percent",
            "source": "paper Tables 3 (CIFAR-10), 4 (SVHN), 5 (apgd_square); attack details from the official code",
            "checkpoint": "last epoch",
            "threat_model": "Linf, white-box (Square in apgd_square is score-based black-box)",
            "eps": {"paper": "8/255", "official_code": "0.031"},
            "attack_loss": (
                "not stated in the paper; the official code maximises L(main) + lam*L(ALC) with lam = the "
                "training lam (0.01), the mask predicted by the ALC (no label), predictions from the main logits"
            ),
            "attacks": {
                "fgsm": "paper: FGSM; code: uniform random start in [-eps, eps] then one eps step (R-FGSM-like)",
                "pgd20": "PGD-20, random start, step eps/4 (CIFAR-10) or eps/10 (SVHN)",
                "cw": "Linf C&W margin optimised by PGD-30, step eps/4, random start; code kappa = 50",
                "apgd_square": "custom AutoAttack subset APGD + Square (as CAS); loss, eps, queries not stated",
            },
            "test_set": "full test set, one restart, batch 128 (code)",
            "training": {
                "cifar10": "SGD m0.9, wd 2e-4, lr 0.1, batch 128; AT 120 ep @60,90; TRADES 85 @75 (code: @60); "
                "MART 90 @60; PGD-10 eps 8/255 (code 0.031) step eps/4 (code 0.007); lam 0.01",
                "svhn": "SGD m0.9, wd 5e-4, lr 0.01, batch 128, 120 ep @75,90; PGD-10 eps 8/255 step eps/4; lam 0.05",
            },
            "lam": {"cifar10": 0.01, "svhn": 0.05},
            "seeds": "single run each (code seed 7); no variance reported",
        },
    }

    # The same tables' undefended rows (%), against which the paper states its gains.
    paper_baselines: dict[str, Any] = {
        "cifar10": {
            "resnet18": {
                "pgd_at": {"clean": 84.47, "fgsm": 61.09, "pgd20": 44.33, "cw": 44.70, "apgd_square": 37.02},
                "trades": {"clean": 79.57, "fgsm": 62.26, "pgd20": 52.29, "cw": 49.18},
                "mart": {"clean": 78.86, "fgsm": 61.87, "pgd20": 51.61, "cw": 46.97},
            },
            "wrn28_10": {"pgd_at": {"clean": 87.29, "fgsm": 58.50, "pgd20": 49.17, "cw": 48.68}},
            "wrn34_10": {
                "pgd_at": {"clean": 86.65, "fgsm": 63.71, "pgd20": 47.06, "cw": 45.75},
                "trades": {"clean": 84.16, "fgsm": 65.34, "pgd20": 52.92, "cw": 51.61},
                "mart": {"clean": 84.39, "fgsm": 65.10, "pgd20": 50.39, "cw": 48.77},
            },
        },
        "svhn": {"resnet18": {"pgd_at": {"clean": 93.72, "fgsm": 65.87, "pgd20": 50.35, "cw": 47.89}}},
    }

    # Paper Tables 8-9: PGD-AT models trained with lam 0.01, attacked with L(main) + lam_attack*L(ALC).
    # The robust accuracy falls to about vanilla AT once lam_attack >= 1: the headline numbers
    # (lam_attack 0.01) are not adaptive. Keys are lam_attack; values (fgsm, pgd20, cw) in %.
    attack_lam_sweep: dict[str, Any] = {
        "cifar10": {
            "resnet18": {
                "clean": 84.73,
                "by_attack_lam": {
                    0: (86.09, 85.33, 84.60), 0.01: (65.78, 64.84, 82.35), 0.1: (63.29, 56.22, 60.91),
                    0.5: (62.71, 47.55, 47.90), 1: (62.71, 46.99, 46.95), 2: (62.71, 46.78, 46.91),
                    3: (62.71, 46.72, 46.87), 5: (62.71, 46.69, 46.87), 10: (62.71, 46.66, 46.79),
                },
                "vanilla_at": (61.09, 44.33, 44.70),
            },
            "wrn34_10": {
                "clean": 87.12,
                "by_attack_lam": {
                    0: (83.96, 83.61, 83.66), 0.01: (64.05, 59.90, 73.01), 0.1: (63.50, 48.88, 50.42),
                    0.5: (63.49, 47.27, 48.23), 1: (63.50, 47.21, 48.08), 2: (63.50, 47.20, 48.09),
                    3: (63.50, 47.19, 48.07), 5: (63.50, 47.20, 48.06), 10: (63.50, 47.19, 48.05),
                },
                "vanilla_at": (63.71, 47.06, 45.75),
            },
        }
    }

    def __init__(
        self,
        *,
        lam: float = 0.01,
        points: list[str] | str | None = None,
        attack_lam: float | None = None,
        bias: str | None = None,
    ) -> None:
        """
        lam: weight of the ALC loss (paper: 0.01 for CIFAR-10, 0.05 for SVHN; pass `lam=0.05` there,
            the defense is not told the dataset).
        points: insertion point name(s); None = DEFAULT_POINTS[arch] (the paper's position where it has one).
        attack_lam: weight of the ALC loss inside the *training* attack's objective; None = lam, as
            in the paper's Eq. 4 and the official code; 0 crafts on the main CE only.
        bias: ALC bias: "default" (PyTorch init), "zero" (official WRN code), "absent" (the paper's
            bias-free notation theta in R^{CHW x K}); None = as the official code for the arch.
        """
        self.lam = number("lam", lam, at_least=0)
        self.attack_lam = self.lam if attack_lam is None else number("attack_lam", attack_lam, at_least=0)
        self.points = point_list(points)
        if bias is not None and bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {', '.join(BIAS_CHOICES)} (or none = per arch), got '{bias}'")
        self.bias = bias
        self._attached: tuple[str, ...] | None = None

    # -- surgery ----------------------------------------------------------------------------
    def attach(self, model: Classifier) -> None:
        """Add one ALC + scaling module per point, sized by the features there for this input size."""
        taps = model.insertion_points()
        points = resolve_points(model, self.points, DEFAULT_POINTS, "ewas")
        shapes = model.feature_shapes(list(points))
        num_classes = model.num_classes
        bias = self.bias if self.bias is not None else CODE_BIAS_INIT.get(model.arch, "default")
        for point in points:
            shape = shapes[point]
            if len(shape) != 3:
                raise InsertionPointError(f"ewas needs C x H x W features; '{point}' gives shape {shape}")
            taps[point].attached.append(EWASModule(AUX_PREFIX + point, shape, num_classes, bias, model.context))
        self._attached = points

    # -- losses -----------------------------------------------------------------------------
    def aux_logits(self, model: Classifier) -> dict[str, torch.Tensor]:
        """ALC logits of the last forward pass, by aux key (`ewas/<point>`).

        AT methods whose outer loss is not plain CE (TRADES, MART) need these to apply their own
        loss form to each ALC, as the paper's Table 1 does; see docs/defenses.md (section `ewas`).
        """
        aux = model.aux_outputs()
        heads: dict[str, torch.Tensor] = {}
        for module in _modules(model):
            if module.key not in aux:
                raise RuntimeError(f"EWAS: no ALC output for '{module.key}'; run a forward pass first")
            heads[module.key] = aux[module.key]
        return heads

    def aux_weight(self) -> float:
        """lam: Eq. 4-5's weight of CE(ALC logits, y) (one module in the paper; several are averaged)."""
        return self.lam

    def attack_aux_weight(self) -> float | None:
        """CE(main) + attack_lam * CE(ALC): the inner maximisation of Eq. 4 and of the official AT code."""
        return None if self.attack_lam == 0 else self.attack_lam

    def joint_objective(
        self, model: Classifier, weight: float, loss: str = "ce", kappa: float = 0.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per-example L(main) + weight * sum L(ALC), with L = "ce" or the CW "margin".

        This is the authors' attack loss (CE for FGSM/PGD, the CW margin for C&W) at weight = lam,
        and the adaptive sweep of the paper's Tables 8-9 at larger weights.
        """
        per_example = {"ce": cross_entropy, "margin": lambda z, y: margin(z, y, kappa)}
        if loss not in per_example:
            raise ValueError(f"loss must be 'ce' or 'margin', got '{loss}'")
        fn = per_example[loss]

        def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            total = fn(logits.float(), labels)
            for aux_logits in self.aux_logits(model).values():
                total = total + weight * fn(aux_logits.float(), labels)
            return total

        return objective

    # -- adaptive evaluation ------------------------------------------------------------------
    @staticmethod
    @contextmanager
    def relaxed(model: Classifier, temperature: float = 1.0) -> Iterator[None]:
        """Make the eval-mode mask selection differentiable for an attack (BPDA-style surrogate).

        Inside the block the mask is softmax(s_hat / T) @ W instead of W[argmax s_hat], so gradients
        flow through the class choice. Craft with it, then score without it: the relaxed model is
        a surrogate, not the defended model. Still deterministic and label-free.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        modules = _modules(model)
        previous = [m.temperature for m in modules]
        for module in modules:
            module.temperature = float(temperature)
        try:
            yield
        finally:
            for module, value in zip(modules, previous):
                module.temperature = value

    def gradient_surrogates(self, model: Classifier | None) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
        """Soft-selection surrogates at T = 1 and 0.1. `relaxed` changes the forward too, so an
        attack must judge its points on the model outside the block."""
        return {"soft_mask": lambda: EWAS.relaxed(model, 1.0), "soft_mask_t0.1": lambda: EWAS.relaxed(model, 0.1)}

    def adaptive(self) -> AdaptiveDeclaration:
        points = self._attached or self.points or ("<point>",)
        heads = tuple(AUX_PREFIX + p for p in points)
        joint = " + ".join([f"{self.lam:g}*L(aux['{h}'])" for h in heads])
        return AdaptiveDeclaration(
            aux_heads=heads,
            masks=tuple(h + "/selected" for h in heads),
            joint_loss=f"L(final) + {joint}  (L = CE for FGSM/PGD, CW margin kappa 50 for C&W)",
            stochastic=False,
            notes=(
                "Eval mask = ALC weight row of argmax(ALC logits): a non-differentiable selection, so "
                "gradients of the final logits alone are masked (paper Table 8: attacking the main head only "
                "gives PGD-20 85.33 > clean 84.73). The authors attacked with L(final) + 0.01*L(ALC); "
                "raising the ALC weight to >= 1 drops ResNet-18 C&W 82.35 -> ~46.9 and PGD-20 64.84 -> ~46.7, "
                "near vanilla AT (44.70 / 44.33); WRN PGD-20 gain over AT shrinks to ~0.1 pp. Attack with: a "
                "sweep of the ALC weight (EWAS.joint_objective), the ALC head alone (CE and margin), targeted "
                "attacks on the ALC (pushing it to class t forces mask W[t]), the soft-mask surrogate "
                "EWAS.relaxed(model, T), Square and transfer. Always score the final logits; the ALC logits "
                "are in model.aux_outputs()[aux_head], the selected class in model.aux_outputs()[mask]. Check "
                "argmax(ALC) == argmax(final) agreement on clean and adversarial inputs."
            ),
        )


def _modules(model: Classifier) -> list[EWASModule]:
    return [m for m in model.modules() if isinstance(m, EWASModule)]
