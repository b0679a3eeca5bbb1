r"""Training objectives. Each maps ``(net, x0, schedule, generator, y)`` to a scalar loss.

Later chapters register more objectives in :data:`OBJECTIVES`; the training loop looks them up by name.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .paths import LinearPath, NoisePath
from .schedules import NoiseSchedule

Objective = Callable[[nn.Module, torch.Tensor, NoiseSchedule, torch.Generator, "torch.Tensor | None"], torch.Tensor]


def ddpm_eps_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                  y: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`L_\text{simple} = \mathbb{E}_{t\sim U\{1..T\},\,\varepsilon}\,\lVert\varepsilon - \varepsilon_\theta(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon, t)\rVert^2`
    (Ho et al. 2020, eq. 14), averaged over pixels. ``t`` and ε are drawn from ``generator`` on the CPU,
    so a run is reproducible whatever the device."""
    t = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = schedule.q_sample(x0, t, noise)
    return (net(x_t, t.float().to(x0.device), y).float() - noise).pow(2).mean()


def denoising_score_matching_loss(score: Callable[[torch.Tensor, float], torch.Tensor], x0: torch.Tensor, sigma: float,
                                  generator: torch.Generator) -> torch.Tensor:
    r"""Vincent (2011) at one noise level, weighted by :math:`\sigma^2`:
    :math:`\mathbb{E}\,\lVert \sigma\,s(x_0 + \sigma\varepsilon, \sigma) + \varepsilon\rVert^2`
    :math:`= \sigma^2\,\mathbb{E}\,\lVert s(\tilde x) - \nabla_{\tilde x}\log q_\sigma(\tilde x\mid x_0)\rVert^2`.
    Its minimiser over all functions is :math:`\nabla\log p_\sigma`, the score of the noised data."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return (sigma * score(x0 + sigma * noise, sigma) + noise).pow(2).sum(dim=tuple(range(1, x0.ndim))).mean()


TimeSampler = Callable[[int, torch.Generator], torch.Tensor]
"""``sampler(n, generator)``: ``n`` training times in (0, 1), float64 on the CPU."""


def uniform_times(n: int, generator: torch.Generator) -> torch.Tensor:
    r""":math:`t \sim U(0, 1)`, flow matching's default (Lipman et al. 2023)."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def logit_normal_times(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    r""":math:`t = \operatorname{sigmoid}(m + s\,n)`, :math:`n\sim\mathcal N(0,1)`: more training times near the middle
    of the path (Esser et al. 2024, eq. 19, used by Stable Diffusion 3)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))


def flow_matching_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                       y: torch.Tensor | None = None, *, path: NoisePath = LinearPath(),
                       noise: torch.Tensor | None = None, time_sampler: TimeSampler | None = None) -> torch.Tensor:
    r"""Conditional flow matching (Lipman et al. 2023):
    :math:`\mathbb{E}_{t\sim U(0,1),\,x_0,\,\varepsilon}\lVert v_\theta(x_t, t) - (\dot\alpha_t x_0 + \dot\sigma_t\varepsilon)\rVert^2`,
    averaged over pixels; on the linear path the target is :math:`\varepsilon - x_0`. The network sees time
    :math:`T t` (``schedule.T``), the scale DDPM networks see. ``noise`` pairs each ``x0`` with a given
    endpoint instead of fresh Gaussian noise (reflow). ``time_sampler`` replaces :math:`t\sim U(0,1)` (e.g.
    :func:`logit_normal_times`); the minimiser is unchanged wherever its density is positive, the weighting is not."""
    t = (time_sampler or uniform_times)(x0.shape[0], generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    noise = noise.to(x0.device)  # t stays a float64 CPU tensor: MPS has no float64; the path casts before moving
    x_t = path.sample(x0, noise, t)
    target = path.conditional_velocity(x0, noise, t)
    return (net(x_t, (schedule.T * t).float().to(x0.device), y).float() - target).pow(2).mean()


def reflow_loss(net: nn.Module, pairs: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                y: torch.Tensor | None = None) -> torch.Tensor:
    r"""Flow matching on a fixed coupling (Liu et al. 2023): ``pairs[:, 0]`` is data, ``pairs[:, 1]`` the noise the
    previous flow mapped to it. Straight lines between coupled points make the next flow straighter."""
    if pairs.ndim < 3 or pairs.shape[1] != 2:
        raise ValueError(f"reflow expects pairs of shape (batch, 2, ...), got {tuple(pairs.shape)}")
    return flow_matching_loss(net, pairs[:, 0], schedule, generator, y, noise=pairs[:, 1])


def classification_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                        y: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of a classifier on clean images (the feature network of :mod:`diffbook.metrics`).
    Needs labels: train it with ``class_conditional=True``."""
    if y is None:
        raise ValueError("the classification objective needs labels: set class_conditional=True in the config")
    return nn.functional.cross_entropy(net(x0).float(), y)


def noisy_classification_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                              y: torch.Tensor | None = None) -> torch.Tensor:
    r"""Cross-entropy of a classifier of noisy images, :math:`\mathbb{E}_{k\sim U\{1..T\},\,\varepsilon}
    [-\log p_\phi(y \mid \sqrt{\bar\alpha_k}x_0 + \sqrt{1-\bar\alpha_k}\varepsilon, k)]`: the noise-conditioned
    classifier of classifier guidance (Dhariwal & Nichol 2021, who draw the step uniformly, as here)."""
    if y is None:
        raise ValueError("the noisy_classification objective needs labels: set class_conditional=True in the config")
    k = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return nn.functional.cross_entropy(net(schedule.q_sample(x0, k, noise), k.float().to(x0.device)).float(), y)


OBJECTIVES: dict[str, Objective] = {"ddpm_eps": ddpm_eps_loss, "flow_matching": flow_matching_loss,
                                    "reflow": reflow_loss, "classification": classification_loss,
                                    "noisy_classification": noisy_classification_loss}
