"""The training loop (AdamW, warm-up, EMA, gradient clipping, bf16 autocast, exact resume) and its command line.

Command line (what made every file under ``checkpoints/``)::

    python -m diffbook.train mnist_ddpm --out checkpoints

A run keeps its resumable state in ``<cache>/runs/<name>-<config hash>/state.pt``; killing it and running
the same command again continues from the last checkpoint and ends with the same weights, bit for bit
on CPU, as an uninterrupted run. The configs live in :mod:`diffbook.configs`, the data each one trains on
in :mod:`diffbook.training_data`, the files a run writes and reads in :mod:`diffbook.checkpoints`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .checkpoints import (TrainedModel, build_manifest, find_checkpoint, load_checkpoint, parent_sha256, release,
                          run_dir)
from .configs import CONFIGS, TrainConfig
from .device import autocast, autocast_dtype, pick_device
from .distributed import (agree_on_signal, average_gradients, barrier, join, local_slice, mean_over_ranks,
                          sharded_draws)
from .losses import OBJECTIVES, Objective
from .predictors import predictor_from_trained
from .storage import atomic_torch_save
from .training_data import load_training_data


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


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG's seed for one rank at one step of a multi-process run: dropout masks differ between ranks and a
    resumed run draws the same ones (with dropout, N processes equal one process in distribution, not draw for draw)."""
    return (seed * 1_000_003 + step) * 1_009 + rank + 1


def _lr_at(config: TrainConfig, step: int) -> float:
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


@torch.no_grad()
def _update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def _starting_point(config: TrainConfig, net: nn.Module, device: torch.device, fresh: bool
                    ) -> tuple[Objective, bool]:
    """Load ``config.init_from``'s trained weights into ``net`` (when set, on a ``fresh`` start; a resumed run's state
    holds them). Returns the objective with its options bound, and the teacher's
    :class:`~diffbook.predictors.Predictor` where the objective takes one; and whether it takes ``progress``."""
    parameters = inspect.signature(OBJECTIVES[config.objective]).parameters
    objective = functools.partial(OBJECTIVES[config.objective], **config.objective_options)
    takes_progress = "progress" in parameters
    if config.init_from is None:
        return objective, takes_progress
    if config.init_from not in CONFIGS:
        raise ValueError(f"{config.name}: init_from names no config: {config.init_from!r} (see diffbook.configs)")
    parent = CONFIGS[config.init_from]
    if (parent.net, parent.net_config) != (config.net, config.net_config):
        raise ValueError(f"{config.name} starts from {parent.name}, whose network differs ({parent.net} "
                         f"{parent.net_config}): a student must have its teacher's architecture")
    takes_teacher = "teacher" in parameters
    if not (fresh or takes_teacher):
        return objective, takes_progress  # a resumed run holds its weights already, and needs no teacher
    teacher = load_or_train(parent, device=device)
    if fresh:
        net.load_state_dict(teacher.net.state_dict())
    if takes_teacher:
        teacher.net.eval().requires_grad_(False)
        objective = functools.partial(objective, teacher=predictor_from_trained(teacher))
    return objective, takes_progress


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM (``timeout``, a job scheduler, a container stop).

    Raised after the state of the last finished step is saved; ``signum`` gives the conventional exit status
    ``128 + signum`` that the command line exits with.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; nothing was saved from the diverged step on."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[dict[str, int | None]]:
    """Turn SIGINT and SIGTERM into a flag checked between steps, so a run always stops on a finished step."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["signum"] = signum

    previous = {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _non_finite(net: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``net`` that hold a NaN or an infinity."""
    tensors = list(net.named_parameters()) + list(net.named_buffers())
    return [name for name, value in tensors if value.is_floating_point() and not torch.isfinite(value).all()]


class UnreadableState(RuntimeError):
    """A run's resumable state file cannot be read (cut short by a crash or a full disk, or not a training state)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def read_state(state_path: Path, device: torch.device) -> dict:
    """Load a run's resumable state; an unreadable file raises :class:`UnreadableState`, naming it and how to start
    over (``python -m diffbook.train NAME --start-over``, or ``train(..., start_over=True)``)."""
    how = (f"To start this run over, run again with --start-over (or start_over=True), which moves it aside, or "
           f"move it yourself: mv '{state_path}' '{state_path}.broken'")
    try:
        state = torch.load(state_path, map_location=device, weights_only=False)
        missing = [k for k in ("config", "step", "net", "ema", "optimizer", "generator") if k not in state]
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise UnreadableState(f"cannot read the resumable state {state_path} ({type(error).__name__}: {error}); it "
                              f"was probably cut short by a crash or a full disk. {how}", state_path) from None
    if missing:
        raise UnreadableState(f"{state_path} lacks {', '.join(missing)}: it is not a diffbook training state. {how}",
                              state_path)
    return state


def move_aside(state_path: Path) -> Path:
    """Rename an unreadable state to ``state.pt.broken-<UTC time>`` (kept for inspection, never deleted)."""
    target = state_path.with_name(f"{state_path.name}.broken-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    state_path.rename(target)
    print(f"moved the unreadable {state_path} aside to {target}; starting over", file=sys.stderr)
    return target


def train(config: TrainConfig, *, device: torch.device | None = None, out_dir: str | os.PathLike | None = None,
          max_steps: int | None = None, progress: bool = True, command: str | None = None,
          start_over: bool = False) -> TrainedModel:
    """Train ``config`` (resuming from its run directory if a checkpoint is there) and return the EMA model.

    ``max_steps`` stops early after that many total steps, leaving a resumable checkpoint (used by tests to
    simulate an interruption). When the run completes, the EMA weights and a manifest are written to
    ``out_dir`` (default: the run directory) as ``<name>.pt`` / ``<name>.json``.

    Every step checks the loss and the gradient norm: a NaN or infinity raises :class:`TrainingDiverged` before
    the optimiser applies it, and nothing is saved from then on, so the last checkpoint stays the last good one.
    SIGINT and SIGTERM save the state of the last finished step and raise :class:`Interrupted`.

    An unreadable state file raises :class:`UnreadableState`; with ``start_over=True`` it is moved aside instead
    (see :func:`move_aside`) and the run starts from step 0. A readable state is always resumed.
    """
    device = device or pick_device()
    ranks, device = join(device)  # under torchrun: this process's rank, and its GPU
    local_slice(config.batch_size, ranks)  # a batch that does not split over the processes fails before any work
    directory = run_dir(config)
    state_path = directory / "state.pt"
    amp_dtype = autocast_dtype(device, config.precision)

    torch.manual_seed(config.seed)
    net = config.build_net().to(device)
    # fresh: no state to resume (or an unreadable one that start_over moves aside)
    objective, takes_progress = _starting_point(config, net, device, fresh=start_over or not state_path.exists())
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    schedule = config.build_schedule()
    step, wall_time, losses = 0, 0.0, []

    state = None
    if state_path.exists():
        try:
            state = read_state(state_path, device)
        except UnreadableState:
            if not start_over:
                raise
            if ranks.writes:  # rank 0 moves it aside; the other ranks start over with it
                move_aside(state_path)
    barrier(ranks)
    if state is not None:
        if state["config"] != config.to_dict():
            raise RuntimeError(f"{state_path} belongs to another config; delete it to start over")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())  # RNG states are CPU tensors, whatever map_location did
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        step, wall_time, losses = state["step"], state["wall_time"], state["losses"]
        if ranks.writes:
            print(f"resuming {config.name} from step {step}/{config.steps} ({state_path})", file=sys.stderr)
    else:
        # Identical starting RNG whatever happened before this call.
        torch.manual_seed(config.seed + 1)

    def diverged(what: str, value: float | None = None) -> TrainingDiverged:
        last = (f"the last good checkpoint is {state_path} (step {read_state(state_path, torch.device('cpu'))['step']})"
                if state_path.exists() else "no checkpoint was written yet")
        shown = "" if value is None else f" ({value})"
        return TrainingDiverged(
            f"{config.name}: {what} is not finite{shown} at step {step + 1}; stopped without saving anything "
            f"from this step on, and {last}. The same config diverges again at the same step: lower `lr` or raise "
            "`warmup_steps`, or check the training data for NaN/inf, then run again (a changed config starts a "
            "new run).")

    def save_state() -> None:
        broken = _non_finite(net) + [f"ema.{name}" for name in _non_finite(ema)]
        if broken:
            raise diverged(f"the weights ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")
        if not ranks.writes:  # every rank holds the same state; rank 0 writes it
            barrier(ranks)
            return
        atomic_torch_save({
            "config": config.to_dict(), "step": step, "wall_time": wall_time, "losses": losses,
            "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }, state_path)
        barrier(ranks)

    stop_at = config.steps if max_steps is None else min(config.steps, max_steps)
    if step < stop_at:
        images, labels = load_training_data(config, load_or_train)
        net.train()
        bar = tqdm(total=stop_at, initial=step, desc=config.name, disable=not (progress and ranks.writes),
                   mininterval=2.0, file=sys.stderr, dynamic_ncols=True)
        with _deferred_interrupt() as interrupted:
            try:
                while step < stop_at:
                    started = time.perf_counter()
                    if ranks.active:  # each rank its own stream for the global RNG (dropout), a function of the step
                        torch.manual_seed(_rank_seed(config.seed, step, ranks.rank))
                    # the global batch (every rank draws the same), then this rank's share of it
                    idx = _batch_indices(step, config.batch_size, len(images), config.seed)
                    x0 = images[idx]
                    y = labels[idx] if labels is not None else None
                    if config.label_drop:  # "no class" for a random share of the batch, drawn on the CPU
                        dropped = torch.rand(len(idx), generator=generator) < config.label_drop
                        y = torch.where(dropped, config.net_config["num_classes"], y)
                    if config.hflip:  # random left-right flips, drawn on the CPU after the label drop's draws
                        flipped = torch.rand(len(idx), generator=generator) < 0.5
                        x0 = torch.where(flipped.view(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
                    share = local_slice(len(idx), ranks)
                    x0 = x0[share].to(device)
                    y = y[share].to(device) if y is not None else None
                    for group in optimizer.param_groups:
                        group["lr"] = _lr_at(config, step)
                    extra = {"progress": step / config.steps} if takes_progress else {}
                    with sharded_draws(generator, ranks, len(x0)), autocast(device, amp_dtype):
                        loss = objective(net, x0, schedule, generator, y, **extra)
                    loss_value = mean_over_ranks(loss.item(), ranks, device)  # the global batch's loss
                    if not math.isfinite(loss_value):
                        raise diverged("the loss", loss_value)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    average_gradients(net, ranks)
                    # With grad_clip = 0 an infinite max_norm measures the norm without clipping.
                    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip or float("inf"))
                    if not torch.isfinite(grad_norm):
                        raise diverged("the gradient norm", grad_norm.item())
                    optimizer.step()
                    _update_ema(ema, net, min(config.ema_decay, (1 + step) / (10 + step)))
                    step += 1
                    losses.append(loss_value)
                    wall_time += time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
                    signum = agree_on_signal(interrupted["signum"], ranks, device)  # all ranks stop together
                    if step % config.checkpoint_every == 0 or step == stop_at or signum is not None:
                        save_state()
                    if signum is not None:
                        message = (f"{signal.Signals(signum).name}: stopped at step {step}; state saved to "
                                   f"{state_path}. Run the same command again to resume.")
                        print("\n" + message, file=sys.stderr)
                        raise Interrupted(signum, message)
            finally:
                bar.close()

    manifest = build_manifest(config, step, wall_time, losses, device, ema)
    if ranks.active:
        manifest["processes"] = ranks.world  # wall time and hardware are per process
    parent = parent_sha256(config)
    if parent is not None:
        manifest["init_from_sha256"] = parent  # the parent checkpoint this student came from
    manifest["command"] = command or f"diffbook.train.train(CONFIGS[{config.name!r}])"
    if step >= config.steps and ranks.writes:
        target = Path(out_dir) if out_dir is not None else directory
        manifest = release(ema, config, manifest, losses, target)
    barrier(ranks)
    return TrainedModel(ema, config, manifest, losses)


def fit(build_net: Callable[[], nn.Module], loss: Callable[[nn.Module, torch.Generator], torch.Tensor], steps: int,
        *, lr: float = 2e-3, seed: int = 0, grad_clip: float = 1.0, progress: bool = False) -> nn.Module:
    """A short training run in memory, for exercises and toy experiments: ``build_net()`` (called after seeding, so
    the initial weights are reproducible), Adam, the learning rate decaying linearly to 0, gradient clipping;
    ``loss(net, generator)`` draws its own batch from ``generator`` (seeded by ``seed``); a loss with a third
    parameter named ``progress`` also gets the share of training done, in [0, 1) (a curriculum, as ECT's). Returns
    the network in eval mode without gradients; the same seed gives the same weights on the CPU. No checkpoints and
    no resume: anything worth keeping is a :class:`TrainConfig` trained by :func:`train`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    with_progress = "progress" in inspect.signature(loss).parameters
    torch.manual_seed(seed)
    net = build_net()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / steps)
    net.train()
    for step in tqdm(range(steps), disable=not progress, desc="fit", leave=False):
        value = loss(net, generator, step / steps) if with_progress else loss(net, generator)
        if not torch.isfinite(value):
            raise TrainingDiverged(f"fit: the loss is not finite ({float(value)}) at step {step + 1}: lower lr")
        optimizer.zero_grad()
        value.backward()
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        decay.step()
    return net.eval().requires_grad_(False)


def load_or_train(config: TrainConfig, *, device: torch.device | None = None, progress: bool = True) -> TrainedModel:
    """The shipped (or cached) checkpoint trained with exactly ``config``, else train one now."""
    path = find_checkpoint(config)
    if path is not None:
        return load_checkpoint(path, device)
    print(f"no checkpoint for {config.name} (config {config.identity()}); training it now", file=sys.stderr)
    return train(config, device=device, progress=progress)


def _confirm(question: str) -> bool:
    """Ask on an interactive terminal; never blocks a script or a job (no terminal means no)."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    print(question, end="", file=sys.stderr, flush=True)
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False


def command_line(args: list[str], environ: Mapping[str, str]) -> str:
    """The command that retrains this run, as its manifest records it: ``python -m diffbook.train ARGS``, or the
    ``torchrun`` line when the environment says torchrun started this process (``WORLD_SIZE`` > 1)."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return "python -m diffbook.train " + " ".join(args)
    per_node = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = f"--nnodes={world // per_node} " if world > per_node else ""
    return f"torchrun {nodes}--nproc_per_node={per_node} -m diffbook.train " + " ".join(args)


def main(argv: list[str] | None = None) -> None:
    """``python -m diffbook.train NAME [--out DIR] [--device D] [--steps N] [--start-over]``: train a named config;
    ``torchrun --nproc_per_node=N -m diffbook.train NAME ...`` trains it on N processes (:mod:`diffbook.distributed`)."""
    parser = argparse.ArgumentParser(prog="python -m diffbook.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=sorted(CONFIGS), help="a named training config (diffbook.configs)")
    parser.add_argument("--out", default=None, help="directory for <name>.pt/.json (default: the run directory)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: picked automatically)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--start-over", action="store_true",
                        help="if the run's resumable state is unreadable, move it aside and train from step 0")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    command = command_line(sys.argv[1:] if argv is None else argv, os.environ)
    device = pick_device(args.device)
    try:
        try:
            result = train(config, device=device, out_dir=args.out, command=command, start_over=args.start_over)
        except UnreadableState as error:
            several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun: no prompt on every rank
            if several or not _confirm(f"error: {error}\nMove {error.path.name} aside and start this run over? [y/N] "):
                sys.exit(f"error: {error}")
            result = train(config, device=device, out_dir=args.out, command=command, start_over=True)
    except Interrupted as stop:  # the message is printed already; exit like the signal, without a traceback
        sys.exit(128 + stop.signum)
    except TrainingDiverged as error:
        sys.exit(f"error: {error}")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one manifest from rank 0
        print(json.dumps(result.manifest, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
