"""CAS: Channel-wise Activation Suppressing (Bai, Zeng, Jiang, Xia, Ma, Wang; ICLR 2021).

A CAS module sits on a late activation f (N x K x H x W). It global-average-pools f into
channel activations f^ (Eq. 2), classifies them with one fully-connected layer M (the auxiliary
head, K -> C), and multiplies f channel-wise by one row of M's weight (Eq. 3):

    training mode with labels:  f~ = f * M_y        (the true label's row)
    eval mode (always):         f~ = f * M_yhat     (yhat = argmax of this head's own logits)

The row is the raw, signed weight row: no sigmoid, softmax or normalisation (the official code
does none, and adding one would change the method). f~ replaces f in the forward pass. Training
adds (beta / S) * sum_s CE(head_s(x'), y) over the S modules to whichever outer loss the AT method
produced (Eq. 5); the paper's training code crafts its PGD examples on that same joint loss.

Where the paper and the official code (github.com/bymavis/CAS_ICLR2021 @ 057fc636) disagree,
the default follows the paper and an option exposes the code's choice; where the paper is silent
or ambiguous (beta for ResNet-18, the head's bias, how many modules "Block4" means) the default
is the code's. `docs/defenses.md (section `cas`)` lists every difference.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advdef.attacks.losses import cross_entropy, margin
from advdef.defenses.base import AdaptiveDeclaration, Defense, InsertionPointError, point_list, resolve_points
from advdef.models.base import Classifier, DefenseContext
from advdef.registry import DEFENSES

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Default insertion points per architecture (the registry name `build_model` stores in `model.arch`).
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    # Paper: "Block4 ... after the ReLU output"; the official resnet_cas.py puts one CAS module in
    # each of the two BasicBlocks of stage 4 (S = 2), which is what the paper's numbers come from.
    "resnet18": ("layer4.0", "layer4.1"),
    # Paper (App. F.1): "the last two convolution layers"; code (wideresnet_cas.py): the residual
    # branch's pre-activation of the last block of block3, and the final BN-ReLU before pooling.
    "wrn34_10": ("block3.last.preact", "final"),
    # Not in the paper: the WRN-34-10 construction applied to the same pre-activation WRN family.
    "wrn28_10": ("block3.last.preact", "final"),
    # Not in the paper: the pre-activation ResNet-18 analogue of the WRN code's choice (the last
    # block's residual pre-activation and the final BN-ReLU are its last two ReLU outputs).
    "preact_resnet18": ("layer4.1.preact", "final"),
    # Paper (App. F.2): "the last three convolution layers"; code (VGG16_cas.py): one module after
    # each conv-BN-ReLU of the 5th stage (chained: each sees the previous one's masked output).
    "vgg16_bn": ("block4.0", "block4.1", "block4.2"),
    # Not in the paper: the last conv stage of the fast test network.
    "smallcnn": ("block2",),
}
# beta per architecture: WRN 2 (App. F.1), VGG16 3 (App. F.2); ResNet-18's is not stated in the
# paper and every official script uses 2, so 2 is the default for every other architecture.
DEFAULT_BETA: dict[str, float] = {"vgg16_bn": 3.0}
FALLBACK_BETA = 2.0

TRAIN_ATTACKS = ("joint", "cas", "ce")


CASConfigError = InsertionPointError  # attach-time configuration errors (one-line user errors)


class CASModule(nn.Module):
    """One CAS module at one insertion point: GAP -> Linear(K, C) -> multiply by a weight row.

    Reads the true labels from the shared context only in training mode; writes its head's
    logits and the applied channel multiplier into `context.aux` under `cas/<point>` and
    `cas/<point>/mask`.
    """

    def __init__(
        self, point: str, channels: int, num_classes: int, context: DefenseContext, *, bias: bool, suppress: bool
    ) -> None:
        super().__init__()
        self.point = point
        self.head = nn.Linear(channels, num_classes, bias=bias)
        self.suppress = suppress
        # Straight-through soft-mask temperature, set only by CAS.soft_mask_gradients (attacks).
        self.soft_temperature: float | None = None
        # A plain attribute, not a submodule: the context is shared state, not part of the weights.
        object.__setattr__(self, "context", context)

    @property
    def logits_key(self) -> str:
        return f"cas/{self.point}"

    @property
    def mask_key(self) -> str:
        return f"cas/{self.point}/mask"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4:
            raise RuntimeError(f"CAS at '{self.point}' expects N x C x H x W features, got {tuple(features.shape)}")
        pooled = features.mean(dim=(2, 3))  # Eq. 2: channel-wise activation f^
        logits = self.head(pooled)  # f^ M (+ bias): the auxiliary classifier
        labels = self.context.labels if self.training else None
        if labels is not None:
            if labels.shape != (features.shape[0],):
                raise RuntimeError(
                    f"CAS at '{self.point}': {tuple(labels.shape)} labels for a batch of {features.shape[0]}"
                )
            mask = self.head.weight[labels]  # training phase: M_y
        else:
            # Test phase (and training without labels): the row of this head's own prediction.
            # argmax is piecewise constant, so no gradient says the row could switch.
            mask = self.head.weight[logits.argmax(1)]
            if self.soft_temperature is not None:
                # Value stays exactly the hard row (soft - soft.detach() is exactly zero); the
                # gradient is that of the softmax-weighted mixture of rows (a BPDA surrogate).
                soft = F.softmax(logits / self.soft_temperature, dim=1) @ self.head.weight
                mask = mask + (soft - soft.detach())
        self.context.aux[self.logits_key] = logits
        self.context.aux[self.mask_key] = mask
        if not self.suppress:
            return features  # Table 2's "without suppressing": a pure auxiliary classifier
        return features * mask[:, :, None, None].to(features.dtype)  # Eq. 3: f (x) M_row


@DEFENSES.register("cas")
class CAS(Defense):
    """CAS (Bai et al. ICLR 2021): aux GAP-FC heads reweight channels by their class weight row; beta*CE per head."""

    citation = (
        "Yang Bai, Yuyuan Zeng, Yong Jiang, Shu-Tao Xia, Xingjun Ma, Yisen Wang. Improving Adversarial "
        "Robustness via Channel-wise Activation Suppressing. ICLR 2021. arXiv:2103.08307. "
        "Code: https://github.com/bymavis/CAS_ICLR2021"
    )

    # The paper's numbers (accuracy in %, one run each). dataset -> arch -> AT method ->
    # {"last": metrics, "best": metrics, "baseline": {"last": ..., "best": ...}, "tables": ...}.
    # "baseline" is the same AT method without CAS, trained and attacked by the authors.
    # The paper's own attacks (the 'adaptive white-box' joint loss, beta 2, PGD-20 step eps/10 (CE and CW margin), plus AA).
    paper_attacks = ("fgsm", "adaptive:mode=joint,weight=2,steps=20,alpha=4/1275", "adaptive:mode=joint,weight=2,loss=margin,steps=20,alpha=4/1275", "aa")

    published: dict[str, Any] = {
        "protocol": {
            "unit": "percent",
            "source": "arXiv:2103.08307v1 Tables 1, 5, 6, 8-13",
            "threat_model": "Linf, eps 8/255 (official code: 0.031 for PGD and CW, 8/255 for FGSM)",
            "samples": "full test set (CIFAR-10: 10,000), single run, no seeds or intervals",
            "model_mode": "eval mode: each CAS module masks by its own head's argmax",
            "attack_target": "joint loss CE(final) + beta * mean_s CE(aux_s), beta = 2 for +CAS models "
                             "(the 'adaptive white-box' attack); baselines: CE on the final logits",
            "fgsm": "code: uniform random start in the eps-ball, then one eps step on the joint loss (FGSM-RS)",
            "pgd20": "20 steps, step eps/10 (code: 0.003 at eps 0.031), uniform random start, last iterate, "
                     "no restarts",
            "cw": "CW-inf = PGD-20 (step 0.003, random start) on the margin loss, kappa 0, plus beta * mean margin "
                  "of the aux heads; last iterate",
            "autoattack": "standard AutoAttack; version, subset and wrapped output not stated "
                          "(presumably final logits)",
            "checkpoints": "'last' = final epoch; 'best' = highest PGD accuracy on the *test* set during training",
            "transfer": "PGD-20 / CW-inf crafted on a naturally trained ResNet-50 (last checkpoint)",
            "nattack": "1,000 random test images, at most 20,000 queries (last checkpoint)",
            "training": "ResNet-18: SGD 0.9, lr 0.1 /10 at epochs 75 and 90, 200 epochs, wd 2e-4, PGD-10 eps 8/255 "
                        "step 2/255 random start; SVHN: lr 0.01, wd 5e-4, step 1/255; WRN-34-10: wd 5e-4, beta 2; "
                        "VGG16: beta 3",
        },
        "cifar10": {
            "resnet18": {
                "pgd_at": {
                    "tables": "5, 10, 11, 1, 6, 4, 12, 13",
                    "last": {"clean": 86.79, "fgsm": 61.23, "pgd20": 48.88, "cw": 53.33, "autoattack": 44.74,
                             "avg_pgd100": 53.20, "eot": 56.47,
                             "transfer_pgd20": 85.80, "transfer_cw": 86.54, "nattack": 83.32,
                             "pgd20_by_eps": {"2/255": 79.15, "4/255": 70.26, "8/255": 48.88,
                                              "16/255": 16.64, "32/255": 2.48}},
                    "best": {"clean": 86.72, "fgsm": 62.92, "pgd20": 54.40, "cw": 62.72, "autoattack": 47.40},
                    # Table 4 (aux heads only, CAS loss; a different checkpoint than Table 5) and
                    # Table 12 (Margin Decomposition attack; checkpoint not stated).
                    "aux_only": {"clean": 84.95, "fgsm": 61.40, "pgd20": 47.99, "cw": 57.79},
                    "md": {"md_cas": 46.27, "md_ce_cas": 49.56},
                    "baseline": {
                        "last": {"clean": 84.27, "fgsm": 60.46, "pgd20": 46.50, "cw": 48.97, "autoattack": 41.90,
                                 "transfer_pgd20": 79.13, "transfer_cw": 79.87, "nattack": 45.05, "md_ce": 43.35},
                        "best": {"clean": 84.20, "fgsm": 63.32, "pgd20": 52.01, "cw": 50.97, "autoattack": 46.58},
                    },
                },
                "trades": {
                    "tables": "5, 10, 11, 6, 4, 12, 13",
                    "last": {"clean": 85.83, "fgsm": 65.21, "pgd20": 55.99, "cw": 67.17, "autoattack": 48.38,
                             "transfer_pgd20": 84.77, "transfer_cw": 85.54, "nattack": 79.42,
                             "pgd20_by_eps": {"2/255": 80.09, "4/255": 72.69, "8/255": 55.99,
                                              "16/255": 27.94, "32/255": 5.10}},
                    "best": {"clean": 84.75, "fgsm": 63.94, "pgd20": 57.20, "cw": 67.77, "autoattack": 48.40},
                    "aux_only": {"clean": 83.84, "fgsm": 64.31, "pgd20": 54.11, "cw": 64.01},
                    "md": {"md_cas": 53.51, "md_ce_cas": 55.53},
                    "baseline": {
                        "last": {"clean": 83.50, "fgsm": 63.68, "pgd20": 52.80, "cw": 50.90, "autoattack": 47.46,
                                 "transfer_pgd20": 78.18, "transfer_cw": 78.95, "nattack": 49.25, "md_ce": 48.47},
                        "best": {"clean": 82.68, "fgsm": 63.15, "pgd20": 53.05, "cw": 50.46, "autoattack": 48.28},
                    },
                },
                "mart": {
                    "tables": "5, 10, 11, 6, 4, 12, 13",
                    "last": {"clean": 86.95, "fgsm": 63.64, "pgd20": 54.37, "cw": 63.16, "autoattack": 46.39,
                             "transfer_pgd20": 85.68, "transfer_cw": 86.59, "nattack": 81.93,
                             "pgd20_by_eps": {"2/255": 81.01, "4/255": 73.56, "8/255": 54.37,
                                              "16/255": 20.49, "32/255": 2.19}},
                    "best": {"clean": 85.99, "fgsm": 64.23, "pgd20": 58.21, "cw": 69.91, "autoattack": 48.45},
                    "aux_only": {"clean": 84.89, "fgsm": 65.14, "pgd20": 54.48, "cw": 66.92},
                    "md": {"md_cas": 49.89, "md_ce_cas": 55.75},
                    "baseline": {
                        "last": {"clean": 82.16, "fgsm": 63.91, "pgd20": 52.67, "cw": 49.44, "autoattack": 45.45,
                                 "transfer_pgd20": 76.93, "transfer_cw": 77.49, "nattack": 49.05, "md_ce": 46.99},
                        "best": {"clean": 78.90, "fgsm": 63.29, "pgd20": 54.92, "cw": 50.31, "autoattack": 47.06},
                    },
                },
                "standard": {
                    "tables": "App. E (text)",
                    "last": {"clean": 94.56},
                    "baseline": {"last": {"clean": 92.75}},
                },
            },
            "wrn34_10": {
                "pgd_at": {
                    "tables": "8",
                    "last": {"clean": 89.06, "fgsm": 66.98, "pgd20": 53.22, "cw": 54.77},
                    "best": {"clean": 88.25, "fgsm": 67.14, "pgd20": 56.28, "cw": 58.54},
                    "baseline": {"last": {"clean": 84.23, "fgsm": 61.27, "pgd20": 49.53, "cw": 47.68},
                                 "best": {"clean": 84.16, "fgsm": 66.62, "pgd20": 53.75, "cw": 50.52}},
                },
                "trades": {
                    "tables": "8",
                    "last": {"clean": 87.15, "fgsm": 66.15, "pgd20": 53.15, "cw": 57.07},
                    "best": {"clean": 87.07, "fgsm": 66.92, "pgd20": 55.43, "cw": 61.46},
                    "baseline": {"last": {"clean": 86.41, "fgsm": 65.63, "pgd20": 52.64, "cw": 52.43},
                                 "best": {"clean": 86.23, "fgsm": 66.41, "pgd20": 54.42, "cw": 53.45}},
                },
                "mart": {
                    "tables": "8",
                    "last": {"clean": 89.20, "fgsm": 67.96, "pgd20": 54.95, "cw": 57.11},
                    "best": {"clean": 87.87, "fgsm": 68.09, "pgd20": 58.24, "cw": 61.48},
                    "baseline": {"last": {"clean": 85.69, "fgsm": 66.41, "pgd20": 54.49, "cw": 52.55},
                                 "best": {"clean": 84.09, "fgsm": 67.24, "pgd20": 57.56, "cw": 54.42}},
                },
            },
            "vgg16_bn": {
                "pgd_at": {
                    "tables": "9",
                    "last": {"clean": 82.61, "fgsm": 57.56, "pgd20": 42.73, "cw": 49.68},
                    "best": {"clean": 82.25, "fgsm": 59.77, "pgd20": 49.22, "cw": 53.03},
                    "baseline": {"last": {"clean": 70.38, "fgsm": 51.85, "pgd20": 42.01, "cw": 43.81},
                                 "best": {"clean": 70.32, "fgsm": 51.87, "pgd20": 42.23, "cw": 43.63}},
                },
                "trades": {
                    "tables": "9",
                    "last": {"clean": 83.25, "fgsm": 61.51, "pgd20": 49.56, "cw": 52.47},
                    "best": {"clean": 83.45, "fgsm": 61.36, "pgd20": 49.86, "cw": 52.60},
                    "baseline": {"last": {"clean": 76.67, "fgsm": 52.99, "pgd20": 41.13, "cw": 45.25},
                                 "best": {"clean": 74.98, "fgsm": 52.10, "pgd20": 41.53, "cw": 45.50}},
                },
                "mart": {
                    "tables": "9",
                    "last": {"clean": 83.28, "fgsm": 61.70, "pgd20": 49.13, "cw": 49.10},
                    "best": {"clean": 81.53, "fgsm": 61.89, "pgd20": 52.01, "cw": 50.97},
                    "baseline": {"last": {"clean": 72.20, "fgsm": 54.90, "pgd20": 46.53, "cw": 44.72},
                                 "best": {"clean": 71.70, "fgsm": 54.72, "pgd20": 46.55, "cw": 44.52}},
                },
            },
        },
        "svhn": {
            "resnet18": {
                "pgd_at": {
                    "tables": "5, 10, 6",
                    "last": {"clean": 90.39, "fgsm": 67.51, "pgd20": 51.98, "cw": 53.53,
                             "transfer_pgd20": 65.50, "transfer_cw": 72.35, "nattack": 75.72},
                    "best": {"clean": 92.69, "fgsm": 71.83, "pgd20": 54.78, "cw": 54.13},
                    "baseline": {"last": {"clean": 89.62, "fgsm": 65.09, "pgd20": 42.55, "cw": 50.96,
                                          "transfer_pgd20": 64.42, "transfer_cw": 70.60, "nattack": 40.36},
                                 "best": {"clean": 91.41, "fgsm": 69.52, "pgd20": 53.07, "cw": 50.38}},
                },
                "trades": {
                    "tables": "5, 10, 6",
                    "last": {"clean": 91.69, "fgsm": 70.97, "pgd20": 55.26, "cw": 60.10,
                             "transfer_pgd20": 68.48, "transfer_cw": 75.66, "nattack": 81.82},
                    "best": {"clean": 91.41, "fgsm": 71.39, "pgd20": 59.32, "cw": 66.94},
                    "baseline": {"last": {"clean": 91.16, "fgsm": 69.85, "pgd20": 50.90, "cw": 50.85,
                                          "transfer_pgd20": 67.81, "transfer_cw": 74.43, "nattack": 44.16},
                                 "best": {"clean": 90.40, "fgsm": 71.22, "pgd20": 57.71, "cw": 54.49}},
                },
                "mart": {
                    "tables": "5, 10, 6",
                    "last": {"clean": 93.05, "fgsm": 70.30, "pgd20": 51.57, "cw": 53.38,
                             "transfer_pgd20": 68.45, "transfer_cw": 75.45, "nattack": 80.12},
                    "best": {"clean": 91.04, "fgsm": 72.32, "pgd20": 60.29, "cw": 57.05},
                    "baseline": {"last": {"clean": 91.16, "fgsm": 67.31, "pgd20": 48.72, "cw": 50.52,
                                          "transfer_pgd20": 66.85, "transfer_cw": 73.90, "nattack": 41.66},
                                 "best": {"clean": 87.37, "fgsm": 68.58, "pgd20": 57.72, "cw": 51.48}},
                },
            },
        },
    }

    def __init__(
        self,
        *,
        beta: float | None = None,
        points: list[str] | str | None = None,
        bias: bool = True,
        suppress: bool = True,
        train_attack: str = "joint",
    ) -> None:
        """
        beta: weight of the mean auxiliary CE (Eq. 5); None = the paper's value for the
            architecture (3 for vgg16_bn, else 2, the official code's value for ResNet-18).
        points: insertion points, one CAS module each; None = the per-architecture default.
        bias: the auxiliary FC layer has a bias, as "a fully-connected layer" (Sec. 4.1) and the
            code's nn.Linear have; false gives Eq. 4's literal softmax(f^ M), without a bias.
        suppress: multiply features by the weight row (the method); false is Table 2's
            "without suppressing" ablation (heads trained, features untouched).
        train_attack: what the AT method's inner PGD maximises: "joint" = Eq. 5 (Algorithm 1,
            and the code since 057fc636), "cas" = the aux CE alone (the code before 2022-07-27),
            "ce" = the final logits' CE only.
        """
        if beta is not None:
            if isinstance(beta, bool) or not isinstance(beta, (int, float, Fraction)):
                raise ValueError(f"beta must be a number, got {beta!r}")
            if not 0 <= float(beta) < float("inf"):
                raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if not isinstance(bias, bool) or not isinstance(suppress, bool):
            raise ValueError("bias and suppress must be true or false")
        if train_attack not in TRAIN_ATTACKS:
            raise ValueError(f"train_attack must be one of {', '.join(TRAIN_ATTACKS)}, got '{train_attack}'")
        self.beta = None if beta is None else float(beta)
        self.points = point_list(points)
        self.bias = bias
        self.suppress = suppress
        self.train_attack = train_attack
        # Filled by attach: the resolved values and the modules, in insertion-point order.
        self.resolved_points: list[str] = []
        self.resolved_beta: float | None = None
        self.modules: list[CASModule] = []

    # -- surgery ------------------------------------------------------------------------
    def attach(self, model: Classifier) -> None:
        """One CAS module per insertion point, sized from the features it will see there."""
        if self.modules:
            raise RuntimeError("this CAS instance is already attached to a model; create one per model")
        available = model.insertion_points()
        points = list(resolve_points(model, self.points, DEFAULT_POINTS, "cas"))
        shapes = model.feature_shapes(points)
        num_classes = model.num_classes
        reference = next(model.parameters(), None)
        for point in points:
            shape = shapes.get(point)
            if shape is None or len(shape) != 3:
                raise CASConfigError(f"CAS needs C x H x W features at '{point}', got {shape}")
            module = CASModule(point, shape[0], num_classes, model.context, bias=self.bias, suppress=self.suppress)
            if reference is not None:
                module.to(device=reference.device, dtype=reference.dtype)
            available[point].attached.append(module)
            self.modules.append(module)
        self.resolved_points = list(points)
        self.resolved_beta = self.beta if self.beta is not None else DEFAULT_BETA.get(model.arch, FALLBACK_BETA)

    # -- losses -------------------------------------------------------------------------
    def head_logits(self, model: Classifier) -> list[torch.Tensor]:
        """The auxiliary heads' logits from the last forward pass, in insertion-point order."""
        if not self.modules:
            raise RuntimeError("CAS is not attached to a model")
        aux = model.aux_outputs()
        missing = [m.logits_key for m in self.modules if m.logits_key not in aux]
        if missing:
            raise RuntimeError(f"CAS outputs {', '.join(missing)} missing: run a forward pass first")
        return [aux[m.logits_key] for m in self.modules]

    def aux_logits(self, model: Classifier) -> dict[str, torch.Tensor]:
        """The S heads' logits of the last forward pass (Eq. 5's CAS term is beta x their mean CE)."""
        return {m.logits_key: logits for m, logits in zip(self.modules, self.head_logits(model))}

    def aux_weight(self) -> float:
        return self._beta()

    def attack_aux_weight(self) -> float | None:
        """Algorithm 1 crafts on Eq. 5 (joint, beta); `train_attack=cas` is the original release's
        CAS-only loss (heads only: inf); `train_attack=ce` the final logits only."""
        if self.train_attack == "ce":
            return None
        return math.inf if self.train_attack == "cas" else self._beta()

    def objective(
        self, model: Classifier, *, target: str = "joint", loss: str = "ce", beta: float | None = None,
        kappa: float = 0.0, heads: Sequence[str] | None = None,
    ) -> Objective:
        """Per-example attack loss over final logits and/or the aux heads, read after each forward.

        target: "joint" = loss(final) + beta * mean_s loss(head_s) (the authors' adaptive attack),
        "aux" = mean_s loss(head_s) (Table 4), "final" = loss(final). loss: "ce" or "margin" (the
        CW margin clamped at kappa, the code's CW-inf with kappa 0). heads: insertion points whose
        heads count (default all), e.g. one head at a time for a per-head attack.
        """
        if target not in ("joint", "aux", "final"):
            raise ValueError(f"target must be joint, aux or final, got '{target}'")
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss must be ce or margin, got '{loss}'")
        weight = self._beta() if beta is None else float(beta)
        chosen = list(self.resolved_points) if heads is None else list(heads)
        unknown = [h for h in chosen if h not in self.resolved_points]
        if unknown or not chosen:
            raise ValueError(f"heads must be among {', '.join(self.resolved_points)}, got {chosen}")
        selected = [self.resolved_points.index(h) for h in chosen]

        def per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return cross_entropy(logits, labels) if loss == "ce" else margin(logits, labels, kappa)

        def evaluate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if target == "final":
                return per_example(logits, labels)
            outputs = self.head_logits(model)
            aux = torch.stack([per_example(outputs[i], labels) for i in selected]).mean(0)
            return aux if target == "aux" else per_example(logits, labels) + weight * aux

        return evaluate

    def _beta(self) -> float:
        if self.resolved_beta is None:
            raise RuntimeError("CAS is not attached to a model")
        return self.resolved_beta

    # -- adaptive attacks ---------------------------------------------------------------
    @contextmanager
    def soft_mask_gradients(self, temperature: float = 1.0) -> Iterator[None]:
        """Inside the block, eval-mode masks keep their hard argmax value but back-propagate as
        softmax(head / T)-weighted mixtures of rows, so an attack sees that the row can switch
        (a BPDA surrogate for the non-differentiable argmax routing the paper never attacked)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        previous = [m.soft_temperature for m in self.modules]
        for module in self.modules:
            module.soft_temperature = float(temperature)
        try:
            yield
        finally:
            for module, value in zip(self.modules, previous):
                module.soft_temperature = value

    @property
    def selects_masks(self) -> bool:
        """Each head's argmax picks its module's channel row; without suppressing no mask is applied."""
        return self.suppress

    def gradient_surrogates(self, model: Classifier | None) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
        """Soft-selection BPDA (straight-through: forward unchanged) at T = 1 and the sharper T = 0.1."""
        if not self.suppress:
            return {}  # the rows never reach the features: nothing to differentiate through
        return {"soft_mask": lambda: self.soft_mask_gradients(1.0), "soft_mask_t0.1": lambda: self.soft_mask_gradients(0.1)}

    def adaptive(self) -> AdaptiveDeclaration:
        points = self.resolved_points or self.points or ["<per-architecture default>"]
        beta = self.resolved_beta if self.resolved_beta is not None else self.beta
        beta_text = "beta (per-architecture default)" if beta is None else f"{beta:g}"
        return AdaptiveDeclaration(
            aux_heads=tuple(f"cas/{p}" for p in points),
            masks=tuple(f"cas/{p}/mask" for p in points),
            joint_loss=(
                f"ce(final, y) + {beta_text} * mean_s ce(cas/<point>_s, y); CW-inf: the same with the "
                "kappa-0 margin on final logits and heads"
            ),
            stochastic=False,
            notes=(
                "Eval-mode masks are the weight row of each head's own argmax: piecewise constant, so "
                "gradients treat the row as fixed and never show it could switch. Attack, and take the "
                "per-example worst case over: final logits only (CE, DLR, AutoAttack), each head and the "
                "head mean (CAS.objective(target='aux', heads=[...]), Table 4), the joint loss (CAS.objective, the "
                "authors' attack, beta 2), a targeted attack driving the first head to a wrong class, "
                "a soft-mask surrogate (CAS.soft_mask_gradients), and a gradient-free attack (Square). "
                "The paper's gains shrink from +4..16 points (CW) to +0.1..2.8 under AutoAttack; "
                "CW above PGD accuracy and NAttack near clean accuracy are gradient-masking red flags."
            ),
        )
