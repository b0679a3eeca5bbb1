"""One training loop for every chapter: AdamW, warm-up, EMA, gradient clipping, bf16 autocast where it helps,
atomic checkpoints with exact resume, and a manifest beside every released checkpoint.

Command line (what made every file under ``checkpoints/``)::

    python -m diffbook.train mnist_ddpm --out checkpoints

A run keeps its resumable state in ``<cache>/runs/<name>-<config hash>/state.pt``; killing it and running
the same command again continues from the last checkpoint and ends with the same weights, bit for bit
on CPU, as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .data import load_dataset
from .device import autocast, autocast_dtype, describe_hardware, pick_device
from .conversions import predictor_from_trained
from .losses import OBJECTIVES
from .nets import MLPConfig, build_net, count_parameters
from .ode import heun, time_grid
from .schedules import NoiseSchedule
from .storage import atomic_torch_save, atomic_write_text, cache_dir, checkpoints_dir, sha256_file
from .toy import TOY_DATASETS, toy_samples

# Fields that do not change the trained weights, and so do not change a run's identity.
_NOT_IDENTITY = ("checkpoint_every",)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained network. Two equal configs give identical weights on CPU."""

    name: str
    dataset: str = "mnist"
    net: str = "unet"
    net_config: dict = field(default_factory=dict)
    objective: str = "ddpm_eps"
    schedule: str = "linear"
    T: int = 1000
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 0
    train_subset: int | None = None
    class_conditional: bool = False
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        for name in ("steps", "batch_size", "checkpoint_every", "T"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def identity(self) -> str:
        """A short hash of the fields that determine the weights."""
        values = {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def build_net(self) -> nn.Module:
        return build_net(self.net, self.net_config)

    def build_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.named(self.schedule, self.T)


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
    return cache_dir() / "runs"


def run_dir(config: TrainConfig) -> Path:
    return runs_dir() / f"{config.name}-{config.identity()}"


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: consecutive slices of one seeded permutation per epoch.

    A pure function of ``step``, so resuming needs no data-loader state.
    """
    flat = step * batch_size + torch.arange(batch_size)
    epochs, positions = flat // n, flat % n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        mask = epochs == epoch
        out[mask] = perm[positions[mask]]
    return out


REFLOW_ODE_STEPS = 100  # Heun steps used to couple noise with data for reflow


def reflow_pairs(parent: str, n: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """(n, 2, ...) pairs ``[ODE(noise), noise]``: the coupling a trained flow ``parent`` (a config name) defines,
    integrated with :data:`REFLOW_ODE_STEPS` Heun steps from a seeded batch of noise."""
    from .configs import CONFIGS  # configs imports this module
    if parent not in CONFIGS:
        raise ValueError(f"unknown reflow parent {parent!r}: expected a config name such as 'ring_fm'")
    model = load_or_train(CONFIGS[parent], device=device)
    net_config = model.net.config
    shape = (net_config.dim,) if isinstance(net_config, MLPConfig) else \
        (net_config.in_channels, net_config.image_size, net_config.image_size)
    noise = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        data = heun(predictor_from_trained(model).velocity, noise.to(next(model.net.parameters()).device),
                    time_grid(REFLOW_ODE_STEPS)).cpu()
    return torch.stack([data, noise], dim=1)


def pattern_dataset(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``<dataset>_w``: a dataset with the locality chapter's "W" pattern planted at a random amplitude."""
    from .locality import add_pattern, w_pattern
    dataset = load_dataset(name.removesuffix("_w"), "train")
    return add_pattern(dataset.tensor(), w_pattern(dataset.images.shape[-1]), seed), torch.from_numpy(dataset.labels)


def _load_training_data(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    if config.dataset.endswith("_w"):
        images, labels = pattern_dataset(config.dataset, config.seed)
        if config.train_subset is not None:
            images, labels = images[: config.train_subset], labels[: config.train_subset]
        return images, (labels if config.class_conditional else None)
    if config.dataset.startswith("reflow:"):
        return reflow_pairs(config.dataset.removeprefix("reflow:"), config.train_subset or 10_000, config.seed), None
    if config.dataset in TOY_DATASETS:  # 2-D toy data: a fixed sample of train_subset points
        return toy_samples(config.dataset, config.train_subset or 100_000, seed=config.seed), None
    dataset = load_dataset(config.dataset, "train")
    images = dataset.tensor()
    labels = torch.from_numpy(dataset.labels)
    if config.train_subset is not None:
        images, labels = images[: config.train_subset], labels[: config.train_subset]
    return images, (labels if config.class_conditional else None)


def _lr_at(config: TrainConfig, step: int) -> float:
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


@torch.no_grad()
def _update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


@contextlib.contextmanager
def _deferred_interrupt():
    """Turn Ctrl-C into a flag checked between steps, so a run always stops on a finished step."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(config: TrainConfig, *, device: torch.device | None = None, out_dir: str | os.PathLike | None = None,
          max_steps: int | None = None, progress: bool = True, command: str | None = None) -> TrainedModel:
    """Train ``config`` (resuming from its run directory if a checkpoint is there) and return the EMA model.

    ``max_steps`` stops early after that many total steps, leaving a resumable checkpoint (used by tests to
    simulate an interruption). When the run completes, the EMA weights and a manifest are written to
    ``out_dir`` (default: the run directory) as ``<name>.pt`` / ``<name>.json``.
    """
    device = device or pick_device()
    directory = run_dir(config)
    state_path = directory / "state.pt"
    amp_dtype = autocast_dtype(device, config.precision)

    torch.manual_seed(config.seed)
    net = config.build_net().to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    schedule = config.build_schedule()
    step, wall_time, losses = 0, 0.0, []

    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != config.to_dict():
            raise RuntimeError(f"{state_path} belongs to another config; delete it to start over")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, wall_time, losses = state["step"], state["wall_time"], state["losses"]
        print(f"resuming {config.name} from step {step}/{config.steps} ({state_path})", file=sys.stderr)
    else:
        # Identical starting RNG whatever happened before this call.
        torch.manual_seed(config.seed + 1)

    def save_state() -> None:
        atomic_torch_save({
            "config": config.to_dict(), "step": step, "wall_time": wall_time, "losses": losses,
            "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }, state_path)

    stop_at = config.steps if max_steps is None else min(config.steps, max_steps)
    if step < stop_at:
        images, labels = _load_training_data(config)
        net.train()
        bar = tqdm(total=stop_at, initial=step, desc=config.name, disable=not progress, mininterval=2.0,
                   file=sys.stderr, dynamic_ncols=True)
        with _deferred_interrupt() as interrupted:
            try:
                while step < stop_at:
                    started = time.perf_counter()
                    idx = _batch_indices(step, config.batch_size, len(images), config.seed)
                    x0 = images[idx].to(device)
                    y = labels[idx].to(device) if labels is not None else None
                    for group in optimizer.param_groups:
                        group["lr"] = _lr_at(config, step)
                    with autocast(device, amp_dtype):
                        loss = OBJECTIVES[config.objective](net, x0, schedule, generator, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip:
                        nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
                    optimizer.step()
                    _update_ema(ema, net, min(config.ema_decay, (1 + step) / (10 + step)))
                    step += 1
                    losses.append(loss.item())
                    wall_time += time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
                    if step % config.checkpoint_every == 0 or step == stop_at or interrupted["set"]:
                        save_state()
                    if interrupted["set"]:
                        print(f"\ninterrupted at step {step}; state saved to {state_path}. "
                              "Run the same command again to resume.", file=sys.stderr)
                        raise KeyboardInterrupt
            finally:
                bar.close()

    manifest = _manifest(config, step, wall_time, losses, device, ema)
    manifest["command"] = command or f"diffbook.train.train(CONFIGS[{config.name!r}])"
    if step >= config.steps:
        target = Path(out_dir) if out_dir is not None else directory
        manifest = release(ema, config, manifest, losses, target)
    return TrainedModel(ema, config, manifest, losses)


def _manifest(config: TrainConfig, step: int, wall_time: float, losses: list[float], device: torch.device,
              net: nn.Module) -> dict[str, Any]:
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
            directory: Path) -> dict[str, Any]:
    """Write ``<name>.pt`` (EMA weights, float32, CPU) and ``<name>.json`` (manifest with its sha256)."""
    weights = {k: v.detach().float().cpu() for k, v in ema.state_dict().items()}
    path = Path(directory) / f"{config.name}.pt"
    digest = atomic_torch_save({"config": config.to_dict(), "ema": weights, "losses": losses}, path)
    manifest = {**manifest, "file": path.name, "sha256": digest, "bytes": path.stat().st_size}
    atomic_write_text(path.with_suffix(".json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_checkpoint(path: str | os.PathLike, device: torch.device | None = None) -> TrainedModel:
    """Load a released checkpoint, verifying its sha256 against the manifest beside it."""
    path = Path(path)
    manifest_path = path.with_suffix(".json")
    if not manifest_path.exists():
        raise FileNotFoundError(f"no manifest {manifest_path} beside {path}")
    manifest = json.loads(manifest_path.read_text())
    digest = sha256_file(path)
    if digest != manifest["sha256"]:
        raise RuntimeError(f"{path} is corrupt or was replaced: sha256 {digest} != manifest {manifest['sha256']}. "
                           f"Retrain with `{manifest['command']}` or restore the file from git.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(payload["config"])
    net = config.build_net()
    net.load_state_dict(payload["ema"])
    net = net.to(device or pick_device()).eval().requires_grad_(False)
    return TrainedModel(net, config, manifest, payload["losses"])


def find_checkpoint(config: TrainConfig) -> Path | None:
    """A released checkpoint whose manifest records exactly ``config``: shipped first, then the run cache."""
    for path in (checkpoints_dir() / f"{config.name}.pt", run_dir(config) / f"{config.name}.pt"):
        manifest_path = path.with_suffix(".json")
        if path.exists() and manifest_path.exists():
            recorded = TrainConfig.from_dict(json.loads(manifest_path.read_text())["config"])
            if recorded.identity() == config.identity():
                return path
    return None


def load_or_train(config: TrainConfig, *, device: torch.device | None = None, progress: bool = True) -> TrainedModel:
    """The shipped (or cached) checkpoint trained with exactly ``config``, else train one now."""
    path = find_checkpoint(config)
    if path is not None:
        return load_checkpoint(path, device)
    print(f"no checkpoint for {config.name} (config {config.identity()}); training it now", file=sys.stderr)
    return train(config, device=device, progress=progress)


def main(argv: list[str] | None = None) -> None:
    from .configs import CONFIGS

    parser = argparse.ArgumentParser(prog="python -m diffbook.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=sorted(CONFIGS), help="a named training config (diffbook.configs)")
    parser.add_argument("--out", default=None, help="directory for <name>.pt/.json (default: the run directory)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: picked automatically)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    command = "python -m diffbook.train " + " ".join(sys.argv[1:] if argv is None else argv)
    result = train(config, device=pick_device(args.device), out_dir=args.out, command=command)
    print(json.dumps(result.manifest, indent=2))


if __name__ == "__main__":
    main()
