r"""The DDPM variational bound in bits per dimension (Ho et al. 2020, eq. 5):

.. math::
    -\log p_\theta(x_0) \le \underbrace{D_\mathrm{KL}(q(x_T|x_0)\,\|\,p(x_T))}_{L_T}
    + \sum_{t=2}^{T}\underbrace{D_\mathrm{KL}(q(x_{t-1}|x_t,x_0)\,\|\,p_\theta(x_{t-1}|x_t))}_{L_{t-1}}
    \underbrace{-\log p_\theta(x_0|x_1)}_{L_0},

with :math:`p_\theta(x_{t-1}|x_t) = N(\mu_\theta, \sigma_t^2 I)`, :math:`\sigma_t^2=\beta_t`, and a discretised
Gaussian decoder :math:`L_0` over the 256 pixel levels of [−1, 1].
"""
from __future__ import annotations

import math

import torch

from .predictors import Predictor
from .schedules import NoiseSchedule


def gaussian_kl(mean_q: torch.Tensor, var_q: torch.Tensor | float, mean_p: torch.Tensor,
                var_p: torch.Tensor | float) -> torch.Tensor:
    r"""Elementwise :math:`D_\mathrm{KL}(N(m_q, v_q)\,\|\,N(m_p, v_p)) = \tfrac12\big(\log\tfrac{v_p}{v_q} + \tfrac{v_q + (m_q-m_p)^2}{v_p} - 1\big)` in nats."""
    var_q = torch.as_tensor(var_q, dtype=mean_q.dtype, device=mean_q.device)
    var_p = torch.as_tensor(var_p, dtype=mean_q.dtype, device=mean_q.device)
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float,
                                        levels: int = 256) -> torch.Tensor:
    r""":math:`\log \int_{\text{bin}(x)} N(u; \mu, s^2)\,du` for data on a grid of ``levels`` values in [−1, 1];
    the edge bins extend to :math:`\pm\infty`, so the probabilities of all bins sum to one."""
    half_bin = 1.0 / (levels - 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    upper = torch.where(x > 1 - half_bin, torch.ones_like(x), _std_normal_cdf((x + half_bin - mean) / std))
    lower = torch.where(x < -1 + half_bin, torch.zeros_like(x), _std_normal_cdf((x - half_bin - mean) / std))
    return torch.log((upper - lower).clamp(min=1e-12))


@torch.no_grad()
def ddpm_bound_terms(model: Predictor, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator
                     ) -> torch.Tensor:
    """The terms :math:`L_0, L_1, …, L_T` in nats per image, shape ``(batch, T + 1)``, of ``model`` (a predictor on
    ``schedule``'s path, e.g. :func:`~diffbook.predictors.predictor_from_trained`; one evaluation per step, at
    :math:`t = k/T`).

    Each :math:`L_{t-1}` uses one draw :math:`x_t \\sim q(x_t|x_0)` from ``generator``: an unbiased estimate.
    """
    device, T = x0.device, schedule.T
    abar, beta = schedule.alpha_bar, schedule.beta
    dims = tuple(range(1, x0.ndim))
    terms = torch.zeros(x0.shape[0], T + 1, dtype=torch.float64)
    mean_T = abar[T].sqrt().item() * x0
    terms[:, T] = gaussian_kl(mean_T, 1 - abar[T].item(), torch.zeros_like(x0), 1.0).sum(dims).double().cpu()
    post_var = schedule.posterior_variance
    c0, ct = schedule.posterior_mean_coefs
    for t in range(1, T + 1):
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t = schedule.q_sample(x0, tt, noise)
        eps = model(x_t, t / T, "eps").float()
        coef = beta[t].item() / (1 - abar[t].item()) ** 0.5
        mean_p = (x_t - coef * eps) / (1 - beta[t].item()) ** 0.5
        if t == 1:
            terms[:, 0] = -discretized_gaussian_log_likelihood(x0, mean_p, beta[1].sqrt().item()).sum(dims).double().cpu()
        else:
            mean_q = c0[t].item() * x0 + ct[t].item() * x_t
            kl = gaussian_kl(mean_q, post_var[t].item(), mean_p, beta[t].item())
            terms[:, t - 1] = kl.sum(dims).double().cpu()
    return terms


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Convert a negative log-likelihood in nats per example to bits per dimension."""
    return nats / (dims * math.log(2))

