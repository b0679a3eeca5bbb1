r"""Discrete noise schedules of DDPM and the quantities every later chapter converts between.

Index convention: arrays have length ``T + 1`` and are indexed by the time step ``t = 0, …, T``;
``t = 0`` is clean data (``beta[0] = 0``, ``alpha_bar[0] = 1``).

.. math::
    \alpha_t = 1 - \beta_t,\quad \bar\alpha_t = \prod_{s\le t}\alpha_s,\quad
    x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\quad
    \mathrm{SNR}(t) = \bar\alpha_t / (1-\bar\alpha_t),\quad \sigma_t^2 = (1-\bar\alpha_t)/\bar\alpha_t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .paths import DiscretePath


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020): :math:`\\beta_t` linear from ``beta_start`` (t=1) to ``beta_end`` (t=T)."""
    if T < 1:
        raise ValueError(f"T must be a positive number of steps, got {T}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): :math:`\\bar\\alpha_t = f(t)/f(0)`, :math:`f(t)=\\cos^2\\big(\\tfrac{t/T+s}{1+s}\\tfrac{\\pi}{2}\\big)`,
    :math:`\\beta_t = \\min(1 - \\bar\\alpha_t/\\bar\\alpha_{t-1}, \\text{max\\_beta})`."""
    if T < 1:
        raise ValueError(f"T must be a positive number of steps, got {T}")
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule; build it with :meth:`linear` or :meth:`cosine`."""

    beta: torch.Tensor  # (T+1,), float64, beta[0] = 0

    def __post_init__(self) -> None:
        beta = self.beta
        if beta.ndim != 1 or len(beta) < 2:
            raise ValueError(f"beta must be a 1-D tensor of length T+1 >= 2, got shape {tuple(beta.shape)}")
        if beta[0] != 0:
            raise ValueError("beta[0] must be 0: index 0 is clean data")
        if not bool(((beta[1:] > 0) & (beta[1:] < 1)).all()):
            raise ValueError("every beta_t for t >= 1 must lie in (0, 1)")

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        """From :math:`\\beta_1, …, \\beta_T` (prepends :math:`\\beta_0 = 0`)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cat([torch.zeros(1, dtype=torch.float64), betas]))

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        return cls.from_betas(linear_betas(T, beta_start, beta_end))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008) -> "NoiseSchedule":
        return cls.from_betas(cosine_betas(T, s))

    @classmethod
    def named(cls, name: str, T: int = 1000) -> "NoiseSchedule":
        """``"linear"`` or ``"cosine"``."""
        makers = {"linear": cls.linear, "cosine": cls.cosine}
        if name not in makers:
            raise ValueError(f"unknown schedule {name!r}: expected one of {', '.join(makers)}")
        return makers[name](T)

    @property
    def T(self) -> int:
        return len(self.beta) - 1

    @property
    def alpha(self) -> torch.Tensor:
        return 1 - self.beta

    @property
    def alpha_bar(self) -> torch.Tensor:
        return torch.cumprod(self.alpha, dim=0)

    @property
    def signal(self) -> torch.Tensor:
        """:math:`\\sqrt{\\bar\\alpha_t}`, the scale of :math:`x_0` in :math:`x_t`."""
        return self.alpha_bar.sqrt()

    @property
    def noise(self) -> torch.Tensor:
        """:math:`\\sqrt{1-\\bar\\alpha_t}`, the scale of :math:`\\varepsilon` in :math:`x_t`."""
        return (1 - self.alpha_bar).sqrt()

    @property
    def snr(self) -> torch.Tensor:
        """:math:`\\bar\\alpha_t/(1-\\bar\\alpha_t)` (infinite at t = 0)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    @property
    def log_snr(self) -> torch.Tensor:
        return self.snr.log()

    @property
    def sigma_ve(self) -> torch.Tensor:
        """:math:`\\sigma_t = \\sqrt{(1-\\bar\\alpha_t)/\\bar\\alpha_t}`: the variance-exploding noise level of
        :math:`x_t/\\sqrt{\\bar\\alpha_t} = x_0 + \\sigma_t\\varepsilon`."""
        return self.snr.rsqrt()

    @property
    def posterior_variance(self) -> torch.Tensor:
        """:math:`\\tilde\\beta_t = \\beta_t(1-\\bar\\alpha_{t-1})/(1-\\bar\\alpha_t)` for t >= 1 (0 at t = 0)."""
        alpha_bar = self.alpha_bar
        out = torch.zeros_like(self.beta)
        out[1:] = self.beta[1:] * (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:])
        return out

    @property
    def posterior_mean_coefs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`\\tilde\\mu_t = c_0 x_0 + c_t x_t` with :math:`c_0=\\sqrt{\\bar\\alpha_{t-1}}\\beta_t/(1-\\bar\\alpha_t)`,
        :math:`c_t=\\sqrt{\\alpha_t}(1-\\bar\\alpha_{t-1})/(1-\\bar\\alpha_t)` for t >= 1 (both 0 at t = 0)."""
        alpha_bar = self.alpha_bar
        c0, ct = torch.zeros_like(self.beta), torch.zeros_like(self.beta)
        c0[1:] = alpha_bar[:-1].sqrt() * self.beta[1:] / (1 - alpha_bar[1:])
        ct[1:] = self.alpha[1:].sqrt() * (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:])
        return c0, ct

    def respaced(self, timesteps: list[int] | torch.Tensor) -> "NoiseSchedule":
        """The schedule restricted to increasing ``timesteps`` (excluding 0), keeping :math:`\\bar\\alpha` there:
        :math:`\\beta'_i = 1 - \\bar\\alpha_{\\tau_i}/\\bar\\alpha_{\\tau_{i-1}}` (Nichol & Dhariwal 2021)."""
        steps = torch.as_tensor(timesteps, dtype=torch.long)
        if steps.ndim != 1 or len(steps) == 0 or bool((steps[1:] <= steps[:-1]).any()):
            raise ValueError("timesteps must be a non-empty, strictly increasing 1-D sequence")
        if steps[0] < 1 or steps[-1] > self.T:
            raise ValueError(f"timesteps must lie in 1..{self.T}, got {steps[0].item()}..{steps[-1].item()}")
        alpha_bar = self.alpha_bar[torch.cat([torch.zeros(1, dtype=torch.long), steps])]
        return NoiseSchedule.from_betas(1 - alpha_bar[1:] / alpha_bar[:-1])

    def path(self) -> DiscretePath:
        r"""The :class:`~diffbook.paths.DiscretePath` of this schedule: :math:`\alpha_t^2 = \bar\alpha_k` at :math:`t = k/T`,
        the path on which every network trained on these steps is read."""
        return DiscretePath(self.alpha_bar)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw from :math:`q(x_t\\mid x_0)`: :math:`\\sqrt{\\bar\\alpha_t}x_0 + \\sqrt{1-\\bar\\alpha_t}\\varepsilon`, per-example ``t``."""
        return expand(self.signal, t, x0) * x0 + expand(self.noise, t, x0) * noise


def expand(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped to broadcast against ``like`` (batch first), in ``like``'s dtype and device.

    ``t`` must hold integer steps in ``0..T`` (``T = len(values) - 1``); negative steps are refused rather than
    counted from the end.
    """
    t = torch.as_tensor(t).cpu()  # the lookup happens on the CPU: the tables are float64, which MPS lacks
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer steps 0..{len(values) - 1}, got dtype {t.dtype}; for continuous times "
                        "in [0, 1] use the schedule's path() (diffbook.paths)")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > len(values) - 1):
        raise IndexError(f"t must lie in 0..{len(values) - 1} (T = {len(values) - 1} steps; 0 is clean data), "
                         f"got {int(t.min())}..{int(t.max())}")
    out = values[t].to(like.dtype).to(like.device)
    return out.reshape(-1, *([1] * (like.ndim - 1)))
