r"""Chapter 6's experiments as functions: every fast sampler within every budget of network evaluations (NFE), from
the same noise, scored by one callable, beside an ancestral reference chain; and the distance of each deterministic
sampler's endpoint to a fine solution of the same probability-flow ODE."""
from __future__ import annotations

import functools
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from .device import autocast, autocast_dtype
from .paths import DiscretePath
from .predictors import Predictor
from .samplers import FAST_SAMPLERS, karras_times, sample_ancestral, sample_edm_stochastic, step_times

TWO_EVALUATION_SAMPLERS = ("heun", "edm")
"""Samplers with two evaluations per step but one on the last step to t = 0 (Karras grids end there)."""

EDM_CHURN = 40.0
r"""Chapter 6's :math:`S_\text{churn}` for EDM's stochastic sampler: :math:`\gamma = \min(S_\text{churn}/N, \sqrt2 - 1)` is
then :math:`\sqrt2 - 1` at every step of every grid up to 96 steps (no :math:`S_\text{tmin}, S_\text{tmax}` window, noise
scale 1). On the MNIST DDPM at 49 NFE (256 samples, one draw of noise) it scored the lowest FD of S_churn = 1, 10, 40,
80 and EDM's windowed ImageNet-style settings (:math:`S_\text{tmin} = 0.05`, :math:`S_\text{tmax} = 50`): an in-sample
choice. At 19 NFE it scores worse than no churn (Heun), by less than two standard errors of an FD difference at that
sample size (chapter 6): too few steps are left to remove the added noise."""

SWEEP_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    **FAST_SAMPLERS, "edm": functools.partial(sample_edm_stochastic, churn=EDM_CHURN)}
"""Chapter 6's sweep: :data:`~diffbook.samplers.FAST_SAMPLERS` and EDM's stochastic sampler (Karras et al. 2022,
Algorithm 2: Heun in :math:`(\rho, y)` with fresh noise before each step; ``churn=0`` would be ``"heun"``)."""


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps that spend at most ``nfe`` evaluations on :func:`~diffbook.samplers.karras_times` grids (which end at
    t = 0): Heun's and EDM's last step, to clean data, skips its correction, so n of their steps cost 2n - 1."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return (nfe + 1) // 2 if sampler in TWO_EVALUATION_SAMPLERS else nfe


def nfe_spent(sampler: str, steps: int) -> int:
    """Evaluations that ``steps`` steps of ``sampler`` cost on a grid ending at t = 0 (inverse of :func:`steps_for_nfe`)."""
    return 2 * steps - 1 if sampler in TWO_EVALUATION_SAMPLERS else steps


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, the root-mean-square difference over its coordinates (pixels), float64 on the CPU."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).flatten(1).pow(2).mean(1).sqrt().cpu()


def ode_errors(model: Predictor, x_T: torch.Tensor, nfes: list[int] | tuple[int, ...], reference: torch.Tensor,
               samplers: dict[str, Callable[..., torch.Tensor]]) -> dict[str, dict[int, torch.Tensor]]:
    """Discretisation error of deterministic samplers: for every sampler and every NFE budget in ``nfes``, the
    per-sample :func:`rms_distance` of its endpoint on :func:`~diffbook.samplers.karras_times` (with
    :func:`steps_for_nfe` steps) from ``x_T`` to ``reference``, a fine solution of the same probability-flow ODE from
    the same ``x_T``. Runs in ``x_T``'s dtype, without autocast. Returns ``{sampler: {budget: errors}}``."""
    errors: dict[str, dict[int, torch.Tensor]] = {}
    for name, sampler in samplers.items():
        errors[name] = {budget: rms_distance(sampler(model, x_T, karras_times(model.path, steps_for_nfe(name, budget))),
                                             reference) for budget in nfes}
    return errors


def nfe_sweep(model: Predictor, x_T: torch.Tensor, nfes: list[int] | tuple[int, ...],
              score: Callable[[torch.Tensor], float], samplers: dict | None = None,
              keep: Callable[[str, int], bool] = lambda name, nfe: False, progress: bool = True,
              seed: int = 0) -> tuple[list[dict], dict]:
    """Run every sampler (default :data:`~diffbook.samplers.FAST_SAMPLERS`) within every NFE budget, on Karras times
    (ending at t = 0) from the same ``x_T``, under the device's autocast; stochastic samplers draw from a generator
    seeded with ``seed``. Returns rows ``{sampler, nfe (spent), steps, score, seconds_per_sample}`` and the samples
    for which ``keep(name, nfe)`` is true."""
    samplers = FAST_SAMPLERS if samplers is None else samplers
    device, rows, kept = x_T.device, [], {}
    jobs = sorted({(name, steps_for_nfe(name, nfe)) for name in samplers for nfe in nfes},
                  key=lambda job: (list(samplers).index(job[0]), job[1]))
    for name, steps in tqdm(jobs, disable=not progress, desc="nfe sweep"):
        nfe = nfe_spent(name, steps)
        started = time.perf_counter()
        with autocast(device, autocast_dtype(device)):
            out = samplers[name](model, x_T, karras_times(model.path, steps),
                                 generator=torch.Generator().manual_seed(seed)).float().clamp(-1, 1)
        seconds = (time.perf_counter() - started) / len(x_T)
        rows.append({"sampler": name, "nfe": nfe, "steps": steps, "score": score(out), "seconds_per_sample": seconds})
        if keep(name, nfe):
            kept[(name, nfe)] = out
    return rows, kept


def ancestral_reference(model: Predictor, x_T: torch.Tensor, steps: int, score: Callable[[torch.Tensor], float],
                        generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Chapter 1's ancestral sampler (x̂₀ clipped, σ² = β) with ``steps`` of the schedule's steps from ``x_T``: the
    reference of a sweep, scored and timed like a row of :func:`nfe_sweep`. ``model`` must live on a
    :class:`~diffbook.paths.DiscretePath`. Returns the row and the samples."""
    if not isinstance(model.path, DiscretePath):
        raise ValueError("the ancestral reference runs on the schedule's own steps: pass a DDPM network's predictor "
                         "(predictor_from_trained), whose path is a DiscretePath")
    started = time.perf_counter()
    with autocast(x_T.device, autocast_dtype(x_T.device)):
        images = sample_ancestral(model, x_T, step_times(model.path.T, steps), generator=generator,
                                  clip_x0=True).float().clamp(-1, 1)
    seconds = (time.perf_counter() - started) / len(x_T)
    return {"sampler": "ancestral", "nfe": steps, "steps": steps, "score": score(images),
            "seconds_per_sample": seconds}, images
