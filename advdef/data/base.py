"""Dataset contract: images as uint8 tensors in memory, served as float batches in [0,1].

Keeping decoded uint8 tensors (CIFAR-10 train is 150 MB) makes every epoch and every attack read
memory, not disk, and makes shuffling and augmentation reproducible from a seed, which is what
lets an interrupted training run resume bit-for-bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset, available without loading it."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Training augmentation: "crop_flip" (CIFAR/SVHN papers), "crop" (digits: flips change digits), "none".
    augment: str = "crop_flip"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "augment": self.augment,
        }

    @classmethod
    def from_json(cls, data: dict) -> DataInfo:
        return cls(
            name=data["name"],
            input_shape=tuple(data["input_shape"]),
            num_classes=int(data["num_classes"]),
            class_names=tuple(data["class_names"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            augment=data.get("augment", "none"),
        )


@dataclass
class Split:
    """Images (uint8, N×C×H×W), labels and each sample's index in the source split."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = torch.arange(len(self.labels))
        if not (len(self.images) == len(self.labels) == len(self.ids)):
            raise ValueError("images, labels and ids differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: torch.Tensor) -> Split:
        return Split(self.images[positions], self.labels[positions], self.ids[positions])

    def float_images(self, positions: torch.Tensor | slice | None = None) -> torch.Tensor:
        images = self.images if positions is None else self.images[positions]
        return images.float().div_(255.0)

    def ids_hash(self) -> str:
        """A short hash of the sample ids: two evaluations are comparable only on equal hashes."""
        return hashlib.sha256(self.ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded, class-balanced choice of `n` positions (sorted), as evaluation subsets should be.

    Classes get n // K each; the remainder goes to the first classes in a seeded order. A class
    with too few samples gives what it has and the rest is filled from the others.
    """
    total = len(labels)
    if n >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    shuffled = {c: idx[torch.randperm(len(idx), generator=generator)] for c, idx in per_class.items()}
    order = [int(classes[i]) for i in torch.randperm(len(classes), generator=generator)]
    quota = {c: n // len(classes) for c in order}
    for c in order[: n % len(classes)]:
        quota[c] += 1
    chosen: list[torch.Tensor] = []
    leftovers: list[torch.Tensor] = []
    for c in order:
        take = min(quota[c], len(shuffled[c]))
        chosen.append(shuffled[c][:take])
        leftovers.append(shuffled[c][take:])
    picked = torch.cat(chosen)
    missing = n - len(picked)
    if missing > 0:
        pool = torch.cat(leftovers)
        pool = pool[torch.randperm(len(pool), generator=generator)]
        picked = torch.cat([picked, pool[:missing]])
    return torch.sort(picked).values


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out a class-balanced validation split from train, for checkpoint selection.

    The test split is never used to pick checkpoints; this split is.
    """
    n_val = max(int(round(len(train) * fraction)), 1)
    val_positions = balanced_indices(train.labels, n_val, seed)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_positions] = False
    return train.subset(torch.nonzero(keep).flatten()), train.subset(val_positions)


def limit_split(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or limit >= len(split):
        return split
    if limit < 1:
        raise ValueError(f"a limit must be a positive number of samples, got {limit}")
    return split.subset(balanced_indices(split.labels, limit, seed))


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding (and horizontal flip for "crop_flip") on a uint8/float batch.

    The draws are the image-by-image loop's (all crop offsets, then all flips) and the crops are
    one gather over the padded batch's windows, so the output is bit-identical to that loop's.
    """
    if mode == "none":
        return images
    return apply_augmentation(images, augmentation_draws(len(images), mode, generator, padding), padding)


def augmentation_draws(
    n: int, mode: str, generator: torch.Generator, padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`augment_batch`'s random draws for `n` images: (crop offsets N x 2, flips N or None).

    Separate from applying them so a data-parallel rank can draw for the whole global batch (the
    generator advances as in one process) and augment only its own rows.
    """
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if mode == "crop_flip" else None
    return offsets, flips


def apply_augmentation(
    images: torch.Tensor, draws: tuple[torch.Tensor, torch.Tensor | None], padding: int = 4
) -> torch.Tensor:
    """Crop (and flip) each image as `draws` (one row per image) say."""
    offsets, flips = draws
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    windows = padded.unfold(2, height, 1).unfold(3, width, 1)  # N, C, top, left, H, W (a view)
    out = windows[torch.arange(n), :, offsets[:, 0], offsets[:, 1]]
    if flips is not None:
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of an n-row batch that rank `rank` of `world_size` holds: contiguous
    shares in rank order, sizes differing by at most one (the first n % world_size get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: str = "none",
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0,1], labels, ids) batches; shuffling/augmentation seeded by `seed`.

    `shard=(rank, world_size)` is the data-parallel sampler: every rank draws the same global
    order and augmentation for each global batch of `batch_size` and yields only its contiguous
    share (`shard_bounds`), so the shares of all ranks concatenate to the unsharded batch, bit
    for bit, and only the share is gathered and augmented.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    for start in range(0, len(split), batch_size):
        positions = order[start : start + batch_size]
        draws = augmentation_draws(len(positions), augment, generator) if augment != "none" else None
        if shard is not None:
            low, high = shard_bounds(len(positions), *shard)
            positions = positions[low:high]
            if draws is not None:
                draws = (draws[0][low:high], None if draws[1] is None else draws[1][low:high])
        images = split.images[positions]
        if draws is not None:
            images = apply_augmentation(images, draws)
        yield images.float().div_(255.0), split.labels[positions], split.ids[positions]


def prefetch(
    batches: Iterable[T], depth: int = 2, *, transform: Callable[[T], T] | None = None
) -> Iterator[T]:
    """Yield `batches`' items, produced up to `depth` items ahead on a background thread.

    The producer runs the same iterator, in the same order, as a plain loop would: its random
    draws (a seeded generator of its own, as in `iterate_batches`) are unchanged, so prefetched
    items are bit-identical to sequential ones; the global RNG is never touched. `transform`
    (e.g. pinning for CUDA) runs on the producer too. An exception in the producer is raised
    here; closing this generator (or an exception in the consumer's loop, with `closing`)
    stops and joins the thread. `depth` 0 iterates on the calling thread.
    """
    if depth <= 0:
        for item in batches:
            yield transform(item) if transform is not None else item
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        # Blocking puts: the producer wakes only when a slot frees (it never polls, so it does
        # not interrupt the training thread); closing drains the queue to unblock a put.
        iterator = iter(batches)
        try:
            while not stop.is_set():
                try:
                    item = next(iterator)
                except StopIteration:
                    slots.put((True, None))
                    return
                slots.put((False, transform(item) if transform is not None else item))
        except BaseException as error:  # handed to the consumer, raised there
            slots.put((True, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="advdef-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            finished, payload = slots.get()
            if finished:
                if payload is not None:
                    raise payload
                return
            yield payload
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                slots.get_nowait()
            thread.join(timeout=0.01)


def pin_batch(batch: tuple, device: torch.device | None = None) -> tuple:
    """The batch with its tensors in page-locked memory, for asynchronous copies to CUDA `device`
    (run on the prefetch thread, so the copy into pinned memory overlaps the model's step)."""
    if device is not None and device.index is not None:
        torch.cuda.set_device(device)  # per thread: pin through the training device's context
    return tuple(item.pin_memory() if isinstance(item, torch.Tensor) else item for item in batch)


class WaitClock:
    """Wraps an iterator and adds up the wall time spent waiting for its next item."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items = iter(items)
        self.waited = 0.0

    def __iter__(self) -> WaitClock:
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.waited += time.perf_counter() - started


class DatasetPlugin:
    """Base of dataset plugins: `info` without I/O, `load(split)` returning a Split."""

    info: DataInfo

    def load(self, split: str, *, limit: int | None = None, seed: int = 0) -> Split:
        raise NotImplementedError


@dataclass
class LoadedData:
    """Train/validation/test splits ready for training and evaluation."""

    info: DataInfo
    train: Split
    val: Split
    test: Split | None = None


def load_for_training(
    dataset: DatasetPlugin, *, limit_train: int | None, val_fraction: float, seed: int
) -> LoadedData:
    """Train split (optionally limited) with a validation split carved from it."""
    train = dataset.load("train", limit=limit_train, seed=seed)
    if len(train) < 2:
        raise ValueError("need at least 2 training samples to carve a validation split")
    train, val = carve_validation(train, val_fraction, seed)
    return LoadedData(dataset.info, train, val)
