"""Channel-wise activation statistics, natural vs adversarial (the CAS paper's Sec. 3 analysis).

Bai et al. (ICLR 2021, "CAS") observe at the penultimate layer that adversarial inputs (1) raise
channel activation *magnitudes* and (2) activate channels more *uniformly* than natural inputs
of the same class. This module measures both for any advdef classifier at a named insertion
point; `advdef.report.plots.plot_channels` draws the paper's two figures. Section references
(§) are to the CAS digest, `shared/seeds/digests/cas.md`.

Definitions (per sample i and channel k of the feature map f at the tap, N x K x H x W):

- **channel activation** a[i,k] = mean over the H x W positions of |f[i,k]| (§5.1 step 4: the
  paper global-average-pools f). The paper's features are post-ReLU, where |f| = f and this is
  exactly its GAP; for signed features (e.g. captured after CAS's signed mask) the absolute
  value keeps it a magnitude instead of letting signs cancel. Feature maps without spatial
  dimensions (N x K) are used as they are.
- **activated**: a[i,k] > tau * max_k' a[i,k'], with tau = 1% by default — the paper's dynamic,
  per-image threshold relative to the image's strongest channel (§5.1 step 5; the official code
  agrees; App. F.6's "1% of the maximum activation count" contradicts both and is not offered).
  An image whose activations are all zero activates no channel.
- **frequency** F[k] = fraction of the n samples in which channel k is activated (§5.2). The
  paper plots the count ("Number of Activation", out of 1,000 class-0 images); the fraction is
  the count divided by n, comparable across sample sizes.
- **magnitude** (§5.3), by `magnitude=`:
  - `"mean"` (default): the true mean of a[i,k] over all n samples — what the Fig. 1 caption
    describes ("averaged ... for natural and adversarial test examples");
  - `"activated"`: the true mean of a[i,k] over the samples in which channel k is activated
    (0 for a channel never activated) — the quantity the paper's code aims at;
  - `"paper"`: the official code's computation, reproduced: per batch, the sum of a[i,k] over
    *all* the batch's samples divided by the number of samples activating k (left at 0 when the
    sum is 0), combined across batches by the running pairwise average m <- (m + m_batch) / 2,
    which weighs later batches more. Where the code divides a nonzero sum by a zero count (inf),
    the batch value is 0 here instead. Batches are `batch_size` consecutive samples of the set
    analysed (the code's are 128 test images before it keeps class 0).

What the paper's analysis fixes and where this module lets you choose (§5.1):

- **samples**: the paper uses the 1,000 CIFAR-10 test images of class 0 only; the default here
  is every given sample (the evaluation's class-balanced subset in `analyze_run_channels`), and
  `class_id=0` reproduces the paper's choice.
- **adversarial inputs**: white-box PGD-20 at eps 8/255 against the same model in eval mode
  (step 0.003, random start, last iterate, CE loss). The default here is advdef's `pgd20`
  (step 2/255, best iterate kept); `pgd:steps=20,alpha=3/1000` gives the paper's step. For a
  CAS model the paper's analysis code attacks the joint loss CE(final) + 2 * mean CE(aux), i.e.
  an adaptive attack in advdef's terms; pass one as `attack` to reproduce that.
- **capture point**: the paper hooks the baseline's `layer4` output and, for CAS models, the
  last block's ReLU *before* the CAS mask. `capture="input"` (default) records what enters the
  tap — the backbone's features before any defense module attached there — which is the paper's
  choice for CAS and identical to the output for an undefended model; `capture="output"` records
  the features after the defense modules (e.g. the masked tensor).

Everything runs with the model in eval mode under `torch.no_grad()`, except the attack, which
gets the same label-free `LogitsView` the evaluation uses (and the same per-batch seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd
import torch

from advdef.attacks.base import AttackContext, check_budget, eval_mode
from advdef.attacks.pgd import EIGHT_255
from advdef.errors import UserError, suggest
from advdef.specs import format_value, parse_eps

MAGNITUDES = ("mean", "activated", "paper")
CAPTURES = ("input", "output")
DEFAULT_TAU = 0.01


@dataclass
class ChannelStats:
    """Per-channel activation statistics of natural and adversarial inputs at one layer.

    Arrays have one entry per channel, in the model's channel order. Frequencies are fractions
    of `n`; magnitudes are in the feature map's units (mean absolute activation, see the module
    docstring for `magnitude_rule`).
    """

    layer: str
    channels: int
    natural_magnitude: np.ndarray
    adversarial_magnitude: np.ndarray
    natural_frequency: np.ndarray
    adversarial_frequency: np.ndarray
    n: int
    attack: str  # canonical attack spec
    eps: str  # exact fraction, e.g. "8/255"
    tau: float
    threshold: str  # the activation rule in words
    magnitude_rule: str  # one of MAGNITUDES
    capture: str = "input"
    class_id: int | None = None
    natural_accuracy: float | None = None  # on the analysed samples
    adversarial_accuracy: float | None = None
    run_id: str | None = None
    epoch: int | None = None
    dataset: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("natural_magnitude", "adversarial_magnitude", "natural_frequency", "adversarial_frequency"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            if values.shape != (self.channels,):
                raise ValueError(f"{name} has shape {values.shape}, expected ({self.channels},)")
            setattr(self, name, values)

    @property
    def mean_magnitude(self) -> tuple[float, float]:
        """(natural, adversarial) magnitude averaged over channels."""
        return float(self.natural_magnitude.mean()), float(self.adversarial_magnitude.mean())

    def to_frame(self) -> pd.DataFrame:
        """One row per channel; the provenance (layer, attack, eps, n, rules) repeats in each row so
        a CSV of it stands alone."""
        frame = pd.DataFrame(
            {
                "channel": np.arange(self.channels),
                "natural_magnitude": self.natural_magnitude,
                "adversarial_magnitude": self.adversarial_magnitude,
                "natural_frequency": self.natural_frequency,
                "adversarial_frequency": self.adversarial_frequency,
            }
        )
        meta = {
            "layer": self.layer, "capture": self.capture, "n": self.n, "class_id": self.class_id,
            "attack": self.attack, "eps": self.eps, "tau": self.tau, "magnitude_rule": self.magnitude_rule,
            "run_id": self.run_id, "epoch": self.epoch,
        }
        for key, value in meta.items():
            frame[key] = value
        return frame


def channel_activations(features: torch.Tensor) -> torch.Tensor:
    """a[i,k]: mean |f| over the spatial positions of each channel (N x K float32)."""
    features = features.detach().float().abs()
    if features.dim() == 2:
        return features
    if features.dim() < 2:
        raise ValueError(f"expected features of shape N x K (x spatial), got {tuple(features.shape)}")
    return features.flatten(2).mean(2)


def activated(activations: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's per-image relative threshold: a[i,k] > tau * max_k' a[i,k'] (N x K bool)."""
    return activations > tau * activations.max(dim=1, keepdim=True).values


def summarize_activations(batches: list[torch.Tensor], tau: float, magnitude: str) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude, frequency) per channel from per-batch activation matrices (see module docstring)."""
    if magnitude not in MAGNITUDES:
        raise UserError(f"unknown magnitude rule '{magnitude}'; valid: {', '.join(MAGNITUDES)}")
    batches = [b.double().cpu() for b in batches if len(b)]
    if not batches:
        raise UserError("no samples to analyse")
    everything = torch.cat(batches)
    on = activated(everything, tau)
    frequency = on.double().mean(0)
    if magnitude == "mean":
        values = everything.mean(0)
    elif magnitude == "activated":
        count = on.sum(0)
        total = (everything * on).sum(0)
        values = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    else:  # "paper": the official code's per-batch ratio and running pairwise average
        values = None
        for batch in batches:
            count = activated(batch, tau).sum(0)
            total = batch.sum(0)
            ratio = torch.where((total != 0) & (count > 0), total / count.clamp(min=1), torch.zeros_like(total))
            values = ratio if values is None else (values + ratio) / 2
    return values.numpy(), frequency.numpy()


def unknown_layer(name: str, valid: list[str]) -> UserError:
    """An unknown-layer error naming close matches (if any) and every valid insertion point."""
    message = str(suggest(name, valid, "layer"))
    if "valid:" not in message:  # suggest named only the close matches
        message += " valid: " + ", ".join(valid)
    return UserError(message)


def resolve_tap(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    points = model.insertion_points()
    if layer not in points:
        raise unknown_layer(layer, list(points))
    return points[layer]


def make_attack(attack: Any, eps: Fraction | str | None) -> Any:
    """An attack instance from a spec string (eps from the argument: specs may not set it) or as given."""
    if not isinstance(attack, str):
        return attack
    from advdef.registry import ATTACKS

    if "eps" in ATTACKS.parse(attack)[1].params:
        raise UserError(f"attack '{attack}' sets eps; give the budget with --eps / eps=")
    return ATTACKS.create(attack, eps=parse_eps(eps if eps is not None else EIGHT_255))


def _spec_of(attack: Any) -> str:
    spec = getattr(attack, "spec", None)
    return spec() if callable(spec) else repr(attack)


class _Recorder:
    """Forward hook on a Tap: records channel activations of one forward while `active`."""

    def __init__(self, capture: str) -> None:
        self.capture = capture
        self.active = False
        self.batch: torch.Tensor | None = None

    def __call__(self, _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.active:
            return
        if self.batch is not None:
            raise RuntimeError("the insertion point ran twice in one forward pass; cannot attribute its features")
        features = inputs[0] if self.capture == "input" else output
        self.batch = channel_activations(features).cpu()

    def take(self) -> torch.Tensor:
        if self.batch is None:
            raise RuntimeError("the insertion point did not run in the forward pass")
        batch, self.batch = self.batch, None
        return batch


def channel_statistics(
    model: torch.nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Any,
    *,
    eps: Fraction | str | None = None,
    tau: float = DEFAULT_TAU,
    magnitude: str = "mean",
    capture: str = "input",
    class_id: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    sample_ids: torch.Tensor | None = None,
    context: AttackContext | None = None,
) -> ChannelStats:
    """Channel statistics of `model` at insertion point `layer` on natural inputs `x` (in [0,1])
    with labels `y`, and on their adversarial counterparts crafted by `attack`.

    `attack` is an advdef attack (or a spec string, built with `eps`, default 8/255); it is
    called like the evaluation calls it, `attack(view, x, y, seed=...)` on the eval-mode,
    label-free view, with per-batch seeds derived from `seed` and `sample_ids` (default: the
    positions in `x`). `context` is bound to the attack first (adaptive and transfer attacks
    need it; default: the model alone). `class_id` keeps only the samples of that class (the
    paper analyses class 0). Statistics are defined in the module docstring.
    """
    from advdef.evaluation.engine import CLEAN, batch_seed, seeded_model_rng

    if magnitude not in MAGNITUDES:
        raise UserError(f"unknown magnitude rule '{magnitude}'; valid: {', '.join(MAGNITUDES)}")
    if capture not in CAPTURES:
        raise UserError(f"unknown capture point '{capture}'; valid: {', '.join(CAPTURES)}")
    if not 0 <= tau < 1:
        raise UserError(f"tau must be in [0, 1), got {tau}")
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    tap = resolve_tap(model, layer)
    attack = make_attack(attack, eps)
    spec = _spec_of(attack)
    budget = Fraction(getattr(attack, "eps", parse_eps(eps if eps is not None else EIGHT_255)))
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    ids = torch.arange(len(y)) if sample_ids is None else torch.as_tensor(sample_ids)
    if class_id is not None:
        keep = torch.nonzero(y.cpu() == class_id).flatten()
        if not len(keep):
            raise UserError(f"no samples of class {class_id} to analyse")
        x, y, ids = x[keep.to(x.device)], y[keep.to(y.device)], ids[keep]
    if not len(y):
        raise UserError("no samples to analyse")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    recorder = _Recorder(capture)
    handle = tap.register_forward_hook(recorder)
    natural: list[torch.Tensor] = []
    adversarial: list[torch.Tensor] = []
    correct_natural = correct_adversarial = 0
    try:
        with eval_mode(model) as view:
            if hasattr(attack, "bind"):
                attack.bind(context or AttackContext(model=model, defense=None, run={}, device=device))
            for start in range(0, len(y), batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                first = int(ids[start])
                with torch.no_grad(), seeded_model_rng(seed, CLEAN, first):
                    recorder.active = True
                    logits = view(xb)
                    recorder.active = False
                natural.append(recorder.take())
                correct_natural += int((logits.argmax(1) == yb).sum())
                with seeded_model_rng(seed, spec, first):
                    x_adv = attack(view, xb, yb, seed=batch_seed(seed, spec, first))
                    check_budget(xb, x_adv, float(budget))
                    with torch.no_grad():
                        recorder.active = True
                        logits = view(x_adv)
                        recorder.active = False
                adversarial.append(recorder.take())
                correct_adversarial += int((logits.argmax(1) == yb).sum())
    finally:
        recorder.active = False
        handle.remove()

    natural_magnitude, natural_frequency = summarize_activations(natural, tau, magnitude)
    adversarial_magnitude, adversarial_frequency = summarize_activations(adversarial, tau, magnitude)
    n = len(y)
    return ChannelStats(
        layer=layer,
        channels=int(natural[0].shape[1]),
        natural_magnitude=natural_magnitude,
        adversarial_magnitude=adversarial_magnitude,
        natural_frequency=natural_frequency,
        adversarial_frequency=adversarial_frequency,
        n=n,
        attack=spec,
        eps=format_value(budget),
        tau=float(tau),
        threshold=f"a[i,k] > {tau:g} * max_k' a[i,k'] (per image; a = spatial mean of |f|)",
        magnitude_rule=magnitude,
        capture=capture,
        class_id=class_id,
        natural_accuracy=correct_natural / n,
        adversarial_accuracy=correct_adversarial / n,
    )


def analyze_run_channels(
    store: Any,
    run_id: str,
    layer: str,
    n: int | None = 500,
    attack: str = "pgd20",
    eps: Fraction | str | None = None,
    seed: int = 0,
    device: str = "auto",
    *,
    tau: float = DEFAULT_TAU,
    magnitude: str = "mean",
    capture: str = "input",
    class_id: int | None = None,
    batch_size: int = 128,
    epoch: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
    limit_test: int | None = None,
) -> ChannelStats:
    """`channel_statistics` for a stored run: its selected checkpoint (or `epoch`) on the test
    samples an evaluation with the same n and seed uses (seeded, class-balanced), attacked at
    `eps` (default 8/255).

    With `class_id`, the samples are n seeded ones of that class instead (the paper: class 0).
    """
    from advdef.evaluation.engine import EvalConfig, load_target, select_samples

    budget = parse_eps(eps if eps is not None else EIGHT_255)
    built_attack = make_attack(attack, budget)  # bad specs fail before the model loads
    if magnitude not in MAGNITUDES:
        raise UserError(f"unknown magnitude rule '{magnitude}'; valid: {', '.join(MAGNITUDES)}")
    if n is not None and n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    config = EvalConfig(
        attacks=[attack], eps=budget, n=None if class_id is not None else n, seed=seed, batch_size=batch_size,
        limit_test=limit_test, data_dir=data_dir, download=download, device=device, epoch=epoch, checks=False,
    )
    target = load_target(store, run_id, config)
    resolve_tap(target.model, layer)  # unknown layer: fail before attacking
    samples = target.samples
    if class_id is not None:
        of_class = torch.nonzero(samples.labels == class_id).flatten()
        if not len(of_class):
            raise UserError(f"the test split has no samples of class {class_id}")
        samples = select_samples(samples.subset(of_class), n, seed)
    context = AttackContext(model=target.model, defense=target.defense, run=target.run, device=target.device,
                            store=store)
    stats = channel_statistics(
        target.model, layer, samples.float_images(), samples.labels, built_attack, tau=tau, magnitude=magnitude,
        capture=capture, batch_size=batch_size, seed=seed, sample_ids=samples.ids, context=context,
    )
    stats.class_id = class_id
    stats.run_id = run_id
    stats.epoch = target.protocol["epoch"]
    stats.dataset = target.protocol["dataset"]
    stats.extras["sample_hash"] = samples.ids_hash()
    return stats
