"""FSR: Feature Separation and Recalibration (Kim, Cho, Jung, Yoon; CVPR 2023).

One block at a late feature map f (C x H x W) splits it with a learned element-wise soft mask
into a robust part f+ = m * f and a non-robust part f- = (1 - m) * f, recalibrates the
non-robust part with a small conv net R, and passes f~ = f+ + f- + (1 - m) * R(f-) on:

    r  = S(f)                                   separation net: a robustness logit per activation
    m  = sigmoid((r + g1 - g2) / tau)           training: two-class Gumbel softmax (Eq. 2), g ~ Gumbel
    m  = sigmoid(r / tau)                       eval: noise fixed at u = 0.5, so g1 = g2 cancel
    f~ = m * f + (1 - m) * f + (1 - m) * R((1 - m) * f)

A shared head h (GAP then Linear(C, K)) scores f+, f- and the recalibrated f~- = f- + m- * R(f-);
training adds  lam_sep * [CE(h(f+), y) + CE(h(f-), y')] + lam_rec * CE(h(f~-), y), with y' the
most probable wrong class of the model's final logits (Eqs. 3-5). The head never feeds the
prediction; its logits are auxiliary outputs that an adaptive attack may target.

Written from the paper and the technical digest (docs/defenses.md (section `fsr`)); no code was copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advdef.defenses.base import AdaptiveDeclaration, Defense, InsertionPointError, point_list, resolve_points
from advdef.models.base import Classifier, DefenseContext
from advdef.registry import DEFENSES
from advdef.validation import number

# Default insertion point per architecture (registry name). The paper inserts FSR "after block4 for
# ResNet-18 and VGG16, block3 for WRN-34-10"; the official code places it on the last feature map
# before global pooling (ResNet-18: layer4 output; WRN: after the final bn1+ReLU) and, for VGG16,
# on the 4th conv stage before its max-pool. Pre-activation nets follow the WRN placement: the
# feature map after the final BN+ReLU (`final`), which is what the official WRN code does.
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer4",),
    "preact_resnet18": ("final",),
    "wrn34_10": ("final",),
    "wrn28_10": ("final",),
    "vgg16_bn": ("block3",),
    "smallcnn": ("block2",),  # not in the paper: the last feature map, so fast tests exercise FSR
}

# Spec values: `none` parses to None, which is how the code's choices are spelled (`rec_final_act=none`).
REC_FINAL_ACTS = ("bn_relu", None)  # paper: R's last block is Conv-BN-ReLU; code: a bare conv
ABLATIONS = (None, "no_sep", "no_rec")  # full FSR, then the Table 6 variants ("w/o Sep", "w/o Rec")
AUX_KINDS = ("robust", "nonrobust", "recalibrated")

# Key under which the final logits of the last forward pass are kept in `context.aux`: the
# separation loss needs y' (top wrong class of the final output) and `aux_loss` gets only labels.
LOGITS_KEY = "fsr/logits"


def aux_key(point: str, kind: str) -> str:
    """Name of an auxiliary output in `model.aux_outputs()`: `fsr/layer4/robust`, `fsr/layer4/mask`."""
    return f"fsr/{point}/{kind}"



def gumbel_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """g = -log(-log u), u ~ U(0, 1), from torch's global RNG (the trainer seeds it).

    u is clamped away from 0 so that g stays finite (u = 0 would give g = -inf and NaN masks).
    """
    u = torch.rand(shape, device=device).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def eval_mask(r: torch.Tensor, tau: float) -> torch.Tensor:
    """Deterministic inference mask: Eq. 2 with both noises fixed at u_c = 0.5.

    Then g1 = g2 = -log(log 2) and the two-class softmax of (log sigma(r) + g1)/tau against
    (log(1 - sigma(r)) + g2)/tau reduces exactly to sigmoid(r / tau).
    """
    return torch.sigmoid(r / tau)


def gumbel_mask(r: torch.Tensor, tau: float) -> torch.Tensor:
    """Training mask: Eq. 2 with fresh Gumbel noise g1, g2 per activation.

    log sigma(r) - log(1 - sigma(r)) = r, so the two-class Gumbel softmax is
    sigmoid((r + g1 - g2) / tau); the closed form avoids the code's log(. + 1e-8) clipping.
    """
    g1 = gumbel_noise(r.shape, r.device)
    g2 = gumbel_noise(r.shape, r.device)
    return torch.sigmoid((r + g1 - g2) / tau)


def top_wrong_class(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """y' of Eq. 3: the highest-scoring class other than the true one (top-1, or top-2 if top-1 = y)."""
    masked = logits.detach().masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return masked.argmax(1)


def conv_net(channels: int, hidden: int, final_bn_relu: bool) -> nn.Sequential:
    """The separation / recalibration net: Conv3x3(C->h)-BN-ReLU, Conv3x3(h->h)-BN-ReLU, Conv3x3(h->C).

    Convs are bias-free, stride 1, padding 1, so the output has f's shape and maps one logit (or
    one correction) to each activation. `final_bn_relu` appends BN(C)-ReLU to the last conv, the
    paper's description of R.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 3, padding=1, bias=False),
    ]
    if final_bn_relu:
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def aux_head(channels: int, num_classes: int, hidden: int) -> nn.Sequential:
    """The shared auxiliary head h: GAP then Linear(C, K) (code), or a 2-layer MLP when hidden > 0."""
    if hidden == 0:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class FSRBlock(nn.Module):
    """One FSR module at one insertion point: f -> f~, writing auxiliary logits and the mask.

    Train mode draws Gumbel noise (stochastic mask); eval mode uses the fixed-noise mask
    sigmoid(r / tau), so `eval(); model(x)` is deterministic and reads no labels. The block never
    reads labels at all: y' is derived in `FSR.aux_loss` from the final logits.
    """

    context: DefenseContext | None

    def __init__(
        self,
        point: str,
        channels: int,
        num_classes: int,
        *,
        tau: float,
        hidden: int,
        rec_final_act: str | None,
        aux_hidden: int,
        ablation: str | None,
    ) -> None:
        super().__init__()
        self.point = point
        self.tau = tau
        self.ablation = ablation
        # Adaptive-attack surrogate (eval only): differentiate the mask at this larger temperature.
        self.surrogate_tau: float | None = None
        self.surrogate_straight_through = True
        self.separation = conv_net(channels, hidden, final_bn_relu=False) if ablation != "no_sep" else None
        self.recalibration = (
            conv_net(channels, hidden, final_bn_relu=rec_final_act == "bn_relu") if ablation != "no_rec" else None
        )
        self.aux = aux_head(channels, num_classes, aux_hidden)
        object.__setattr__(self, "context", None)  # set by FSR.attach; a reference, not a submodule

    @property
    def separates(self) -> bool:
        return self.separation is not None

    @property
    def recalibrates(self) -> bool:
        return self.recalibration is not None

    def mask(self, r: torch.Tensor) -> torch.Tensor:
        """m from the robustness logits r: Gumbel in training, fixed noise (sigmoid(r/tau)) in eval."""
        if self.training:
            return gumbel_mask(r, self.tau)
        hard = eval_mask(r, self.tau)
        if self.surrogate_tau is None:
            return hard
        soft = eval_mask(r, self.surrogate_tau)
        if self.surrogate_straight_through:
            return soft + (hard - soft).detach()  # value at tau, gradient at surrogate_tau
        return soft

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        outputs: dict[str, torch.Tensor] = {}
        if not self.separates:  # "w/o Sep": recalibrate the whole map, f~ = f + R(f)
            recalibrated = f + self.recalibration(f)
            outputs["recalibrated"] = self.aux(recalibrated)
            out = recalibrated
        else:
            r = self.separation(f)
            m = self.mask(r)
            robust = m * f
            nonrobust = (1 - m) * f
            outputs["mask"] = m
            outputs["robust"] = self.aux(robust)
            outputs["nonrobust"] = self.aux(nonrobust)
            if self.recalibrates:
                recalibrated = nonrobust + (1 - m) * self.recalibration(nonrobust)
                outputs["recalibrated"] = self.aux(recalibrated)
                out = robust + recalibrated
            else:  # "w/o Rec": only the robust part goes on
                out = robust
        if self.context is not None:
            for kind, value in outputs.items():
                self.context.aux[aux_key(self.point, kind)] = value
        return out


def _record_final_logits(module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    """Forward hook on the Classifier: keep the final logits for y' (module-level so deepcopy works)."""
    module.context.aux[LOGITS_KEY] = output


def fsr_blocks(model: nn.Module) -> list[FSRBlock]:
    return [m for m in model.modules() if isinstance(m, FSRBlock)]


@DEFENSES.register("fsr")
class FSR(Defense):
    """FSR (Kim et al. CVPR 2023): Gumbel-masked feature separation + recalibration at a late feature map."""

    citation = (
        "Woo Jae Kim, Yoonki Cho, Junsik Jung, Sung-Eui Yoon. Feature Separation and Recalibration for "
        "Adversarial Robustness. CVPR 2023. arXiv:2303.13846. Code: github.com/wkim97/FSR"
    )

    # dataset -> arch -> AT method -> metric (percent, full test set), plus the eval protocol.
    # Tables 1-4 of the paper (ResNet-18 and VGG16, with FSR). AA and the black-box columns exist
    # only for ResNet-18 / CIFAR-10 (Table 3).
    # The paper's own attacks (step eps/10, no random start, final logits).
    paper_attacks = ("fgsm", "pgd:steps=20,alpha=4/1275,random_start=false", "pgd:steps=100,alpha=4/1275,random_start=false", "cw:alpha=4/1275,random_start=false", "aa")

    published: dict[str, Any] = {
        "cifar10": {
            "resnet18": {
                "pgd_at": {"clean": 81.46, "fgsm": 58.07, "pgd20": 52.47, "pgd100": 51.02, "cw": 49.44,
                           "ensemble": 48.34, "aa": 46.41, "ti_fgsm": 62.53, "di_fgsm": 50.50, "nattack": 52.65},
                "trades": {"clean": 84.49, "fgsm": 58.29, "pgd20": 52.27, "pgd100": 51.28, "cw": 49.92,
                           "ensemble": 49.28, "aa": 48.45, "ti_fgsm": 61.45, "di_fgsm": 50.54, "nattack": 50.43},
                "mart": {"clean": 83.28, "fgsm": 59.55, "pgd20": 54.80, "pgd100": 53.69, "cw": 48.98,
                         "ensemble": 48.36, "aa": 46.55, "ti_fgsm": 62.68, "di_fgsm": 51.42, "nattack": 53.76},
            },
            "vgg16_bn": {
                "pgd_at": {"clean": 80.06, "fgsm": 54.40, "pgd20": 49.82, "pgd100": 48.82, "cw": 47.28, "ensemble": 46.24},
                "trades": {"clean": 80.78, "fgsm": 55.48, "pgd20": 49.95, "pgd100": 49.03, "cw": 46.28, "ensemble": 45.90},
                "mart": {"clean": 79.18, "fgsm": 56.41, "pgd20": 52.69, "pgd100": 52.13, "cw": 44.49, "ensemble": 44.20},
            },
        },
        "svhn": {
            "resnet18": {
                "pgd_at": {"clean": 91.28, "fgsm": 60.46, "pgd20": 43.94, "pgd100": 39.01, "cw": 43.22, "ensemble": 38.81},
                "trades": {"clean": 91.39, "fgsm": 68.85, "pgd20": 51.49, "pgd100": 47.50, "cw": 46.70, "ensemble": 46.17},
                "mart": {"clean": 89.87, "fgsm": 61.06, "pgd20": 46.51, "pgd100": 42.94, "cw": 43.89, "ensemble": 42.40},
            },
            "vgg16_bn": {
                "pgd_at": {"clean": 91.44, "fgsm": 65.01, "pgd20": 45.99, "pgd100": 39.07, "cw": 43.08, "ensemble": 38.15},
                "trades": {"clean": 91.89, "fgsm": 69.25, "pgd20": 54.56, "pgd100": 47.81, "cw": 46.66, "ensemble": 44.10},
                "mart": {"clean": 90.60, "fgsm": 62.28, "pgd20": 47.17, "pgd100": 42.50, "cw": 43.44, "ensemble": 40.73},
            },
        },
        "protocol": {
            "unit": "percent",
            "threat_model": "Linf, eps 8/255, inputs in [0,1] (no normalisation in the official code)",
            "samples": "full test split (10,000 CIFAR-10; 26,032 SVHN); NAttack on 1,000 CIFAR-10 test images",
            "model_mode": "eval BN, deterministic mask (Gumbel noise fixed at u = 0.5); attacks target the final logits only",
            "checkpoint": "last epoch (100) of a single run, no seed, no best-checkpoint selection",
            "attacks": {
                "fgsm": "one eps step on the CE gradient sign, no random start",
                "pgd20": "20 steps of eps/10, CE, no random start, 1 restart",
                "pgd100": "100 steps of eps/10, CE, no random start, 1 restart",
                "cw": "Linf PGD, 30 steps of eps/10 on the CW margin loss with kappa 50, no random start",
                "ensemble": "per-example worst case over fgsm, pgd20, pgd100, cw (the code also requires clean-correct)",
                "aa": "AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square) [version inferred]",
                "ti_fgsm": "transfer from a naturally trained ResNet-50 (settings unstated)",
                "di_fgsm": "transfer from a naturally trained ResNet-50 (settings unstated)",
                "nattack": "query-based, 1,000 images, 40,000-query limit",
            },
            # The same attacks as advdef specs (eps from --eps 8/255; eps/10 = 4/1275).
            "advdef_attacks": [
                "fgsm",
                "pgd:steps=20,alpha=4/1275,random_start=false",
                "pgd:steps=100,alpha=4/1275,random_start=false",
                "cw:alpha=4/1275,random_start=false",
                "aa",
            ],
            "training": (
                "PGD-10 AT (eps 8/255, step eps/4 CIFAR, eps/8 SVHN, uniform random start), crafted with eval BN "
                "and the deterministic mask, CE on final logits; update on x_adv only with train BN and Gumbel masks; "
                "SGD momentum 0.9, wd 5e-4, lr 0.1 (SVHN 0.01), /10 at epochs 75 and 90 of 100, batch 128, "
                "pad-4 crop + flip (CIFAR), lam_sep = lam_rec = 1, tau = 0.1"
            ),
        },
    }

    # The paper's own rows without FSR (same protocol), for deltas; ResNet-18 unless stated.
    published_baselines: dict[str, Any] = {
        "cifar10": {
            "resnet18": {
                "pgd_at": {"clean": 85.02, "fgsm": 56.21, "pgd20": 48.22, "pgd100": 46.37, "cw": 47.38,
                           "ensemble": 45.51, "aa": 44.11, "ti_fgsm": 59.03, "di_fgsm": 46.56, "nattack": 39.55},
                "trades": {"clean": 86.31, "fgsm": 57.21, "pgd20": 50.74, "pgd100": 49.44, "cw": 48.66,
                           "ensemble": 47.89, "aa": 46.81, "ti_fgsm": 59.95, "di_fgsm": 49.23, "nattack": 43.45},
                "mart": {"clean": 82.73, "fgsm": 56.65, "pgd20": 50.88, "pgd100": 49.15, "cw": 47.21,
                         "ensemble": 45.98, "aa": 44.27, "ti_fgsm": 59.73, "di_fgsm": 48.38, "nattack": 44.68},
            },
            "vgg16_bn": {
                "pgd_at": {"clean": 80.56, "fgsm": 53.47, "pgd20": 47.17, "pgd100": 45.58, "cw": 45.82, "ensemble": 43.71},
                "trades": {"clean": 82.44, "fgsm": 53.92, "pgd20": 47.39, "pgd100": 46.20, "cw": 44.80, "ensemble": 44.20},
                "mart": {"clean": 76.11, "fgsm": 54.86, "pgd20": 51.06, "pgd100": 50.16, "cw": 43.53, "ensemble": 43.01},
            },
        },
        "svhn": {
            "resnet18": {
                "pgd_at": {"clean": 91.21, "fgsm": 55.55, "pgd20": 40.85, "pgd100": 37.54, "cw": 40.61, "ensemble": 37.41},
                "trades": {"clean": 90.99, "fgsm": 61.31, "pgd20": 47.12, "pgd100": 43.55, "cw": 45.48, "ensemble": 42.99},
                "mart": {"clean": 90.50, "fgsm": 58.21, "pgd20": 43.61, "pgd100": 40.43, "cw": 42.20, "ensemble": 40.07},
            },
            "vgg16_bn": {
                "pgd_at": {"clean": 89.59, "fgsm": 54.88, "pgd20": 40.27, "pgd100": 36.90, "cw": 39.46, "ensemble": 36.62},
                "trades": {"clean": 90.48, "fgsm": 61.50, "pgd20": 45.99, "pgd100": 40.00, "cw": 42.82, "ensemble": 39.27},
                "mart": {"clean": 89.95, "fgsm": 59.03, "pgd20": 42.89, "pgd100": 38.73, "cw": 39.12, "ensemble": 37.64},
            },
        },
    }

    # Table 6 (ResNet-18, CIFAR-10, PGD-AT), keyed by this plugin's `ablation` value ("full" = none).
    published_ablations: dict[str, dict[str, float]] = {
        "full": {"fgsm": 58.07, "pgd20": 52.47, "pgd100": 51.02, "cw": 49.44, "ensemble": 48.34, "aa": 46.41},
        "no_sep": {"fgsm": 57.51, "pgd20": 50.71, "pgd100": 48.98, "cw": 49.32, "ensemble": 47.60, "aa": 45.47},
        "no_rec": {"fgsm": 57.67, "pgd20": 50.06, "pgd100": 48.54, "cw": 49.41, "ensemble": 47.32, "aa": 44.96},
    }

    # Table 7: parameters (M) and FLOPs (G, = 2 x MACs at 32x32) with and without FSR.
    published_cost: dict[str, dict[str, float]] = {
        "resnet18": {"params_m": 11.17, "params_m_fsr": 12.43, "gflops": 1.1133, "gflops_fsr": 1.1535},
        "vgg16_bn": {"params_m": 15.25, "params_m_fsr": 16.52, "gflops": 0.6299, "gflops_fsr": 0.6701},
    }

    def __init__(
        self,
        *,
        points: str | list[str] | None = None,
        tau: float = 0.1,
        lam_sep: float = 1.0,
        lam_rec: float = 1.0,
        hidden: int = 64,
        rec_final_act: str | None = None,
        aux_hidden: int = 0,
        ablation: str | None = None,
    ) -> None:
        """Paper defaults: tau 0.1, lam_sep = lam_rec = 1 (Sec. 4.1), hidden width 64 (code).

        `points` (None = the architecture's default) may list several points (Eq. 5 averages the
        losses over them). `rec_final_act` is None, spelled `none` (the default: the official code,
        whose R ends with a bare conv; the published numbers and the 1,259,018-parameter overhead
        come from it), or `bn_relu` (the paper's text: R is three Conv-BN-ReLU blocks, +1,024 params). `aux_hidden` 0 is the code's
        single Linear head; > 0 gives a Linear-ReLU-Linear head (the paper says "MLP-based" without
        a width). `ablation` selects the Table 6 variants `no_sep` / `no_rec`.
        """
        self.points = point_list(points)
        self.tau = number("tau", tau, above=0)
        self.lam_sep = number("lam_sep", lam_sep, at_least=0)
        self.lam_rec = number("lam_rec", lam_rec, at_least=0)
        self.hidden = self._count("hidden", hidden, minimum=1)
        self.aux_hidden = self._count("aux_hidden", aux_hidden, minimum=0)
        rec_final_act = None if rec_final_act == "none" else rec_final_act
        ablation = None if ablation == "none" else ablation
        if rec_final_act not in REC_FINAL_ACTS:
            raise ValueError(f"rec_final_act must be bn_relu (paper) or none (code), got '{rec_final_act}'")
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be none, no_sep or no_rec, got '{ablation}'")
        self.rec_final_act = rec_final_act
        self.ablation = ablation
        self.attached_points: tuple[str, ...] = ()

    # -- validation -----------------------------------------------------------------------
    @staticmethod
    def _count(name: str, value: Any, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return value

    # -- surgery --------------------------------------------------------------------------
    def resolve_points(self, model: Classifier) -> tuple[str, ...]:
        """The points FSR goes to on `model`: the user's, else the architecture's default."""
        return resolve_points(model, self.points, DEFAULT_POINTS, "fsr")

    def attach(self, model: Classifier) -> None:
        """Put one FSR block on each chosen tap, sized from the features there and the class count."""
        points = self.resolve_points(model)
        shapes = model.feature_shapes(list(points))
        num_classes = model.num_classes
        for point in points:
            shape = shapes.get(point, ())
            if len(shape) != 3:
                raise InsertionPointError(f"fsr needs a C x H x W feature map at '{point}', got shape {shape}")
            block = FSRBlock(
                point, shape[0], num_classes, tau=self.tau, hidden=self.hidden, rec_final_act=self.rec_final_act,
                aux_hidden=self.aux_hidden, ablation=self.ablation,
            )
            object.__setattr__(block, "context", model.context)
            parameter = next(model.parameters(), None)
            if parameter is not None:
                block.to(parameter.device)
            model.insertion_points()[point].attached.append(block)
        model.register_forward_hook(_record_final_logits)
        self.attached_points = points


    # -- training -------------------------------------------------------------------------
    def extra_aux_loss(self, model: Classifier, labels: torch.Tensor) -> torch.Tensor | None:
        """Eq. 5 without L_cls (FSR's heads are not plain classifiers of the input, so any AT
        method adds this as it is, on the inputs it trains on): mean over FSR points of lam_sep * L_sep + lam_rec * L_rec.

        All CE terms are batch means, as in the official code. y' comes from the final logits of
        the same forward pass, as indices only (no gradient flows through the choice of y').
        """
        blocks = fsr_blocks(model)
        if not blocks:
            return None
        aux = model.aux_outputs()
        if LOGITS_KEY not in aux:
            raise RuntimeError("FSR.aux_loss needs a forward pass of the FSR model first")
        wrong: torch.Tensor | None = None
        per_point = []
        for block in blocks:
            outputs = {kind: aux.get(aux_key(block.point, kind)) for kind in AUX_KINDS}
            terms: list[torch.Tensor] = []
            if block.separates:
                if wrong is None:
                    wrong = top_wrong_class(aux[LOGITS_KEY], labels)
                terms.append(self.lam_sep * (F.cross_entropy(outputs["robust"], labels)
                                             + F.cross_entropy(outputs["nonrobust"], wrong)))
            if block.recalibrates:
                terms.append(self.lam_rec * F.cross_entropy(outputs["recalibrated"], labels))
            per_point.append(torch.stack(terms).sum())
        return torch.stack(per_point).mean()

    # -- evaluation -----------------------------------------------------------------------
    def adaptive(self) -> AdaptiveDeclaration:
        points = self.attached_points or self.points or ("*",)  # glob until the points are known
        separates, recalibrates = self.ablation != "no_sep", self.ablation != "no_rec"
        kinds = [k for k, on in (("robust", separates), ("nonrobust", separates), ("recalibrated", recalibrates)) if on]
        return AdaptiveDeclaration(
            aux_heads=tuple(aux_key(p, k) for p in points for k in kinds),
            masks=tuple(aux_key(p, "mask") for p in points) if separates else (),
            joint_loss=None,
            stochastic=False,
            notes=(
                "The authors attack the final logits only (no joint loss), eval mask fixed at u = 0.5. "
                f"Aux heads are logits of one shared GAP+Linear head on f+ (robust), f- (nonrobust; trained "
                f"towards the top wrong class) and recalibrated f~-; `FSR.joint_objective(model, beta)` gives "
                f"the CAS/CIFS-style joint loss CE(final) + beta * mean_l[CE(robust_l) + CE(recalibrated_l)]. "
                f"The mask is sigmoid(r / tau) with tau = {self.tau:g}: nearly binary, its gradient "
                f"(1/tau) m (1 - m) vanishes where saturated; `FSR.mask_temperature(model, tau)` evaluates at "
                f"the trained tau and differentiates at a larger one (or replaces it). Train mode is stochastic "
                f"(Gumbel noise); eval mode is deterministic."
            ),
        )

    # The heads trained towards y (robust, recalibrated) are what an attack pushes away from y; the
    # non-robust head is trained towards a wrong class, and no head's prediction selects the mask.
    ATTACK_KINDS = ("robust", "recalibrated")

    def attack_head_names(self) -> tuple[str, ...]:
        """The declared heads that classify y (not the non-robust head, trained towards y')."""
        return tuple(h for h in self.adaptive().aux_heads if h.rsplit("/", 1)[-1] in self.ATTACK_KINDS)

    def attack_heads(self, model: Classifier) -> dict[str, torch.Tensor]:
        """The shared head's logits on f+ and recalibrated f~- from the last forward pass."""
        aux = model.aux_outputs()
        missing = [h for h in self.attack_head_names() if h not in aux]
        if missing:
            raise RuntimeError(f"FSR outputs {', '.join(missing)} missing: run a forward pass first")
        return {h: aux[h] for h in self.attack_head_names()}

    @property
    def selects_masks(self) -> bool:
        """The mask is sigmoid(r / tau) of the separation net, not chosen by a head's prediction."""
        return False

    def gradient_surrogates(self, model: Classifier | None) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
        """Straight-through raised-temperature masks (menu A5): value at the trained tau, gradient at 1 or 0.5."""
        if self.ablation == "no_sep":
            return {}  # no mask
        return {
            "mask_temperature": lambda: FSR.mask_temperature(model, 1.0, straight_through=True),
            "mask_temperature_0.5": lambda: FSR.mask_temperature(model, 0.5, straight_through=True),
        }

    @staticmethod
    def joint_objective(model: Classifier, beta: float = 2.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per-example adaptive loss: CE(final) + beta * mean over points of [CE(robust) + CE(recalibrated)].

        Not the authors' attack (they attacked the final logits); the CAS evaluation's beta = 2
        convention. Reads the aux outputs of the forward pass that produced `logits`.
        """

        def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            aux = model.aux_outputs()
            loss = F.cross_entropy(logits, labels, reduction="none")
            heads = []
            for block in fsr_blocks(model):
                for kind in ("robust", "recalibrated"):
                    key = aux_key(block.point, kind)
                    if key in aux:
                        heads.append(F.cross_entropy(aux[key], labels, reduction="none"))
            if heads:
                loss = loss + beta * torch.stack(heads).sum(0) / len(fsr_blocks(model))
            return loss

        return objective

    @staticmethod
    @contextmanager
    def mask_temperature(model: Classifier, tau: float, *, straight_through: bool = True) -> Iterator[None]:
        """Within the block, eval-mode masks use temperature `tau` for gradients (surrogate attack).

        With `straight_through`, the forward value stays sigmoid(r / tau_trained) (the defended
        model's prediction is unchanged) and only the gradient uses sigmoid(r / tau); without it
        the surrogate temperature replaces the trained one outright.
        """
        if not tau > 0:
            raise ValueError(f"surrogate temperature must be positive, got {tau}")
        blocks = fsr_blocks(model)
        saved = [(b.surrogate_tau, b.surrogate_straight_through) for b in blocks]
        try:
            for block in blocks:
                block.surrogate_tau, block.surrogate_straight_through = float(tau), straight_through
            yield
        finally:
            for block, (surrogate, straight) in zip(blocks, saved):
                block.surrogate_tau, block.surrogate_straight_through = surrogate, straight
