"""Data-parallel training across processes (``torchrun --nproc_per_node=N -m diffbook.train NAME``).

Every rank runs the same config on its share of the same global batch, so that N processes take the steps one process
would take with the whole batch:

- **the same batch order**: each rank computes the global batch's indices (a pure function of the step) and keeps its
  contiguous slice of ``batch_size / N`` of them;
- **the same randomness**: the objectives draw their times and noise from the run's CPU generator. Inside
  :func:`sharded_draws` every draw of the run's generator whose first dimension is the local batch draws the global
  batch's values and keeps the rank's slice, so each sample gets exactly the random numbers it gets in one process.
  This assumes what every objective of :mod:`diffbook.losses` does: its draws from the generator are per-sample
  ``torch.randn`` / ``rand`` / ``randint`` of the batch's first dimension, and its loss is a mean of per-sample terms.
  Dropout draws from the global RNG, which each rank seeds as a function of the step and its rank: with dropout, N
  processes equal one process in distribution, not draw for draw;
- **the same update**: after the backward pass the gradients are averaged over the ranks (:func:`average_gradients`,
  an all-reduce; the mean of equal shards' mean losses is the global mean loss), so every rank applies the same step
  and keeps identical weights, EMA and optimiser state.

The gradient exchange is an explicit all-reduce of ``torch.distributed`` (NCCL on CUDA, gloo on CPU) rather than the
``DistributedDataParallel`` wrapper: several objectives call the network more than once per step, or through a
Jacobian-vector product (MeanFlow), which the wrapper's hooks do not support. Only rank 0 writes checkpoints and
manifests; a stop signal on any rank stops every rank after the same step (:func:`agree_on_signal`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks: ``rank`` of ``world`` (1: a plain single-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes files (rank 0 only)."""
        return self.rank == 0


def join(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), once; without it, a single-process :class:`Group`. On CUDA each
    rank takes the GPU of its ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(), device
    if device.type == "mps":
        raise ValueError("several processes need CUDA (NCCL) or the CPU (gloo); MPS has no collective backend here: "
                         "run one process, or pass --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a rank that dies leaves the others waiting at most this long
        timeout = datetime.timedelta(seconds=float(os.environ.get("DIFFBOOK_DIST_TIMEOUT_S", "600")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Group(dist.get_rank(), dist.get_world_size()), device


def local_slice(n_global: int, group: Group) -> slice:
    """This rank's contiguous share of a global batch of ``n_global`` (which the world size must divide)."""
    if n_global % group.world:
        raise ValueError(f"the batch size {n_global} must be divisible by the number of processes ({group.world}): "
                         f"change batch_size or --nproc_per_node")
    share = n_global // group.world
    return slice(group.rank * share, (group.rank + 1) * share)


_DRAWS = ("randn", "rand", "randint")


@contextlib.contextmanager
def sharded_draws(generator: torch.Generator, group: Group, n_local: int) -> Iterator[None]:
    """Within the block, a draw from ``generator`` whose size starts with ``n_local`` draws the global batch's values
    (first dimension ``n_local * world``) and returns this rank's slice: the numbers one process would have drawn for
    these samples. Other draws, and draws from other generators, are untouched. A no-op for a single process."""
    if not group.active:
        yield
        return
    originals = {name: getattr(torch, name) for name in _DRAWS}
    rows = slice(group.rank * n_local, (group.rank + 1) * n_local)

    def wrap(name: str):
        original = originals[name]

        def draw(*args, **kwargs):
            if kwargs.get("generator") is not generator:
                return original(*args, **kwargs)
            args = list(args)
            # where the size is: a keyword, a tuple argument (randint's third or second), or randn/rand's int arguments
            where = "size" if "size" in kwargs else next(
                (i for i, a in enumerate(args) if isinstance(a, (tuple, list, torch.Size))), None)
            if where is None and name != "randint":
                size, where = tuple(args), "ints"
            elif where is None:
                return original(*args, **kwargs)
            else:
                size = tuple(kwargs["size"] if where == "size" else args[where])
            if not size or size[0] != n_local:
                return original(*args, **kwargs)
            global_size = (n_local * group.world, *size[1:])
            if where == "size":
                kwargs["size"] = global_size
            elif where == "ints":
                args = [global_size]
            else:
                args[where] = global_size
            return original(*args, **kwargs)[rows]

        return draw

    try:
        for name in _DRAWS:
            setattr(torch, name, wrap(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


def average_gradients(net: nn.Module, group: Group) -> None:
    """Replace every gradient by its mean over the ranks (one flattened all-reduce)."""
    if not group.active:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= group.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(value: float, group: Group, device: torch.device) -> float:
    """The mean of a number over the ranks (every rank gets it)."""
    if not group.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / group.world


def agree_on_signal(signum: int | None, group: Group, device: torch.device) -> int | None:
    """The stop signal any rank received (the largest number), so that all ranks stop after the same step."""
    if not group.active:
        return signum
    tensor = torch.tensor([signum or 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item()) or None


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()
