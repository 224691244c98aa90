"""Inner maximisation of the AT methods: the crafting context, start points and FAT's ascent.

Fixed-length ascents (PGD-AT, TRADES, MART) run `advdef.attacks.pgd.pgd_attack` with
`track_best=False`, from the start point chosen here; FAT stops each example early, which that
function does not offer, so its loop lives here and shares the projection. Noise comes from the
trainer's per-epoch generator, so resumed runs repeat exactly, and is drawn per example through
`example_noise`, so data-parallel ranks together draw what one process would (see
`advdef.training.distributed.BatchShare`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from advdef.attacks.pgd import project
from advdef.models.base import Classifier
from advdef.training.distributed import current_share

BN_MODES = ("train", "eval")
STARTS = ("normal", "uniform", "none")
NORMAL_START_SCALE = 0.001  # TRADES/MART reference code: x + 0.001 * N(0, 1)

# (inputs, labels) -> logits of one forward pass; labels reach the defense only in train mode.
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def crafting(model: Classifier, bn_mode: str) -> Iterator[Forward]:
    """Model in `bn_mode` with frozen parameters for the block; back in train mode afterwards.

    Yields `forward(x, y)`: in train mode it passes the labels to the defense (as the papers'
    training code does), in eval mode it cannot, so the defense predicts them itself. Freezing the
    parameters means the ascent computes input gradients only; the forwards are marked as the
    "attack" phase on the "adversarial" route (see `Classifier.phase` and `Classifier.route`).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got '{bn_mode}'")
    model.train(bn_mode == "train")
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with model.phase("attack"), model.route("adversarial"):
            yield lambda x, y: labelled_forward(model, x, y)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
        model.train()


def labelled_forward(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """model(x), with the labels visible to the defense exactly when the model is in train mode."""
    if model.training:
        with model.labels(y):
            return model(x)
    return model(x)


def start_point(x: torch.Tensor, start: str, eps: float, generator: torch.Generator) -> torch.Tensor:
    """The ascent's first iterate, in [0, 1]: x + 0.001 N(0,1) ("normal", TRADES/MART), x + U(-eps,
    eps) ("uniform", Madry/FAT) or x itself ("none")."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got '{start}'")
    if start == "none":
        return x.detach().clone()
    if start == "normal":
        noise = NORMAL_START_SCALE * example_noise("normal", x.shape, generator)
    else:
        noise = (2 * example_noise("uniform", x.shape, generator) - 1) * eps
    return (x.detach() + noise.to(x.device, x.dtype)).clamp(0, 1)


def example_noise(
    kind: str, shape: torch.Size | tuple[int, ...], generator: torch.Generator, place: tuple[int, int] | None = None
) -> torch.Tensor:
    """N(0,1) ("normal") or U[0,1) ("uniform") noise, one row per example of this process's batch.

    Under data parallelism (`advdef.training.distributed.sharing`) the rows held here are a share
    of a global batch: the noise is drawn for every row of it and this share's rows are kept, so
    the ranks' rows together are exactly the single-process draw. `place` = (rows on lower ranks,
    rows on all ranks) for a draw over a subset of the batch (`BatchShare.place`); by default the
    draw covers the whole batch. Outside the trainer it is a plain draw of `shape`.
    """
    if kind not in ("normal", "uniform"):
        raise ValueError(f"noise kind must be 'normal' or 'uniform', got {kind!r}")
    share = current_share()
    rows = shape[0]
    if place is not None:
        offset, total = place
    elif share is not None:
        if rows != share.size:
            raise ValueError(f"a batch-wide draw needs this process's {share.size} rows, got {rows}")
        offset, total = share.offset, share.total
    else:
        offset, total = 0, rows
    draw = torch.randn if kind == "normal" else torch.rand
    noise = draw((total, *shape[1:]), generator=generator)
    return noise if total == rows else noise[offset : offset + rows]


def running_place(count: int) -> tuple[int, int]:
    """(rows on lower ranks, rows on all ranks) of a subset of the batch of which `count` rows
    are held here: a collective under data parallelism, (0, count) otherwise."""
    share = current_share()
    return share.place(count) if share is not None else (0, count)


def input_gradient(
    forward: Forward, objective: Objective, x_adv: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d sum(objective) / d x_adv) of one forward pass; the objective is evaluated right
    after the forward, so a defense-aware objective reads that pass's auxiliary heads."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x_adv, y)
        loss = objective(logits, y)
        (gradient,) = torch.autograd.grad(loss.sum(), x_adv)
    return logits.detach(), gradient


def early_stopped_ascent(
    forward: Forward,
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    x_start: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    tau: int,
    omega: float = 0.0,
    generator: torch.Generator | None = None,
    whole_batch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FAT's early-stopped PGD (Zhang et al. 2020, Alg. 1): (x_adv, steps taken per example).

    Before each of the `steps` updates every still-running example is scored; one the model
    misclassifies spends one unit of its budget tau, and one misclassified with no budget left
    stops there, keeping that iterate. So an example stops at the (tau+1)-th misclassified iterate
    it reaches (tau steps after it first becomes misclassified, unless the attack loses it in
    between), or after `steps` updates. omega > 0 adds omega x N(0,1) noise to each update, the
    reference's escape from flat regions.

    Only running examples are forwarded, as in the reference; that is exact in eval mode, where
    examples do not interact. `whole_batch` forwards every example each step (for train-mode
    crafting, so BatchNorm never sees a batch of one and label-conditioned defenses a full batch).
    """
    x_adv = x_start.detach().clone()
    budget = torch.full((len(x),), tau, dtype=torch.long, device=x.device)
    taken = torch.zeros(len(x), dtype=torch.long, device=x.device)
    running = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        rows = torch.arange(len(x), device=x.device) if whole_batch else running
        if len(rows):
            logits, gradient = input_gradient(forward, objective, x_adv[rows], y[rows])
            if whole_batch:
                logits, gradient = logits[running], gradient[running]
            wrong = logits.argmax(1) != y[running]
        else:  # only under data parallelism: this rank's examples all stopped, others' run on
            gradient, wrong = torch.zeros_like(x_adv[:0]), torch.zeros(0, dtype=torch.bool, device=x.device)
        stop = wrong & (budget[running] == 0)
        budget[running[wrong & ~stop]] -= 1
        go = ~stop
        running, gradient = running[go], gradient[go]
        # Every rank continues while any example of the global batch runs (train-mode crafting
        # with synchronised BatchNorm needs the ranks' forwards in step), and the omega noise is
        # drawn over the global batch's running examples.
        place = running_place(len(running))
        if place[1] == 0:
            break
        update = alpha * gradient.sign()
        if omega:
            noise = example_noise("normal", update.shape, generator, place=place)
            update = update + omega * noise.to(update.device, update.dtype)
        x_adv[running] = project(x_adv[running] + update, x[running], eps)
        taken[running] += 1
    return x_adv.detach(), taken
