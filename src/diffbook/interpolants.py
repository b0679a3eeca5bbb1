r"""Probability paths :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`, :math:`t \in [0, 1]`, data at t = 0.

Every model in the book lives on one of these paths. A path fixes, for each data point, the conditional
velocity :math:`u_t(x \mid x_0, \varepsilon) = \dot\alpha_t x_0 + \dot\sigma_t \varepsilon` that flow matching
regresses on, and an SDE :math:`dx = f_t x\,dt + g_t\,dW` with the same marginals:

.. math::
    f_t = \frac{\dot\alpha_t}{\alpha_t}, \qquad g_t^2 = 2\sigma_t\dot\sigma_t - 2\frac{\dot\alpha_t}{\alpha_t}\sigma_t^2 .

- :class:`LinearInterpolant`: :math:`\alpha_t = 1 - t`, :math:`\sigma_t = t` (rectified flow; Lipman et al.'s OT path).
- :class:`VPInterpolant`: :math:`\alpha_t = e^{-B(t)/2}`, :math:`\sigma_t = \sqrt{1 - \alpha_t^2}` with
  :math:`B(t) = \beta_\min t + \tfrac12(\beta_\max - \beta_\min)t^2`: the VP SDE of chapter 3, i.e. DDPM's
  linear schedule with :math:`t = k/T`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _as_time(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``values`` of shape (batch,) or () to broadcast against ``like`` (batch, ...)."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


class Interpolant:
    """Base class: subclasses define :meth:`alpha`, :meth:`sigma` and their time derivatives."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time_of_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        r"""The time at which :math:`\sigma_t/\alpha_t` (the inverse square root of the SNR) equals ``ratio``."""
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r""":math:`(\alpha_t, \sigma_t, \dot\alpha_t, \dot\sigma_t)`, each shaped to broadcast against ``like``."""
        t = _as_time(t).double()
        return tuple(broadcast(f(t), like) for f in (self.alpha, self.sigma, self.d_alpha, self.d_sigma))

    def sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        r""":math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon`."""
        alpha, sigma, _, _ = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def conditional_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        r""":math:`\frac{d}{dt}x_t = \dot\alpha_t x_0 + \dot\sigma_t\varepsilon`: the flow-matching regression target."""
        _, _, d_alpha, d_sigma = self.coefficients(t, x0)
        return d_alpha * x0 + d_sigma * noise

    def sde_coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Drift coefficient :math:`f_t` and squared diffusion :math:`g_t^2` of the SDE with this path's marginals."""
        t = _as_time(t).double()
        alpha, sigma, d_alpha, d_sigma = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        f = d_alpha / alpha
        return f, 2 * sigma * d_sigma - 2 * f * sigma**2

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:
        """:math:`f_t`: with :meth:`diffusion`, an interpolant is an SDE for chapter 3's samplers (:mod:`diffbook.sde`)."""
        return self.sde_coefficients(t)[0]

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """:math:`g_t`."""
        return self.sde_coefficients(t)[1].clamp_min(0).sqrt()


@dataclass(frozen=True)
class LinearInterpolant(Interpolant):
    r""":math:`x_t = (1 - t)x_0 + t\varepsilon`: straight lines from data to noise, constant velocity :math:`\varepsilon - x_0`."""

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t.clone()

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def time_of_ratio(self, ratio):
        return ratio / (1 + ratio)


@dataclass(frozen=True)
class VPInterpolant(Interpolant):
    r"""The variance-preserving path :math:`\alpha_t^2 + \sigma_t^2 = 1` of the VP SDE (chapter 3)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def _beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha(self, t):
        return torch.exp(-0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2))

    def sigma(self, t):
        return (1 - self.alpha(t) ** 2).clamp_min(0).sqrt()

    def d_alpha(self, t):
        return -0.5 * self._beta(t) * self.alpha(t)

    def d_sigma(self, t):
        return 0.5 * self._beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def time_of_ratio(self, ratio):  # alpha^2 = 1 / (1 + ratio^2), i.e. B(t) = log(1 + ratio^2)
        spread = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 2 * spread * torch.log1p(ratio**2)).sqrt()) / spread


INTERPOLANTS: dict[str, Interpolant] = {"linear": LinearInterpolant(), "vp": VPInterpolant()}
