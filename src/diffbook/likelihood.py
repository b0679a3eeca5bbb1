r"""Exact log-likelihood through the probability-flow ODE (instantaneous change of variables, Chen et al. 2018).

Along a trajectory of :math:`dx/dt = u_t(x)`, :math:`\frac{d}{dt}\log p_t(x_t) = -\nabla\cdot u_t(x_t)`, so

.. math::
    \log p_0(x_0) = \log p_1(x_1) + \int_0^1 \nabla\cdot u_t(x_t)\,dt .

The divergence is exact (``d`` backward passes; 2-D data) or Hutchinson's unbiased estimate
:math:`\mathbb{E}_z[z^\top (\partial u/\partial x) z]` with Rademacher :math:`z` (one backward pass; images).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .elbo import bits_per_dim
from .predictors import Predictor
from .samplers import sample_heun, time_grid

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def divergence_exact(velocity: Velocity, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u(x, t), div u(x, t))`` with the trace of the Jacobian from one backward pass per dimension."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = velocity(x, t)
        flat_u, dims = u.flatten(1), x[0].numel()
        div = sum(torch.autograd.grad(flat_u[:, i].sum(), x, retain_graph=i < dims - 1)[0].flatten(1)[:, i]
                  for i in range(dims))
    return u.detach(), div.detach()


def divergence_hutchinson(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, probe: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(u(x, t), z^T (du/dx) z)`` for the given probe ``z`` (shaped like ``x``): one vector-Jacobian product."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = velocity(x, t)
        (vjp,) = torch.autograd.grad((u * probe).sum(), x)
    return u.detach(), (vjp * probe).flatten(1).sum(1).detach()


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).cpu().double()  # float64 on the CPU: MPS has none
    return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def ode_log_likelihood(model: Predictor, x0: torch.Tensor, *, n_steps: int = 100, t_start: float = 0.0,
                       t_end: float = 1.0, times: torch.Tensor | None = None, divergence: str = "exact", generator: torch.Generator | None = None,
                       prior_log_prob: Callable[[torch.Tensor], torch.Tensor] = standard_normal_log_prob,
                       progress: bool = False) -> torch.Tensor:
    r""":math:`\log p_{t_\text{start}}(x_0)` in nats per sample (float64) under ``model``'s probability-flow ODE,
    integrating the augmented ODE
    :math:`(\dot x, \dot\ell) = (u_t(x), \nabla\cdot u_t(x))` from ``t_start`` to ``t_end`` with Heun steps and
    scoring the end point under ``prior_log_prob``. ``times`` (increasing) replaces the uniform grid, e.g. to put
    more steps where the field changes fast. ``divergence="hutchinson"`` draws one Rademacher probe
    per sample from ``generator`` and keeps it along the path (unbiased for the log-likelihood)."""
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    shape, dims = x0.shape, x0[0].numel()
    velocity = model.velocity
    if divergence == "hutchinson":
        probe = (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(x0.dtype).to(x0.device)

    def augmented(state: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = state[:, :dims].reshape(shape)
        if divergence == "exact":
            u, div = divergence_exact(velocity, x, t)
        else:
            u, div = divergence_hutchinson(velocity, x, t, probe)
        return torch.cat([u.flatten(1), div[:, None].to(state.dtype)], dim=1)

    start = torch.cat([x0.flatten(1), torch.zeros(shape[0], 1, dtype=x0.dtype, device=x0.device)], dim=1)
    grid = time_grid(n_steps, t_start, t_end) if times is None else times
    end = sample_heun(Predictor(augmented, "velocity", model.path), start, grid, progress=progress)
    x1, integral = end[:, :dims].reshape(shape), end[:, dims].cpu().double()
    return prior_log_prob(x1).cpu() + integral.cpu()


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Uniform dequantisation of uint8 images onto the book's scale :math:`x = k/127.5 - 1`: each pixel is
    spread uniformly over its bin of width :data:`BIN_WIDTH` = 2/255 centred on the training value."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64)
    return ((images.double() + u - 0.5) / 127.5 - 1).float()


BIN_WIDTH = 2 / 255


def density_bits_per_dim(log_density: torch.Tensor, dims: int, bin_width: float = BIN_WIDTH) -> torch.Tensor:
    r"""Bits per dimension of the 8-bit data from a continuous density at dequantised points:
    :math:`-\log_2 P(k) \le -\frac{\log p(x)}{d\ln 2} - \log_2\Delta` (Jensen, Theis et al. 2016)."""
    return bits_per_dim(-log_density, dims) - math.log2(bin_width)
