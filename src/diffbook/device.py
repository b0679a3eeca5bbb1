"""Hardware: which device to run on, which precision helps there, and one seed for everything."""
from __future__ import annotations

import contextlib
import os
import platform
import random
from functools import lru_cache

import numpy as np
import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, else Apple MPS, else CPU. ``$DIFFBOOK_DEVICE`` or ``prefer`` override the choice."""
    choice = prefer or os.environ.get("DIFFBOOK_DEVICE")
    if choice:
        source = "the requested device" if prefer else "DIFFBOOK_DEVICE"
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise ValueError(f"{source} is {choice!r}: expected cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{source} is {choice!r} but this torch ({torch.__version__}) sees no CUDA GPU: "
                               "install a CUDA build of torch on a machine with a GPU, or use cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"{source} is {choice!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                         and torch.backends.mps.is_available()):
            raise RuntimeError(f"{source} is {choice!r} but Apple MPS is not available here (it needs macOS on "
                               "Apple silicon and an MPS build of torch): use cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{source} is {choice!r}: the book runs on cpu, cuda or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded with ``seed``.

    On CPU, two runs after the same ``seed_everything`` produce bit-identical tensors.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype to train with, or None for plain float32.

    ``precision`` is ``"fp32"``, ``"bf16"`` or ``"auto"``: bf16 on CUDA GPUs that support it and on CPUs
    with native bf16 units, float32 elsewhere (always on MPS). Whether bf16 pays off for a given network
    size on a CPU is measured by ``benchmarks/train_throughput.py --precision-by-config``.
    """
    if precision == "fp32" or device.type == "mps":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_hardware(device: torch.device) -> str:
    """A one-line description of the machine, recorded in checkpoint manifests."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads != 1 else ''}"
