"""CIFS: Channel-wise Importance-based Feature Selection (Yan et al., ICML 2021).

At each insertion point a small *probe* network predicts the class from the features `z`
(a surrogate for the rest of the network). The *relevance* of channel c is the gradient of the
sum of the probe's top-k logits with respect to `z`, summed over the channel's spatial positions
(Eq. 1); the *importance mask* is a monotone non-negative map of the relevances (the paper's
headline IMGF: a softmax over channels, T = 1), and the features leave the point as `z * m`
(Eq. 2). In training mode the top-1 class of the top-k is replaced by the true label; in eval
mode only the probe's own predictions are used, so `model.eval(); model(x)` is label-free.

The probes are trained by the adaptive loss of Eq. 3 (cross-entropy of every probe next to the
final cross-entropy, beta = |I| = 2), and the paper's AT crafts its training examples with the
same joint loss (Eq. 4). See docs/defenses.md (section `cifs`) for the paper-vs-code choices and their options.
"""

from __future__ import annotations

import math
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

# Per-architecture defaults: (insertion points, probe hidden width as a fraction of the channels).
# ResNet-18 is the official code's placement (layer4[0] with an MLP probe 512->128->10, layer4[1]
# with a linear probe). WRN follows the WRN-28-10 file of the code's older commit: inside the last
# block3 unit on the residual branch's pre-activation (MLP 640->240->10), and after the final
# BN+ReLU (linear). The others are our inference, documented in docs/defenses.md (section `cifs`).
DEFAULTS: dict[str, tuple[tuple[str, ...], float]] = {
    "resnet18": (("layer4.0", "layer4.1"), 128 / 512),
    "preact_resnet18": (("layer4.1.preact", "final"), 128 / 512),
    "wrn34_10": (("block3.last.preact", "final"), 240 / 640),
    "wrn28_10": (("block3.last.preact", "final"), 240 / 640),
    "vgg16_bn": (("block4.1", "block4.2"), 128 / 512),
    "smallcnn": (("block1", "block2"), 128 / 512),
}
DEFAULT_HIDDEN_RATIO = 128 / 512

IMGFS = ("softmax", "sigmoid", "softplus")
IMGF_ALPHA = {"sigmoid": 10.0, "softplus": 5.0}  # the paper's §3.3 values
PROBES = ("mlp", "linear")
TRAIN_TOPK = ("replace", "distinct")
MASK_GRAD = ("probe", "full", "constant")
MLP_SOFTPLUS_BETA = 5.0  # the code's probe activation; the paper names no activation



# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------


def _pool(z: torch.Tensor) -> torch.Tensor:
    """Global average pooling of (N, C, ...) features to (N, C)."""
    return z.flatten(2).mean(2) if z.dim() > 2 else z


class LinearProbe(nn.Module):
    """GAP -> Linear(C, K): the paper's probe for the last CIFS layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(_pool(z))


class MLPProbe(nn.Module):
    """GAP -> Linear(C, h) -> Softplus(beta=5) -> Linear(h, K): the penultimate layer's "two-layer MLP".

    Softplus rather than ReLU matters: the relevance is a gradient, and a ReLU probe's gradient is
    piecewise constant in the features, while Softplus keeps it smooth (its derivative is sigmoid(5x)).
    """

    def __init__(self, channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.Softplus(beta=MLP_SOFTPLUS_BETA)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(_pool(z))))


# ----------------------------------------------------------------------------------------------
# The CIFS module placed at one insertion point
# ----------------------------------------------------------------------------------------------


def select_classes(
    logits: torch.Tensor, k: int, labels: torch.Tensor | None, train_topk: str = "replace"
) -> torch.Tensor:
    """Indices (N, k) of the logits whose sum defines the relevance (the paper's y^{l,k}).

    Without labels: the probe's top-k classes. With labels (training mode only), per the paper the
    top-1 index is replaced by the true label and the others are kept; when the label is itself
    among the other top-k classes it is then counted twice, as in the official code ("replace").
    "distinct" instead takes the label plus the k-1 highest-ranked classes other than the label.
    """
    if labels is None:
        return logits.topk(k, dim=1).indices
    labels = labels.view(-1, 1).to(logits.device)
    if train_topk == "replace":
        top = logits.topk(k, dim=1).indices.clone()
        top[:, :1] = labels
        return top
    if k == 1:
        return labels
    others = logits.detach().scatter(1, labels, float("-inf")).topk(k - 1, dim=1).indices
    return torch.cat([labels, others], dim=1)


def importance_mask(relevance: torch.Tensor, imgf: str, temperature: float, alpha: float) -> torch.Tensor:
    """The Importance Mask Generating Function: relevances (N, C) -> non-negative scores (N, C)."""
    if imgf == "softmax":
        return torch.softmax(relevance / temperature, dim=1)
    if imgf == "sigmoid":
        return torch.sigmoid(alpha * relevance)
    return F.softplus(relevance, beta=alpha)  # (1/alpha) log(1 + exp(alpha g))


class CIFSModule(nn.Module):
    """Probe, relevance, mask and channel re-weighting at one insertion point.

    Writes the probe's raw logits and the mask into the model's `DefenseContext.aux` under
    `cifs/<point>/logits` and `cifs/<point>/mask`; reads `context.labels` only in training mode.
    """

    def __init__(
        self,
        point: str,
        probe: nn.Module,
        context: DefenseContext,
        *,
        k: int,
        imgf: str,
        temperature: float,
        alpha: float,
        mask_scale: float,
        train_topk: str,
        mask_grad: str,
    ) -> None:
        super().__init__()
        self.point = point
        self.probe = probe
        # A plain attribute, not a submodule: the context is shared model state, not parameters.
        object.__setattr__(self, "context", context)
        self.k, self.imgf, self.temperature, self.alpha = k, imgf, temperature, alpha
        self.mask_scale, self.train_topk, self.mask_grad = mask_scale, train_topk, mask_grad

    @property
    def logits_key(self) -> str:
        return f"cifs/{self.point}/logits"

    @property
    def mask_key(self) -> str:
        return f"cifs/{self.point}/mask"

    def extra_repr(self) -> str:
        return (f"point={self.point}, k={self.k}, imgf={self.imgf}, temperature={self.temperature}, "
                f"alpha={self.alpha}, mask_scale={self.mask_scale}, mask_grad={self.mask_grad}")

    def _labels(self, batch: int) -> torch.Tensor | None:
        labels = self.context.labels if self.training else None
        if labels is not None and labels.shape[0] != batch:
            raise RuntimeError(
                f"CIFS at {self.point}: {labels.shape[0]} labels for a batch of {batch}; call the model "
                "with labels only on the inputs they belong to"
            )
        return labels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        outer_grad = torch.is_grad_enabled()
        probe_trainable = any(p.requires_grad for p in self.probe.parameters())
        # "full": the mask stays a function of z (hence of the backbone and the input).
        through_z = outer_grad and self.mask_grad == "full" and z.requires_grad
        # Second-order graph only when something upstream can use it (no graph under no_grad,
        # none while a training attack runs with frozen parameters).
        create_graph = outer_grad and (through_z or (self.mask_grad != "constant" and probe_trainable))
        labels = self._labels(z.shape[0])
        with torch.enable_grad():  # the relevance is a gradient even when the caller is under no_grad
            z_in = z if through_z else z.detach().requires_grad_(True)
            logits = self.probe(z_in)
            chosen = select_classes(logits.detach(), self.k, labels, self.train_topk)
            score = logits.gather(1, chosen).sum()
            (gradient,) = torch.autograd.grad(score, z_in, create_graph=create_graph)
        # Eq. 1: the common-perturbation gradient is the feature gradient summed over the channel.
        relevance = gradient.flatten(2).sum(2) if gradient.dim() > 2 else gradient
        mask = importance_mask(relevance, self.imgf, self.temperature, self.alpha) * self.mask_scale
        if not create_graph:
            mask = mask.detach()
        if through_z or not outer_grad:
            raw = logits if outer_grad else logits.detach()
        else:
            # The code's second, non-detached probe pass: the probe CE trains the backbone too.
            raw = self.probe(z)
        self.context.aux[self.logits_key] = raw
        self.context.aux[self.mask_key] = mask
        shape = (*mask.shape, *([1] * (z.dim() - 2)))
        return z * mask.view(shape).to(z.dtype)


# ----------------------------------------------------------------------------------------------
# The defense plugin
# ----------------------------------------------------------------------------------------------


def _as_list(value: list[str] | str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"{what} must be one or more names, got {value!r}")
    return items


@DEFENSES.register("cifs")
class CIFS(Defense):
    """CIFS (Yan et al. ICML 2021): channels reweighted by a softmax of probe top-2 logit gradients.

    Two modules (MLP probe, then linear probe) at the last two blocks by default; the probes are
    trained with the joint loss of Eq. 3 (beta = 2), which the training attack also maximises.
    """

    citation = (
        "Hanshu Yan, Jingfeng Zhang, Gang Niu, Jiashi Feng, Vincent Y. F. Tan, Masashi Sugiyama. "
        "CIFS: Improving Adversarial Robustness of CNNs via Channel-wise Importance-based Feature "
        "Selection. ICML 2021 (PMLR 139). arXiv:2102.05311. Code: github.com/HanshuYAN/CIFS."
    )

    # The paper's numbers (accuracy in %, last epoch unless the key says best), by dataset ->
    # architecture -> AT method. Attacks maximise the joint loss of Eq. 3 with the attacker's
    # beta_atk; each number is the worst over beta_atk in {0, 0.1, 1, 2, 10, 100, inf}.
    # The paper's own attacks (step eps/10, no random start).
    paper_attacks = ("fgsm", "pgd:steps=20,alpha=4/1275,random_start=false", "cw:alpha=4/1275,random_start=false", "pgd:steps=100,alpha=4/1275,random_start=false")

    published: dict[str, Any] = {
        "protocol": {
            "unit": "percent",
            "threat_model": "Linf, eps 8/255 (CIFAR-10, SVHN), 0.3 (FMNIST); white-box, eval mode",
            "attacks": {
                "clean": "natural accuracy, full test set",
                "fgsm": "fgsm (one eps step)",
                "pgd20": "pgd:steps=20,alpha=4/1275,random_start=false (step eps/10, last iterate)",
                "cw": "cw:alpha=4/1275,random_start=false (PGD-30 on CW margin, kappa 50)",
                "pgd100": "pgd:steps=100,alpha=4/1275,random_start=false",
                "aa_custom": "APGD-CE (5 restarts x 100) + Square (5000 queries, CE) with the joint loss, "
                             "2000 images; NOT standard AutoAttack",
            },
            "loss": "joint loss Eq. 3, ce(final)/(1+b) + b/((1+b)|I|) sum ce(probe_i); worst over "
                    "b in {0, 0.1, 1, 2, 10, 100, inf, inf-1, inf-2} per attack (Table B.3)",
            "checkpoint": "last epoch (best-epoch tables select on the test set)",
            "samples": "full 10k test set (AutoAttack: 2000); single run, seed 0",
            "training": {
                "cifar10/resnet18": "PGD-10 eps 8/255 step 2/255 random start, joint loss beta=2 inside "
                                    "and outside; SGD 0.9, wd 2e-4, lr 0.1 x0.1 at 75, 90; 120 epochs; "
                                    "batch 128 (code)",
                "cifar10/wrn28_10": "as resnet18 but 110 epochs, wd 5e-4",
                "svhn/resnet18": "as cifar10 but lr 0.01, wd 5e-4",
                "fashion_mnist/resnet10": "PGD-20 eps 0.3 step 0.02; lr 0.1 x0.1 at 45, 75, 90; wd 2e-4",
            },
        },
        "cifar10": {
            "resnet18": {
                "pgd_at": {"clean": 83.86, "fgsm": 58.86, "pgd20": 51.23, "cw": 50.28, "pgd100": 48.74,
                           "aa_custom": 46.20},
                "pgd_at@best": {"clean": 82.46, "fgsm": 58.98, "pgd20": 51.94, "cw": 51.25, "pgd100": 49.76},
                "fat": {"clean": 86.35, "fgsm": 59.47, "pgd20": 51.68, "cw": 51.84, "pgd100": 49.52},
                "trades": {"clean": 85.20, "fgsm": 54.76, "pgd20": 46.13, "pgd100": 43.65},
            },
            "wrn28_10": {
                "pgd_at": {"clean": 85.56, "fgsm": 61.34, "pgd20": 53.74, "cw": 53.20, "pgd100": 51.51,
                           "aa_custom": 49.75},
                "pgd_at@best": {"clean": 84.67, "fgsm": 61.03, "pgd20": 54.09, "cw": 53.76, "pgd100": 52.03},
                "fat": {"clean": 86.74, "fgsm": 60.67, "pgd20": 51.99, "cw": 52.34, "pgd100": 49.87},
            },
        },
        "svhn": {
            "resnet18": {
                "pgd_at": {"clean": 93.94, "fgsm": 66.24, "pgd20": 52.02, "cw": 50.13, "pgd100": 47.49,
                           "aa_custom": 42.10},
                "pgd_at@best": {"clean": 93.27, "fgsm": 67.36, "pgd20": 52.67, "cw": 50.20, "pgd100": 48.36},
            },
        },
        "fashion_mnist": {
            "resnet10": {
                "pgd_at": {"clean": 83.35, "fgsm": 77.48, "pgd40": 66.59, "pgd100": 65.50},
                "pgd_at@best": {"clean": 83.32, "fgsm": 78.55, "pgd40": 69.05, "pgd100": 67.21},
            },
        },
    }

    def __init__(
        self,
        *,
        points: list[str] | str | None = None,
        probes: list[str] | str | None = None,
        hidden: int | None = None,
        k: int = 2,
        imgf: str = "softmax",
        temperature: float = 1.0,
        alpha: float | None = None,
        mask_scale: float = 1.0,
        beta: float = 2.0,
        attack_beta: float | str | None = None,
        train_topk: str = "replace",
        mask_grad: str = "probe",
    ) -> None:
        """Paper defaults; see docs/defenses.md (section `cifs`) for each option.

        points: insertion points (None: the architecture's default); probes: "mlp"/"linear" per
        point, or one for all (None: linear at the deepest point, MLP elsewhere, as the paper);
        hidden: MLP width (None: the code's width scaled with the channels); k: top-k classes for
        the relevance; imgf/temperature/alpha: the mask function (softmax T=1; sigmoid alpha=10;
        softplus alpha=5); mask_scale: multiplier of the mask (1 = paper and released code, 2 =
        development code); beta: probe-loss weight of Eq. 3; attack_beta: beta of the joint loss
        the training attack maximises (None: beta, Eq. 4; 0: final CE only; "inf": probes only);
        train_topk: label substitution ("replace" = paper and code, "distinct"); mask_grad: what
        the mask is differentiable with respect to ("probe" = code, "constant", "full").
        """
        self.points = point_list(points)
        self.probes = _as_list(probes, "probes")
        if self.probes is not None:
            bad = [p for p in self.probes if p not in PROBES]
            if bad:
                raise ValueError(f"unknown probe {bad[0]!r}; valid: {', '.join(PROBES)}")
            if self.points is not None and len(self.probes) not in (1, len(self.points)):
                raise ValueError(f"give one probe for all points or one per point ({len(self.points)}), "
                                 f"got {len(self.probes)}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if imgf not in IMGFS:
            raise ValueError(f"unknown imgf {imgf!r}; valid: {', '.join(IMGFS)}")
        if train_topk not in TRAIN_TOPK:
            raise ValueError(f"unknown train_topk {train_topk!r}; valid: {', '.join(TRAIN_TOPK)}")
        if mask_grad not in MASK_GRAD:
            raise ValueError(f"unknown mask_grad {mask_grad!r}; valid: {', '.join(MASK_GRAD)}")
        self.hidden = hidden
        self.k = k
        self.imgf = imgf
        self.temperature = number("temperature", temperature, above=0)
        self.alpha = number("alpha", alpha, above=0) if alpha is not None else None
        self.mask_scale = number("mask_scale", mask_scale, above=0)
        self.beta = number("beta", beta, above=0)
        self.attack_beta = self._parse_attack_beta(attack_beta)
        self.train_topk = train_topk
        self.mask_grad = mask_grad
        self._attached: list[str] = []  # resolved points after attach, in network order

    @staticmethod
    def _parse_attack_beta(value: float | str | None) -> float | None:
        if value is None:
            return None
        if isinstance(value, str) and value.lower() in ("inf", "infinity"):
            return math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
            raise ValueError(f"attack_beta must be a number >= 0 or 'inf', got {value!r}")
        return float(value)

    # -- surgery ---------------------------------------------------------------------------
    def resolve_points(self, model: Classifier) -> list[str]:
        """The insertion points for `model`: the user's, else the architecture's default."""
        defaults = {arch: points for arch, (points, *_rest) in DEFAULTS.items()}
        return list(resolve_points(model, self.points, defaults, "cifs"))

    def attach(self, model: Classifier) -> None:
        """Put one CIFS module (probe + mask) at each insertion point, sized from the features."""
        names = self.resolve_points(model)
        taps = model.insertion_points()

        # One eval forward gives the shapes and the network order of the points.
        order: list[str] = []
        hooks = [taps[n].register_forward_hook(lambda *_a, n=n: order.append(n) if n not in order else None)
                 for n in names]
        try:
            shapes = model.feature_shapes(names)
        finally:
            for hook in hooks:
                hook.remove()
        num_classes = model.num_classes
        if self.k > num_classes:
            raise InsertionPointError(f"k={self.k} exceeds the {num_classes} classes")
        probes = self._probe_kinds(names, order)
        ratio = DEFAULTS.get(model.arch, ((), DEFAULT_HIDDEN_RATIO))[1]
        alpha = self.alpha if self.alpha is not None else IMGF_ALPHA.get(self.imgf, 1.0)
        reference = next(iter(model.parameters()), None)
        for name in order:
            channels = shapes[name][0]
            if probes[name] == "linear":
                probe: nn.Module = LinearProbe(channels, num_classes)
            else:
                hidden = self.hidden or max(num_classes, round(channels * ratio))
                probe = MLPProbe(channels, hidden, num_classes)
            module = CIFSModule(
                name, probe, model.context, k=self.k, imgf=self.imgf, temperature=self.temperature,
                alpha=alpha, mask_scale=self.mask_scale, train_topk=self.train_topk, mask_grad=self.mask_grad,
            )
            if reference is not None:
                module.to(reference.device)
            module.train(model.training)
            taps[name].attached.append(module)
        self._attached = order

    def _probe_kinds(self, names: list[str], order: list[str]) -> dict[str, str]:
        """Probe kind per point: the paper's rule is linear at the deepest point, MLP before it."""
        if self.probes is None:
            return {n: ("linear" if n == order[-1] else "mlp") for n in names}
        if len(self.probes) == 1:
            return {n: self.probes[0] for n in names}
        if len(self.probes) != len(names):
            raise InsertionPointError(f"{len(self.probes)} probes for {len(names)} insertion points")
        return dict(zip(names, self.probes))  # in the order the user listed the points

    @staticmethod
    def modules_of(model: Classifier) -> list[CIFSModule]:
        """The CIFS modules attached to `model`, in network order."""
        return [m for m in model.modules() if isinstance(m, CIFSModule)]

    # -- losses ----------------------------------------------------------------------------
    def probe_logits(self, model: Classifier) -> list[torch.Tensor]:
        """Raw probe logits of the last forward pass, in network order."""
        aux = model.aux_outputs()
        heads = []
        for module in self.modules_of(model):
            if module.logits_key not in aux:
                raise RuntimeError(f"no CIFS output at {module.point}: run a forward pass before the loss")
            heads.append(aux[module.logits_key])
        return heads

    def aux_logits(self, model: Classifier) -> dict[str, torch.Tensor]:
        """Raw probe logits of the last forward pass by aux key. Eq. 3's probe term is
        (beta/|I|) sum_i CE(probe_i, y) = beta x their mean CE, relative to a final CE of weight 1:
        the total is (1+beta) x Eq. 3 (the paper's relative weights, exactly the official code's
        loss at beta = 2)."""
        return {m.logits_key: logits for m, logits in zip(self.modules_of(model), self.probe_logits(model))}

    def aux_weight(self) -> float:
        return self.beta

    def attack_aux_weight(self) -> float | None:
        """Eq. 4: the training attack maximises the same joint loss (attack_beta, default beta;
        inf = probe terms only). Sign-gradient PGD is unaffected by Eq. 3's 1/(1+beta) scale."""
        beta_atk = self.beta if self.attack_beta is None else self.attack_beta
        return None if beta_atk == 0 else beta_atk

    def joint_objective(
        self, model: Classifier, beta_atk: float, heads: list[int] | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per-example Eq. 3 loss with the attacker's beta (inf: probe terms only).

        `heads` restricts the probe terms to those indices (network order), e.g. [0] is the
        paper's "inf-1" attack on the first CIFS layer alone.
        """

        def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            probes = self.probe_logits(model)
            if heads is not None:
                probes = [probes[i] for i in heads]
            final = F.cross_entropy(logits.float(), labels, reduction="none")
            if beta_atk == 0 or not probes:
                return final
            probe_term = sum(F.cross_entropy(p.float(), labels, reduction="none") for p in probes)
            if math.isinf(beta_atk):
                return probe_term / len(probes)
            return final / (1 + beta_atk) + beta_atk / ((1 + beta_atk) * len(probes)) * probe_term

        return objective

    # -- adaptive attacks ------------------------------------------------------------------
    @property
    def mask_detached(self) -> bool:
        """True when attack gradients treat the mask as constant in the input (the code's default)."""
        return self.mask_grad != "full"

    @contextmanager
    def undetached_masks(self, model: Classifier) -> Iterator[None]:
        """Within the block, masks are recomputed differentiably in the features (hence the input),
        so an adaptive attack's gradient includes the mask's dependence the default path drops."""
        modules = self.modules_of(model)
        previous = [m.mask_grad for m in modules]
        for m in modules:
            m.mask_grad = "full"
        try:
            yield
        finally:
            for m, mode in zip(modules, previous):
                m.mask_grad = mode

    def gradient_surrogates(self, model: Classifier | None) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
        """The un-detached mask recomputation (menu A6), only where the masks are detached."""
        if not self.mask_detached:
            return {}  # mask_grad=full: the ordinary gradient already includes the mask's dependence
        return {"undetached": lambda: self.undetached_masks(model)}

    def adaptive(self) -> AdaptiveDeclaration:
        points = self._attached or self.points or []
        return AdaptiveDeclaration(
            aux_heads=tuple(f"cifs/{p}/logits" for p in points),
            masks=tuple(f"cifs/{p}/mask" for p in points),
            joint_loss=(
                "ce(final)/(1+b) + b/((1+b)*|I|) * sum_i ce(aux_heads[i]); authors attack with "
                "b in {0, 0.1, 1, 2, 10, 100, inf} plus each head alone (inf-i) and report the worst "
                "(CIFS.joint_objective(model, b, heads))"
            ),
            stochastic=False,
            notes=(
                f"mask_detached={self.mask_detached}: with mask_grad='{self.mask_grad}' the relevance is "
                "computed on detached features, so input gradients ignore the mask's dependence on x "
                "(exact a.e. for a linear probe, a dropped real term for the MLP probe). Recompute the "
                "masks un-detached with CIFS.undetached_masks(model). The masks switch with the probe's "
                "top-k classes (piecewise in x): also try BPDA/straight-through over the class choice, "
                "random starts, restarts, standard AutoAttack, and transfer from the undefended model."
            ),
        )
