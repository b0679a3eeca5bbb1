r"""Langevin dynamics: sampling with nothing but a score.

Unadjusted Langevin: :math:`x_{k+1} = x_k + \eta\,\nabla\log p(x_k) + \sqrt{2\eta}\,z_k`. Annealed Langevin
(Song & Ermon 2019) runs it at decreasing noise levels :math:`\sigma_1 > \dots > \sigma_L` with step
:math:`\eta_i = \epsilon\,\sigma_i^2/\sigma_L^2`, so that early levels move mass between modes and late ones refine.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


@torch.no_grad()
def langevin(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, step_size: float, n_steps: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``n_steps`` of unadjusted Langevin dynamics from ``x`` with step size ``step_size`` (η)."""
    if step_size <= 0 or n_steps < 0:
        raise ValueError(f"need step_size > 0 and n_steps >= 0, got {step_size}, {n_steps}")
    for _ in range(n_steps):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x + step_size * score(x) + (2 * step_size) ** 0.5 * z
    return x


@torch.no_grad()
def annealed_langevin(score: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas: Sequence[float],
                      epsilon: float, steps_per_level: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Annealed Langevin dynamics: ``steps_per_level`` Langevin steps with ``score(x, sigma)`` at each of the
    decreasing noise levels ``sigmas``, step size ``epsilon * sigma**2 / sigmas[-1]**2``."""
    sigmas = list(sigmas)
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas must be strictly decreasing")
    for sigma in sigmas:
        x = langevin(lambda v: score(v, sigma), x, epsilon * sigma**2 / sigmas[-1] ** 2, steps_per_level, generator)
    return x
