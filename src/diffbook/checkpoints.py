"""Checkpoint files: where a run keeps its state, the released ``<name>.pt`` with its manifest, and finding them.

A released checkpoint is two files: ``<name>.pt`` (EMA weights in float32, the config, the loss history) and
``<name>.json`` (the manifest: what made it, on which hardware, in how long, and the ``.pt``'s sha256).
:func:`find_checkpoint` looks for one whose manifest records exactly a given config (by
:meth:`~diffbook.configs.TrainConfig.identity`), first under ``checkpoints/`` and then in the run cache.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .configs import TrainConfig
from .device import autocast_dtype, describe_hardware, pick_device
from .nets import count_parameters
from .schedules import NoiseSchedule
from .storage import atomic_write_bytes, atomic_write_text, cache_dir, checkpoints_dir, sha256_bytes, sha256_file, torch_bytes


@dataclass
class TrainedModel:
    """A trained network (EMA weights, eval mode) with what made it."""

    net: nn.Module
    config: TrainConfig
    manifest: dict[str, Any]
    loss_history: list[float]

    @property
    def schedule(self) -> NoiseSchedule:
        return self.config.build_schedule()


def runs_dir() -> Path:
    """Where training runs keep their resumable state: ``<cache>/runs``."""
    return cache_dir() / "runs"


def run_dir(config: TrainConfig) -> Path:
    """The directory of the run that trains ``config``: ``<cache>/runs/<name>-<config identity>``."""
    return runs_dir() / f"{config.name}-{config.identity()}"


def build_manifest(config: TrainConfig, step: int, wall_time: float, losses: list[float], device: torch.device,
                   net: nn.Module) -> dict[str, Any]:
    """What a checkpoint records about the run that made it (``release`` adds the file's name, size and sha256)."""
    tail = losses[-200:]
    return {
        "name": config.name,
        "config": config.to_dict(),
        "config_identity": config.identity(),
        "seed": config.seed,
        "steps": step,
        "wall_time_s": round(wall_time, 1),
        "device": device.type,
        "hardware": describe_hardware(device),
        "precision": str(autocast_dtype(device, config.precision) or torch.float32).replace("torch.", ""),
        "parameters": count_parameters(net),
        "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
        "torch_version": torch.__version__,
        "diffbook_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def release(ema: nn.Module, config: TrainConfig, manifest: dict[str, Any], losses: list[float],
            directory: str | os.PathLike) -> dict[str, Any]:
    """Write ``<name>.pt`` (EMA weights, float32, CPU) and ``<name>.json`` (manifest with its sha256).

    Refuses weights or losses that are not finite, so a diverged run never replaces a good checkpoint.
    """
    weights = {k: v.detach().float().cpu() for k, v in ema.state_dict().items()}
    path = Path(directory) / f"{config.name}.pt"
    broken = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if broken or not all(math.isfinite(value) for value in losses):
        what = f"weights {', '.join(broken[:3])}" if broken else "loss history"
        raise ValueError(f"refusing to release {config.name}: its {what} contain NaN or infinity; "
                         f"{path} is left as it was")
    data = torch_bytes({"config": config.to_dict(), "ema": weights, "losses": losses})
    manifest = {**manifest, "file": path.name, "sha256": sha256_bytes(data), "bytes": len(data)}
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"  # before writing anything: NaN is not JSON
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_suffix(".json"), text)
    return manifest


REQUIRED_MANIFEST_KEYS = ("name", "config", "sha256")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a checkpoint manifest; errors name the file and say how to repair it."""
    path = Path(path)
    weights = path.with_suffix(".pt")
    if not path.exists():
        raise FileNotFoundError(f"no manifest {path} beside {weights}: without it the weights cannot be verified. "
                                f"Restore it from git, or retrain with `python -m diffbook.train {path.stem}`.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"manifest {path} is not valid JSON ({error}); it was probably truncated. Restore it from "
                         f"git, or retrain with `python -m diffbook.train {path.stem}`.") from None
    missing = [key for key in REQUIRED_MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise ValueError(f"manifest {path} lacks {', '.join(missing)}: it was not written by diffbook.train. "
                         f"Restore it from git, or retrain with `python -m diffbook.train {path.stem}`.")
    return manifest


def load_checkpoint(path: str | os.PathLike, device: torch.device | None = None) -> TrainedModel:
    """Load a released checkpoint, verifying its sha256 against the manifest beside it."""
    path = Path(path)
    manifest = read_manifest(path.with_suffix(".json"))
    digest = sha256_file(path)
    if digest != manifest["sha256"]:
        raise RuntimeError(f"{path} is corrupt or was replaced: sha256 {digest} != manifest {manifest['sha256']}. "
                           f"Retrain with `{manifest.get('command', 'python -m diffbook.train ' + path.stem)}` or "
                           "restore the file from git.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(payload["config"])
    net = config.build_net()
    net.load_state_dict(payload["ema"])
    net = net.to(device or pick_device()).eval().requires_grad_(False)
    return TrainedModel(net, config, manifest, payload["losses"])


def parent_sha256(config: TrainConfig) -> str | None:
    """The sha256 of the released checkpoint of ``config.init_from`` (the network a student started from and was
    taught by), or None when it has none or none is found."""
    from .configs import CONFIGS  # the named configs, to look the parent up by name

    parent = CONFIGS.get(config.init_from) if config.init_from else None
    path = find_checkpoint(parent) if parent is not None else None
    return read_manifest(path.with_suffix(".json"))["sha256"] if path is not None else None


def find_checkpoint(config: TrainConfig) -> Path | None:
    """A released checkpoint whose manifest records exactly ``config``: shipped first, then the run cache. A student
    (``init_from``) must also have been trained from its parent's current checkpoint (the manifest's
    ``init_from_sha256``): a retrained teacher makes its students stale.

    Says on stderr why a ``<name>.pt`` that exists is not used (no manifest, a broken one, another config, or a
    retrained parent), so that nobody retrains for half an hour without knowing why.
    """
    for path in (checkpoints_dir() / f"{config.name}.pt", run_dir(config) / f"{config.name}.pt"):
        if not path.exists():
            continue
        try:
            manifest = read_manifest(path.with_suffix(".json"))
            recorded = TrainConfig.from_dict(manifest["config"])
        except (OSError, ValueError, TypeError) as error:
            print(f"not using {path}: {error}", file=sys.stderr)
            continue
        if recorded.identity() == config.identity():
            trained_from = manifest.get("init_from_sha256")
            current = parent_sha256(config) if trained_from else None
            if current is not None and current != trained_from:
                print(f"not using {path}: it was trained from another checkpoint of {config.init_from} (sha256 "
                      f"{trained_from[:12]}, now {current[:12]}); it is retrained from the current one",
                      file=sys.stderr)
                continue
            return path
        changed = sorted(k for k, v in config.to_dict().items() if recorded.to_dict().get(k) != v)
        print(f"not using {path}: it was trained with another config (differs in {', '.join(changed)})",
              file=sys.stderr)
    return None
