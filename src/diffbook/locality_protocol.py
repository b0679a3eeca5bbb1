r"""The r² protocol of Lukoianov et al. (2025): analytic denoisers against a trained U-Net, step by step.

Every method denoises images at DDPM step :math:`k` (``ImageDenoiser``: ``(x_t, k) -> x0_hat``) and is sampled with
the same 10-step deterministic DDIM from the same noise as the U-Net (:func:`ddim_protocol`). :func:`r2_experiment`
scores each method's final sample, and its per-step :math:`\hat x_0` on the U-Net's own trajectory, with
:func:`diffbook.locality.r_squared` against the U-Net's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .locality import (Denoiser, WienerFilter, analytic_denoiser_pair, analytic_masks, nearest_training_image,
                       optimal_denoiser, r_squared)
from .schedules import NoiseSchedule
from .storage import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

PAPER_TIMESTEPS = tuple(range(900, -1, -100))
"""The paper's DDIM protocol: 10 steps at 0-indexed times t = 900, 800, ..., 0 ("leading" spacing). In this
book's schedule, whose index 0 is clean data, 0-indexed time t is step k = t + 1."""

PAPER_SEED = 42
"""The seed of the initial noise in the authors' code."""

PAPER_THETA = {"mnist": 0.005, "fashion_mnist": 0.005, "cifar10": 0.05}
"""The mask threshold θ of the analytic denoiser, per dataset, as in the paper."""

PAPER_R2 = {"mnist": 0.491, "cifar10": 0.589, "celeba_hq": 0.902}
"""The paper's published r² of its analytic denoiser against its U-Nets (their numbers, not ours)."""

ImageDenoiser = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t images, step k) -> x0_hat images


def unet_denoiser(net: nn.Module, schedule: NoiseSchedule) -> ImageDenoiser:
    r"""A DDPM ε-network as an :math:`\hat x_0` denoiser at step k: :math:`(x_t - \sqrt{1-\bar\alpha_k}\,\hat\varepsilon)/\sqrt{\bar\alpha_k}`."""
    def denoise(x: torch.Tensor, k: int) -> torch.Tensor:
        eps = net(x.float(), torch.full((len(x),), float(k), device=x.device)).to(x.dtype)
        return (x - schedule.noise[k].item() * eps) / schedule.signal[k].item()
    return denoise


def flat_denoiser(fn: Denoiser, schedule: NoiseSchedule) -> ImageDenoiser:
    """Wrap a denoiser on flattened vectors (``fn(x_t, alpha_bar)``) as an image denoiser at step k."""
    def denoise(x: torch.Tensor, k: int) -> torch.Tensor:
        return fn(x.flatten(1), schedule.alpha_bar[k].item()).reshape(x.shape).to(x.dtype)
    return denoise


@dataclass
class AnalyticDenoiser:
    """The paper's analytic denoiser at every DDPM step, both variants (exact softmax and the released code's
    batch-averaged one). Masks are cached per step; the last result per step is cached too, so the two
    variants evaluated on the same state cost one pass over the training set."""

    train: torch.Tensor  # (n, d) flattened training images
    wiener: WienerFilter
    schedule: NoiseSchedule
    theta: float
    batch_size: int = 512
    dtype: torch.dtype = torch.float32
    _masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _last: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def masks(self, k: int) -> torch.Tensor:
        if k not in self._masks:
            self._masks[k] = analytic_masks(self.wiener, self.schedule.alpha_bar[k].item(), self.theta)
        return self._masks[k]

    def pair(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact, batch-averaged) :math:`\\hat x_0` of images ``x`` at step k."""
        cached = self._last.get(k)
        if cached is None or cached[0].shape != x.shape or not torch.equal(cached[0], x):
            flat = analytic_denoiser_pair(x.flatten(1), self.schedule.alpha_bar[k].item(), self.train, self.masks(k),
                                          self.batch_size, self.dtype)
            cached = (x.clone(), tuple(out.reshape(x.shape) for out in flat))
            self._last[k] = cached
        return cached[1]

    def exact(self) -> ImageDenoiser:
        return lambda x, k: self.pair(x, k)[0]

    def batch_averaged(self) -> ImageDenoiser:
        return lambda x, k: self.pair(x, k)[1]


def protocol_noise(samples: int, seed: int = PAPER_SEED, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    """The initial noise x_T of the protocol (float64): the same for every method, and the first images of a
    larger draw are the images of a smaller one only if ``samples`` is the same, so pass the record's count."""
    return torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed)).double()


def paper_denoisers(train: torch.Tensor, schedule: NoiseSchedule, theta: float, analytic: bool = True,
                    dtype: torch.dtype = torch.float32, wiener: WienerFilter | None = None) -> dict[str, ImageDenoiser]:
    """The rows of the r² table, as image denoisers, from flattened training images (n, d): the optimal
    (empirical posterior mean), the Wiener filter (fitted to ``train`` unless given), the analytic denoiser
    (exact and batch-averaged; left out with ``analytic=False``) and the nearest training image."""
    wiener = wiener or WienerFilter.fit(train)
    rows = {"optimal": flat_denoiser(lambda x, a: optimal_denoiser(x, a, train), schedule),
            "wiener": flat_denoiser(wiener, schedule)}
    if analytic:
        model = AnalyticDenoiser(train, wiener, schedule, theta, dtype=dtype)
        rows |= {"analytic": model.exact(), "analytic_batch": model.batch_averaged()}
    rows["nearest"] = flat_denoiser(lambda x, a: nearest_training_image(x, a, train), schedule)
    return rows


@dataclass
class DDIMTrace:
    r"""A DDIM run: the final sample, the state before each step and the clipped :math:`\hat x_0` of each step."""

    final: torch.Tensor
    states: list[torch.Tensor]
    x0_hats: list[torch.Tensor]


@torch.no_grad()
def ddim_protocol(denoise: ImageDenoiser, x_T: torch.Tensor, schedule: NoiseSchedule,
                  timesteps: tuple[int, ...] = PAPER_TIMESTEPS, states: list[torch.Tensor] | None = None) -> DDIMTrace:
    r"""Deterministic DDIM (η = 0) on 0-indexed ``timesteps`` with :math:`\hat x_0` clipped to [-1, 1] at every step;
    the step after the last time goes to clean data. With ``states`` (another run's states), each step starts
    from those instead of from this run's own trajectory: the per-step ("score-matching") comparison."""
    x, seen, x0_hats = x_T, [], []
    for i, t in enumerate(timesteps):
        k = t + 1
        if states is not None:
            x = states[i]
        seen.append(x)
        x0 = denoise(x, k).clamp(-1, 1)
        x0_hats.append(x0)
        eps = (x - schedule.signal[k].item() * x0) / schedule.noise[k].item()
        k_prev = timesteps[i + 1] + 1 if i + 1 < len(timesteps) else 0
        x = schedule.signal[k_prev].item() * x0 + schedule.noise[k_prev].item() * eps
    return DDIMTrace(x, seen, x0_hats)


@dataclass
class R2Result:
    """Per-image r² against the U-Net: ``final[name]`` (n,) for the final samples, ``per_step[name]``
    (steps, n) for each step's :math:`\\hat x_0` on the U-Net's trajectory; the runs themselves in ``traces``."""

    reference: DDIMTrace
    traces: dict[str, DDIMTrace]
    final: dict[str, torch.Tensor]
    per_step: dict[str, torch.Tensor]

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and standard error over images of the final r², and the mean over images and steps of the
        per-step r², per method."""
        def mean_sem(values: torch.Tensor) -> tuple[float, float]:
            return values.mean().item(), (values.std() / len(values) ** 0.5).item()
        out = {}
        for name in self.final:
            (final, final_sem), per_step = mean_sem(self.final[name]), self.per_step[name].mean(1)
            out[name] = {"final": final, "final_sem": final_sem, "per_step": per_step.mean().item(),
                         "per_step_sem": mean_sem(self.per_step[name].mean(0))[1]}
        return out

    def to_record(self) -> dict[str, Any]:
        """JSON-ready: the sample count, :meth:`summary` and every per-image value."""
        return {"samples": len(self.reference.final), "summary": self.summary(),
                "final": {name: values.tolist() for name, values in self.final.items()},
                "per_step": {name: values.tolist() for name, values in self.per_step.items()}}

    def max_difference(self, record: dict[str, Any]) -> float:
        """The largest |r²| difference, final or per step, between this run and the first images of a stored
        ``record`` (same methods): how well the record is reproduced."""
        n = len(self.reference.final)
        worst = 0.0
        for name in self.final:
            final = torch.tensor(record["final"][name][:n], dtype=torch.float64)
            per_step = torch.tensor(record["per_step"][name], dtype=torch.float64)[:, :n]
            worst = max(worst, (self.final[name] - final).abs().max().item(),
                        (self.per_step[name] - per_step).abs().max().item())
        return worst


def r2_experiment(unet: ImageDenoiser, denoisers: dict[str, ImageDenoiser], x_T: torch.Tensor,
                  schedule: NoiseSchedule, timesteps: tuple[int, ...] = PAPER_TIMESTEPS,
                  progress: bool = True) -> R2Result:
    """Sample the U-Net and every denoiser from ``x_T`` with :func:`ddim_protocol`, and replay each denoiser on
    the U-Net's states; r² of every method against the U-Net, per image (and per step)."""
    reference = ddim_protocol(unet, x_T, schedule, timesteps)
    traces, final, per_step = {}, {}, {}
    runs = [(name, replay) for replay in (True, False) for name in denoisers]  # replays first: they share states
    for name, replay in tqdm(runs, desc="r² protocol", disable=not progress):
        if replay:
            run = ddim_protocol(denoisers[name], x_T, schedule, timesteps, states=reference.states)
            per_step[name] = torch.stack([r_squared(a, b) for a, b in zip(run.x0_hats, reference.x0_hats)])
        else:
            traces[name] = ddim_protocol(denoisers[name], x_T, schedule, timesteps)
            final[name] = r_squared(traces[name].final, reference.final)
    return R2Result(reference, traces, final, per_step)


def stored_r2(dataset: str) -> dict[str, Any] | None:
    """The record ``benchmarks/locality_r2.py --dataset DATASET --out ...`` saved under ``benchmarks/results``
    (per-image r² of every method, the command, hardware and wall time), or None if there is none."""
    path = RESULTS_DIR / f"locality_r2_{dataset}.json"
    return json.loads(path.read_text()) if path.exists() else None
