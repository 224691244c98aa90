from pathlib import Path

import pytest
import torch
from PIL import Image

from advdef.data.base import augment_batch, balanced_indices, carve_validation, iterate_batches
from advdef.errors import UserError
from advdef.registry import DATASETS
from tests.conftest import SHARED_CIFAR


def test_digits_is_real_offline_data_in_unit_range():
    digits = DATASETS.create("digits")
    train, test = digits.load("train"), digits.load("test")
    assert digits.info.input_shape == (1, 16, 16)
    assert len(train) + len(test) == 1797
    assert set(train.ids.tolist()).isdisjoint(test.ids.tolist())
    x, y, _ = next(iterate_batches(test, 64))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert set(y.tolist()) <= set(range(10))


def test_digits_size_option():
    split = DATASETS.create("digits:size=32").load("test", limit=10)
    assert split.images.shape[1:] == (1, 32, 32) and len(split) == 10


def test_balanced_indices_are_seeded_and_balanced():
    labels = torch.arange(10).repeat(50)
    a, b = balanced_indices(labels, 100, seed=1), balanced_indices(labels, 100, seed=1)
    assert torch.equal(a, b)
    assert torch.bincount(labels[a]).tolist() == [10] * 10
    assert not torch.equal(a, balanced_indices(labels, 100, seed=2))


def test_validation_is_carved_from_train_disjoint_and_balanced():
    train = DATASETS.create("digits").load("train")
    rest, val = carve_validation(train, 0.1, seed=0)
    assert len(rest) + len(val) == len(train)
    assert set(rest.ids.tolist()).isdisjoint(val.ids.tolist())
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.max() - counts.min() <= 1


def test_limits_take_class_balanced_subsets():
    split = DATASETS.create("digits").load("train", limit=50, seed=3)
    assert len(split) == 50 and torch.bincount(split.labels).tolist() == [5] * 10


def test_augmentation_keeps_shape_and_is_seeded():
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    one = augment_batch(images, "crop_flip", torch.Generator().manual_seed(0))
    two = augment_batch(images, "crop_flip", torch.Generator().manual_seed(0))
    assert one.shape == images.shape and torch.equal(one, two) and not torch.equal(one, images)


def test_missing_cifar_data_is_a_user_error(tmp_path):
    dataset = DATASETS.create(f"cifar10:data_dir={tmp_path}")
    with pytest.raises(UserError, match="--download"):
        dataset.load("test")


def _write_imagefolder(root: Path, classes=("cat", "dog"), per_class=4, size=8):
    for split in ("train", "test"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), color=(40 * index + i, 100, 200)).save(folder / f"{i}.png")


def test_imagefolder_reads_train_and_test(tmp_path):
    _write_imagefolder(tmp_path)
    dataset = DATASETS.create(f"imagefolder:{tmp_path}")
    assert dataset.info.input_shape == (3, 8, 8) and dataset.info.class_names == ("cat", "dog")
    test = dataset.load("test")
    assert len(test) == 8 and test.images.dtype == torch.uint8
    assert test.images[0, 0, 0, 0] == 0 and test.images[-1, 0, 0, 0] == 43


def test_imagefolder_without_splits_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train/"):
        DATASETS.create(f"imagefolder:{tmp_path}")


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 JPEGs not present")
def test_imagefolder_reads_shared_cifar10():
    dataset = DATASETS.create(f"imagefolder:{SHARED_CIFAR}")
    assert dataset.info.input_shape == (3, 32, 32) and dataset.info.num_classes == 10
    test = dataset.load("test", limit=20, seed=0)
    assert torch.bincount(test.labels).tolist() == [2] * 10


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 JPEGs not present")
def test_cifar10_reads_an_image_folder_export_with_cifar_labels():
    dataset = DATASETS.create("cifar10", data_dir=str(SHARED_CIFAR))
    test = dataset.load("test", limit=20, seed=0)
    assert dataset.info.name == "cifar10" and test.images.shape == (20, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [2] * 10
    reference = DATASETS.create(f"imagefolder:{SHARED_CIFAR}").load("test", limit=20, seed=0)
    assert torch.equal(test.images, reference.images) and torch.equal(test.labels, reference.labels)


def test_cifar10_without_data_names_both_ways_to_get_it(tmp_path):
    with pytest.raises(UserError, match="--data-dir DIR holding it, or --download"):
        DATASETS.create("cifar10", data_dir=str(tmp_path)).load("test")
