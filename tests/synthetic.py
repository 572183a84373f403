"""Small synthetic datasets written in the exact on-disk formats of the real ones, for tests without network."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py", "classes": 10, "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": "test_batch",
    },
    "cifar100": {"folder": "cifar-100-python", "classes": 100, "train": ["train"], "test": "test"},
}


def class_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """`n` labels covering the classes as evenly as possible, in random order."""
    return rng.permutation(np.arange(n) % num_classes)


def distinct_colours(num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Class colours [C, 3] spread far apart in RGB space: greedy farthest points among random candidates."""
    candidates = rng.uniform(0, 255, (32 * num_classes, 3))
    chosen = [candidates[0]]
    distance = np.linalg.norm(candidates - chosen[0], axis=1)
    for _ in range(num_classes - 1):
        chosen.append(candidates[distance.argmax()])
        distance = np.minimum(distance, np.linalg.norm(candidates - chosen[-1], axis=1))
    return np.stack(chosen)


def cifar_images(labels: np.ndarray, templates: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """CIFAR rows uint8 [N, 3072] (channel-major): class colour plus noise, or uniform noise without templates."""
    if templates is None:
        return rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    # A flat class colour survives random crops, zero padding and flips, so the class stays visible after augmentation.
    chw = templates[labels][:, :, None, None] + rng.normal(0.0, 16.0, (len(labels), 3, 32, 32))
    return np.clip(chw, 0, 255).astype(np.uint8).reshape(len(labels), -1)


BAND_COLOURS = np.array([[220.0, 60.0, 40.0], [40.0, 90.0, 220.0], [60.0, 200.0, 60.0]])  # red, blue, green
BAND_ROWS = 10  # each band's height; rows 0 and 31 are a grey border, so every colour covers exactly 10 rows
BORDER_GREY = 128.0


def band_layouts() -> list[tuple[int, ...]]:
    """The 6 band layouts: colour index of the top, middle and bottom band (the permutations of the 3 colours)."""
    return list(itertools.permutations(range(len(BAND_COLOURS))))


def band_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CIFAR rows uint8 [N, 3072]: class = top-to-bottom order of three colour bands, plus noise.

    Every class holds the same three colours in the same amounts (10 rows each), so colour alone gives
    chance accuracy and only the layout tells the classes apart. Horizontal bands survive the training
    augmentation: a horizontal flip leaves them as they are, a random crop shifts them by at most 4 rows.
    """
    grey = len(BAND_COLOURS)
    palette = np.vstack([BAND_COLOURS, [BORDER_GREY] * 3])  # (4, 3): the band colours, then grey
    rows = np.full((len(labels), 32), grey)  # palette index of each image row
    rows[:, 1:31] = np.array(band_layouts())[labels].repeat(BAND_ROWS, axis=1)
    chw = palette[rows].transpose(0, 2, 1)[:, :, :, None] + rng.normal(0.0, 16.0, (len(labels), 3, 32, 32))
    return np.clip(chw, 0, 255).astype(np.uint8).reshape(len(labels), -1)


def pickle_to(path: Path, obj: dict) -> None:
    """Write `obj` as a pickle (bytes keys, as the real files unpickle with encoding='bytes')."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_batch(name: str, labels: np.ndarray, images: np.ndarray, batch_label: str) -> dict:
    """One CIFAR pickle's dictionary with the keys of the real file."""
    filenames = [f"synthetic_{i}.png".encode() for i in range(len(labels))]
    batch = {b"batch_label": batch_label.encode(), b"filenames": filenames, b"data": images}
    if name == "cifar10":
        batch[b"labels"] = labels.tolist()
    else:
        batch[b"fine_labels"] = labels.tolist()
        batch[b"coarse_labels"] = (labels % 20).tolist()
    return batch


def write_cifar(
    root, name="cifar100", n_train=64, n_test=32, num_classes=None, seed=0, learnable=False, bands=False
) -> Path:
    """Write <root>/cifar-100-python/{train,test,meta} or
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; returns root.

    Images are uniform noise; with `learnable` each class is a flat colour plus noise; with `bands` the
    labels are 0..5 and each class is an order of three colour bands (band_images), all with the same colours.
    """
    root = Path(root)
    layout = CIFAR_LAYOUT[name]
    num_classes = num_classes or layout["classes"]
    folder = root / layout["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = distinct_colours(num_classes, rng) if learnable else None
    used_classes = len(band_layouts()) if bands else num_classes

    def images(labels):
        return band_images(labels, rng) if bands else cifar_images(labels, templates, rng)

    train_labels = class_labels(n_train, used_classes, rng)
    train_images = images(train_labels)
    chunks = np.array_split(np.arange(n_train), len(layout["train"]))
    for i, (file, index) in enumerate(zip(layout["train"], chunks), start=1):
        batch = cifar_batch(name, train_labels[index], train_images[index], f"training batch {i} of {len(chunks)}")
        pickle_to(folder / file, batch)
    test_labels = class_labels(n_test, used_classes, rng)
    pickle_to(folder / layout["test"], cifar_batch(name, test_labels, images(test_labels), "testing batch 1 of 1"))
    names = [f"class_{c}".encode() for c in range(num_classes)]
    if name == "cifar10":
        pickle_to(folder / "batches.meta", {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072})
    else:
        coarse = [f"super_{c}".encode() for c in range(20)]
        pickle_to(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": coarse})
    return root


def random_image(rng: np.random.Generator, size: int, mode: str = "RGB") -> Image.Image:
    """A noise image of the given side and PIL mode."""
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def write_imagefolder(root, n_per_class=4, classes=("cat", "dog"), size=32, split="test") -> Path:
    """Write root/train/<cls>/*.png and root/<split>/<cls>/*.png; returns root."""
    root = Path(root)
    rng = np.random.default_rng(0)
    for part in ("train", split):
        for cls in classes:
            folder = root / part / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                random_image(rng, size).save(folder / f"{i}.png")
    return root


def write_tiny_imagenet(root, n_per_class=2, wnids=("n01443537", "n01629819"), size=64) -> Path:
    """Write <root>/tiny-imagenet-200 in the real layout (wnids.txt, train/, val/ with annotations, test/); returns
    root."""
    root = Path(root)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # The real wnids.txt is not sorted, so labels come from sorting, not from line order.
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tsynthetic class {w}\n" for w in wnids))
    count = 0
    for wnid in wnids:
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i in range(n_per_class):
            # Every third image is grayscale, as some real Tiny-ImageNet JPEGs are.
            random_image(rng, size, "L" if count % 3 == 2 else "RGB").save(images / f"{wnid}_{i}.JPEG")
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
            count += 1
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    val_images = base / "val" / "images"
    val_images.mkdir(parents=True, exist_ok=True)
    # Interleave classes in val so labels depend on the annotation file, not on file order.
    val_wnids = [wnids[(i + i // len(wnids)) % len(wnids)] for i in range(n_per_class * len(wnids))]
    annotations = []
    for i, wnid in enumerate(val_wnids):
        random_image(rng, size, "L" if i % 3 == 1 else "RGB").save(val_images / f"val_{i}.JPEG")
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t{size - 1}\t{size - 1}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    (base / "test" / "images").mkdir(parents=True, exist_ok=True)
    random_image(rng, size).save(base / "test" / "images" / "test_0.JPEG")
    return root
