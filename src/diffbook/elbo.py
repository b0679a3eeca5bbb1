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
from dataclasses import dataclass

import torch

from .predictors import Predictor
from .schedules import NoiseSchedule, expand


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


def geometric_strata(T: int, n_strata: int) -> list[tuple[int, int]]:
    """A partition of the KL steps :math:`t = 2, …, T` into ``min(n_strata, T - 1)`` blocks ``(first, last)`` whose
    edges are spaced geometrically (each at least one step past the last): single steps where the terms
    :math:`L_{t-1}` change fastest (small t), wide blocks at large t. ``n_strata >= T - 1`` gives one block per step."""
    if T < 2 or n_strata < 1:
        raise ValueError(f"need T >= 2 and n_strata >= 1, got T={T}, n_strata={n_strata}")
    n = min(n_strata, T - 1)
    edges = [2]
    for i in range(1, n + 1):
        target = round(2 * ((T + 1) / 2) ** (i / n))
        edges.append(min(max(edges[-1] + 1, target), T + 1 - (n - i)))
    return [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:])]


@dataclass(frozen=True)
class BoundEstimate:
    """A stratified Monte-Carlo estimate of the DDPM bound (:func:`ddpm_bound_estimate`), in nats per image.

    ``decoder`` (:math:`L_0`) and ``prior`` (:math:`L_T`) have shape (batch,); ``steps`` and ``kl`` have shape
    (batch, strata): the step :math:`t` drawn in each stratum for each image and its :math:`L_{t-1}`; ``strata`` lists
    each stratum's first and last step.
    """

    decoder: torch.Tensor
    prior: torch.Tensor
    steps: torch.Tensor
    kl: torch.Tensor
    strata: tuple[tuple[int, int], ...]

    @property
    def sizes(self) -> torch.Tensor:
        """The number of steps in each stratum, (strata,), float64."""
        return torch.tensor([last - first + 1 for first, last in self.strata], dtype=torch.float64)

    @property
    def single_steps_until(self) -> int:
        """The step up to which each step, from t = 2 on, is a stratum of its own (no sampling over t there)."""
        last_single = 1
        for first, last in self.strata:
            if first != last or first != last_single + 1:
                break
            last_single = last
        return last_single

    def middle(self) -> torch.Tensor:
        r""":math:`\sum_{t=2}^{T} L_{t-1}` per image, each stratum's drawn term times its size: unbiased."""
        return (self.kl * self.sizes).sum(1)

    def total(self) -> torch.Tensor:
        r"""The bound per image, nats: :math:`L_0 + \sum_t L_{t-1} + L_T` (unbiased for its expectation)."""
        return self.decoder + self.middle() + self.prior


def _reverse_mean(x_t: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | float, alpha_bar: torch.Tensor | float
                  ) -> torch.Tensor:
    r""":math:`\mu_\theta = (x_t - \beta_t\varepsilon_\theta/\sqrt{1-\bar\alpha_t})/\sqrt{1-\beta_t}` (Ho et al. 2020, eq. 11)."""
    return (x_t - beta / (1 - alpha_bar) ** 0.5 * eps) / (1 - beta) ** 0.5


@torch.no_grad()
def ddpm_bound_estimate(model: Predictor, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator,
                        n_strata: int | None = None) -> BoundEstimate:
    r"""The DDPM bound of ``x0`` (Ho et al. 2020, eq. 5) with the sum over :math:`t` estimated by stratified sampling:
    :math:`L_T` exactly, :math:`L_0` from one draw of :math:`x_1`, and in each stratum of :func:`geometric_strata`
    one step :math:`t` per image, drawn uniformly, whose :math:`L_{t-1}` (one draw :math:`x_t\sim q(x_t|x_0)`) counts
    for the whole stratum. Unbiased for the bound; one network evaluation per stratum. ``n_strata=None`` evaluates
    every step (the strata are single steps), as :func:`ddpm_bound_terms` does."""
    T, batch = schedule.T, x0.shape[0]
    strata = geometric_strata(T, T - 1 if n_strata is None else n_strata)
    dims = tuple(range(1, x0.ndim))
    abar, beta = schedule.alpha_bar, schedule.beta
    mean_T = abar[T].sqrt().item() * x0
    prior = gaussian_kl(mean_T, 1 - abar[T].item(), torch.zeros_like(x0), 1.0).sum(dims).cpu().double()
    x_1 = schedule.q_sample(x0, torch.ones(batch, dtype=torch.long), torch.randn(x0.shape, generator=generator).to(x0.device))
    mean_1 = _reverse_mean(x_1, model(x_1, 1 / T, "eps").float(), beta[1].item(), abar[1].item())
    decoder = -discretized_gaussian_log_likelihood(x0, mean_1, beta[1].sqrt().item()).sum(dims).cpu().double()
    steps = torch.empty(batch, len(strata), dtype=torch.long)
    kl = torch.empty(batch, len(strata), dtype=torch.float64)
    c0, ct = schedule.posterior_mean_coefs
    for k, (first, last) in enumerate(strata):
        t = (torch.full((batch,), first, dtype=torch.long) if first == last
             else torch.randint(first, last + 1, (batch,), generator=generator))
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=generator).to(x0.device))
        eps = model(x_t, t.double() / T, "eps").float()
        mean_p = _reverse_mean(x_t, eps, expand(beta, t, x0), expand(abar, t, x0))
        mean_q = expand(c0, t, x0) * x0 + expand(ct, t, x0) * x_t
        steps[:, k] = t
        kl[:, k] = gaussian_kl(mean_q, expand(schedule.posterior_variance, t, x0), mean_p,
                               expand(beta, t, x0)).sum(dims).cpu().double()
    return BoundEstimate(decoder, prior, steps, kl, tuple(strata))


def ddpm_bound_terms(model: Predictor, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator
                     ) -> torch.Tensor:
    """The terms :math:`L_0, L_1, …, L_T` in nats per image, shape ``(batch, T + 1)``, of ``model`` (a predictor on
    ``schedule``'s path, e.g. :func:`~diffbook.predictors.predictor_from_trained`; one evaluation per step, at
    :math:`t = k/T`).

    Each :math:`L_{t-1}` uses one draw :math:`x_t \\sim q(x_t|x_0)` from ``generator``: an unbiased estimate
    (:func:`ddpm_bound_estimate` with every step its own stratum).
    """
    estimate = ddpm_bound_estimate(model, schedule, x0, generator)
    return torch.cat([estimate.decoder[:, None], estimate.kl, estimate.prior[:, None]], dim=1)


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Convert a negative log-likelihood in nats per example to bits per dimension."""
    return nats / (dims * math.log(2))

