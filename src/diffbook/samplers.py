r"""Every reverse integrator of the book, k-diffusion style: one function each, one signature

    ``sample_<name>(model, x, times, *, generator=None, callback=None, **knobs) -> x_final``

``model`` is a :class:`~diffbook.predictors.Predictor` (any kind, any path), ``x`` the state at ``times[0]`` and ``times``
a decreasing grid on the model's path (:func:`time_grid`, :func:`karras_times`, :func:`step_times`). Noise is drawn
on the CPU from ``generator``, so a seed gives the same samples on any device; deterministic samplers accept and
ignore it. ``callback`` receives one :class:`Step` per step: how chapters watch trajectories (progressive
decoding, straightness, per-step comparisons).

In the scaled variables :math:`\rho = \sigma_t/\alpha_t`, :math:`y = x/\alpha_t` the probability-flow ODE is
:math:`dy/d\rho = \hat\varepsilon(x_t, t)` (chapter 5); in the model's own time it is :math:`dx/dt = \hat u_t(x)`.

=========================== ======================================================== ============
sampler                     method                                                    NFE per step
=========================== ======================================================== ============
:func:`sample_ancestral`    DDPM's ancestral step, the posterior :math:`q(x_s\mid x_t,\hat x_0)` (Ho et al. 2020)   1
:func:`sample_ddim`         DDIM, Euler in :math:`(\rho, y)`; ``eta > 0`` adds noise (Song et al. 2021)            1
:func:`sample_euler`        Euler in :math:`(t, x)` on the velocity                                           1
:func:`sample_heun`         Heun in :math:`(t, x)`, or in :math:`(\rho, y)` with ``scaled=True`` (Karras et al. 2022, Alg. 1)  2
:func:`sample_dpm_solver_pp_2m` DPM-Solver++(2M), exponential integrator in :math:`\log(\alpha/\sigma)` (Lu et al. 2022)  1
:func:`sample_edm_stochastic` EDM's stochastic sampler with churn (Karras et al. 2022, Alg. 2)                    2
:func:`sample_euler_maruyama` the reverse-time SDE (Anderson 1982), Euler–Maruyama                               1
:func:`sample_predictor_corrector` Langevin corrector, then reverse-SDE step (after Song et al. 2021)        1 + corrector
:func:`sample_annealed_langevin` annealed Langevin dynamics (Song & Ermon 2019)                               steps/level
:func:`sample_flow_map`     a learned flow map's jumps :math:`x \leftarrow \Psi_{t_i\to t_{i+1}}(x)` (chapter 9)         1
:func:`sample_consistency`  multistep consistency sampling: :math:`\hat x_0`, then fresh noise (Song et al. 2023, Alg. 1)  1
=========================== ======================================================== ============

A flow map (:class:`~diffbook.flowmaps.FlowMap`) is the one model that is not a :class:`Predictor`: it maps a state
from one time to another, so :func:`sample_flow_map` takes it in the ``model`` slot of the same signature.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .flowmaps import FlowMap
from .paths import NoisePath, as_time
from .predictors import Predictor, convert


@dataclass(frozen=True)
class Step:
    r"""One step of a sampler, from time ``t`` to ``t_next``: its ``index``, the state ``x`` at ``t`` (the step's
    input) and :math:`\hat x_0` as the model predicted it at ``t`` (after clipping, where the sampler clips)."""

    index: int
    t: float
    t_next: float
    x: torch.Tensor
    x0_hat: torch.Tensor


Callback = Callable[[Step], None]


class Trajectory:
    """A callback that keeps every :class:`Step`; ``states(final)`` is the whole trajectory, start to ``final``."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def __call__(self, step: Step) -> None:
        self.steps.append(step)

    def states(self, final: torch.Tensor) -> list[torch.Tensor]:
        return [step.x for step in self.steps] + [final]

    @property
    def x0_hats(self) -> list[torch.Tensor]:
        return [step.x0_hat for step in self.steps]


# ---------------------------------------------------------------- time grids

def time_grid(n_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """``n_steps + 1`` equally spaced times from ``t_start`` to ``t_end`` (float64)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64)


def step_times(T: int, steps: int | None = None) -> torch.Tensor:
    """The times :math:`k/T` of ``steps`` evenly spaced steps :math:`k \\in 1..T` (all of them by default), from
    :math:`T` down, then 0: DDPM's chain, and its respacing (Nichol & Dhariwal 2021), on a
    :class:`~diffbook.paths.DiscretePath`."""
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in 1..{T}, got {steps}")
    ks = sorted({round(1 + i * (T - 1) / max(1, steps - 1)) for i in range(steps)}) if steps > 1 else [T]
    return torch.tensor([0] + ks, dtype=torch.float64).flip(0) / T


def karras_times(path: NoisePath, n_steps: int, t_start: float = 1.0, t_end: float = 1e-3, rho: float = 7.0,
                 to_zero: bool = True) -> torch.Tensor:
    r"""Karras et al. (2022), eq. 5: :math:`\rho_i^{1/r}` evenly spaced between :math:`\rho_\max^{1/r}` and
    :math:`\rho_\min^{1/r}` (here :math:`\rho = \sigma/\alpha`, exponent ``rho`` = r = 7), mapped back to the path's times.
    With ``to_zero`` (their :math:`\sigma_N = 0`) the last of the ``n_steps`` steps goes from ``t_end`` to clean data,
    so the sampler returns its final :math:`\hat x_0` rather than an image with noise of level ``t_end`` left in."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if not 0 < t_end < t_start:
        raise ValueError(f"need 0 < t_end < t_start, got t_end={t_end}, t_start={t_start}")
    ratio_max, ratio_min = path.ratio(torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
    if not math.isfinite(ratio_max):
        raise ValueError(f"{type(path).__name__} is pure noise at t_start={t_start} (sigma/alpha is infinite): start "
                         "where it is finite, e.g. t_start=0.99 on the linear path (sigma/alpha = 99)")
    points = n_steps if to_zero else n_steps + 1
    ramp = torch.linspace(0, 1, points, dtype=torch.float64) if points > 1 else torch.zeros(1, dtype=torch.float64)
    ratios = (ratio_max ** (1 / rho) + ramp * (ratio_min ** (1 / rho) - ratio_max ** (1 / rho))) ** rho
    times = path.time_of_ratio(ratios)
    times[0] = t_start
    if points > 1:
        times[-1] = t_end
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)]) if to_zero else times


def _check_times(times: torch.Tensor | Sequence[float], either_way: bool = False) -> list[float]:
    """The grid as floats; it must lie in the paths' time interval [0, 1] and decrease (or, for the ODE integrators,
    ``either_way``, be monotone). A list or tuple of numbers is accepted as well as a tensor."""
    if isinstance(times, (list, tuple)):
        times = torch.tensor(times, dtype=torch.float64)
    ok = torch.is_tensor(times) and times.ndim == 1 and len(times) >= 2
    ok = ok and (bool((times[1:] < times[:-1]).all()) or (either_way and bool((times[1:] > times[:-1]).all())))
    if not ok:
        raise ValueError(f"times must be a {'monotone' if either_way else 'decreasing'} 1-D tensor of at least 2 "
                         "points (time_grid, karras_times, step_times)")
    if not torch.isfinite(times).all() or float(times.min()) < 0 or float(times.max()) > 1:
        raise ValueError(f"times must lie in [0, 1] (a path's time: 1 is noise, 0 is data), got "
                         f"{float(times.min()):g}..{float(times.max()):g}; for DDPM step indices k use "
                         "step_times(T, steps), which gives k/T")
    return times.tolist()


def _coefficients(path: NoisePath, t: float) -> tuple[float, float]:
    t = as_time(t)
    return path.alpha(t).item(), path.sigma(t).item()


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _steps(times: list[float], name: str, progress: bool):
    return tqdm(range(len(times) - 1), disable=not progress, desc=name, leave=False)


def _x0_from(model: Predictor, x: torch.Tensor, t: float, prediction: torch.Tensor, kind: str) -> torch.Tensor:
    """:math:`\\hat x_0` from a prediction of ``kind`` already made at (x, t): no further model evaluation."""
    if kind == "x0":
        return prediction
    coefficients = model.path.coefficients(torch.tensor(t, dtype=torch.float64), x)
    return convert(prediction, kind, "x0", x, *coefficients)


# ---------------------------------------------------------------- samplers

@torch.no_grad()
def sample_ancestral(model: Predictor, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
                     callback: Callback | None = None, variance: str = "beta", clip_x0: bool = False,
                     partial: bool = False, progress: bool = False) -> torch.Tensor:
    r"""Ancestral sampling (Ho et al. 2020, Algorithm 2) between any two times :math:`t > s` of a Gaussian path:
    with :math:`\alpha_{t|s} = \alpha_t/\alpha_s` and :math:`\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2\sigma_s^2`,

    .. math::
        x_s = \frac{\alpha_{t|s}\sigma_s^2}{\sigma_t^2}x_t + \frac{\alpha_s\sigma_{t|s}^2}{\sigma_t^2}\hat x_0 + \varsigma z,

    the mean of :math:`q(x_s \mid x_t, \hat x_0)`, with :math:`\varsigma^2 = \sigma_{t|s}^2` (``variance="beta"``, DDPM's
    :math:`\beta_t` on its own schedule) or the posterior's :math:`\sigma_{t|s}^2\sigma_s^2/\sigma_t^2` (``"posterior"``,
    :math:`\tilde\beta_t`), and no noise on the last step. ``partial=True`` says that ``times`` is only part of a longer
    chain (inpainting runs one step at a time): its last step then adds noise too, unless it ends at :math:`t = 0`.
    On :meth:`NoiseSchedule.path` at :func:`step_times` this is exactly DDPM's chain (respaced when ``steps < T``). ``clip_x0`` clamps :math:`\hat x_0` to the data range [-1, 1]."""
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    grid = _check_times(times)
    for i in _steps(grid, "ancestral", progress):
        t, s = grid[i], grid[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(model.path, t), _coefficients(model.path, s)
        x0 = model(x, t, "x0")
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if callback is not None:
            callback(Step(i, t, s, x, x0))
        alpha_ts = alpha_t / alpha_s
        var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
        x_next = (alpha_ts * sigma_s**2 / sigma_t**2) * x + (alpha_s * var_ts / sigma_t**2) * x0
        if i < len(grid) - 2 or (partial and s > 0):  # the chain's last step returns the mean (DDPM)
            std = math.sqrt(var_ts if variance == "beta" else var_ts * sigma_s**2 / sigma_t**2)
            x_next = x_next + std * _noise(x, generator)
        x = x_next
    return x


@torch.no_grad()
def sample_ddim(model: Predictor, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, eta: float = 0.0, clip_x0: bool = False,
                progress: bool = False) -> torch.Tensor:
    r"""DDIM (Song et al. 2021): :math:`x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - \sigma_\eta^2}\,\hat\varepsilon + \sigma_\eta z`,
    :math:`\sigma_\eta^2 = \eta^2\sigma_s^2\big(1 - \tfrac{\alpha_t^2\sigma_s^2}{\alpha_s^2\sigma_t^2}\big)`; ``eta = 1`` is the DDPM
    posterior. With ``clip_x0`` :math:`\hat x_0` is clamped to [-1, 1] and :math:`\hat\varepsilon` recomputed from it
    (the locality chapter's protocol, Lukoianov et al. 2025)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: the DDPM posterior's noise), got {eta}")
    grid = _check_times(times)
    for i in _steps(grid, "ddim", progress):
        t, s = grid[i], grid[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(model.path, t), _coefficients(model.path, s)
        if clip_x0:
            x0 = model(x, t, "x0").clamp(-1, 1)
            eps = (x - alpha_t * x0) / sigma_t
        else:
            eps = model(x, t, "eps")
            x0 = (x - sigma_t * eps) / alpha_t
        if callback is not None:
            callback(Step(i, t, s, x, x0))
        noise_std = eta * sigma_s * math.sqrt(max(0.0, 1 - (alpha_t * sigma_s) ** 2 / (alpha_s * sigma_t) ** 2))
        x = alpha_s * x0 + math.sqrt(max(0.0, sigma_s**2 - noise_std**2)) * eps
        if noise_std > 0:
            x = x + noise_std * _noise(x, generator)
    return x


@torch.no_grad()
def sample_euler(model: Predictor, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    r"""Euler on the probability-flow ODE in the path's time: :math:`x_{i+1} = x_i + (t_{i+1} - t_i)\,\hat u_{t_i}(x_i)`.
    An ODE runs both ways: an increasing grid integrates from data towards noise."""
    grid = _check_times(times, either_way=True)
    for i in _steps(grid, "euler", progress):
        t, s = grid[i], grid[i + 1]
        velocity = model(x, t, "velocity")
        if callback is not None:
            callback(Step(i, t, s, x, _x0_from(model, x, t, velocity, "velocity")))
        x = x + (s - t) * velocity
    return x


@torch.no_grad()
def sample_heun(model: Predictor, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, scaled: bool = False, progress: bool = False) -> torch.Tensor:
    r"""Heun's method (explicit trapezoid, second order) on the probability-flow ODE: an Euler guess, then the
    average of the slopes at both ends. Two evaluations per step.

    - ``scaled=False``: in the path's time, :math:`dx/dt = \hat u_t(x)`.
    - ``scaled=True``: in :math:`(\rho, y)`, :math:`dy/d\rho = \hat\varepsilon` (Karras et al. 2022, Algorithm 1), where the
      correction is skipped on a step to :math:`\rho = 0` (so n steps ending at clean data cost 2n − 1).

    In the path's time the grid may also increase (data towards noise: the ODE is invertible). A step to a time where
    the path's velocity is singular (:math:`\sigma'` infinite, as for VP paths at :math:`t = 0`, where
    :math:`\sigma \propto \sqrt t`) is an Euler step: the slope there does not exist."""
    grid = _check_times(times, either_way=not scaled)
    for i in _steps(grid, "heun", progress):
        t, s = grid[i], grid[i + 1]
        if not scaled:
            h = s - t
            slope = model(x, t, "velocity")
            if callback is not None:
                callback(Step(i, t, s, x, _x0_from(model, x, t, slope, "velocity")))
            guess = x + h * slope
            end = torch.as_tensor(s, dtype=torch.float64)
            singular = not (torch.isfinite(model.path.d_sigma(end)).all() and torch.isfinite(model.path.d_alpha(end)).all())
            x = guess if singular else x + 0.5 * h * (slope + model(guess, s, "velocity"))
            continue
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(model.path, t), _coefficients(model.path, s)
        y, h = x / alpha_t, sigma_s / alpha_s - sigma_t / alpha_t
        slope = model(x, t, "eps")
        if callback is not None:
            callback(Step(i, t, s, x, (x - sigma_t * slope) / alpha_t))
        y_next = y + h * slope
        if sigma_s > 0:
            y_next = y + 0.5 * h * (slope + model(alpha_s * y_next, s, "eps"))
        x = alpha_s * y_next
    return x


@torch.no_grad()
def sample_dpm_solver_pp_2m(model: Predictor, x: torch.Tensor, times: torch.Tensor, *,
                            generator: torch.Generator | None = None, callback: Callback | None = None,
                            progress: bool = False) -> torch.Tensor:
    r"""DPM-Solver++(2M), data prediction, Lu et al. (2022) Algorithm 2. With Lu et al.'s :math:`\lambda = \log(\alpha/\sigma)`
    (half of :meth:`NoisePath.log_snr`), :math:`h = \lambda_s - \lambda_t`:
    :math:`x_s = \tfrac{\sigma_s}{\sigma_t}x_t - \alpha_s(e^{-h} - 1)D`, where :math:`D = \hat x_0` on the first step and, as
    in k-diffusion and diffusers (not in Lu et al.), on the last (then the update is DDIM's), and
    :math:`D = (1 + \tfrac1{2r})\hat x_0^{(t)} - \tfrac1{2r}\hat x_0^{(\text{prev})}`, :math:`r = h_\text{prev}/h`, otherwise."""
    grid = _check_times(times)
    previous = None  # (x0_hat, h) of the previous step
    last = len(grid) - 2
    for i in _steps(grid, "dpm++2m", progress):
        t, s = grid[i], grid[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(model.path, t), _coefficients(model.path, s)
        x0 = model(x, t, "x0")
        if callback is not None:
            callback(Step(i, t, s, x, x0))
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


@torch.no_grad()
def sample_edm_stochastic(model: Predictor, x: torch.Tensor, times: torch.Tensor, *,
                          generator: torch.Generator | None = None, callback: Callback | None = None,
                          churn: float = 40.0, churn_min: float = 0.0, churn_max: float = float("inf"),
                          noise_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
    r"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) in :math:`(\rho, y)`: before each step, raise the
    noise level from :math:`\rho_i` to :math:`\hat\rho_i = \rho_i(1 + \gamma_i)` by adding fresh noise of variance
    :math:`\hat\rho_i^2 - \rho_i^2` (times ``noise_scale``:math:`^2`), with :math:`\gamma_i = \min(S_\text{churn}/N, \sqrt2 - 1)` where
    :math:`\rho_i \in [S_\text{tmin}, S_\text{tmax}]` (``churn``, ``churn_min``, ``churn_max``; N the number of steps),
    then take a Heun step from :math:`\hat\rho_i` to :math:`\rho_{i+1}` (Euler on the last step, to ρ = 0). With
    ``churn=0`` it is :func:`sample_heun` with ``scaled=True``."""
    grid = _check_times(times)
    path, n = model.path, len(grid) - 1
    gamma_max = min(churn / n, math.sqrt(2) - 1)
    for i in _steps(grid, "edm", progress):
        t, s = grid[i], grid[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _coefficients(path, t), _coefficients(path, s)
        rho_t, rho_s = sigma_t / alpha_t, sigma_s / alpha_s
        y = x / alpha_t
        gamma = gamma_max if churn_min <= rho_t <= churn_max else 0.0
        rho_hat = rho_t * (1 + gamma)
        if gamma > 0:
            y = y + noise_scale * math.sqrt(rho_hat**2 - rho_t**2) * _noise(y, generator)
            t_hat = path.time_of_ratio(torch.tensor(rho_hat, dtype=torch.float64)).item()
            x_hat = _coefficients(path, t_hat)[0] * y
        else:  # no churn: evaluate at x itself, as Heun does (alpha_t * (x / alpha_t) can differ from x in the last bit)
            t_hat, x_hat = t, x
        slope = model(x_hat, t_hat, "eps")
        if callback is not None:
            callback(Step(i, t, s, x, y - rho_hat * slope))
        y_next = y + (rho_s - rho_hat) * slope
        if rho_s > 0:
            y_next = y + 0.5 * (rho_s - rho_hat) * (slope + model(alpha_s * y_next, s, "eps"))
        x = alpha_s * y_next
    return x


@torch.no_grad()
def sample_flow_map(model: FlowMap, x: torch.Tensor, times: torch.Tensor, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    r"""Jump along a flow map: :math:`x_{i+1} = \Psi_{t_i\to t_{i+1}}(x_i)`, one evaluation per step; with the exact map
    every grid gives the same endpoint (the semigroup property). Deterministic. The callback's :math:`\hat x_0` is where
    the step's straight line, continued, meets :math:`t = 0`: :math:`x_i - t_i\,\bar u(x_i, t_i, t_{i+1})` (the endpoint
    itself on a step that ends at 0)."""
    if not isinstance(model, FlowMap):
        raise TypeError(f"sample_flow_map needs a diffbook.flowmaps.FlowMap, got {type(model).__name__}; a Predictor's "
                        "one Euler step is euler_flow_map(predictor)")
    grid = _check_times(times, either_way=True)
    for i in _steps(grid, "flow map", progress):
        t, s = grid[i], grid[i + 1]
        velocity = model.average_velocity(x, t, s)
        if callback is not None:
            callback(Step(i, t, s, x, x - t * velocity))
        x = x + (s - t) * velocity
    return x


@torch.no_grad()
def sample_consistency(model: Predictor, x: torch.Tensor, times: torch.Tensor, *,
                       generator: torch.Generator | None = None, callback: Callback | None = None,
                       progress: bool = False) -> torch.Tensor:
    r"""Multistep consistency sampling (Song et al. 2023, Algorithm 1): at each time :math:`t_i` take the model's
    :math:`\hat x_0 = f(x, t_i)` (for a consistency model, its consistency function :math:`\Psi_{t_i\to 0}`), then
    re-noise it to the next time with fresh noise, :math:`x = \alpha_{t_{i+1}}\hat x_0 + \sigma_{t_{i+1}} z`; the last
    step, to :math:`t = 0`, returns :math:`\hat x_0`. One evaluation per step; one step is one-step generation."""
    if isinstance(model, FlowMap):
        raise TypeError("sample_consistency takes a Predictor (its x0 is the consistency function); for a FlowMap use "
                        "sample_flow_map, or flow_map.consistency()")
    grid = _check_times(times)
    for i in _steps(grid, "consistency", progress):
        t, s = grid[i], grid[i + 1]
        x0 = model(x, t, "x0")
        if callback is not None:
            callback(Step(i, t, s, x, x0))
        alpha_s, sigma_s = _coefficients(model.path, s)
        x = alpha_s * x0 + sigma_s * _noise(x, generator) if sigma_s > 0 else alpha_s * x0
    return x


def _langevin_step(x: torch.Tensor, score: torch.Tensor, generator: torch.Generator | None, snr: float
                   ) -> torch.Tensor:
    """One Langevin corrector step with the ``score`` at ``x``, its size set by the target signal-to-noise ratio ``snr``
    (the rule of Song et al. 2021, Algorithm 4)."""
    z = _noise(x, generator)
    flat_norm = lambda v: v.reshape(v.shape[0], -1).norm(dim=1).mean()
    step = 2 * (snr * flat_norm(z) / flat_norm(score).clamp_min(1e-12)) ** 2
    return x + step * score + (2 * step).sqrt() * z


@torch.no_grad()
def sample_predictor_corrector(model: Predictor, x: torch.Tensor, times: torch.Tensor, *,
                               generator: torch.Generator | None = None, callback: Callback | None = None,
                               corrector_steps: int = 1, snr: float = 0.16, progress: bool = False) -> torch.Tensor:
    r"""Predictor–corrector sampling after Song et al. (2021), Algorithms 1 and 4, in the order corrector first: at each
    time, ``corrector_steps`` Langevin steps with the score at that
    time (step size :math:`\epsilon = 2(r\,\overline{\lVert z\rVert}/\overline{\lVert s\rVert})^2`, norms averaged over the
    batch, ``snr`` = r), then one Euler–Maruyama step of the reverse-time SDE (Anderson 1982) of the model's path,
    :math:`dx = [f_t x - g_t^2\nabla\log p_t(x)]\,dt + g_t\,d\bar W` (:math:`f, g` from
    :meth:`NoisePath.sde_coefficients`), with no noise on the last step.
    ``(len(times) - 1) * (corrector_steps + 1)`` evaluations."""
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    grid = _check_times(times)
    for i in _steps(grid, "predictor-corrector" if corrector_steps else "euler-maruyama", progress):
        t, s = grid[i], grid[i + 1]
        score = model(x, t, "score")
        if callback is not None:  # the step's input, before its corrector steps
            callback(Step(i, t, s, x, _x0_from(model, x, t, score, "score")))
        for _ in range(corrector_steps):
            x = _langevin_step(x, score, generator, snr)
            score = model(x, t, "score")
        f, g2 = (c.item() for c in model.path.sde_coefficients(t))
        g2 = max(g2, 0.0)
        x = x - (f * x - g2 * score) * (t - s)
        if i < len(grid) - 2:
            x = x + math.sqrt(g2 * (t - s)) * _noise(x, generator)
    return x


def sample_euler_maruyama(model: Predictor, x: torch.Tensor, times: torch.Tensor, *,
                          generator: torch.Generator | None = None, callback: Callback | None = None,
                          progress: bool = False) -> torch.Tensor:
    r"""The reverse-time SDE (Anderson 1982; Song et al. 2021) of the model's path with Euler–Maruyama steps
    backwards in time: :func:`sample_predictor_corrector` without corrector. The last step adds no noise."""
    return sample_predictor_corrector(model, x, times, generator=generator, callback=callback, corrector_steps=0,
                                      progress=progress)


@torch.no_grad()
def sample_annealed_langevin(model: Predictor, x: torch.Tensor, times: torch.Tensor, *,
                             generator: torch.Generator | None = None, callback: Callback | None = None,
                             epsilon: float = 1e-3, steps_per_level: int = 10, progress: bool = False) -> torch.Tensor:
    r"""Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): at each time of ``times`` but the last (the
    noise levels, decreasing), ``steps_per_level`` steps of :math:`x \leftarrow x + \eta\,\hat s_t(x) + \sqrt{2\eta}\,z` with
    :math:`\eta = \epsilon\,\rho_t^2/\rho_L^2` (:math:`\rho = \sigma/\alpha`, :math:`\rho_L` the last level's). On a VE path this
    is NCSN's sampler, whose update :math:`x + \tfrac{a}{2}s + \sqrt{a}\,z` has :math:`a = 2\eta`: their step constant is twice
    ``epsilon``. ``times[-1]`` only closes the grid."""
    grid = _check_times(times)
    levels = grid[:-1]
    ratios = [(lambda a, s: s / a)(*_coefficients(model.path, t)) for t in levels]
    for i in _steps(grid, "annealed langevin", progress):
        t = levels[i]
        step = epsilon * ratios[i] ** 2 / ratios[-1] ** 2
        for j in range(steps_per_level):
            score = model(x, t, "score")
            if callback is not None and j == 0:
                callback(Step(i, t, grid[i + 1], x, _x0_from(model, x, t, score, "score")))
            x = x + step * score + math.sqrt(2 * step) * _noise(x, generator)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ancestral": sample_ancestral, "ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun,
    "dpm++2m": sample_dpm_solver_pp_2m, "edm": sample_edm_stochastic, "euler-maruyama": sample_euler_maruyama,
    "predictor-corrector": sample_predictor_corrector, "annealed-langevin": sample_annealed_langevin,
    "consistency": sample_consistency,
}
"""Every sampler of a :class:`Predictor` by name; ``functools.partial`` fixes a knob (``functools.partial(sample_ddim,
eta=1.0)``). :func:`sample_flow_map`, whose model is a flow map, is the one sampler outside it."""

FAST_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim, "ddim, eta=1": functools.partial(sample_ddim, eta=1.0),
    "heun": functools.partial(sample_heun, scaled=True), "dpm++2m": sample_dpm_solver_pp_2m,
}
"""Chapter 6's sweep on Karras times: the deterministic DDIM, its stochastic η = 1 variant, EDM's Heun (in
:math:`(\\rho, y)`) and DPM-Solver++(2M)."""
