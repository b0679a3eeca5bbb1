r"""Inpainting with an unconditional model: fill the pixels where ``mask == 0`` given the ``known`` image where
``mask == 1`` (chapter 8). Three ways, one per place the knowledge can enter:

=============================== ==================================================================================
:func:`replacing`               the *state*: after every step, the known pixels are overwritten by the observation
                                noised to the new time (Song et al. 2021, "imputation"); wraps any sampler
:func:`sample_repaint`          the same, plus RePaint's resampling: every ``jump_length`` steps, noise forward
                                again and re-denoise, ``resamples`` times (Lugmayr et al. 2022)
:func:`projected`               the *prediction*: :math:`\hat x_0 \leftarrow A^\dagger y + (I - A^\dagger A)\hat x_0`, DDNM's
                                range–null-space step (Wang et al. 2023, eq. 13) for the masking operator
                                :math:`A`, for which :math:`A^\dagger = A`; a predictor, so any sampler runs it
=============================== ==================================================================================

``known`` and ``mask`` have the shape of one sample or of the batch; ``mask`` is 1 on known pixels, 0 elsewhere.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from .predictors import Predictor
from .samplers import Callback, Step, _check_times, _coefficients, _noise, sample_ancestral

Sampler = Callable[..., torch.Tensor]
"""A sampler of the common signature ``sampler(model, x, times, *, generator=None, callback=None, **knobs)``."""


def _check_mask(known: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> None:
    for name, value in (("known", known), ("mask", mask)):
        if value.shape != x.shape and value.shape != x.shape[1:]:
            raise ValueError(f"{name} must have the shape of one sample {tuple(x.shape[1:])} or of the batch "
                             f"{tuple(x.shape)}, got {tuple(value.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (pixel to fill) and 1 (known pixel)")


def _impose(model: Predictor, x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, t: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """Known pixels of ``x`` replaced by a fresh draw of :math:`q(x_t\\mid y) = N(\\alpha_t y, \\sigma_t^2 I)`."""
    alpha, sigma = _coefficients(model.path, t)
    noised = alpha * known + (sigma * _noise(x, generator) if sigma > 0 else 0)
    return mask * noised + (1 - mask) * x


def replacing(sampler: Sampler, known: torch.Tensor, mask: torch.Tensor) -> Sampler:
    r"""``sampler`` turned into an inpainter by replacement (Song et al. 2021, Appendix I.2): the sampler runs one
    interval of ``times`` at a time, and after each the known pixels are set to :math:`\alpha_s y + \sigma_s z`, a fresh
    draw of the observation noised to the new time :math:`s` (exactly :math:`y` at :math:`s = 0`). The returned
    function has the common signature. A multistep sampler (DPM-Solver++(2M)) restarts its history at each interval,
    i.e. runs its first-order step; Euler–Maruyama and predictor–corrector add no noise on the last step of a call,
    so here on none: use them whole, or use :func:`~diffbook.samplers.sample_ancestral` (told ``partial=True``) or
    DDIM."""
    def sample(model: Predictor, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
               callback: Callback | None = None, **knobs) -> torch.Tensor:
        _check_mask(known, mask, x)
        grid = torch.tensor(_check_times(times), dtype=torch.float64)
        # a sampler that ends a chain without noise (the ancestral one) must know that each call is one step of many
        partial = {"partial": True} if "partial" in inspect.signature(sampler).parameters else {}
        x = _impose(model, x, known, mask, grid[0].item(), generator)
        for i in range(len(grid) - 1):
            relay = None if callback is None else (lambda step, i=i: callback(Step(i, step.t, step.t_next, step.x,
                                                                               step.x0_hat)))
            x = sampler(model, x, grid[i:i + 2], generator=generator, callback=relay, **knobs, **partial)
            x = _impose(model, x, known, mask, grid[i + 1].item(), generator)
        return x

    return sample


def repaint_schedule(n_steps: int, jump_length: int, resamples: int) -> list[int]:
    """RePaint's walk over the indices ``0..n_steps`` of a time grid (0 = the start, pure noise): down one index per
    reverse step; at every multiple of ``jump_length`` below ``n_steps`` it jumps back up ``jump_length`` indices
    ``resamples - 1`` times, so that each stretch of ``jump_length`` steps is denoised ``resamples`` times (Lugmayr et
    al. 2022, Algorithm 1, their ``jump_n_sample``; ``resamples = 1`` is plain replacement). The jumps sit at the same
    distances from the *start* as here; RePaint's own scheduler counts them from the end (its last jump comes just
    before the clean image, ours ``jump_length`` steps into the chain), with the same number of evaluations."""
    if n_steps < 1 or jump_length < 1 or resamples < 1:
        raise ValueError(f"need n_steps, jump_length, resamples >= 1; got {n_steps}, {jump_length}, {resamples}")
    left = {j: resamples - 1 for j in range(jump_length, n_steps, jump_length)}
    walk, i = [0], 0
    while i < n_steps:
        i += 1
        walk.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            i -= jump_length
            walk.append(i)
    return walk


def repaint_nfe(n_steps: int, jump_length: int, resamples: int) -> int:
    """Network evaluations of :func:`sample_repaint`: one per reverse (downward) move of :func:`repaint_schedule`."""
    walk = repaint_schedule(n_steps, jump_length, resamples)
    return sum(b > a for a, b in zip(walk[:-1], walk[1:]))


@torch.no_grad()
def sample_repaint(model: Predictor, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
                   callback: Callback | None = None, known: torch.Tensor, mask: torch.Tensor, jump_length: int = 10,
                   resamples: int = 1, clip_x0: bool = True) -> torch.Tensor:
    r"""RePaint (Lugmayr et al. 2022): ancestral steps with replacement along :func:`repaint_schedule` over ``times``;
    an upward move from time :math:`s` to :math:`t` draws :math:`x_t \sim N(\tfrac{\alpha_t}{\alpha_s}x_s,
    (\sigma_t^2 - \tfrac{\alpha_t^2}{\alpha_s^2}\sigma_s^2) I)`, the forward process, so the unknown pixels are
    re-denoised in the light of the known ones. Costs :func:`repaint_nfe` evaluations."""
    _check_mask(known, mask, x)
    grid = _check_times(times)
    walk = repaint_schedule(len(grid) - 1, jump_length, resamples)
    x = _impose(model, x, known, mask, grid[0], generator)
    for index, (a, b) in enumerate(zip(walk[:-1], walk[1:])):
        t, s = grid[a], grid[b]
        if b > a:  # reverse: one ancestral step, then the known pixels at the new time
            relay = None if callback is None else (lambda step: callback(Step(index, t, s, step.x, step.x0_hat)))
            x = sample_ancestral(model, x, torch.tensor([t, s], dtype=torch.float64), generator=generator,
                                 callback=relay, clip_x0=clip_x0, partial=True)
            x = _impose(model, x, known, mask, s, generator)
        else:  # forward: from time t up to time s > t
            x = forward_jump(model.path, x, t, s, generator)
    return x


def forward_jump(path, x: torch.Tensor, t_from: float, t_to: float, generator: torch.Generator | None) -> torch.Tensor:
    r"""A draw of :math:`q(x_{t'}\mid x_t)` for :math:`t' > t` on a Gaussian path:
    :math:`\tfrac{\alpha_{t'}}{\alpha_t}x_t + \sqrt{\sigma_{t'}^2 - (\alpha_{t'}/\alpha_t)^2\sigma_t^2}\,z`, the forward
    process between two times, which keeps the marginals :math:`q(x_{t'}\mid x_0)` (RePaint's jump back)."""
    if not t_to > t_from:
        raise ValueError(f"a forward jump goes to a later (noisier) time, got {t_from} -> {t_to}")
    (a_from, s_from), (a_to, s_to) = _coefficients(path, t_from), _coefficients(path, t_to)
    ratio = a_to / a_from
    return ratio * x + math.sqrt(max(0.0, s_to**2 - ratio**2 * s_from**2)) * _noise(x, generator)


def projected(model: Predictor, known: torch.Tensor, mask: torch.Tensor) -> Predictor:
    r"""DDNM's range–null-space projection (Wang et al. 2023, eq. 13) with :math:`A` = the mask, :math:`A^\dagger = A`:
    :math:`\hat x_0 \leftarrow \text{mask}\cdot y + (1 - \text{mask})\cdot\hat x_0`. As an ``x0`` predictor any sampler
    integrates it; with deterministic DDIM the step from the projected :math:`\hat x_0` is DDNM's with
    :math:`\eta = 0`."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_mask(known, mask, x)
        return mask * known + (1 - mask) * model(x, t, "x0")

    return Predictor(fn, "x0", model.path)

