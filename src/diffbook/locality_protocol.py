r"""The r² protocol of Lukoianov et al. (2025): analytic denoisers against a trained U-Net, step by step.

Every method is an ``x0`` :class:`~diffbook.predictors.Predictor` on the DDPM schedule's
:class:`~diffbook.paths.DiscretePath` (the U-Net through :func:`~diffbook.predictors.predictor_from_trained`, the
denoisers of :mod:`diffbook.locality` through :func:`~diffbook.predictors.predictor_from_denoiser`), and is sampled
with the same 10-step deterministic DDIM from the same noise as the U-Net:
:func:`~diffbook.samplers.sample_ddim` with ``clip_x0=True`` on :func:`protocol_times`. :func:`r2_experiment` scores
each method's final sample, and its clipped :math:`\hat x_0` on the U-Net's own trajectory (kept by a
:class:`~diffbook.samplers.Trajectory`), with :func:`diffbook.locality.r_squared` against the U-Net's. The final
score is the paper's; the per-step score on the U-Net's states is this book's variant (the authors' code logs its
per-step scores along each analytic model's own trajectory). :func:`paired_difference` compares two rows image by
image.

The package does not know where records are kept: :func:`load_r2_record` reads the file it is given.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .locality import (WienerFilter, analytic_denoiser_pair, analytic_masks, nearest_training_image, optimal_denoiser,
                       r_squared)
from .paths import NoisePath
from .predictors import Predictor, predictor_from_denoiser
from .samplers import Trajectory, sample_ddim

PAPER_TIMESTEPS = tuple(range(900, -1, -100))
"""The paper's DDIM protocol: 10 steps at 0-indexed times t = 900, 800, ..., 0 ("leading" spacing). In this
book's schedule, whose index 0 is clean data, 0-indexed time t is step k = t + 1 (see :func:`protocol_times`)."""

PAPER_SEED = 42
"""The seed of the initial noise in the authors' code."""

PAPER_THETA = {"mnist": 0.005, "fashion_mnist": 0.005, "cifar10": 0.05}
"""The mask threshold θ of the analytic denoiser, per dataset, as in the paper."""

PAPER_R2 = {"mnist": 0.491, "cifar10": 0.589, "celeba_hq": 0.902}
"""The paper's published r² of its analytic denoiser against its U-Nets (their numbers, not ours)."""


def protocol_times(T: int = 1000, timesteps: tuple[int, ...] = PAPER_TIMESTEPS) -> torch.Tensor:
    r"""The protocol's time grid on a :class:`~diffbook.paths.DiscretePath` of ``T`` steps: the paper's 0-indexed
    ``timesteps`` t are the steps k = t + 1 of this book's schedule, at times k/T, and the last step goes to
    clean data, t = 0 (float64, decreasing; ``[0.901, 0.801, ..., 0.001, 0]`` for the paper's)."""
    steps = [t + 1 for t in timesteps]
    if not steps or any(not 1 <= k <= T for k in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must decrease strictly within 0..{T - 1}, got {timesteps}")
    return torch.tensor(steps + [0], dtype=torch.float64) / T


@dataclass
class AnalyticDenoiser:
    """The paper's analytic denoiser on a noise ``path``, both variants (exact softmax and the released code's
    batch-averaged one), as ``x0`` Predictors (:meth:`exact`, :meth:`batch_averaged`). Masks are cached per noise
    level :math:`\\bar\\alpha`; the last result per noise level is cached too, so the two variants evaluated on the
    same state cost one pass over the training set."""

    train: torch.Tensor  # (n, d) flattened training images
    wiener: WienerFilter
    path: NoisePath
    theta: float
    batch_size: int = 512
    dtype: torch.dtype = torch.float32
    _masks: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)
    _last: dict[float, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def masks(self, alpha_bar: float) -> torch.Tensor:
        if alpha_bar not in self._masks:
            self._masks[alpha_bar] = analytic_masks(self.wiener, alpha_bar, self.theta)
        return self._masks[alpha_bar]

    def pair(self, x_t: torch.Tensor, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact, batch-averaged) :math:`\\hat x_0` of flattened ``x_t`` (batch, d) at noise level ``alpha_bar``."""
        cached = self._last.get(alpha_bar)
        if cached is None or cached[0].shape != x_t.shape or not torch.equal(cached[0], x_t):
            pair = analytic_denoiser_pair(x_t, alpha_bar, self.train, self.masks(alpha_bar), self.batch_size,
                                          self.dtype)
            cached = (x_t.clone(), pair)
            self._last[alpha_bar] = cached
        return cached[1]

    def exact(self) -> Predictor:
        return predictor_from_denoiser(lambda x, alpha_bar: self.pair(x, alpha_bar)[0], self.path)

    def batch_averaged(self) -> Predictor:
        return predictor_from_denoiser(lambda x, alpha_bar: self.pair(x, alpha_bar)[1], self.path)


def protocol_noise(samples: int, seed: int = PAPER_SEED, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    """The initial noise x_T of the protocol (float64): the same for every method, and the first images of a
    larger draw are the images of a smaller one only if ``samples`` is the same, so pass the record's count."""
    return torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed)).double()


def paper_denoisers(train: torch.Tensor, path: NoisePath, theta: float, analytic: bool = True,
                    dtype: torch.dtype = torch.float32, wiener: WienerFilter | None = None) -> dict[str, Predictor]:
    """The rows of the r² table, as ``x0`` Predictors on ``path`` (``schedule.path()``), from flattened training
    images (n, d): the optimal (empirical posterior mean), the Wiener filter (fitted to ``train`` unless given),
    the analytic denoiser (exact and batch-averaged; left out with ``analytic=False``) and the nearest training
    image to :math:`x_t/\\sqrt{\\bar\\alpha_t}` (the authors' code does not divide by :math:`\\sqrt{\\bar\\alpha_t}`)."""
    wiener = wiener or WienerFilter.fit(train)
    rows = {"optimal": predictor_from_denoiser(lambda x, a: optimal_denoiser(x, a, train), path),
            "wiener": predictor_from_denoiser(wiener, path)}
    if analytic:
        model = AnalyticDenoiser(train, wiener, path, theta, dtype=dtype)
        rows |= {"analytic": model.exact(), "analytic_batch": model.batch_averaged()}
    rows["nearest"] = predictor_from_denoiser(lambda x, a: nearest_training_image(x, a, train), path)
    return rows


@dataclass
class R2Result:
    """Per-image r² against the U-Net: ``final[name]`` (n,) for the final samples, ``per_step[name]``
    (len(steps), n) for each step's clipped :math:`\\hat x_0` on the U-Net's trajectory, at the protocol's step
    indices ``steps`` (all of them unless the run was asked for fewer). The runs themselves: the U-Net's final samples
    ``reference`` and its ``trajectory`` (states and clipped :math:`\\hat x_0` per step), and the final samples of
    every method that was sampled to the end in ``samples`` (``final`` and ``samples`` are empty for a replay-only
    run)."""

    reference: torch.Tensor
    trajectory: Trajectory
    samples: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    per_step: dict[str, torch.Tensor]
    steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.steps:
            self.steps = tuple(range(len(self.trajectory.steps)))

    @property
    def complete(self) -> bool:
        """Every method sampled to the end and replayed at every step: what a record holds."""
        return (self.steps == tuple(range(len(self.trajectory.steps))) and set(self.final) == set(self.per_step))

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and standard error over images of the final r², and of the per-image mean over steps of the
        per-step r², per method (a complete run only)."""
        if not self.complete:
            raise ValueError("summary() needs a complete run (every method sampled and replayed at every step)")
        def mean_sem(values: torch.Tensor) -> tuple[float, float]:
            return values.mean().item(), (values.std() / len(values) ** 0.5).item()
        out = {}
        for name in self.final:
            (final, final_sem), (per_step, per_step_sem) = mean_sem(self.final[name]), mean_sem(self.per_step[name].mean(0))
            out[name] = {"final": final, "final_sem": final_sem, "per_step": per_step, "per_step_sem": per_step_sem}
        return out

    def to_record(self) -> dict[str, Any]:
        """JSON-ready: the sample count, :meth:`summary` and every per-image value (a complete run only)."""
        return {"samples": len(self.reference), "summary": self.summary(),
                "final": {name: values.tolist() for name, values in self.final.items()},
                "per_step": {name: values.tolist() for name, values in self.per_step.items()}}

    def max_difference(self, record: dict[str, Any]) -> float:
        """The largest |r²| difference between this run and the first images of a stored ``record`` (same
        methods), over every value this run has: final samples, and the per-step values at its ``steps``. How well
        the record is reproduced."""
        n = len(self.reference)
        worst = 0.0
        for name, values in self.final.items():
            stored = torch.tensor(record["final"][name][:n], dtype=torch.float64)
            worst = max(worst, (values - stored).abs().max().item())
        for name, values in self.per_step.items():
            stored = torch.tensor(record["per_step"][name], dtype=torch.float64)[list(self.steps), :n]
            worst = max(worst, (values - stored).abs().max().item())
        return worst


def r2_experiment(unet: Predictor, denoisers: dict[str, Predictor], x_T: torch.Tensor,
                  times: torch.Tensor | None = None, progress: bool = True, *, final: bool = True,
                  steps: Sequence[int] | None = None) -> R2Result:
    """Sample the U-Net and every denoiser from ``x_T`` with deterministic DDIM, :math:`\\hat x_0` clipped, on
    ``times`` (default :func:`protocol_times` of the U-Net's DiscretePath), and evaluate each denoiser's clipped
    :math:`\\hat x_0` on the U-Net's states; r² of every method against the U-Net, per image (and per step).
    A partial run, to check a stored record cheaply: ``final=False`` skips the denoisers' own chains, ``steps``
    (indices into the protocol's steps) replays only those steps."""
    times = protocol_times(unet.path.T) if times is None else times
    trajectory = Trajectory()
    reference = sample_ddim(unet, x_T, times, clip_x0=True, callback=trajectory)
    steps = tuple(range(len(trajectory.steps))) if steps is None else tuple(steps)
    samples, final_r2, per_step = {}, {}, {}
    runs = [(name, replay) for replay in ((True, False) if final else (True,)) for name in denoisers]  # replays first
    for name, replay in tqdm(runs, desc="r² protocol", disable=not progress):
        model = denoisers[name]
        if replay:
            with torch.no_grad():
                per_step[name] = torch.stack([r_squared(model(step.x, step.t, "x0").clamp(-1, 1), step.x0_hat)
                                              for step in (trajectory.steps[i] for i in steps)])
        else:
            samples[name] = sample_ddim(model, x_T, times, clip_x0=True)
            final_r2[name] = r_squared(samples[name], reference)
    return R2Result(reference, trajectory, samples, final_r2, per_step, steps)


def paired_difference(record: dict[str, Any], a: str, b: str, score: str = "final") -> tuple[float, float]:
    """Row ``a`` minus row ``b`` of a record (or :meth:`R2Result.to_record`), image by image (both rows scored on the
    same images from the same noise), for ``score`` "final" or "per_step" (the per-image mean over steps): the mean
    difference and its standard error. Paired, so the images' shared difficulty cancels; two rows' separate error
    bars cannot tell whether they differ."""
    if score not in ("final", "per_step"):
        raise ValueError(f"score must be 'final' or 'per_step', got {score!r}")
    values = {name: torch.tensor(record[score][name], dtype=torch.float64) for name in (a, b)}
    if score == "per_step":
        values = {name: v.mean(0) for name, v in values.items()}
    difference = values[a] - values[b]
    return difference.mean().item(), (difference.std() / len(difference) ** 0.5).item()


def load_r2_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A record saved by ``benchmarks/locality_r2.py --out PATH`` (per-image r² of every method, the command,
    hardware and wall time), or None if there is no file at ``path``."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
