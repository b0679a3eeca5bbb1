r"""Score SDEs (Song et al. 2021): :math:`dx = f(t)\,x\,dt + g(t)\,dW` on :math:`t \in [0, 1]`, with
Gaussian marginals :math:`x_t \mid x_0 \sim N(m(t)\,x_0, v(t) I)`.

- VE: :math:`f = 0`, :math:`\sigma(t) = \sigma_\min(\sigma_\max/\sigma_\min)^t`, :math:`g^2 = d\sigma^2/dt`; :math:`m = 1`, :math:`v = \sigma(t)^2 - \sigma(0)^2`.
- VP: :math:`f = -\tfrac12\beta(t)`, :math:`g^2 = \beta(t)`, :math:`\beta(t) = \beta_\min + t(\beta_\max - \beta_\min)`;
  :math:`m = e^{-\frac12 B(t)}`, :math:`v = 1 - e^{-B(t)}`, :math:`B(t) = \int_0^t \beta`. With
  :math:`\beta_\min = 0.1`, :math:`\beta_\max = 20` it is the continuous limit of DDPM's linear schedule (T = 1000).
- sub-VP: :math:`f = -\tfrac12\beta(t)`, :math:`g^2 = \beta(t)(1 - e^{-2B(t)})`; :math:`m = e^{-\frac12 B(t)}`, :math:`v = (1 - e^{-B(t)})^2`.

The samplers take ``score(x, t)``, with ``t`` a tensor of shape (batch,), and integrate from t = 1 down to a
small ``t_end``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from .interpolants import Interpolant
from .ode import time_grid


@dataclass(frozen=True)
class VPSDE:
    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta(t).sqrt()

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean coefficient m(t), standard deviation sqrt(v(t)))."""
        b = self.integral_beta(t)
        return torch.exp(-0.5 * b), (1 - torch.exp(-b)).sqrt()


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return (self.beta(t) * (1 - torch.exp(-2 * self.integral_beta(t)))).sqrt()

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.integral_beta(t)
        return torch.exp(-0.5 * b), 1 - torch.exp(-b)


@dataclass(frozen=True)
class VESDE:
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), (self.sigma(t) ** 2 - self.sigma_min**2).sqrt()


SDE = Union[VPSDE, VESDE, Interpolant]  # SubVPSDE is a VPSDE; an Interpolant has drift_coef and diffusion too
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def reverse_sde_euler_maruyama(sde: SDE, score: ScoreFn, x: torch.Tensor, n_steps: int, generator: torch.Generator | None = None,
                               t_end: float = 1e-3, t_start: float = 1.0) -> torch.Tensor:
    r"""Integrate the reverse-time SDE (Anderson 1982) from ``t_start`` to ``t_end`` with Euler–Maruyama:
    :math:`dx = [f(t)x - g(t)^2\nabla\log p_t(x)]\,dt + g(t)\,d\bar W`, stepping backwards in time.
    The last step adds no noise."""
    grid = time_grid(n_steps, t_start, t_end)
    for i in range(n_steps):
        t, dt = grid[i], grid[i] - grid[i + 1]
        tt = torch.full((x.shape[0],), t.item(), dtype=x.dtype, device=x.device)
        g = sde.diffusion(t).item()
        drift = sde.drift_coef(t).item() * x - g**2 * score(x, tt)
        x = x - drift * dt.item()
        if i < n_steps - 1:
            x = x + g * dt.sqrt().item() * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


@torch.no_grad()
def probability_flow_euler(sde: SDE, score: ScoreFn, x: torch.Tensor, n_steps: int, t_end: float = 1e-3,
                           t_start: float = 1.0) -> torch.Tensor:
    r"""Integrate the probability-flow ODE :math:`dx/dt = f(t)x - \tfrac12 g(t)^2\nabla\log p_t(x)` from ``t_start``
    to ``t_end`` with Euler steps. Deterministic: the same ``x`` gives the same output."""
    grid = time_grid(n_steps, t_start, t_end)
    for i in range(n_steps):
        t, dt = grid[i], grid[i] - grid[i + 1]
        tt = torch.full((x.shape[0],), t.item(), dtype=x.dtype, device=x.device)
        velocity = sde.drift_coef(t).item() * x - 0.5 * sde.diffusion(t).item() ** 2 * score(x, tt)
        x = x - velocity * dt.item()
    return x


@torch.no_grad()
def predictor_corrector(sde: SDE, score: ScoreFn, x: torch.Tensor, n_steps: int, generator: torch.Generator | None = None,
                        corrector_steps: int = 1, snr: float = 0.16, t_end: float = 1e-3) -> torch.Tensor:
    r"""Song et al. (2021), Algorithm 2: at each time, ``corrector_steps`` Langevin steps with the score at that
    time (step size :math:`\epsilon = 2(r\,\overline{\lVert z\rVert}/\overline{\lVert s\rVert})^2`, norms averaged over
    the batch, ``snr`` = r), then one reverse-SDE Euler–Maruyama step (no noise on the last).
    ``n_steps * (corrector_steps + 1)`` score evaluations."""
    grid = time_grid(n_steps, 1.0, t_end)
    flat_norm = lambda v: v.reshape(v.shape[0], -1).norm(dim=1).mean()
    for i in range(n_steps):
        t, dt = grid[i], grid[i] - grid[i + 1]
        tt = torch.full((x.shape[0],), t.item(), dtype=x.dtype, device=x.device)
        for _ in range(corrector_steps):
            s = score(x, tt)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            eps = 2 * (snr * flat_norm(z) / flat_norm(s).clamp_min(1e-12)) ** 2
            x = x + eps * s + (2 * eps).sqrt() * z
        g = sde.diffusion(t).item()
        x = x - (sde.drift_coef(t).item() * x - g**2 * score(x, tt)) * dt.item()
        if i < n_steps - 1:
            x = x + g * dt.sqrt().item() * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x
