"""Data loading speed features, each proved not to change what the model sees (issue 8):
the decoded-image cache, the vectorized augmentation, background batch preparation, pinning."""

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from advdef.data import cache, vision
from advdef.data.base import Split, WaitClock, augment_batch, iterate_batches, prefetch
from advdef.device import prepare
from advdef.registry import DATASETS
from advdef.store import Store
from advdef.training import checkpoint, trainer
from tests.conftest import SHARED_CIFAR, quick_config


def _sequential_augment(images, mode, generator, padding=4):
    """The image-by-image augmentation the vectorized one replaced (the reference)."""
    if mode == "none":
        return images
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    out = torch.empty_like(images)
    for i in range(n):
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, top : top + height, left : left + width]
    if mode == "crop_flip":
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def _reference_decode(paths, shape, mode):
    """The per-file decode ImageFolderData.load did before the cache (torchvision's loader)."""
    from torchvision.datasets.folder import pil_loader
    from torchvision.transforms.functional import pil_to_tensor, resize

    channels, height, width = shape
    images = torch.empty((len(paths), channels, height, width), dtype=torch.uint8)
    for row, path in enumerate(paths):
        image = pil_to_tensor(pil_loader(path).convert(mode))
        if image.shape[1:] != (height, width):
            image = resize(image, [height, width], antialias=True)
        images[row] = image
    return images


@pytest.mark.parametrize("mode", ["crop", "crop_flip"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_vectorized_augmentation_is_the_sequential_one(mode, dtype):
    images = torch.randint(0, 256, (37, 3, 12, 10), dtype=torch.uint8).to(dtype)
    one, two = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    fast, slow = augment_batch(images, mode, one), _sequential_augment(images, mode, two)
    assert fast.dtype == slow.dtype and fast.is_contiguous() and torch.equal(fast, slow)
    assert torch.equal(torch.rand(4, generator=one), torch.rand(4, generator=two))  # same draws consumed


def _split(n=203, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, 10, (n,), generator=generator), torch.arange(n) * 3)


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_prefetched_batches_are_bit_identical_to_sequential_ones(depth):
    split = _split()
    state = torch.get_rng_state()
    sequential = list(iterate_batches(split, 32, shuffle=True, seed=11, augment="crop_flip"))
    prefetched = list(prefetch(iterate_batches(split, 32, shuffle=True, seed=11, augment="crop_flip"), depth))
    assert len(prefetched) == len(sequential) == 7
    for (x1, y1, i1), (x2, y2, i2) in zip(sequential, prefetched):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (the model's) is never drawn from


def test_prefetch_raises_the_producers_error_and_stops_when_closed():
    def failing():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(prefetch(failing(), 2))

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    items = prefetch(endless(), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert not any(t.name == "advdef-prefetch" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # at most `depth` ahead, plus the one in hand


def test_wait_clock_counts_time_spent_waiting():
    clock = WaitClock(iter([1, 2, 3]))
    assert list(clock) == [1, 2, 3] and clock.waited >= 0.0


def _final_weights(store, run_id, epoch):
    return load_file(str(checkpoint.paths(Path(store.get_run(run_id)["run_dir"]), epoch)["weights"]))


def test_training_with_and_without_prefetching_gives_identical_weights(tmp_path, monkeypatch):
    config = quick_config(epochs=2, limit_train=200, batch_size=32)
    store = Store(tmp_path / "s.sqlite")
    monkeypatch.setattr(trainer, "PREFETCH_BATCHES", 0)
    sequential = trainer.start_run(config, store, tmp_path / "runs")
    monkeypatch.setattr(trainer, "PREFETCH_BATCHES", 3)
    prefetched = trainer.start_run(config, store, tmp_path / "runs")
    a, b = _final_weights(store, sequential, 2), _final_weights(store, prefetched, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = store.checkpoints(prefetched)[-1]["metrics"]
    assert 0.0 <= metrics["data_wait_seconds"] <= metrics["train_seconds"]


def test_prepare_on_cpu_is_a_plain_move_in_the_memory_format():
    x = torch.rand(4, 3, 8, 8)
    out = prepare(x, torch.device("cpu"), True)
    assert torch.equal(out, x) and out.is_contiguous(memory_format=torch.channels_last)
    labels = torch.arange(4)
    assert prepare(labels, torch.device("cpu"), False) is labels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepare_to_cuda_copies_through_pinned_memory():
    x = torch.rand(4, 3, 8, 8)
    out = prepare(x, torch.device("cuda"), True)
    assert out.is_cuda and torch.equal(out.cpu(), x)


# ---- decoded-image cache -------------------------------------------------------------------------


def _write_tree(root: Path, per_class=6, size=8):
    """An ImageFolder tree with JPEG, PNG, grayscale, palette and RGBA files and one odd size."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for index, name in enumerate(("cat", "dog", "emu")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator).numpy()
                image = Image.fromarray(pixels)
                if i == 1:
                    image.convert("L").save(folder / f"{i}.png")
                elif i == 2:
                    image.convert("P").save(folder / f"{i}.png")
                elif i == 3:
                    image.convert("RGBA").save(folder / f"{i}.png")
                elif i == 4 and index == 1:
                    image.resize((size + 3, size + 1)).save(folder / f"{i}.jpg")  # resized on load
                else:
                    image.save(folder / f"{i}.jpg", quality=90)


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _write_tree(root)
    monkeypatch.setenv("ADVDEF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "MIN_CACHED_FILES", 1)
    return root


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache").glob("*.safetensors"))


def _same(a: Split, b: Split):
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.ids, b.ids)


def test_decoding_matches_torchvisions_imagefolder_loader(tree):
    from torchvision.datasets import ImageFolder

    paths = [path for path, _ in ImageFolder(str(tree / "train")).samples]
    expected = _reference_decode(paths, (3, 8, 8), "RGB")
    assert torch.equal(vision.decode_images(paths, (3, 8, 8), "RGB"), expected)
    assert torch.equal(vision.decode_images(paths, (1, 8, 8), "L"), _reference_decode(paths, (1, 8, 8), "L"))


def test_first_load_writes_the_cache_and_later_loads_read_it(tree, tmp_path, monkeypatch):
    dataset = DATASETS.create(f"imagefolder:{tree}")
    first = dataset.load("train")
    (path,) = _cache_files(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert set(handle.keys()) == {"images", "labels", "positions"}
    assert metadata["source_root"] == str(tree.resolve()) and metadata["split"] == "train"
    assert metadata["file_count"] == "18" and len(metadata["fingerprint"]) == 64

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(vision, "decode_images", no_decoding)
    assert _same(dataset.load("train"), first)
    assert _same(dataset.load("train", limit=6, seed=4), first.subset(dataset.load("train", limit=6, seed=4).ids))


def test_cached_and_uncached_loads_are_bit_identical(tree, monkeypatch):
    dataset = DATASETS.create(f"imagefolder:{tree}")
    cold, warm = dataset.load("test"), dataset.load("test")
    cold_subset, warm_subset = dataset.load("test", limit=9, seed=2), dataset.load("test", limit=5, seed=1)
    monkeypatch.setenv("ADVDEF_CACHE", "off")
    assert _same(cold, dataset.load("test")) and _same(warm, cold)
    assert _same(cold_subset, dataset.load("test", limit=9, seed=2))
    assert _same(warm_subset, dataset.load("test", limit=5, seed=1))


def test_a_changed_file_list_rebuilds_the_cache(tree, tmp_path):
    dataset = DATASETS.create(f"imagefolder:{tree}")
    dataset.load("train")
    (path,) = _cache_files(tmp_path)
    before = path.stat().st_mtime_ns
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tree / "train" / "emu" / "9.png")
    grown = dataset.load("train")
    assert len(grown) == 19 and path.stat().st_mtime_ns != before
    assert torch.equal(grown.images[-1, :, 0, 0], torch.tensor([1, 2, 3], dtype=torch.uint8))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["file_count"] == "19"


def test_a_corrupt_cache_file_is_rebuilt(tree, tmp_path):
    dataset = DATASETS.create(f"imagefolder:{tree}")
    first = dataset.load("test")
    (path,) = _cache_files(tmp_path)
    path.write_bytes(b"not a safetensors file")
    assert _same(dataset.load("test"), first)
    assert load_file(str(path))["images"].shape == (18, 3, 8, 8)


def test_small_subsets_decode_only_their_files_and_write_nothing(tree, tmp_path, monkeypatch):
    decoded = []
    real = vision.decode_images
    monkeypatch.setattr(vision, "decode_images", lambda paths, *a: decoded.append(len(paths)) or real(paths, *a))
    dataset = DATASETS.create(f"imagefolder:{tree}")
    assert len(dataset.load("train", limit=6)) == 6 and decoded == [6] and not _cache_files(tmp_path)
    dataset.load("train", limit=9)  # half the split or more: decode it all, once
    assert decoded == [6, 18] and len(_cache_files(tmp_path)) == 1


def test_small_splits_and_a_disabled_cache_write_nothing(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _write_tree(root)
    monkeypatch.setenv("ADVDEF_CACHE", str(tmp_path / "cache"))
    DATASETS.create(f"imagefolder:{root}").load("train")  # 18 files < MIN_CACHED_FILES
    monkeypatch.setattr(cache, "MIN_CACHED_FILES", 1)
    monkeypatch.setenv("ADVDEF_CACHE", "off")
    DATASETS.create(f"imagefolder:{root}").load("train")
    assert not (tmp_path / "cache").exists()


def test_the_cache_never_goes_inside_the_data_folder(tree, monkeypatch):
    for inside in (tree, tree / "train" / ".cache"):
        monkeypatch.setenv("ADVDEF_CACHE", str(inside))
        with pytest.warns(UserWarning, match="inside the data folder"):
            split = DATASETS.create(f"imagefolder:{tree}").load("train")
        assert len(split) == 18 and not list(tree.rglob("*.safetensors"))


def test_an_unwritable_cache_only_warns(tree, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    monkeypatch.setenv("ADVDEF_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="could not cache"):
        split = DATASETS.create(f"imagefolder:{tree}").load("test")
    assert len(split) == 18


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ADVDEF_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_dir() == Path.home() / ".cache" / "advdef"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "advdef"
    monkeypatch.setenv("ADVDEF_CACHE", "~/elsewhere")
    assert cache.cache_dir() == Path.home() / "elsewhere"


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 JPEGs not present")
def test_shared_cifar10_jpegs_decode_as_torchvisions_loader_does():
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(SHARED_CIFAR / "test")).samples[::40]
    paths = [path for path, _ in samples]
    assert torch.equal(vision.decode_images(paths, (3, 32, 32), "RGB"), _reference_decode(paths, (3, 32, 32), "RGB"))
