r"""Langevin dynamics: sampling with nothing but a score.

Unadjusted Langevin: :math:`x_{k+1} = x_k + \eta\,\nabla\log p(x_k) + \sqrt{2\eta}\,z_k`, a Markov chain for one fixed
density given its score. Its annealed form (Song & Ermon 2019), which follows a model's score down its noise levels,
is a sampler: :func:`diffbook.samplers.sample_annealed_langevin`.
"""
from __future__ import annotations

from typing import Callable

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
