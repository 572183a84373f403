"""Image classification data (CIFAR-10/100, Tiny-ImageNet, scikit-learn's digits, class folders) for Lightning."""

from __future__ import annotations

import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.utils import calculate_md5, check_md5

from errors import UserError
from flags import Augment, Data
from seeds import mix_seed

DATASETS = get_args(Data)
# The released recipe normalises Tiny-ImageNet with the ImageNet statistics and CIFAR with CIFAR-100's.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = get_args(Augment)
# Datasets with a labelled validation split (Tiny-ImageNet's val/ is both its validation and its test split).
VALIDATION_SPLIT = ("tiny-imagenet",)
OFFLINE_ENV = "DIFFUSIONBLOCKS_OFFLINE"
IMAGEFOLDER_IMAGE_SIZE = 32
# scikit-learn's handwritten digits: 1,797 scans of 8x8 pixels with grey values 0 to 16, shipped inside the
# package. Each is scaled to 0-255 and upscaled to 16x16 by pixel repetition; a fixed-seed shuffle puts the first
# DIGITS_TEST_SIZE scans in the test split, whatever --seed is, so every run scores the same 500 images.
DIGITS_SIDE = 16
DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0
DIGITS_MAX = 16  # the scans' largest grey value (white)
# Number of classes and native image side of the datasets with a fixed layout.
BUILTIN_SHAPES = {"cifar10": (10, 32), "cifar100": (100, 32), "tiny-imagenet": (200, 64), "digits": (10, DIGITS_SIDE)}
CIFAR_ROWS = 32 * 32 * 3


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset."""

    num_classes: int
    image_size: int
    in_channels: int = 3


@dataclass(frozen=True)
class Source:
    """Where a downloadable dataset comes from and the folder its archive unpacks to."""

    folder: str
    url: str
    md5: str

    @property
    def archive(self) -> str:
        """File name of the downloaded archive."""
        return self.url.rsplit("/", 1)[-1]


SOURCES = {
    "cifar10": Source(
        "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
    ),
    "cifar100": Source(
        "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"
    ),
    "tiny-imagenet": Source(
        "tiny-imagenet-200", "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de"
    ),
}

# Pickle files of each split and the key holding the labels.
CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "label_key": b"labels"},
    "cifar100": {"train": ["train"], "test": ["test"], "label_key": b"fine_labels"},
}


def normalization(data: str) -> transforms.Normalize:
    """The released Normalize: ImageNet statistics for Tiny-ImageNet, CIFAR-100 statistics for every other dataset."""
    if data == "tiny-imagenet":
        return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)


def geometry(data: str, image_size: int, random_crop: bool) -> list:
    """Resizing and cropping to image_size: the dataset's released random crop, or the deterministic test-time one."""
    if not random_crop:
        return [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if data == "tiny-imagenet":
        return [transforms.RandomResizedCrop(image_size)]  # torchvision defaults, as released
    return [transforms.Resize(image_size), transforms.RandomCrop(image_size, padding=4)]


def train_transform(data: str, image_size: int, add_rand_aug: bool, augment: Augment = "released") -> transforms.Compose:
    """Training transform of `data`: the released augmentation or a part of it (`augment`), optionally with RandAugment."""
    if augment not in AUGMENTS:
        raise UserError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTS)}")
    steps = geometry(data, image_size, random_crop=augment in ("released", "crop"))
    if augment in ("released", "flip"):
        steps.append(transforms.RandomHorizontalFlip())
    if add_rand_aug:
        steps.append(transforms.RandAugment())
    return transforms.Compose([*steps, transforms.ToTensor(), normalization(data)])


def test_transform(data: str, image_size: int) -> transforms.Compose:
    """Deterministic evaluation transform of `data`."""
    return transforms.Compose([*geometry(data, image_size, random_crop=False), transforms.ToTensor(), normalization(data)])


def rgb_loader(path: str) -> Image.Image:
    """Open an image file as RGB (grayscale and palette images included)."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class ArrayDataset(Dataset):
    """Images held in memory as uint8 [N, H, W, 3] with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class FileListDataset(Dataset):
    """Images read from (path, label) pairs."""

    def __init__(self, samples: list[tuple[str, int]], transform: transforms.Compose):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(rgb_loader(path)), label


class SeededSamples(Dataset):
    """A dataset looked up by (index, seed): each sample's random augmentation is drawn from its own seed.

    Augmentation then depends neither on the number of workers nor on where a run was resumed.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # Only the CPU generator the transforms draw from: torch.manual_seed would also queue
        # CUDA/XPU/MTIA seeding (with a captured stack trace) for every sample.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class ResumableShuffleSampler(Sampler[tuple[int, int]]):
    """Training order as a pure function of (seed, epoch), started at the batch the trainer is at.

    Lightning restarts an interrupted epoch with a fresh iterator; reading the position from the
    trainer's optimizer step makes the resumed run see exactly the batches the straight run would.
    """

    def __init__(self, length: int, batch_size: int, seed: int, accumulate: int, global_step: Callable[[], int]):
        self.length, self.batch_size, self.seed, self.accumulate = length, batch_size, seed, accumulate
        self.global_step = global_step

    def __len__(self) -> int:
        return self.length

    def position(self) -> tuple[int, int]:
        """(epoch, first batch) at the trainer's current optimizer step."""
        batches = self.length // self.batch_size
        steps_per_epoch = -(-batches // self.accumulate)  # Lightning steps on an epoch's last batch too
        epoch, step_in_epoch = divmod(self.global_step(), steps_per_epoch)
        return epoch, step_in_epoch * self.accumulate

    def __iter__(self):
        epoch, first_batch = self.position()
        epoch_seed = mix_seed(self.seed, epoch, bits=62)
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        for pos in range(first_batch * self.batch_size, self.length):
            yield order[pos], mix_seed(epoch_seed, pos, multiplier=1_000_033, bits=62)


def distributed() -> bool:
    """Whether this process is one of several DDP ranks (Lightning then shards the data itself)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def one_line(error: BaseException) -> str:
    """An exception's message folded onto a single line."""
    return " ".join(str(error).split()) or type(error).__name__


def check_dataset_name(data: str) -> None:
    """Reject a dataset name this module does not know."""
    if data not in DATASETS:
        raise UserError(f"unknown dataset {data!r}: choose one of {', '.join(DATASETS)}")


def check_readable(path: Path) -> None:
    """Reject an existing folder this process may not list or read."""
    if path.exists() and not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{path} exists but is not readable: fix its permissions (chmod u+rx) or pass another --data_dir")


def imagefolder_dirs(data_dir: Path) -> tuple[Path, Path]:
    """The train folder and the test folder (test/, else val/) of a class-folder tree."""
    check_readable(data_dir)
    train = data_dir / "train"
    test = next((data_dir / name for name in ("test", "val") if (data_dir / name).is_dir()), None)
    if not train.is_dir() or test is None:
        raise UserError(
            f"imagefolder needs class folders {train}/<class>/ and {data_dir / 'test'}/<class>/ "
            f"(or {data_dir / 'val'}/<class>/): create them and put the images inside"
        )
    return train, test


def folder_classes(folder: Path) -> list[str]:
    """Sorted class folder names under `folder`, as ImageFolder numbers them."""
    check_readable(folder)
    try:
        classes, _ = datasets.folder.find_classes(folder)
    except OSError as e:
        raise UserError(f"no class folders in {folder} ({one_line(e)}): put each class's images in {folder}/<class>/") from e
    return classes


def dataset_info(data: str, data_dir: str, image_size: int | None = None) -> DatasetInfo:
    """Number of classes and image size of a dataset, without loading any image."""
    check_dataset_name(data)
    if image_size is not None and image_size < 1:
        raise UserError(f"image size must be a positive number of pixels, got {image_size}")
    if data == "imagefolder":
        train, _ = imagefolder_dirs(Path(data_dir))
        num_classes, default_size = len(folder_classes(train)), IMAGEFOLDER_IMAGE_SIZE
    else:
        num_classes, default_size = BUILTIN_SHAPES[data]
    return DatasetInfo(num_classes=num_classes, image_size=image_size or default_size)


def unavailable(data: str, data_dir: Path, reason: str) -> UserError:
    """The error for a dataset that is neither on disk nor downloadable."""
    source = SOURCES[data]
    return UserError(
        f"{data} not found in {data_dir / source.folder} and it cannot be downloaded ({reason}): "
        f"download {source.url} and extract it into {data_dir}"
    )


def stream_to_file(url: str, path: Path) -> None:
    """Download `url` into `path`."""
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)


def fetch_archive(data: str, data_dir: Path) -> Path:
    """The verified archive of `data` in data_dir, downloaded unless a good copy is already there."""
    source = SOURCES[data]
    archive = data_dir / source.archive
    # A complete archive already here (kept from an earlier download, or placed by hand) spares the network.
    if archive.is_file() and check_md5(str(archive), source.md5):
        return archive
    if os.environ.get(OFFLINE_ENV) == "1":
        raise unavailable(data, data_dir, f"offline: {OFFLINE_ENV}=1")
    part = data_dir / f"{source.archive}.part"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        stream_to_file(source.url, part)
        digest = calculate_md5(str(part))
        if digest != source.md5:
            raise unavailable(data, data_dir, f"checksum mismatch: got md5 {digest}, expected {source.md5}")
        # Renaming only a verified file means the archive name never holds a partial download.
        os.replace(part, archive)
    except (OSError, http.client.HTTPException) as e:
        raise unavailable(data, data_dir, one_line(e)) from e
    finally:
        part.unlink(missing_ok=True)
    return archive


def extract_archive(archive: Path, data_dir: Path, folder: str) -> None:
    """Unpack `folder` from `archive` into data_dir, so that it appears whole or not at all."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=data_dir))
    except OSError as e:
        raise UserError(f"cannot write into {data_dir} ({one_line(e)}): make it writable or pass another --data_dir") from e
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(staging)
        else:
            with tarfile.open(archive) as t:
                t.extractall(staging, filter="data")
        if not (staging / folder).is_dir():
            raise UserError(f"{archive} does not contain the folder {folder}: delete {archive} and run again")
        os.replace(staging / folder, data_dir / folder)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot extract {archive} ({one_line(e)}): delete {archive} and run again") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_downloaded(data: str, data_dir: Path) -> None:
    """Download and extract `data` into data_dir unless its folder is already there."""
    check_readable(data_dir)
    folder = SOURCES[data].folder
    if (data_dir / folder).is_dir():
        return
    extract_archive(fetch_archive(data, data_dir), data_dir, folder)


def require_folder(data: str, data_dir: Path) -> Path:
    """The extracted folder of `data`, which prepare_data should have provided."""
    check_readable(data_dir)
    source = SOURCES[data]
    root = data_dir / source.folder
    if not root.is_dir():
        raise UserError(f"{data} not found in {root}: download {source.url} and extract it into {data_dir}")
    check_readable(root)
    return root


def corrupt(path: Path, root: Path, problem: str) -> UserError:
    """The error for a damaged dataset file."""
    return UserError(f"{path} is not a valid dataset file ({problem}): delete {root} and run again to re-download it")


def read_cifar_file(path: Path, root: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3] uint8 and labels [N] int64 of one CIFAR pickle, validated."""
    if not path.is_file():
        raise corrupt(path, root, "file missing")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    # Garbage bytes make pickle raise nearly any exception type, not only UnpicklingError.
    except Exception as e:
        raise corrupt(path, root, f"cannot unpickle: {one_line(e)}") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise corrupt(path, root, f"expected a dict with keys b'data' and {label_key!r}")
    images, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != CIFAR_ROWS:
        shape = getattr(images, "shape", None)
        raise corrupt(path, root, f"data must be uint8 with {CIFAR_ROWS} columns, got {type(images).__name__} {shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise corrupt(path, root, f"{len(images)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes):
        raise corrupt(path, root, f"labels must be integers in [0, {num_classes})")
    # Rows are stored channel-major (3 planes of 32x32); PIL wants height, width, channel.
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels.astype(np.int64)


def load_cifar(data: str, root: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of one CIFAR split, concatenated over its batch files."""
    spec = CIFAR_FILES[data]
    parts = [read_cifar_file(root / name, root, spec["label_key"], num_classes) for name in spec[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def digits_scans() -> tuple[np.ndarray, np.ndarray]:
    """All digit scans as uint8 RGB images [1797, 16, 16, 3] (grey in all three channels) and labels [1797] int64."""
    # Imported here: scikit-learn (and SciPy under it) takes seconds to import, and only this dataset needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = DIGITS_SIDE // digits.images.shape[1]
    grey = (digits.images * (255 / DIGITS_MAX)).astype(np.uint8).repeat(scale, axis=1).repeat(scale, axis=2)
    return np.repeat(grey[..., None], 3, axis=3), digits.target.astype(np.int64)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split of the digits, ordered by label, then by scan number.

    That is the order torchvision's ImageFolder reads the class-folder tree these digits were first written as
    (train/<digit>/<scan:04d>.png), so runs see the same batches as the image-folder runs in docs/.
    """
    images, labels = digits_scans()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    chosen = order[:DIGITS_TEST_SIZE] if split == "test" else order[DIGITS_TEST_SIZE:]
    chosen = chosen[np.lexsort((chosen, labels[chosen]))]
    return images[chosen], labels[chosen]


def read_wnids(root: Path, num_classes: int) -> dict[str, int]:
    """Tiny-ImageNet class ids mapped to labels: the index in sorted order of wnids.txt."""
    path = root / "wnids.txt"
    if not path.is_file():
        raise corrupt(path, root, "file missing")
    wnids = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
    if not wnids or len(wnids) > num_classes:
        raise corrupt(path, root, f"expected 1 to {num_classes} class ids, found {len(wnids)}")
    return {wnid: label for label, wnid in enumerate(wnids)}


def tiny_imagenet_train(root: Path, labels: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every training image, from train/<wnid>/images/."""
    samples = [(str(p), label) for wnid, label in labels.items() for p in sorted((root / "train" / wnid / "images").glob("*.JPEG"))]
    if not samples:
        raise corrupt(root / "train", root, "no images in train/<wnid>/images/")
    return samples


def tiny_imagenet_val(root: Path, labels: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every validation image, labelled by val/val_annotations.txt."""
    path = root / "val" / "val_annotations.txt"
    if not path.is_file():
        raise corrupt(path, root, "file missing")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in labels:
            raise corrupt(path, root, f"line {number} is not '<file>\\t<wnid from wnids.txt>\\t...'")
        image = root / "val" / "images" / fields[0]
        if not image.is_file():
            raise corrupt(image, root, f"listed on line {number} of {path.name} but missing")
        samples.append((str(image), labels[fields[1]]))
    if not samples:
        raise corrupt(path, root, "no annotations")
    return samples


def image_folder(folder: Path, transform: transforms.Compose) -> datasets.ImageFolder:
    """torchvision ImageFolder over `folder`, loading RGB, with errors turned into UserError."""
    try:
        return datasets.ImageFolder(folder, transform=transform, loader=rgb_loader)
    except OSError as e:
        raise UserError(f"cannot read images in {folder} ({one_line(e)}): put image files in {folder}/<class>/") from e


def build_split(data: str, data_dir: Path, split: str, transform: transforms.Compose, num_classes: int) -> Dataset:
    """The dataset of one split ("train" or "test"), read from disk and validated."""
    if data == "imagefolder":
        train, test = imagefolder_dirs(data_dir)
        train_classes, test_classes = folder_classes(train), folder_classes(test)
        if train_classes != test_classes:
            raise UserError(
                f"class folders differ between {train} ({', '.join(train_classes)}) and {test} ({', '.join(test_classes)}): "
                "give both splits the same class folders"
            )
        return image_folder(train if split == "train" else test, transform)
    if data == "digits":
        return ArrayDataset(*load_digits_split(split), transform)
    root = require_folder(data, data_dir)
    if data in CIFAR_FILES:
        return ArrayDataset(*load_cifar(data, root, split, num_classes), transform)
    labels = read_wnids(root, num_classes)
    # Tiny-ImageNet's labelled val split serves as the test split (its test split has no labels).
    samples = tiny_imagenet_train(root, labels) if split == "train" else tiny_imagenet_val(root, labels)
    return FileListDataset(samples, transform)


class ImageDataModule(pl.LightningDataModule):
    """Train and test splits of one dataset with the released recipe's transforms and loaders."""

    def __init__(
        self,
        data: str,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        add_rand_aug: bool = False,
        image_size: int | None = None,
        seed: int = 42,
        augment: Augment = "released",
    ):
        super().__init__()
        # One download per job, by global rank 0, into the (shared) data folder; other ranks wait.
        self.prepare_data_per_node = False
        check_dataset_name(data)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        if num_workers < 0:
            raise UserError(f"--num_workers must be 0 or more, got {num_workers}")
        self.data = data
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.add_rand_aug = add_rand_aug
        self.augment = augment
        self.seed = seed
        self.info = dataset_info(data, data_dir, image_size)
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def prepare_data(self) -> None:
        """Download the dataset if it is not on disk yet (Lightning runs this on one process per node)."""
        if self.data in SOURCES:
            ensure_downloaded(self.data, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the splits this stage needs (fitting also loads test, which follows it)."""
        if stage in (None, "fit") and self.train_set is None:
            transform = train_transform(self.data, self.info.image_size, self.add_rand_aug, self.augment)
            self.train_set = self.read_split("train", transform)
        if self.test_set is None:
            self.test_set = self.read_split("test", test_transform(self.data, self.info.image_size))

    def read_split(self, split: str, transform: transforms.Compose) -> Dataset:
        """One split of this module's dataset."""
        return build_split(self.data, self.data_dir, split, transform, self.info.num_classes)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches; the last partial batch is dropped."""
        if len(self.train_set) < self.batch_size:
            raise UserError(
                f"{self.data} has {len(self.train_set)} training images, fewer than --batch_size {self.batch_size}: "
                "lower --batch_size"
            )
        return self.loader(self.train_set, self.batch_size, train=True)

    def test_dataloader(self) -> DataLoader:
        """Every test image exactly once, in order."""
        return self.loader(self.test_set, self.eval_batch_size, train=False)

    @property
    def has_validation_split(self) -> bool:
        """Whether the released program validates on this dataset (and tests its best checkpoint)."""
        return self.data in VALIDATION_SPLIT

    def val_dataloader(self) -> DataLoader:
        """The test split again: Tiny-ImageNet's val/ is both splits, and --eval_every_n_epochs scores the test split."""
        return self.test_dataloader()

    def trainer_step(self) -> int:
        """The attached trainer's optimizer step (0 before fitting)."""
        return self.trainer.global_step if self.trainer else 0

    def loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        """A DataLoader with this module's worker settings.

        Single process: training order from ResumableShuffleSampler (resumable bit-exactly). Under DDP,
        Lightning shards training data with a DistributedSampler seeded from the global seed, and
        the test split is sharded without padding so every test image is scored exactly once.
        """
        sampler = None
        # Creating an iterator draws worker seeds from the loader's generator; a private one keeps
        # the global generator (dropout, noise) untouched by how often Lightning restarts an epoch.
        generator = torch.Generator().manual_seed(self.seed)
        if train and not distributed():
            accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
            sampler = ResumableShuffleSampler(len(dataset), batch_size, self.seed, accumulate, self.trainer_step)
            dataset = SeededSamples(dataset)
        elif not train and distributed():
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train if sampler is None else None,
            sampler=sampler,
            generator=generator,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
