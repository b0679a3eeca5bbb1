r"""Noise paths :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`, :math:`t \in [0, 1]`, data at t = 0: the one object
every model, loss and sampler of the book lives on.

A path fixes, for each data point, the conditional velocity :math:`\dot\alpha_t x_0 + \dot\sigma_t \varepsilon` that flow
matching regresses on, the log signal-to-noise ratio :math:`\lambda_t = \log(\alpha_t^2/\sigma_t^2)` in which samplers
space their steps, and the SDE :math:`dx = f_t x\,dt + g_t\,dW` with the same marginals (Song et al. 2021;
Kingma et al. 2021):

.. math::
    f_t = \frac{\dot\alpha_t}{\alpha_t}, \qquad g_t^2 = 2\sigma_t\dot\sigma_t - 2\frac{\dot\alpha_t}{\alpha_t}\sigma_t^2 .

- :class:`LinearPath`: :math:`\alpha_t = 1 - t`, :math:`\sigma_t = t` (rectified flow; Lipman et al.'s OT path with
  :math:`\sigma_\min = 0`, their time reversed).
- :class:`VPPath`: :math:`\alpha_t = e^{-B(t)/2}`, :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`,
  :math:`B(t) = \beta_\min t + \tfrac12(\beta_\max - \beta_\min)t^2`: the VP SDE, the continuous limit of DDPM.
- :class:`SubVPPath`: :math:`\alpha_t = e^{-B(t)/2}`, :math:`\sigma_t = 1 - \alpha_t^2` (the sub-VP SDE).
- :class:`VEPath`: :math:`\alpha_t = 1`, :math:`\sigma_t^2 = s_t^2 - \sigma_\min^2`, :math:`s_t = \sigma_\min(\sigma_\max/\sigma_\min)^t` (the VE SDE).
- :class:`CosinePath`: :math:`\alpha_t = \cos(\tfrac{t + s}{1 + s}\tfrac\pi2)/\cos(\tfrac{s}{1+s}\tfrac\pi2)`, variance preserving
  (Nichol & Dhariwal 2021, without their clipping of β).
- :class:`DiscretePath`: the path of a trained DDPM schedule: at :math:`t = k/T` its :math:`\alpha_t^2` *is* the
  schedule's :math:`\bar\alpha_k`, and between steps :math:`\lambda_t` is interpolated linearly. A network trained on
  the steps of that schedule is read on this path: at :math:`t = k/T` it sees exactly step k and its training noise
  level; between steps, a fractional step index at the interpolated level
  (see :func:`diffbook.predictors.predictor_from_trained`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

def as_time(t: torch.Tensor | float) -> torch.Tensor:
    """``t`` as a float64 tensor on the CPU. Time arithmetic (schedules, their inverses) stays there, whatever device
    holds the data: Apple MPS has no float64, and the coefficients reach the data only through :func:`broadcast`,
    which casts them to the data's dtype before moving them."""
    if not torch.is_tensor(t):
        return torch.as_tensor(t, dtype=torch.float64)
    return t.to("cpu").double()  # move first: a float64 conversion on MPS would fail


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``values`` of shape (batch,) or () to broadcast against ``like`` (batch, ...), in its dtype."""
    values = values.to(dtype=like.dtype).to(device=like.device)  # cast first: float64 never reaches MPS
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


class NoisePath:
    """Base class: a path defines :meth:`alpha`, :meth:`sigma`, their time derivatives and :meth:`time_of_ratio`
    (all on float64 tensors of times); everything else follows from them."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time_of_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        r"""The time at which :math:`\sigma_t/\alpha_t` equals ``ratio`` (the inverse of :meth:`ratio`)."""
        raise NotImplementedError

    def ratio(self, t: torch.Tensor | float) -> torch.Tensor:
        r""":math:`\sigma_t/\alpha_t`, the noise level of :math:`x_t/\alpha_t = x_0 + (\sigma_t/\alpha_t)\varepsilon` (EDM's σ)."""
        t = as_time(t)
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        r""":math:`\lambda_t = \log(\alpha_t^2/\sigma_t^2)`, decreasing in t (``+inf`` at clean data)."""
        return -2 * torch.log(self.ratio(t))

    def time_of_log_snr(self, log_snr: torch.Tensor | float) -> torch.Tensor:
        r"""The inverse of :meth:`log_snr`."""
        return self.time_of_ratio(torch.exp(-0.5 * as_time(log_snr)))

    def coefficients(self, t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r""":math:`(\alpha_t, \sigma_t, \dot\alpha_t, \dot\sigma_t)`, each shaped to broadcast against ``like``."""
        t = as_time(t)
        return tuple(broadcast(f(t), like) for f in (self.alpha, self.sigma, self.d_alpha, self.d_sigma))

    def sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        r""":math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon`, per-sample ``t`` of shape (batch,) or one time."""
        alpha, sigma, _, _ = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def conditional_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        r""":math:`\frac{d}{dt}x_t = \dot\alpha_t x_0 + \dot\sigma_t\varepsilon`: the flow-matching regression target."""
        _, _, d_alpha, d_sigma = self.coefficients(t, x0)
        return d_alpha * x0 + d_sigma * noise

    def sde_coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Drift coefficient :math:`f_t` and squared diffusion :math:`g_t^2` of the SDE with this path's marginals."""
        t = as_time(t)
        alpha, sigma, d_alpha, d_sigma = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        f = d_alpha / alpha
        return f, 2 * sigma * d_sigma - 2 * f * sigma**2


@dataclass(frozen=True)
class LinearPath(NoisePath):
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
        ratio = as_time(ratio)
        return torch.where(torch.isinf(ratio), torch.ones_like(ratio), ratio / (1 + ratio))


@dataclass(frozen=True)
class VPPath(NoisePath):
    r"""The variance-preserving path :math:`\alpha_t^2 + \sigma_t^2 = 1` of the VP SDE, :math:`\beta(t)` linear in t."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`B(t) = \int_0^t \beta(s)\,ds`."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        return torch.exp(-0.5 * self.integral_beta(t))

    def sigma(self, t):
        return (-torch.expm1(-self.integral_beta(t))).clamp_min(0).sqrt()

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        return 0.5 * self.beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def _time_of_integral(self, integral: torch.Tensor) -> torch.Tensor:
        """Solve B(t) = ``integral`` for t >= 0 (the quadratic's positive root)."""
        spread = self.beta_max - self.beta_min
        if spread == 0:
            return integral / self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 2 * spread * integral).sqrt()) / spread

    def time_of_ratio(self, ratio):  # alpha^2 = 1 / (1 + ratio^2), i.e. B(t) = log(1 + ratio^2)
        return self._time_of_integral(torch.log1p(as_time(ratio) ** 2))


@dataclass(frozen=True)
class SubVPPath(VPPath):
    r"""The sub-VP SDE's path: :math:`\alpha_t = e^{-B(t)/2}`, :math:`\sigma_t = 1 - \alpha_t^2`, below the VP path's σ."""

    def sigma(self, t):
        return -torch.expm1(-self.integral_beta(t))

    def d_sigma(self, t):
        return self.beta(t) * self.alpha(t) ** 2

    def time_of_ratio(self, ratio):  # (1 - a^2)/a = r  =>  a = (sqrt(r^2 + 4) - r) / 2
        ratio = as_time(ratio)
        alpha = 2 / ((ratio**2 + 4).sqrt() + ratio)
        return self._time_of_integral(-2 * torch.log(alpha))


@dataclass(frozen=True)
class VEPath(NoisePath):
    r"""The variance-exploding path of the VE SDE: :math:`\alpha_t = 1`, :math:`\sigma_t = \sqrt{s_t^2 - \sigma_\min^2}` with
    :math:`s_t = \sigma_\min(\sigma_\max/\sigma_\min)^t`, so that :math:`\sigma_0 = 0` and :math:`g_t^2 = d s_t^2/dt`."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def _s(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return (self._s(t) ** 2 - self.sigma_min**2).clamp_min(0).sqrt()

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return self._s(t) ** 2 * math.log(self.sigma_max / self.sigma_min) / self.sigma(t)

    def time_of_ratio(self, ratio):
        ratio = as_time(ratio)
        return torch.log((ratio**2 + self.sigma_min**2).sqrt() / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


@dataclass(frozen=True)
class CosinePath(NoisePath):
    r"""Nichol & Dhariwal's cosine schedule in continuous time: :math:`\alpha_t^2 = f(t)/f(0)`,
    :math:`f(t) = \cos^2(\tfrac{t+s}{1+s}\tfrac\pi2)`, :math:`\sigma_t^2 = 1 - \alpha_t^2` (pure noise at t = 1)."""

    s: float = 0.008

    def _angle(self, t):
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def alpha(self, t):
        return (torch.cos(self._angle(t)) / math.cos(self._angle(0.0))).clamp(0, 1)

    def sigma(self, t):
        return (1 - self.alpha(t) ** 2).clamp_min(0).sqrt()

    def d_alpha(self, t):
        return -torch.sin(self._angle(t)) * (math.pi / 2) / (1 + self.s) / math.cos(self._angle(0.0))

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def time_of_ratio(self, ratio):  # alpha = 1 / sqrt(1 + r^2)
        alpha = (1 + as_time(ratio) ** 2).rsqrt()
        return torch.acos(alpha * math.cos(self._angle(0.0))) * (2 / math.pi) * (1 + self.s) - self.s


@dataclass(frozen=True, eq=False)
class DiscretePath(NoisePath):
    r"""The path of a discrete variance-preserving schedule with steps :math:`k = 0, …, T` at times :math:`t = k/T`.

    At every step :math:`\alpha_t^2 = \bar\alpha_k` exactly. For :math:`t \ge 1/T` the log-SNR is linear between steps
    (and continues with the last step's slope beyond t = 1, where a change of path may ask for more noise than the
    schedule ever had); on :math:`[0, 1/T]`, where :math:`\lambda_0 = \infty`, :math:`\sigma_t^2` is linear instead.
    Time derivatives are those of the segment *below* t (at a step, the one a reverse-time sampler takes next;
    an increasing grid gets the other one-sided derivative there). Because :math:`\dot\alpha, \dot\sigma` jump at every
    step, a solver stepping in t across many steps keeps an error of order 1/T; the samplers in
    :math:`(\rho, y)` or :math:`\lambda` (DDIM, EDM's Heun, DPM-Solver++) use only α and σ and do not. Build it with
    :meth:`diffbook.schedules.NoiseSchedule.path`."""

    alpha_bar: torch.Tensor  # (T + 1,), float64, alpha_bar[0] = 1
    _log_snr: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        alpha_bar = torch.as_tensor(self.alpha_bar, dtype=torch.float64)
        if alpha_bar.ndim != 1 or len(alpha_bar) < 2 or alpha_bar[0] != 1:
            raise ValueError("alpha_bar must be a 1-D tensor of length T+1 >= 2 with alpha_bar[0] = 1")
        if not bool((alpha_bar[1:] < alpha_bar[:-1]).all()) or not bool((alpha_bar[1:] > 0).all()):
            raise ValueError("alpha_bar must decrease strictly and stay positive")
        object.__setattr__(self, "alpha_bar", alpha_bar)
        object.__setattr__(self, "_log_snr", torch.log(alpha_bar / (1 - alpha_bar)))

    @property
    def T(self) -> int:
        return len(self.alpha_bar) - 1

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(step index u = tT snapped to integers within 1e-9, segment j with u in (j, j+1], whether u is a step)."""
        u = t * self.T
        nearest = u.round()
        on_step = (u - nearest).abs() < 1e-9
        u = torch.where(on_step, nearest, u)
        j = (torch.ceil(u) - 1).clamp(0, self.T - 1).long()
        return u, j, on_step & (nearest >= 0) & (nearest <= self.T)

    def _alpha_bar(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:math:`\\alpha_t^2`, :math:`d\\lambda/dt`); on the first segment, where σ² is linear instead, the λ slope is
        meaningless (-inf) and unused."""
        u, j, on_step = self._segment(t)
        table = self.alpha_bar.to(t.device)
        lam = self._log_snr.to(t.device)
        first = j == 0
        lam_lo, lam_hi = lam[j], lam[(j + 1).clamp(max=self.T)]
        slope = (lam_hi - lam_lo) * self.T
        interpolated = torch.sigmoid(torch.where(first, lam_hi, lam_lo) + (u - j) * torch.where(first, 0.0, lam_hi - lam_lo))
        first_value = 1 - u.clamp_min(0) * (1 - table[1])
        value = torch.where(first, first_value, interpolated)
        value = torch.where(on_step, table[u.clamp(0, self.T).long()], value)
        return value, slope

    def alpha(self, t):
        return self._alpha_bar(t)[0].sqrt()

    def sigma(self, t):
        return (1 - self._alpha_bar(t)[0]).clamp_min(0).sqrt()

    def _derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar, slope = self._alpha_bar(t)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).clamp_min(0).sqrt()
        first = self._segment(t)[1] == 0
        d_var_first = self.T * (1 - self.alpha_bar[1].item())  # d sigma^2 / dt on [0, 1/T]
        d_alpha = torch.where(first, -d_var_first / (2 * alpha), 0.5 * alpha * sigma**2 * slope)
        d_sigma = torch.where(first, d_var_first / (2 * sigma), -0.5 * sigma * alpha**2 * slope)
        return d_alpha, d_sigma

    def d_alpha(self, t):
        return self._derivatives(t)[0]

    def d_sigma(self, t):
        return self._derivatives(t)[1]

    def time_of_ratio(self, ratio):
        ratio = as_time(ratio)
        lam = -2 * torch.log(ratio)
        knots = self._log_snr.to(ratio.device)  # decreasing; knots[0] = inf
        # first segment: sigma^2 = u (1 - alpha_bar_1), with sigma^2 = r^2 / (1 + r^2)
        first = (ratio**2 / (1 + ratio**2)) / (1 - self.alpha_bar[1].item()) / self.T
        # later segments: find j >= 1 with knots[j] >= lam > knots[j + 1] (extrapolating past T)
        descending = -knots[1:]  # increasing
        j = torch.searchsorted(descending, (-lam).contiguous(), right=True).clamp(1, self.T - 1)
        frac = (knots[j] - lam) / (knots[j] - knots[j + 1])
        later = (j + frac) / self.T
        return torch.where(lam >= knots[1], first, later)
