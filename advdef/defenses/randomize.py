"""randomize: random resizing and padding at the input (Xie et al., ICLR 2018; arXiv 1711.01991).

Each forward pass, every image independently is resized to rnd x rnd with rnd drawn uniformly
from the integers [low, high), then placed at a uniformly random offset on a high x high canvas
filled with `pad_value` (paper: 299 -> [299, 331) padded to 331 on ImageNet). The module sits on
the classifier's input tap, so it sees [0,1] images before normalization and `pad_value=0.5` is
mid-grey for every dataset: the original's zero padding in [-1, 1] space, and the value of Athalye
et al.'s reimplementation.

This defense is shipped as a NEGATIVE CONTROL. Its robustness under plain PGD comes from
stochastic gradients, not from a harder model: Athalye, Carlini & Wagner (ICML 2018) broke it to
0% at eps 0.031 with Expectation over Transformation (EOT). An evaluation that does not catch it
(`pgd:eot=30` and the evaluation's stochastic-defense warning) would catch nothing of its kind.

Randomness comes from the global torch RNG, drawn on the CPU so a seed gives the same draws on
every device: the trainer seeds it per epoch and the evaluation per batch, so runs reproduce.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advdef.defenses.base import AdaptiveDeclaration, Defense, InsertionPointError
from advdef.models.base import Classifier
from advdef.registry import DEFENSES
from advdef.validation import number

# The paper's ImageNet geometry, which the defaults scale to the dataset's side length.
PAPER_SIDE, PAPER_CANVAS = 299, 331
INTERPOLATIONS = ("nearest", "bilinear")


def default_range(side: int) -> tuple[int, int]:
    """[low, high) of the drawn side for an input side S: the paper's [299, 331) scaled, S -> round(S*331/299)."""
    return side, round(side * PAPER_CANVAS / PAPER_SIDE)


def check_range(low: int, high: int) -> None:
    """At least one size to draw from, and each drawn image fits on the canvas (rnd < high)."""
    if low < 1 or low > high - 1:
        raise ValueError(f"randomize needs 1 <= low <= high - 1 (sizes are drawn from [low, high)), got low={low}, high={high}")


def _side(name: str, value: Any) -> int | None:
    """A side length in pixels (positive int) or None for the default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
    return value


class RandomResizePad(nn.Module):
    """Per image: resize to a random rnd in [low, high), paste at a random offset on a high x high canvas."""

    def __init__(
        self, low: int, high: int, *, pad_value: float, interpolation: str, resize_back: int | None, at_train: bool
    ) -> None:
        super().__init__()
        check_range(low, high)
        self.low, self.high = low, high
        self.pad_value = pad_value
        self.interpolation = interpolation
        self.resize_back = resize_back  # the native side S to return to, or None to feed the canvas
        self.at_train = at_train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.at_train:
            return x
        sizes, tops, lefts = self.draw(len(x))
        out = self.place(x, sizes.to(x.device), tops.to(x.device), lefts.to(x.device))
        if self.resize_back is not None:
            out = F.interpolate(out, size=(self.resize_back, self.resize_back), mode="bilinear", align_corners=False)
        return out

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Side and (top, left) offset of each image, from the global CPU RNG (device-independent)."""
        sizes = torch.randint(self.low, self.high, (n,))
        slack = (self.high - sizes + 1).double()  # offsets 0 .. high - rnd inclusive
        tops = (torch.rand(n, dtype=torch.float64) * slack).floor().long()
        lefts = (torch.rand(n, dtype=torch.float64) * slack).floor().long()
        return sizes, tops, lefts

    def place(self, x: torch.Tensor, sizes: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor) -> torch.Tensor:
        """Resize each image to its size and paste it on a pad_value canvas (one resize per distinct size).

        The canvas is built channels-last so one `index_put` per size writes every image of that
        size at its own offset; gradients flow to the pasted pixels, the border is constant.
        """
        n, channels = x.shape[:2]
        canvas = x.new_full((n, self.high, self.high, channels), self.pad_value)
        for size in sizes.unique().tolist():
            members = torch.nonzero(sizes == size).flatten()
            resized = self.resize(x[members], size)
            span = torch.arange(size, device=x.device)
            rows = (tops[members, None] + span)[:, :, None]
            cols = (lefts[members, None] + span)[:, None, :]
            canvas = canvas.index_put((members[:, None, None], rows, cols), resized.permute(0, 2, 3, 1))
        return canvas.permute(0, 3, 1, 2)

    def resize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if self.interpolation == "nearest":
            return F.interpolate(x, size=(size, size), mode="nearest")
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        back = f", resize_back={self.resize_back}" if self.resize_back is not None else ""
        return (f"low={self.low}, high={self.high}, pad_value={self.pad_value:g}, "
                f"interpolation={self.interpolation!r}{back}, at_train={self.at_train}")


@DEFENSES.register("randomize")
class Randomize(Defense):
    """Random resize + pad at the input (Xie et al. 2018): a stochastic NEGATIVE CONTROL, broken by EOT; attack with pgd:eot=30."""

    citation = (
        "Cihang Xie, Jianyu Wang, Zhishuai Zhang, Zhou Ren, Alan Yuille. Mitigating Adversarial Effects "
        "Through Randomization. ICLR 2018. arXiv:1711.01991. Broken by: Anish Athalye, Nicholas Carlini, "
        "David Wagner. Obfuscated Gradients Give a False Sense of Security: Circumventing Defenses to "
        "Adversarial Examples. ICML 2018. arXiv:1802.00420"
    )

    # Only numbers stated by the sources (digest xie-thesis.md section 2b); no CIFAR numbers exist.
    published: dict[str, Any] = {
        "imagenet": {
            "nips17_competition": {"rank": 2, "entries": 107, "normalized_score": 0.924},
            "athalye2018_eot": {"eps": 0.031, "accuracy": 0.0},
        },
        "protocol": {
            "nips17_competition": (
                "NIPS 2017 adversarial defense competition (team iyswim): rnd in [310, 331), nearest resize, "
                "pad to 331, 30 random draws per image each with a 50% horizontal flip, prediction = sum over "
                "draws of softmax + 0.4 x aux-head softmax, on ensemble-adversarially-trained Inception-ResNet-v2; "
                "normalized competition score, not an accuracy (adversarial training alone: 0.773, rank 56)"
            ),
            "athalye2018_eot": (
                "accuracy in percent of the randomization layer alone (no adversarial training), ImageNet, Linf "
                "eps 0.031, EOT with 30 transform samples per gradient step, up to 1000 steps, lr 0.1, early "
                "stop on success; pad value 0.5 on [0,1] (their reimplementation)"
            ),
            "paper_geometry": "299 -> rnd in [299, 331), random zero pad (in [-1,1]) to 331; 12,528 patterns; no retraining",
        },
    }

    def __init__(
        self,
        *,
        low: int | None = None,
        high: int | None = None,
        pad_value: float = 0.5,
        interpolation: str = "nearest",
        resize_back: bool = False,
        at_train: bool = True,
    ) -> None:
        """
        low, high: drawn side lengths rnd in [low, high) pixels, canvas high x high; None = the
            paper's 299 -> [299, 331) scaled to the input side S (32 -> [32, 35), 16 -> [16, 18)).
        pad_value: canvas colour on [0,1] images (0.5 = mid-grey = the original's zero in [-1,1]).
        interpolation: "nearest" (the NIPS'17 code) or "bilinear".
        resize_back: bilinearly resize the canvas back to S x S (for models that need the native
            size; every built-in architecture pools adaptively and takes the canvas as is).
        at_train: randomize in training mode too (the model learns the randomized distribution,
            the fair way to benchmark it); false = inference only, as the paper (no retraining).
        """
        self.low = _side("low", low)
        self.high = _side("high", high)
        if self.low is not None and self.high is not None:
            check_range(self.low, self.high)
        self.pad_value = number("pad_value", pad_value, at_least=0, at_most=1)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation
        for name, flag in (("resize_back", resize_back), ("at_train", at_train)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        self.resize_back = resize_back
        self.at_train = at_train

    def resolve_range(self, side: int) -> tuple[int, int]:
        """The [low, high) this defense draws from for an input side; unset ends take the scaled paper default."""
        default_low, default_high = default_range(side)
        low = default_low if self.low is None else self.low
        high = default_high if self.high is None else self.high
        check_range(low, high)
        return low, high

    def attach(self, model: Classifier) -> None:
        """One RandomResizePad on the input tap (before normalization), sized from the model's input."""
        height, width = model.input_shape[-2:]
        if height != width:
            raise InsertionPointError(f"randomize needs square inputs, got {height}x{width}")
        low, high = self.resolve_range(int(height))
        module = RandomResizePad(
            low, high, pad_value=self.pad_value, interpolation=self.interpolation,
            resize_back=int(height) if self.resize_back else None, at_train=self.at_train,
        )
        model.input_tap.attached.append(module)

    def adaptive(self) -> AdaptiveDeclaration:
        return AdaptiveDeclaration(
            stochastic=True,
            notes=(
                "NEGATIVE CONTROL: every forward pass draws a new resize and offset, so one PGD gradient is "
                "the gradient of one random draw; plain PGD/FGSM/CW is noisy and overstates robustness, and "
                "clean and robust accuracies are each one draw. Attack with EOT, averaging the gradient over "
                "the randomness: pgd:eot=30 (Athalye et al. 2018 broke it to 0% at eps 0.031 on ImageNet with "
                "30 samples per gradient). A transfer attack from the undefended model is also informative."
            ),
        )
