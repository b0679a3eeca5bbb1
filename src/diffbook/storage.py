"""Where the book keeps things, and how it writes them: atomically, with checksums.

Every file the package writes goes through :func:`atomic_write_bytes` or :func:`atomic_torch_save`:
the bytes land in a temporary file in the same directory and are renamed into place, so an
interrupted write never leaves a half-written file under the final name. A write killed outright (power
loss, ``kill -9``) can leave its temporary ``.<name>.<pid>.*.part`` behind; the next write of the same
file removes it once its process is gone.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
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
    remove_stale_parts(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".part")
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or the platform cannot tell: keep its file
    return True


def remove_stale_parts(path: str | os.PathLike, max_age_s: float = 86_400.0) -> list[Path]:
    """Delete temporary files of earlier, killed writes of ``path``; returns what was removed.

    A part file is stale when the process that wrote it (its name records the pid) no longer runs, or, for
    files without a pid, when it is older than ``max_age_s``. Parts of a write in progress are kept.
    """
    path = Path(path)
    removed = []
    for part in path.parent.glob(f".{path.name}.*.part"):
        middle = part.name[len(path.name) + 2:-len(".part")].split(".", 1)[0]
        try:
            stale = not _process_alive(int(middle)) if middle.isdigit() else (
                time.time() - part.stat().st_mtime > max_age_s)
            if stale and middle != str(os.getpid()):
                part.unlink()
                removed.append(part)
        except FileNotFoundError:
            continue  # another writer removed or renamed it meanwhile
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def torch_bytes(obj: Any) -> bytes:
    """What ``torch.save(obj)`` would write, as bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically; returns the sha256 of the bytes written."""
    data = torch_bytes(obj)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)
