r"""ODE samplers for :math:`dx/dt = u_t(x)`, integrated from noise (t = 1) to data (t = 0).

Each sampler is one function with one signature, ``sampler(velocity, x, times)``: ``velocity(x, t)`` takes
``t`` of shape (batch,), ``times`` is a decreasing grid from :func:`time_grid`. ``trajectory=True`` returns
every state, for plots and for measuring straightness.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(n_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """``n_steps + 1`` equally spaced times from ``t_start`` to ``t_end`` (float64)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64)


def _full(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)


def _check_grid(times: torch.Tensor) -> None:
    if times.ndim != 1 or len(times) < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 points, got shape {tuple(times.shape)}")


def euler(velocity: Velocity, x: torch.Tensor, times: torch.Tensor, *, trajectory: bool = False,
          progress: bool = False) -> torch.Tensor | list[torch.Tensor]:
    r"""Euler: :math:`x_{i+1} = x_i + (t_{i+1} - t_i)\,u_{t_i}(x_i)`. One velocity evaluation per step."""
    _check_grid(times)
    states = [x]
    for i in tqdm(range(len(times) - 1), disable=not progress, desc="euler"):
        x = x + (times[i + 1] - times[i]).item() * velocity(x, _full(times[i], x))
        states.append(x)
    return states if trajectory else x


def heun(velocity: Velocity, x: torch.Tensor, times: torch.Tensor, *, trajectory: bool = False,
         progress: bool = False) -> torch.Tensor | list[torch.Tensor]:
    r"""Heun (explicit trapezoid, second order): an Euler guess :math:`\tilde x`, then
    :math:`x_{i+1} = x_i + \tfrac12 h\,[u_{t_i}(x_i) + u_{t_{i+1}}(\tilde x)]`. Two evaluations per step."""
    _check_grid(times)
    states = [x]
    for i in tqdm(range(len(times) - 1), disable=not progress, desc="heun"):
        h = (times[i + 1] - times[i]).item()
        slope = velocity(x, _full(times[i], x))
        guess = x + h * slope
        x = x + 0.5 * h * (slope + velocity(guess, _full(times[i + 1], x)))
        states.append(x)
    return states if trajectory else x


SAMPLERS = {"euler": euler, "heun": heun}
NFE_PER_STEP = {"euler": 1, "heun": 2}


def straightness(trajectory: list[torch.Tensor], times: torch.Tensor) -> torch.Tensor:
    r"""Per-sample curvature of a discretised path, Liu et al. (2023)'s straightness:
    :math:`S = \int_0^1 \lVert \dot x_t - (x_1 - x_0)\rVert^2 dt` (with :math:`\dot x` from finite differences);
    0 exactly when the path is a straight line at constant speed."""
    _check_grid(times)
    chord = (trajectory[0] - trajectory[-1]) / (times[0] - times[-1]).item()
    total = torch.zeros(trajectory[0].shape[0], dtype=torch.float64)
    for i in range(len(times) - 1):
        h = (times[i + 1] - times[i]).item()
        speed = (trajectory[i + 1] - trajectory[i]) / h
        total += abs(h) * (speed - chord).flatten(1).pow(2).sum(1).double().cpu()
    return total
