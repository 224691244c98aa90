"""Per-example attack losses (to be maximised).

Margins are computed and clamped per example: a batch-summed margin (as in some defense repos)
stops the gradient of the whole batch once the sum turns negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Carlini-Wagner margin: min(max_{j != y} z_j - z_y, kappa), per example."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return torch.clamp(others.amax(1) - true, max=kappa)


LOSSES = {"ce": cross_entropy, "margin": margin}
