"""The embedded offline default: scikit-learn's bundled handwritten digits (UCI, 1,797 images).

Real images shipped inside an installed package, so every command works with no network. The
8×8 originals are resized (bilinear) to `size`×`size` so the CIFAR architectures' strides fit; a
fixed stratified 20% test split (seed 0, independent of the run seed) keeps test ids stable.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from advdef.data.base import DataInfo, DatasetPlugin, Split, balanced_indices, limit_split
from advdef.registry import DATASETS

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


@functools.lru_cache(maxsize=4)
def _load_all(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    if size != 8:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, torch.tensor(bunch.target, dtype=torch.int64)


@DATASETS.register("digits")
class Digits(DatasetPlugin):
    """Embedded offline default: scikit-learn's 1,797 handwritten digits, 10 classes, grayscale."""

    def __init__(self, *, size: int = 16) -> None:
        if not 8 <= size <= 64:
            raise ValueError(f"size must be between 8 and 64 pixels, got {size}")
        self.size = size
        self.info = DataInfo(
            name=f"digits:size={size}" if size != 16 else "digits",
            input_shape=(1, size, size),
            num_classes=10,
            class_names=tuple(str(d) for d in range(10)),
            mean=(0.3,),
            std=(0.4,),
            augment="crop",
        )

    def load(self, split: str, *, limit: int | None = None, seed: int = 0) -> Split:
        images, labels = _load_all(self.size)
        test_positions = balanced_indices(labels, int(len(labels) * _TEST_FRACTION), _SPLIT_SEED)
        is_test = torch.zeros(len(labels), dtype=torch.bool)
        is_test[test_positions] = True
        if split == "test":
            positions = torch.nonzero(is_test).flatten()
        elif split == "train":
            positions = torch.nonzero(~is_test).flatten()
        else:
            raise ValueError(f"unknown split '{split}'")
        # ids are indices into sklearn's array: stable across runs and sizes.
        full = Split(images[positions], labels[positions], positions.clone())
        return limit_split(full, limit, seed)
