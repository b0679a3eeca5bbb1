"""Where the book keeps things, and how it writes them: atomically, with checksums.

Every file the package writes goes through :func:`atomic_write_bytes` or :func:`atomic_torch_save`:
the bytes land in a temporary file in the same directory and are renamed into place, so an
interrupted write never leaves a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """The package's cache: ``$DIFFBOOK_CACHE``, else ``$XDG_CACHE_HOME/diffbook``, else ``~/.cache/diffbook``."""
    if os.environ.get("DIFFBOOK_CACHE"):
        return Path(os.environ["DIFFBOOK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffbook"


def checkpoints_dir() -> Path:
    """The shipped checkpoints: ``$DIFFBOOK_CHECKPOINTS``, else ``checkpoints/`` at the repository root."""
    if os.environ.get("DIFFBOOK_CHECKPOINTS"):
        return Path(os.environ["DIFFBOOK_CHECKPOINTS"]).expanduser()
    return REPO_ROOT / "checkpoints"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and :func:`os.replace` (atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically; returns the sha256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)
