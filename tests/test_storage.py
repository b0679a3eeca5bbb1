import os

import pytest
import torch

from diffbook.storage import atomic_torch_save, atomic_write_bytes, sha256_file


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]


def test_atomic_torch_save_returns_the_files_sha256(tmp_path):
    digest = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "x.pt")
    assert digest == sha256_file(tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt")["w"], torch.arange(3))
