"""Data module facts: on-disk formats, splits, transforms, loaders, download and every user-facing error, all offline."""

import dataclasses
import hashlib
import io
import os
import pickle
import re
import shutil
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import data
# test_transform is reached through `data.` so pytest does not collect it as a test.
from data import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, ImageDataModule, dataset_info, train_transform
from errors import UserError
from tests.synthetic import write_cifar, write_imagefolder, write_tiny_imagenet


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: offline mode and an urlopen that fails the test."""
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        """Stand-in for urlopen that fails loudly."""
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)


def ready(dm: ImageDataModule, stage: str = "fit") -> ImageDataModule:
    """Run the Lightning data hooks in order."""
    dm.prepare_data()
    dm.setup(stage)
    return dm


def batch_sizes(loader) -> list[int]:
    """Size of every batch a loader yields."""
    return [len(y) for _, y in loader]


def test_cifar100_splits_and_loaders(tmp_path):
    write_cifar(tmp_path, "cifar100", n_train=64, n_test=32)
    dm = ready(ImageDataModule("cifar100", str(tmp_path), batch_size=10, eval_batch_size=7, num_workers=0))
    assert dm.info == DatasetInfo(num_classes=100, image_size=32, in_channels=3)
    assert (len(dm.train_set), len(dm.test_set)) == (64, 32)
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert batch_sizes(dm.train_dataloader()) == [10] * 6
    assert batch_sizes(dm.test_dataloader()) == [7, 7, 7, 7, 4]
    labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert labels.tolist() == dm.test_set.labels.tolist()
    assert 0 <= labels.min() and labels.max() < 100


def test_cifar_pixels_are_decoded_channel_major(tmp_path):
    write_cifar(tmp_path, "cifar100", n_train=4, n_test=3)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    dm = ready(ImageDataModule("cifar100", str(tmp_path), num_workers=0), "test")
    expected = raw[b"data"].reshape(-1, 3, 32, 32)
    assert np.array_equal(dm.test_set.images.transpose(0, 3, 1, 2), expected)
    x, y = dm.test_set[1]
    mean, std = torch.tensor(CIFAR100_MEAN)[:, None, None], torch.tensor(CIFAR100_STD)[:, None, None]
    assert torch.allclose(x * std + mean, torch.from_numpy(expected[1]).float() / 255, atol=1e-5)
    assert y == raw[b"fine_labels"][1]


def test_cifar10_reads_all_five_training_batches(tmp_path):
    write_cifar(tmp_path, "cifar10", n_train=23, n_test=9)
    dm = ready(ImageDataModule("cifar10", str(tmp_path), batch_size=4, num_workers=0))
    assert dm.info.num_classes == 10
    assert (len(dm.train_set), len(dm.test_set)) == (23, 9)
    assert sorted(set(dm.train_set.labels.tolist())) == list(range(10))
    assert batch_sizes(dm.train_dataloader()) == [4] * 5
    assert sum(batch_sizes(dm.test_dataloader())) == 9
    assert dm.test_set[0][0].shape == (3, 32, 32)


def test_test_stage_loads_only_the_test_split(tmp_path):
    write_cifar(tmp_path, "cifar10", n_train=5, n_test=3)
    dm = ready(ImageDataModule("cifar10", str(tmp_path), num_workers=0), "test")
    assert dm.train_set is None and len(dm.test_set) == 3


CIFAR_LIKE = ["cifar10", "cifar100", "digits", "imagefolder"]
T = transforms


@pytest.mark.parametrize("name", CIFAR_LIKE)
def test_cifar_train_transform_is_exactly_the_released_recipe(name):
    steps = train_transform(name, 32, add_rand_aug=False).transforms
    assert [type(t) for t in steps] == [T.Resize, T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    resize, crop, flip, _, norm = steps
    assert resize.size == 32 and crop.size == (32, 32) and crop.padding == 4 and flip.p == 0.5
    assert tuple(norm.mean) == CIFAR100_MEAN and tuple(norm.std) == CIFAR100_STD


def test_tiny_imagenet_train_transform_is_exactly_the_released_recipe():
    steps = train_transform("tiny-imagenet", 64, add_rand_aug=False).transforms
    assert [type(t) for t in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    crop, flip, _, norm = steps
    assert crop.size == (64, 64) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BILINEAR and flip.p == 0.5
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", [*CIFAR_LIKE, "tiny-imagenet"])
def test_rand_augment_follows_the_flip_only_with_the_flag(name):
    steps = train_transform(name, 64, add_rand_aug=True).transforms
    kinds = [type(t) for t in steps]
    assert kinds[kinds.index(T.RandomHorizontalFlip) + 1] is T.RandAugment
    augment = steps[kinds.index(T.RandAugment)]
    assert (augment.num_ops, augment.magnitude) == (2, 9)
    assert all(getattr(t, "size", (64, 64)) in (64, (64, 64)) for t in steps)
    assert not any(isinstance(t, T.RandAugment) for t in train_transform(name, 64, add_rand_aug=False).transforms)


# Geometry and flip of each --augment mode: (CIFAR-like datasets, Tiny-ImageNet).
AUGMENT_STEPS = {
    "released": ([T.Resize, T.RandomCrop, T.RandomHorizontalFlip], [T.RandomResizedCrop, T.RandomHorizontalFlip]),
    "none": ([T.Resize, T.CenterCrop], [T.Resize, T.CenterCrop]),
    "crop": ([T.Resize, T.RandomCrop], [T.RandomResizedCrop]),
    "flip": ([T.Resize, T.CenterCrop, T.RandomHorizontalFlip], [T.Resize, T.CenterCrop, T.RandomHorizontalFlip]),
}


@pytest.mark.parametrize("augment", sorted(AUGMENT_STEPS))
@pytest.mark.parametrize("name", ["cifar100", "tiny-imagenet"])
@pytest.mark.parametrize("rand_aug", [False, True])
def test_augment_modes_compose_the_named_parts(augment, name, rand_aug):
    expected = AUGMENT_STEPS[augment][name == "tiny-imagenet"] + [T.RandAugment] * rand_aug + [T.ToTensor, T.Normalize]
    assert [type(t) for t in train_transform(name, 48, rand_aug, augment).transforms] == expected


def test_unknown_augment_is_a_user_error():
    with pytest.raises(UserError, match="released, none, crop, flip"):
        train_transform("cifar100", 32, add_rand_aug=False, augment="mixup")


@pytest.mark.parametrize("name", [*CIFAR_LIKE, "tiny-imagenet"])
def test_test_transform_is_exactly_the_recipe(name):
    steps = data.test_transform(name, 48).transforms
    assert [type(t) for t in steps] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert steps[0].size == 48 and steps[1].size == (48, 48)
    imagenet = name == "tiny-imagenet"
    assert tuple(steps[3].mean) == (IMAGENET_MEAN if imagenet else CIFAR100_MEAN)
    assert tuple(steps[3].std) == (IMAGENET_STD if imagenet else CIFAR100_STD)


# A flat image of RGB (255, 128, 0), normalised by hand: (value / 255 - mean) / std per channel.
FLAT_RGB = (255, 128, 0)
FLAT_NORMALISED = {
    "imagenet": (0.515 / 0.229, (128 / 255 - 0.456) / 0.224, -0.406 / 0.225),  # 2.24891, 0.20518, -1.80444
    "cifar100": (0.4929 / 0.2675, (128 / 255 - 0.4867) / 0.2565, -0.4408 / 0.2761),  # 1.84262, 0.05950, -1.59652
}


def flat_image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), FLAT_RGB)


@pytest.mark.parametrize("name", [*CIFAR_LIKE, "tiny-imagenet"])
def test_normalised_values_of_a_known_image(name):
    expected = torch.tensor(FLAT_NORMALISED["imagenet" if name == "tiny-imagenet" else "cifar100"])[:, None, None]
    candidates = [data.test_transform(name, 24), train_transform(name, 24, add_rand_aug=False, augment="none")]
    if name == "tiny-imagenet":  # its random crop takes no padding, so a flat image stays flat
        candidates.append(train_transform(name, 24, add_rand_aug=False))
    for transform in candidates:
        x = transform(flat_image(40))
        assert x.shape == (3, 24, 24)
        assert torch.allclose(x, expected.expand(3, 24, 24), atol=1e-4), (transform, x[:, 0, 0])


def left_to_right_gradient(size: int) -> Image.Image:
    """Grey levels rising from the left edge to the right one: any crop keeps the left side darker, a mirror does not."""
    row = np.linspace(0, 255, size).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (size, 1))[:, :, None], 3, axis=2))


def mirrored(x: torch.Tensor) -> bool:
    """Whether a transformed gradient image has its bright side on the left."""
    third = x.shape[-1] // 3
    return bool(x[..., :third].mean() > x[..., -third:].mean())


@pytest.mark.parametrize("name", ["cifar100", "tiny-imagenet"])
@pytest.mark.parametrize("augment, mirrors", [("released", True), ("flip", True), ("crop", False), ("none", False)])
def test_only_modes_with_the_flip_mirror(name, augment, mirrors):
    image = left_to_right_gradient(64)
    transform = train_transform(name, 32, add_rand_aug=False, augment=augment)
    flags = []
    for seed in range(40):
        torch.manual_seed(seed)
        flags.append(mirrored(transform(image)))
    assert not mirrored(data.test_transform(name, 32)(image))
    if mirrors:
        assert 5 <= sum(flags) <= 35, sum(flags)  # p = 0.5 each
    else:
        assert not any(flags)


def test_validation_split_of_tiny_imagenet_is_its_test_split(tmp_path):
    write_tiny_imagenet(tmp_path)
    write_cifar(tmp_path, n_train=4, n_test=2)
    tiny = ready(ImageDataModule("tiny-imagenet", str(tmp_path), batch_size=2, num_workers=0, augment="none"))
    cifar = ready(ImageDataModule("cifar100", str(tmp_path), batch_size=2, num_workers=0))
    assert tiny.has_validation_split and not cifar.has_validation_split
    val, test = list(tiny.val_dataloader()), list(tiny.test_dataloader())
    assert len(val) == len(test) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(val, test))
    assert [type(t) for t in tiny.train_set.transform.transforms][:2] == [T.Resize, T.CenterCrop]  # --augment none


@pytest.mark.parametrize("name", ["cifar100", "tiny-imagenet", "digits", "imagefolder"])
def test_datasets_with_transforms_pickle(tmp_path, name):
    write_cifar(tmp_path, n_train=4, n_test=2)
    write_tiny_imagenet(tmp_path)
    write_imagefolder(tmp_path)
    dm = ready(ImageDataModule(name, str(tmp_path), batch_size=2, num_workers=0, add_rand_aug=True))
    clone = pickle.loads(pickle.dumps(dm.test_set))
    assert torch.equal(clone[0][0], dm.test_set[0][0]) and clone[0][1] == dm.test_set[0][1]
    clone = pickle.loads(pickle.dumps(dm.train_set))
    assert clone[0][0].shape == dm.train_set[0][0].shape and clone[0][1] == dm.train_set[0][1]


def rewrite_cifar_test(tmp_path, changes: dict) -> Path:
    """Overwrite keys of the synthetic CIFAR-100 test pickle; returns its path."""
    path = tmp_path / "cifar-100-python" / "test"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch.update(changes)
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return path


@pytest.mark.parametrize(
    "changes",
    [
        {b"data": np.zeros((4, 3071), np.uint8)},
        {b"data": np.zeros((4, 3072), np.float32)},
        {b"fine_labels": [0, 1, 2, 100]},
        {b"fine_labels": [0, 1, -1, 2]},
        {b"fine_labels": [0, 1, 2]},
    ],
    ids=["wrong-columns", "wrong-dtype", "label-too-big", "label-negative", "label-count"],
)
def test_malformed_cifar_is_a_user_error_naming_the_file(tmp_path, changes):
    write_cifar(tmp_path, n_train=4, n_test=4)
    path = rewrite_cifar_test(tmp_path, changes)
    dm = ImageDataModule("cifar100", str(tmp_path), num_workers=0)
    with pytest.raises(UserError, match="delete") as e:
        dm.setup("test")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"not a pickle at all", b"", pickle.dumps([1, 2, 3])], ids=["garbage", "empty", "not-dict"])
def test_unreadable_cifar_file_is_a_user_error(tmp_path, content):
    write_cifar(tmp_path, "cifar10", n_train=10, n_test=2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        ImageDataModule("cifar10", str(tmp_path), num_workers=0).setup("fit")
    assert str(path) in str(e.value)


def test_missing_cifar_batch_file_is_a_user_error(tmp_path):
    write_cifar(tmp_path, "cifar10", n_train=10, n_test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(UserError, match="data_batch_5"):
        ImageDataModule("cifar10", str(tmp_path), num_workers=0).setup("fit")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny-imagenet"])
def test_missing_data_offline_names_url_and_folder(tmp_path, name):
    source = data.SOURCES[name]
    dm = ImageDataModule(name, str(tmp_path / "data"), num_workers=0)
    with pytest.raises(UserError) as e:
        dm.prepare_data()
    message = str(e.value)
    assert source.url in message and str(tmp_path / "data" / source.folder) in message and "offline" in message
    assert f"extract it into {tmp_path / 'data'}" in message and "\n" not in message
    with pytest.raises(UserError, match=re.escape(source.url)):
        dm.setup("fit")


def test_imagefolder_with_test_split(tmp_path):
    write_imagefolder(tmp_path, n_per_class=3, classes=("b", "a", "c"), size=40, split="test")
    dm = ready(ImageDataModule("imagefolder", str(tmp_path), batch_size=2, num_workers=0, image_size=24))
    assert dm.info == DatasetInfo(num_classes=3, image_size=24)
    assert (len(dm.train_set), len(dm.test_set)) == (9, 9)
    assert dm.test_set.classes == ["a", "b", "c"]
    assert dm.train_set[0][0].shape == (3, 24, 24) and dm.test_set[8][0].shape == (3, 24, 24)
    assert sorted({y for _, y in dm.test_set.samples}) == [0, 1, 2]
    assert sum(batch_sizes(dm.test_dataloader())) == 9


def test_imagefolder_falls_back_to_val(tmp_path):
    write_imagefolder(tmp_path, n_per_class=2, split="val")
    dm = ready(ImageDataModule("imagefolder", str(tmp_path), batch_size=2, num_workers=0))
    assert dm.info.image_size == 32
    assert Path(dm.test_set.root) == tmp_path / "val" and len(dm.test_set) == 4


def test_imagefolder_mismatched_classes(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog"))
    write_imagefolder(tmp_path / "other", classes=("cat", "cow"))
    (tmp_path / "other" / "train" / "cow").rename(tmp_path / "test" / "cow")
    dm = ImageDataModule("imagefolder", str(tmp_path), num_workers=0)
    with pytest.raises(UserError, match="class folders differ"):
        dm.setup("fit")


def test_imagefolder_missing_folders_say_what_to_create(tmp_path):
    with pytest.raises(UserError) as e:
        ImageDataModule("imagefolder", str(tmp_path), num_workers=0)
    assert str(tmp_path / "train") in str(e.value) and str(tmp_path / "test") in str(e.value)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        dataset_info("imagefolder", str(tmp_path))


def test_imagefolder_class_without_images(tmp_path):
    write_imagefolder(tmp_path)
    for image in (tmp_path / "test" / "dog").iterdir():
        image.unlink()
    with pytest.raises(UserError, match="cannot read images"):
        ImageDataModule("imagefolder", str(tmp_path), num_workers=0).setup("test")


# sha256 (first 16 hex digits) of each split's uint8 images and int64 labels, and its images per class: measured on
# the class-folder tree that tools/digits_imagefolder.py (since removed) wrote for docs/independent-blocks.md, read
# by ImageFolder at --image_size 16. Equal hashes mean the same pixels in the same order, so the documented runs
# stay reproducible.
DIGITS_SPLITS = {
    "train": ("42fd5d45977f67cc", "e4287814530d54e3", [131, 131, 128, 126, 133, 130, 134, 127, 121, 136]),
    "test": ("79b81f88c63ada91", "3b3aee69149adb11", [47, 51, 49, 57, 48, 52, 47, 52, 53, 44]),
}


def short_sha(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("split", sorted(DIGITS_SPLITS))
def test_digits_splits_are_the_documented_images(split):
    images, labels = data.load_digits_split(split)
    image_hash, label_hash, per_class = DIGITS_SPLITS[split]
    assert images.shape == (sum(per_class), 16, 16, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == per_class
    assert (short_sha(images), short_sha(labels)) == (image_hash, label_hash)
    assert (images.min(), images.max()) == (0, 255)
    assert (images == images[..., :1]).all(), "grey: the three channels are equal"
    blocks = images[..., 0].reshape(-1, 8, 2, 8, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all(), "each scan pixel becomes a 2x2 block"


def test_digits_data_module_ignores_data_dir_and_seed(tmp_path):
    modules = [ready(ImageDataModule("digits", str(tmp_path / "absent"), batch_size=32, num_workers=0, seed=seed))
               for seed in (1, 2)]
    for dm in modules:
        assert dm.info == DatasetInfo(10, 16, 3) and not dm.has_validation_split
        assert (len(dm.train_set), len(dm.test_set)) == (1297, 500)
        x, y = dm.test_set[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    assert not (tmp_path / "absent").exists(), "nothing is downloaded or written"
    first, second = (torch.cat([x for x, _ in dm.test_dataloader()]) for dm in modules)
    assert torch.equal(first, second), "the test split does not depend on --seed"
    assert batch_sizes(modules[0].train_dataloader()) == [32] * 40


def test_tiny_imagenet_labels_follow_sorted_wnids_and_annotations(tmp_path):
    wnids = ("n09999999", "n01443537", "n05555555")
    write_tiny_imagenet(tmp_path, n_per_class=2, wnids=wnids, size=64)
    dm = ready(ImageDataModule("tiny-imagenet", str(tmp_path), batch_size=2, num_workers=0))
    assert dm.info == DatasetInfo(num_classes=200, image_size=64)
    label_of = {w: i for i, w in enumerate(sorted(wnids))}
    root = tmp_path / "tiny-imagenet-200"
    annotations = dict(line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines())
    assert len(dm.test_set) == len(annotations) == 6
    for path, label in dm.test_set.samples:
        assert label == label_of[annotations[Path(path).name]]
    for path, label in dm.train_set.samples:
        assert label == label_of[Path(path).parent.parent.name]
    assert len(dm.train_set) == 6
    images = [dm.test_set[i][0] for i in range(len(dm.test_set))]  # includes grayscale JPEGs
    assert all(x.shape == (3, 64, 64) for x in images)


def test_tiny_imagenet_bad_annotation_is_a_user_error(tmp_path):
    write_tiny_imagenet(tmp_path)
    path = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    path.write_text(path.read_text() + "val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(UserError) as e:
        ImageDataModule("tiny-imagenet", str(tmp_path), num_workers=0).setup("test")
    assert str(path) in str(e.value) and "line 5" in str(e.value)


def test_dataset_info_values(tmp_path):
    write_imagefolder(tmp_path, classes=("a", "b", "c", "d", "e"))
    assert dataset_info("cifar10", "nowhere") == DatasetInfo(10, 32, 3)
    assert dataset_info("cifar100", "nowhere") == DatasetInfo(100, 32, 3)
    assert dataset_info("tiny-imagenet", "nowhere") == DatasetInfo(200, 64, 3)
    assert dataset_info("imagefolder", str(tmp_path)) == DatasetInfo(5, 32, 3)
    assert dataset_info("digits", "nowhere") == DatasetInfo(10, 16, 3)
    assert dataset_info("cifar100", "nowhere", image_size=64) == DatasetInfo(100, 64, 3)
    assert dataset_info("tiny-imagenet", "nowhere", image_size=32).image_size == 32
    with pytest.raises(UserError, match="image size"):
        dataset_info("cifar10", "nowhere", image_size=0)


def test_every_dataset_default_architecture_reads_its_native_image_size(tmp_path):
    from vit import default_arch

    write_imagefolder(tmp_path)
    for name in data.DATASETS:
        assert default_arch(name).image_size == dataset_info(name, str(tmp_path)).image_size, name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": "mnist"}, "cifar10, cifar100, tiny-imagenet, digits, imagefolder"),
        ({"data": "cifar10", "batch_size": 0}, "batch_size"),
        ({"data": "cifar10", "eval_batch_size": 0}, "eval_batch_size"),
        ({"data": "cifar10", "num_workers": -1}, "num_workers"),
        ({"data": "cifar10", "image_size": -4}, "image size"),
    ],
)
def test_invalid_arguments_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        ImageDataModule(**kwargs)


def test_unreadable_data_dir_is_a_user_error(tmp_path, monkeypatch):
    write_cifar(tmp_path, n_train=2, n_test=2)
    real_access = os.access
    monkeypatch.setattr(data.os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    dm = ImageDataModule("cifar100", str(tmp_path), num_workers=0)
    with pytest.raises(UserError, match="not readable"):
        dm.prepare_data()
    with pytest.raises(UserError, match="not readable"):
        dm.setup("test")


def test_train_loader_rejects_batch_larger_than_training_set(tmp_path):
    write_cifar(tmp_path, n_train=8, n_test=2)
    dm = ready(ImageDataModule("cifar100", str(tmp_path), batch_size=9, num_workers=0))
    with pytest.raises(UserError, match="batch_size"):
        dm.train_dataloader()


def test_loader_worker_settings(tmp_path):
    write_cifar(tmp_path, n_train=8, n_test=3)
    dm = ready(ImageDataModule("cifar100", str(tmp_path), batch_size=4, num_workers=2))
    train, test = dm.train_dataloader(), dm.test_dataloader()
    assert train.drop_last and not test.drop_last and test.batch_size == 4
    assert isinstance(train.sampler, data.ResumableShuffleSampler) and isinstance(train.dataset, data.SeededSamples)
    assert isinstance(test.sampler, torch.utils.data.SequentialSampler)
    assert train.num_workers == 2 and train.persistent_workers and test.persistent_workers
    assert train.pin_memory == torch.cuda.is_available()
    dm0 = ready(ImageDataModule("cifar100", str(tmp_path), batch_size=4, num_workers=0))
    assert not dm0.train_dataloader().persistent_workers


def tar_gz_of(folder: Path) -> bytes:
    """A .tar.gz archive holding `folder` at its top level."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        t.add(folder, arcname=folder.name)
    return buffer.getvalue()


def zip_of(folder: Path) -> bytes:
    """A .zip archive holding `folder` at its top level."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent))
    return buffer.getvalue()


def serve(monkeypatch, payload: bytes) -> list:
    """Make data.py's urlopen serve `payload` with networking enabled; returns the list of (url, timeout) requested."""
    monkeypatch.delenv("DIFFUSIONBLOCKS_OFFLINE")
    calls = []

    def fake_urlopen(url, timeout):
        """Record the request and answer with the payload."""
        calls.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    return calls


@pytest.fixture
def cifar100_archive(tmp_path) -> bytes:
    """A synthetic CIFAR-100 release packed like the real tar.gz."""
    return tar_gz_of(write_cifar(tmp_path / "src", n_train=6, n_test=4) / "cifar-100-python")


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch, cifar100_archive):
    calls = serve(monkeypatch, cifar100_archive)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as e:
        ImageDataModule("cifar100", str(data_dir), num_workers=0).prepare_data()
    assert "checksum mismatch" in str(e.value) and data.SOURCES["cifar100"].url in str(e.value)
    assert calls == [(data.SOURCES["cifar100"].url, 60)]
    assert list(data_dir.iterdir()) == []


def test_download_network_error_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSIONBLOCKS_OFFLINE")

    def unreachable(url, timeout):
        """Behave like urlopen without a network."""
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", unreachable)
    with pytest.raises(UserError) as e:
        ImageDataModule("cifar10", str(tmp_path), num_workers=0).prepare_data()
    assert "Name or service not known" in str(e.value) and str(tmp_path / "cifar-10-batches-py") in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["cifar100", "tiny-imagenet"])
def test_download_with_matching_checksum_extracts_and_loads(tmp_path, monkeypatch, name):
    src = tmp_path / "src"
    if name == "cifar100":
        payload = tar_gz_of(write_cifar(src, n_train=6, n_test=4) / "cifar-100-python")
    else:
        payload = zip_of(write_tiny_imagenet(src) / "tiny-imagenet-200")
    source = data.SOURCES[name]
    monkeypatch.setitem(data.SOURCES, name, dataclasses.replace(source, md5=hashlib.md5(payload).hexdigest()))
    serve(monkeypatch, payload)
    data_dir = tmp_path / "data"
    dm = ready(ImageDataModule(name, str(data_dir), batch_size=2, num_workers=0))
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([source.archive, source.folder])
    assert len(dm.test_set) == 4 and dm.test_set[0][0].shape[0] == 3


def test_kept_archive_is_reextracted_without_network(tmp_path, monkeypatch, cifar100_archive):
    monkeypatch.setitem(
        data.SOURCES, "cifar100", dataclasses.replace(data.SOURCES["cifar100"], md5=hashlib.md5(cifar100_archive).hexdigest())
    )
    calls = serve(monkeypatch, cifar100_archive)
    data_dir = tmp_path / "data"
    ImageDataModule("cifar100", str(data_dir), num_workers=0).prepare_data()
    shutil.rmtree(data_dir / "cifar-100-python")
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "1")
    dm = ready(ImageDataModule("cifar100", str(data_dir), batch_size=2, num_workers=0))
    assert len(calls) == 1 and len(dm.train_set) == 6


def test_corrupt_kept_archive_is_replaced(tmp_path, monkeypatch, cifar100_archive):
    source = data.SOURCES["cifar100"]
    monkeypatch.setitem(data.SOURCES, "cifar100", dataclasses.replace(source, md5=hashlib.md5(cifar100_archive).hexdigest()))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / source.archive).write_bytes(cifar100_archive[:100])
    calls = serve(monkeypatch, cifar100_archive)
    ready(ImageDataModule("cifar100", str(data_dir), batch_size=2, num_workers=0))
    assert len(calls) == 1 and (data_dir / source.archive).read_bytes() == cifar100_archive


def test_archive_without_expected_folder_leaves_only_the_archive(tmp_path, monkeypatch):
    wrong = write_cifar(tmp_path / "src", n_train=2, n_test=2) / "cifar-100-python"
    payload = tar_gz_of(wrong.rename(wrong.with_name("something-else")))
    source = data.SOURCES["cifar100"]
    monkeypatch.setitem(data.SOURCES, "cifar100", dataclasses.replace(source, md5=hashlib.md5(payload).hexdigest()))
    serve(monkeypatch, payload)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match="does not contain the folder cifar-100-python"):
        ImageDataModule("cifar100", str(data_dir), num_workers=0).prepare_data()
    assert [p.name for p in data_dir.iterdir()] == [source.archive]


def class_mean_colour_accuracy(dm: ImageDataModule) -> float:
    """Test accuracy of a nearest-centroid classifier on mean colour, centroids from augmented training images."""
    train = torch.stack([x.mean(dim=(1, 2)) for x, _ in dm.train_set])
    train_y = torch.tensor([y for _, y in dm.train_set])
    centroids = torch.stack([train[train_y == c].mean(0) for c in range(int(train_y.max()) + 1)])
    test = torch.stack([x.mean(dim=(1, 2)) for x, _ in dm.test_set])
    test_y = torch.tensor([y for _, y in dm.test_set])
    return (torch.cdist(test, centroids).argmin(1) == test_y).float().mean().item()


@pytest.mark.parametrize("learnable", [True, False])
def test_learnable_synthetic_cifar_shows_the_class(tmp_path, learnable):
    write_cifar(tmp_path, n_train=100, n_test=50, num_classes=10, learnable=learnable)
    dm = ready(ImageDataModule("cifar100", str(tmp_path), num_workers=0))
    accuracy = class_mean_colour_accuracy(dm)
    assert accuracy >= 0.9 if learnable else accuracy <= 0.5
