"""Loss forms of the AT methods, as functions of logits, and their composition with defense heads.

Every function here sees only logits and labels, never a defense or a model by name: an AT method
applies one *form* (TRADES' CE + beta x KL, MART's boosted CE + lambda x weighted KL) to the final
logits and, through `with_heads`, the same form to each auxiliary head a defense exposes
(`Defense.aux_logits`), weighted by the defense's `aux_weight()`. That is the composition of the
CAS paper's Table 7 and the EWAS paper's Table 1, written once for every defense.

Reductions follow the reference code: TRADES' and MART's KL terms are summed over classes and
over the batch and divided by the batch size, i.e. a per-example sum over classes then a batch
mean; cross-entropies are batch means. Everything is computed in float32, so fp16 logits under
CUDA autocast cannot overflow the exponentials.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

# MART's constants (Wang et al. 2020, official code): the boosted CE's margin term uses
# -log(1.0001 - max wrong prob + 1e-12), the KL weight is (1.0000001 - p_y). The small offsets keep
# both terms finite and non-zero when a probability reaches 1.
MART_BOOST_OFFSET = 1.0001
MART_LOG_FLOOR = 1e-12
MART_KL_OFFSET = 1.0000001

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-example loss
PairForm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (natural, adversarial) -> scalar


def kl_per_example(natural: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    """KL(p(x) || p(x')) per example, summed over classes.

    Both sides are differentiable, as in the reference code's outer loss; log-softmax keeps a
    class whose natural probability underflows to 0 at a contribution of exactly 0.
    """
    log_p = F.log_softmax(natural.float(), dim=1)
    log_q = F.log_softmax(adversarial.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def true_class_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_y: the softmax probability of each example's true class."""
    return F.softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)


def boosted_ce_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MART's BCE: CE(p, y) - log(1.0001 - max_{k != y} p_k), per example.

    The second term pushes down the most probable wrong class, which plain CE only does through
    the normaliser; the true class is excluded by masking it out of the max.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=1)
    wrong = probs.masked_fill(F.one_hot(labels, probs.shape[1]).bool(), float("-inf")).amax(1)
    margin = -torch.log(MART_BOOST_OFFSET - wrong + MART_LOG_FLOOR)
    return F.cross_entropy(logits, labels, reduction="none") + margin


def trades_form(natural: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES' outer loss on one classifier: CE(h(x), y) + beta x KL(h(x) || h(x')) (batch means)."""
    natural_ce = F.cross_entropy(natural.float(), labels)
    return natural_ce + beta * kl_per_example(natural, adversarial).mean()


def mart_form(
    natural: torch.Tensor,
    adversarial: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    kl_weight_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """MART's outer loss on one classifier: BCE(h(x'), y) + lam x KL(h(x) || h(x')) x (1 - p_y).

    p_y is this classifier's natural probability of the true class, unless `kl_weight_logits`
    names another classifier's natural logits (the official MART+CAS code weights every head by
    the final classifier's p_y). The weight is not detached, as in the reference code.
    """
    weight_from = natural if kl_weight_logits is None else kl_weight_logits
    weight = MART_KL_OFFSET - true_class_probability(weight_from, labels)
    robust = (kl_per_example(natural, adversarial) * weight).mean()
    return boosted_ce_per_example(adversarial, labels).mean() + lam * robust


def with_heads(
    main: torch.Tensor,
    natural_heads: Mapping[str, torch.Tensor],
    adversarial_heads: Mapping[str, torch.Tensor],
    weight: float,
    form: PairForm,
) -> torch.Tensor:
    """main + weight x mean over heads of form(head(x), head(x')): one loss form for every head.

    Heads are matched by their aux key; a defense without heads (or with weight 0) adds nothing.
    """
    if not natural_heads or not weight:
        return main
    missing = set(natural_heads) ^ set(adversarial_heads)
    if missing:
        raise RuntimeError(f"auxiliary heads differ between the two forward passes: {', '.join(sorted(missing))}")
    terms = [form(natural_heads[key], adversarial_heads[key]) for key in natural_heads]
    return main + weight * torch.stack(terms).mean()


def kl_attack_objective(
    natural_logits: torch.Tensor,
    natural_heads: Mapping[str, torch.Tensor],
    read_heads: Callable[[], Mapping[str, torch.Tensor]],
    head_weight: float | None,
) -> Objective:
    """TRADES' inner objective: per-example KL(p(x) || p(x')) on the final logits, plus
    head_weight x the mean head KL (None/0: final only; inf: heads only).

    `read_heads` returns the heads of the forward pass that produced the logits being scored (the
    defense's `aux_logits`), so it must be called right after that forward, as PGD does. The
    natural side is a fixed target here, as in the reference code (its gradient does not reach x').
    """
    use_heads = bool(head_weight) and bool(natural_heads)

    def objective(logits: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        main = kl_per_example(natural_logits, logits)
        if not use_heads:
            return main
        heads = read_heads()
        head_kl = torch.stack([kl_per_example(natural_heads[k], heads[k]) for k in natural_heads]).mean(0)
        return head_kl if math.isinf(head_weight) else main + head_weight * head_kl

    return objective


def cross_entropy_objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example CE on the final logits: the inner objective of PGD-AT, MART and FAT."""
    return F.cross_entropy(logits.float(), labels, reduction="none")
