r"""Samplers. Chapter 1: ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), as one generator.

:func:`ddpm_steps` yields every step of the reverse chain (the state and the network's guess of
:math:`x_0`), which is what the progressive-decompression figure needs; :func:`sample_ddpm` runs it to the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from .device import autocast, autocast_dtype
from .schedules import NoiseSchedule


@dataclass(frozen=True)
class ReverseStep:
    """One step of a reverse chain, from time ``t`` to ``t_next`` (< t): the state ``x`` at ``t_next``, and
    :math:`\\hat x_0` as predicted at time ``t``."""

    t: int
    t_next: int
    x: torch.Tensor
    x0_hat: torch.Tensor


def ddpm_timesteps(T: int, steps: int | None) -> list[int]:
    """``steps`` evenly spaced time steps in 1..T (all of them when ``steps`` is None or T)."""
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in 1..{T}, got {steps}")
    return sorted({round(1 + i * (T - 1) / max(1, steps - 1)) for i in range(steps)}) if steps > 1 else [T]


@torch.no_grad()
def ddpm_steps(net: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, *, steps: int | None = None,
               generator: torch.Generator | None = None, y: torch.Tensor | None = None, variance: str = "beta",
               clip_x0: bool = True, precision: str = "fp32", progress: bool = False) -> Iterator[ReverseStep]:
    r"""Ancestral sampling from ε-prediction ``net``:

    .. math::
        \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta(x_t,t)}{\sqrt{\bar\alpha_t}},\qquad
        x_{t-1} = \tilde\mu_t(x_t, \hat x_0) + \sigma_t z,\quad
        \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t}\hat x_0 + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}x_t,

    with :math:`\sigma_t^2 = \beta_t` (``variance="beta"``) or :math:`\tilde\beta_t` (``"posterior"``), and no
    noise on the last step. Without clipping this is exactly Algorithm 2 of Ho et al.; ``clip_x0`` clamps
    :math:`\hat x_0` to the data range [−1, 1]. With ``steps < T`` the chain runs on the respaced schedule.
    Noise ``z`` is drawn on the CPU from ``generator``, so a seed gives the same images on any device.
    """
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    timesteps = ddpm_timesteps(schedule.T, steps)
    sub = schedule.respaced(timesteps)
    abar = sub.alpha_bar.tolist()
    c0, ct = (c.tolist() for c in sub.posterior_mean_coefs)
    var = (sub.beta if variance == "beta" else sub.posterior_variance).tolist()
    device = x_T.device
    amp = autocast_dtype(device, precision)
    was_training = net.training
    net.eval()
    x = x_T
    try:
        for i in tqdm(range(len(timesteps), 0, -1), disable=not progress, desc="DDPM", leave=False):
            t = torch.full((x.shape[0],), float(timesteps[i - 1]), device=device)
            with autocast(device, amp):
                eps = net(x, t, y).float()
            x0_hat = (x - (1 - abar[i]) ** 0.5 * eps) / abar[i] ** 0.5
            if clip_x0:
                x0_hat = x0_hat.clamp(-1, 1)
            mean = c0[i] * x0_hat + ct[i] * x
            if i > 1:
                z = torch.randn(x.shape, generator=generator).to(device)
                x = mean + var[i] ** 0.5 * z
            else:
                x = mean
            yield ReverseStep(timesteps[i - 1], timesteps[i - 2] if i > 1 else 0, x, x0_hat)
    finally:
        net.train(was_training)


def sample_ddpm(net: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor | tuple[int, ...], *,
                steps: int | None = None, generator: torch.Generator | None = None,
                device: torch.device | None = None, y: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Run :func:`ddpm_steps` to the end from ``x_T``, a starting tensor or a shape to draw
    :math:`x_T \\sim N(0, I)` for (from ``generator``, on the CPU, then moved to ``device``)."""
    if not isinstance(x_T, torch.Tensor):
        device = device or next(net.parameters()).device
        x_T = torch.randn(tuple(x_T), generator=generator).to(device)
    x = x_T
    for step in ddpm_steps(net, schedule, x_T, steps=steps, generator=generator, y=y, **options):
        x = step.x
    return x
