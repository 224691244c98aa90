"""Datasets read through torchvision: CIFAR-10/100, SVHN, and any ImageFolder tree.

torchvision's own `download=True` stays available for users with internet; with no data and no
`--download` the error says where the data was looked for and how to get it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from advdef.data import cache
from advdef.data.base import DataInfo, DatasetPlugin, Split, balanced_indices
from advdef.errors import UserError
from advdef.registry import DATASETS

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _default_root(data_dir: str | None) -> Path:
    return Path(data_dir or "data").expanduser()


def _from_hwc(array: np.ndarray, labels: list[int] | np.ndarray, limit: int | None, seed: int) -> Split:
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    positions = torch.arange(len(labels_t))
    if limit is not None and limit < len(labels_t):
        positions = balanced_indices(labels_t, limit, seed)
    images = torch.from_numpy(np.ascontiguousarray(array[positions.numpy()])).permute(0, 3, 1, 2).contiguous()
    return Split(images, labels_t[positions], positions)


class _TorchvisionSet(DatasetPlugin):
    def __init__(self, data_dir: str | None, download: bool) -> None:
        self.root = _default_root(data_dir)
        self.download = download

    def _open(self, train: bool):  # pragma: no cover - overridden
        raise NotImplementedError

    def _missing(self, error: Exception) -> UserError:
        return UserError(
            f"{self.info.name} not found under '{self.root}' ({error}); "
            f"pass --data-dir DIR holding it, or --download to fetch it"
        )

    def load(self, split: str, *, limit: int | None = None, seed: int = 0) -> Split:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split '{split}'")
        try:
            dataset = self._open(split == "train")
        except (RuntimeError, FileNotFoundError, OSError) as error:
            raise self._missing(error) from None
        return self._to_split(dataset, limit, seed)

    def _to_split(self, dataset, limit: int | None, seed: int) -> Split:
        return _from_hwc(dataset.data, dataset.targets, limit, seed)


@DATASETS.register("cifar10")
class Cifar10(_TorchvisionSet):
    """CIFAR-10 via torchvision (50k train / 10k test, 32×32 RGB); --data-dir, --download."""

    def __init__(self, *, data_dir: str | None = None, download: bool = False) -> None:
        super().__init__(data_dir, download)
        self.info = DataInfo(
            "cifar10", (3, 32, 32), 10, CIFAR10_CLASSES,
            mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), augment="crop_flip",
        )

    def _open(self, train: bool):
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(self.root), train=train, download=self.download)

    def load(self, split: str, *, limit: int | None = None, seed: int = 0) -> Split:
        """torchvision's CIFAR-10 batches, or an ImageFolder export of them under --data-dir
        (train/ and test/ with one folder per CIFAR-10 class, e.g. PNG or JPEG files): the
        labels follow the class names, which sort into CIFAR-10's own order. A lossy (JPEG)
        export differs from the original pixels slightly; the files read are the user's choice."""
        if _holds_class_folders(self.root, self.info.class_names):
            return ImageFolderData(path=str(self.root)).load(split, limit=limit, seed=seed)
        return super().load(split, limit=limit, seed=seed)


def _holds_class_folders(root: Path, classes: tuple[str, ...]) -> bool:
    return all(sorted(p.name for p in (root / split).iterdir() if p.is_dir()) == sorted(classes)
               for split in ("train", "test") if (root / split).is_dir()) and (root / "test").is_dir()


@DATASETS.register("cifar100")
class Cifar100(_TorchvisionSet):
    """CIFAR-100 via torchvision (50k train / 10k test, 32×32 RGB, 100 classes)."""

    def __init__(self, *, data_dir: str | None = None, download: bool = False) -> None:
        super().__init__(data_dir, download)
        self.info = DataInfo(
            "cifar100", (3, 32, 32), 100, tuple(f"class{i}" for i in range(100)),
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), augment="crop_flip",
        )

    def _open(self, train: bool):
        from torchvision.datasets import CIFAR100

        return CIFAR100(str(self.root), train=train, download=self.download)


@DATASETS.register("svhn")
class Svhn(_TorchvisionSet):
    """SVHN via torchvision (73k train / 26k test digits, 32×32 RGB); no flips in augmentation."""

    def __init__(self, *, data_dir: str | None = None, download: bool = False) -> None:
        super().__init__(data_dir, download)
        self.info = DataInfo(
            "svhn", (3, 32, 32), 10, tuple(str(d) for d in range(10)),
            mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), augment="crop",
        )

    def _open(self, train: bool):
        from torchvision.datasets import SVHN

        return SVHN(str(self.root), split="train" if train else "test", download=self.download)

    def _to_split(self, dataset, limit: int | None, seed: int) -> Split:
        return _from_hwc(dataset.data.transpose(0, 2, 3, 1), dataset.labels, limit, seed)


@DATASETS.register("imagefolder")
class ImageFolderData(DatasetPlugin):
    """Any image tree with train/ and test/ subfolders of one folder per class (torchvision ImageFolder)."""

    def __init__(
        self,
        *,
        path: str,
        size: int | None = None,
        mean: list[float] | float | None = None,
        std: list[float] | float | None = None,
    ) -> None:
        self.root = Path(str(path)).expanduser()
        for sub in ("train", "test"):
            if not (self.root / sub).is_dir():
                raise UserError(f"imagefolder '{self.root}' has no '{sub}/' folder; expected PATH/train/<class>/... and PATH/test/<class>/...")
        from torchvision.datasets import ImageFolder

        probe = ImageFolder(str(self.root / "test"))
        if not probe.samples:
            raise UserError(f"imagefolder '{self.root}/test' holds no images")
        first = probe.loader(probe.samples[0][0])
        width, height = first.size
        channels = len(first.getbands())
        self.size = size
        shape = (channels, size or height, size or width)
        self.info = DataInfo(
            name=f"imagefolder:{self.root}",
            input_shape=shape,
            num_classes=len(probe.classes),
            class_names=tuple(probe.classes),
            mean=_per_channel(mean, channels, 0.5),
            std=_per_channel(std, channels, 0.5),
            augment="crop_flip",
        )

    def load(self, split: str, *, limit: int | None = None, seed: int = 0) -> Split:
        """The split's images decoded to `info.input_shape`, through the decoded-image cache
        (`advdef/data/cache.py`): a whole (or at least half a) split is decoded once and cached;
        a smaller subset is read from a valid cache, else only its own files are decoded."""
        from torchvision.datasets import ImageFolder

        if split not in ("train", "test"):
            raise ValueError(f"unknown split '{split}'")
        folder = ImageFolder(str(self.root / split))
        labels = torch.as_tensor(folder.targets, dtype=torch.int64)
        whole = limit is None or limit >= len(labels)
        positions = torch.arange(len(labels)) if whole else balanced_indices(labels, limit, seed)
        channels, height, width = self.info.input_shape
        mode = "L" if channels == 1 else "RGB"
        entry = None
        if len(labels) >= cache.MIN_CACHED_FILES:
            entry = cache.entry_for(self.root, split, folder.samples, folder.classes, self.info.input_shape, mode)
        if entry is not None:
            cached = cache.read(entry, len(labels), self.info.input_shape, None if whole else positions)
            if cached is not None and torch.equal(cached[1], labels[positions]):
                return Split(cached[0], labels[positions], positions)
            if 2 * len(positions) >= len(labels):  # at most twice the work asked for, then free
                images = decode_images([path for path, _ in folder.samples], self.info.input_shape, mode)
                cache.write(entry, images, labels)
                return Split(images if whole else images[positions], labels[positions], positions)
        paths = [folder.samples[position][0] for position in positions.tolist()]
        return Split(decode_images(paths, self.info.input_shape, mode), labels[positions], positions)


# Decoding threads: Pillow releases the GIL while it decodes (measured on CIFAR-10's 32x32 JPEGs
# with 2 cores: 1.4x the one-thread rate; processes gained nothing).
DECODE_THREADS = min(4, os.cpu_count() or 1)
_DECODE_CHUNK = 256


def decode_images(paths: list[str], shape: tuple[int, int, int], mode: str) -> torch.Tensor:
    """Decode image files into one uint8 N×C×H×W tensor, as torchvision's ImageFolder loader
    does (PIL, converted to RGB, then to `mode`; resized with antialiasing if their size differs)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    channels, height, width = shape
    images = torch.empty((len(paths), channels, height, width), dtype=torch.uint8)

    def decode(rows: range) -> None:
        for row in rows:
            with open(paths[row], "rb") as file:
                image = Image.open(file)
                if image.mode != "RGB":  # convert() to the same mode is a copy: skipped
                    image = image.convert("RGB")
                if mode != "RGB":
                    image = image.convert(mode)
                if image.size == (width, height):
                    pixels = torch.from_numpy(np.array(image))
                    images[row] = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels
                else:
                    images[row] = resize(pil_to_tensor(image), [height, width], antialias=True)

    chunks = [range(start, min(start + _DECODE_CHUNK, len(paths))) for start in range(0, len(paths), _DECODE_CHUNK)]
    if DECODE_THREADS <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            decode(chunk)
    else:
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="advdef-decode") as pool:
            list(pool.map(decode, chunks))
    return images


def _per_channel(value: list[float] | float | None, channels: int, default: float) -> tuple[float, ...]:
    if value is None:
        return (default,) * channels
    values = value if isinstance(value, list) else [value]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"expected {channels} per-channel values, got {len(values)}")
    return tuple(float(v) for v in values)
