r"""Fast samplers (chapter 6), k-diffusion style: one function each, one signature
``sampler(predictor, x, times, ...)``. ``predictor`` is a :class:`~diffbook.conversions.Predictor` (any kind, any
Gaussian path); ``times`` a decreasing grid on its path from :func:`karras_times` or :func:`diffbook.ode.time_grid`.

All three live most naturally in the scaled variables :math:`\rho = \sigma_t/\alpha_t`, :math:`y = x/\alpha_t`, where the
probability-flow ODE is :math:`dy/d\rho = \hat\varepsilon(x_t, t)` (chapter 5):

- :func:`sample_ddim` (Song et al. 2021): Euler in :math:`(\rho, y)`; with ``eta > 0`` it adds fresh noise
  (``eta = 1`` is the DDPM posterior). One evaluation per step.
- :func:`sample_heun` (Karras et al. 2022, Algorithm 1): Heun in :math:`(\rho, y)`. Two evaluations per step.
- :func:`sample_dpm_solver_pp_2m` (Lu et al. 2022): the exponential integrator in
  :math:`\lambda = -\log\rho` with a multistep second-order :math:`\hat x_0`; one evaluation per step.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable

import torch
from tqdm import tqdm

from .conversions import Predictor
from .device import autocast, autocast_dtype
from .interpolants import Interpolant
from .sampling import sample_ddpm
from .schedules import NoiseSchedule


def karras_times(interpolant: Interpolant, n_steps: int, t_start: float = 1.0, t_end: float = 1e-3,
                 rho: float = 7.0, to_zero: bool = True) -> torch.Tensor:
    r"""Karras et al. (2022), eq. 5: :math:`\rho_i^{1/r}` evenly spaced between :math:`\rho_\max^{1/r}` and
    :math:`\rho_\min^{1/r}` (here :math:`\rho = \sigma/\alpha`, exponent ``rho`` = r = 7), mapped back to times.
    With ``to_zero`` (their :math:`\sigma_N = 0`) the last of the ``n_steps`` steps goes from ``t_end`` to clean data,
    so the sampler returns its final :math:`\hat x_0` rather than an image with noise of level ``t_end`` left in."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    points = n_steps if to_zero else n_steps + 1
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    ratio_max, ratio_min = (interpolant.sigma(ends) / interpolant.alpha(ends)).tolist()
    ramp = torch.linspace(0, 1, points, dtype=torch.float64) if points > 1 else torch.zeros(1, dtype=torch.float64)
    ratios = (ratio_max ** (1 / rho) + ramp * (ratio_min ** (1 / rho) - ratio_max ** (1 / rho))) ** rho
    times = interpolant.time_of_ratio(ratios)
    times[0] = t_start
    if points > 1:
        times[-1] = t_end
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)]) if to_zero else times


def _check(times: torch.Tensor) -> None:
    if times.ndim != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must be a decreasing 1-D grid of at least 2 points")


def _coefficients(interpolant: Interpolant, t: torch.Tensor) -> tuple[float, float]:
    return interpolant.alpha(t).item(), interpolant.sigma(t).item()


@torch.no_grad()
def sample_ddim(predictor: Predictor, x: torch.Tensor, times: torch.Tensor, *, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    r"""DDIM: :math:`x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - \sigma_\eta^2}\,\hat\varepsilon + \sigma_\eta z`,
    :math:`\sigma_\eta^2 = \eta^2\sigma_s^2\big(1 - \tfrac{\alpha_t^2\sigma_s^2}{\alpha_s^2\sigma_t^2}\big)`."""
    _check(times)
    path = predictor.interpolant
    for i in tqdm(range(len(times) - 1), disable=not progress, desc="ddim"):
        t, s = times[i], times[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(path, t), _coefficients(path, s)
        eps = predictor(x, t, "eps")
        x0 = (x - sigma_t * eps) / alpha_t
        noise_std = eta * sigma_s * math.sqrt(max(0.0, 1 - (alpha_t * sigma_s) ** 2 / (alpha_s * sigma_t) ** 2))
        x = alpha_s * x0 + math.sqrt(max(0.0, sigma_s**2 - noise_std**2)) * eps
        if noise_std > 0:
            x = x + noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


@torch.no_grad()
def sample_heun(predictor: Predictor, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    r"""Heun's method on :math:`dy/d\rho = \hat\varepsilon` (EDM): an Euler step, then the trapezoid correction,
    skipped where :math:`\rho` reaches 0. ``generator`` is unused (deterministic); it keeps the signature common."""
    _check(times)
    path = predictor.interpolant
    for i in tqdm(range(len(times) - 1), disable=not progress, desc="heun"):
        t, s = times[i], times[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(path, t), _coefficients(path, s)
        y, h = x / alpha_t, sigma_s / alpha_s - sigma_t / alpha_t
        slope = predictor(x, t, "eps")
        y_next = y + h * slope
        if sigma_s > 0:
            y_next = y + 0.5 * h * (slope + predictor(alpha_s * y_next, s, "eps"))
        x = alpha_s * y_next
    return x


@torch.no_grad()
def sample_dpm_solver_pp_2m(predictor: Predictor, x: torch.Tensor, times: torch.Tensor, *,
                            generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    r"""DPM-Solver++(2M), data prediction, Lu et al. (2022) Algorithm 2. With :math:`\lambda = \log(\alpha/\sigma)`,
    :math:`h = \lambda_s - \lambda_t`: :math:`x_s = \tfrac{\sigma_s}{\sigma_t}x_t - \alpha_s(e^{-h} - 1)D`, where
    :math:`D = \hat x_0` on the first and last steps (then the update is DDIM's) and
    :math:`D = (1 + \tfrac1{2r})\hat x_0^{(t)} - \tfrac1{2r}\hat x_0^{(\text{prev})}`, :math:`r = h_\text{prev}/h`, otherwise."""
    _check(times)
    path = predictor.interpolant
    previous = None  # (x0_hat, h) of the previous step
    last = len(times) - 2
    for i in tqdm(range(len(times) - 1), disable=not progress, desc="dpm++2m"):
        t, s = times[i], times[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(path, t), _coefficients(path, s)
        x0 = predictor(x, t, "x0")
        if sigma_s == 0:  # lambda_s = inf: the exact step lands on the data prediction
            return x0
        h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
        data = x0
        if previous is not None and i < last:
            r = previous[1] / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * data
        previous = (x0, h)
    return x


SAMPLERS = {"ddim": sample_ddim, "ddim, eta=1": functools.partial(sample_ddim, eta=1.0), "heun": sample_heun,
            "dpm++2m": sample_dpm_solver_pp_2m}


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps that spend at most ``nfe`` evaluations on :func:`karras_times` grids (which end at t = 0): Heun's last
    step, to clean data, skips its correction, so n Heun steps cost 2n - 1."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def nfe_spent(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def nfe_sweep(predictor: Predictor, x_T: torch.Tensor, nfes: list[int] | tuple[int, ...],
              score: Callable[[torch.Tensor], float], samplers: dict | None = None,
              keep: Callable[[str, int], bool] = lambda name, nfe: False, progress: bool = True,
              seed: int = 0) -> tuple[list[dict], dict]:
    """Run every sampler within every NFE budget, on Karras times (ending at t = 0) from the same ``x_T``, under
    the device's autocast; stochastic samplers draw from a generator seeded with ``seed``. Returns rows ``{sampler, nfe (spent), steps, score, seconds_per_sample}`` and the
    samples for which ``keep(name, nfe)`` is true."""
    samplers = SAMPLERS if samplers is None else samplers
    device, rows, kept = x_T.device, [], {}
    jobs = sorted({(name, steps_for_nfe(name, nfe)) for name in samplers for nfe in nfes},
                  key=lambda job: (list(samplers).index(job[0]), job[1]))
    for name, steps in tqdm(jobs, disable=not progress, desc="nfe sweep"):
        nfe = nfe_spent(name, steps)
        started = time.perf_counter()
        with autocast(device, autocast_dtype(device)):
            out = samplers[name](predictor, x_T, karras_times(predictor.interpolant, steps),
                                 generator=torch.Generator().manual_seed(seed)).float().clamp(-1, 1)
        seconds = (time.perf_counter() - started) / len(x_T)
        rows.append({"sampler": name, "nfe": nfe, "steps": steps, "score": score(out), "seconds_per_sample": seconds})
        if keep(name, nfe):
            kept[(name, nfe)] = out
    return rows, kept


def ancestral_reference(net: torch.nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int,
                        score: Callable[[torch.Tensor], float], generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Chapter 1's ancestral sampler with ``steps`` steps from ``x_T`` (the reference of a sweep), scored and timed
    like a row of :func:`nfe_sweep`. Returns the row and the samples."""
    started = time.perf_counter()
    with autocast(x_T.device, autocast_dtype(x_T.device)):
        images = sample_ddpm(net, schedule, x_T, steps=steps, generator=generator).float().clamp(-1, 1)
    seconds = (time.perf_counter() - started) / len(x_T)
    return {"sampler": "ancestral", "nfe": steps, "steps": steps, "score": score(images),
            "seconds_per_sample": seconds}, images
