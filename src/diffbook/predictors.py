r"""One model convention: a :class:`Predictor` is "given :math:`x` and :math:`t` on this path, predict this kind".

On a path :math:`x = \alpha x_0 + \sigma\varepsilon` (:mod:`diffbook.paths`) a model may predict

============ ===================================================================
``eps``      the noise :math:`\varepsilon`
``x0``       the clean data :math:`x_0` (a denoiser)
``score``    :math:`\nabla\log p_t(x) = -\varepsilon/\sigma` (for the posterior means)
``v``        :math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho 2022)
``velocity`` :math:`u = \dot\alpha x_0 + \dot\sigma\varepsilon`, the probability-flow ODE's :math:`dx/dt`
============ ===================================================================

Given :math:`x`, each is an invertible linear function of the pair :math:`(x_0, \varepsilon)`, so each converts into
every other (:func:`convert`, through that pair). Exact for the optimal (posterior-mean) predictions, and the
definition of what a trained network of one kind "says" in another (chapter 5).

Every model of the book becomes a :class:`Predictor`: a trained network (:func:`predictor_from_trained`, read on the
path and at the steps it was trained on), an exact toy model (:func:`diffbook.toy.exact_predictor`) or a denoiser
of the locality chapter (:func:`predictor_from_denoiser`). Converting kind is ``predictor(x, t, kind)``; moving to
another path is :func:`change_path`. The samplers of :mod:`diffbook.samplers` take any of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .paths import LinearPath, NoisePath, as_time, broadcast

KINDS = ("eps", "x0", "score", "v", "velocity")

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(x, t)``: a prediction for images or points ``x`` (batch, ...) at times ``t`` (batch,), float64 on the CPU
(see :func:`~diffbook.paths.as_time`; a network moves them to its device in its own dtype)."""


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}: expected one of {', '.join(KINDS)}")


def _need_derivatives(d_alpha, d_sigma) -> None:
    if d_alpha is None or d_sigma is None:
        raise ValueError("'velocity' needs the path's time derivatives: pass d_alpha and d_sigma")


def to_x0_eps(prediction: torch.Tensor, kind: str, x: torch.Tensor, alpha, sigma, d_alpha=None, d_sigma=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Solve for :math:`(x_0, \varepsilon)` from :math:`x = \alpha x_0 + \sigma\varepsilon` and one prediction."""
    check_kind(kind)
    if kind == "eps":
        return (x - sigma * prediction) / alpha, prediction
    if kind == "x0":
        return prediction, (x - alpha * prediction) / sigma
    if kind == "score":
        eps = -sigma * prediction
        return (x - sigma * eps) / alpha, eps
    if kind == "v":  # [alpha sigma; -sigma alpha] [x0; eps] = [x; v]
        norm = alpha**2 + sigma**2
        return (alpha * x - sigma * prediction) / norm, (sigma * x + alpha * prediction) / norm
    _need_derivatives(d_alpha, d_sigma)  # [alpha sigma; d_alpha d_sigma] [x0; eps] = [x; u]
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x - sigma * prediction) / det, (alpha * prediction - d_alpha * x) / det


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, kind: str, alpha, sigma, d_alpha=None, d_sigma=None) -> torch.Tensor:
    """The prediction of ``kind`` that corresponds to the pair ``(x0, eps)``."""
    check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        return -eps / sigma
    if kind == "v":
        return alpha * eps - sigma * x0
    _need_derivatives(d_alpha, d_sigma)
    return d_alpha * x0 + d_sigma * eps


def convert(prediction: torch.Tensor, source: str, target: str, x: torch.Tensor, alpha, sigma, d_alpha=None,
            d_sigma=None) -> torch.Tensor:
    r"""Turn a ``source`` prediction at :math:`x` into the equivalent ``target`` prediction.

    ``alpha``, ``sigma`` (and, for ``velocity``, ``d_alpha``, ``d_sigma``) are numbers or tensors broadcasting
    against ``x``; :meth:`NoisePath.coefficients` gives all four.
    """
    if source == target:
        check_kind(source)
        return prediction
    x0, eps = to_x0_eps(prediction, source, x, alpha, sigma, d_alpha, d_sigma)
    return from_x0_eps(x0, eps, target, alpha, sigma, d_alpha, d_sigma)


@dataclass
class Predictor:
    r"""A model of one ``kind`` on one ``path``, queried as any kind at time :math:`t \in [0, 1]`.

    ``fn(x, t)`` returns the ``kind`` prediction, with ``t`` of shape (batch,), float64. ``predictor(x, t, kind)``
    evaluates and converts; ``t`` may be one number or one time per sample.
    """

    fn: PredictFn
    kind: str
    path: NoisePath

    def __post_init__(self) -> None:
        check_kind(self.kind)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, kind: str = "velocity") -> torch.Tensor:
        t = as_time(t)
        times = t.expand(x.shape[0]) if t.ndim == 0 else t
        if times.shape != (x.shape[0],):
            raise ValueError(f"t must be one time or one per sample ({x.shape[0]}), got shape {tuple(t.shape)}")
        prediction = self.fn(x, times).to(x.dtype)
        if kind == self.kind:
            check_kind(kind)
            return prediction
        # one time for the batch: the path's coefficients once, not once per sample
        return convert(prediction, self.kind, kind, x, *self.path.coefficients(t, x))

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self(x, t, "velocity")

    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self(x, t, "score")


def per_time(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> PredictFn:
    """Lift ``fn(x_rows, t)``, which handles one time at a time, to a :data:`PredictFn` (one call per distinct time)."""
    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        values = t.unique()
        if len(values) == 1:
            return fn(x, values.item())
        out = None
        for value in values:
            rows = t == value
            part = fn(x[rows], value.item())
            out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
            out[rows] = part
        return out
    return predict


def change_path(predictor: Predictor, path: NoisePath) -> Predictor:
    r"""The same model on another Gaussian path (Kingma et al. 2021; Karras et al. 2022).

    Two paths with equal :math:`\sigma/\alpha` at times :math:`t` and :math:`t'` hold the same noisy data up to
    scale: :math:`x = \alpha_t(x_0 + \tfrac{\sigma}{\alpha}\varepsilon) = \tfrac{\alpha_t}{\alpha'_{t'}}x'`. So the ε-prediction
    carries over: :math:`\hat\varepsilon_\text{new}(x, t) = \hat\varepsilon(\tfrac{\alpha'_{t'}}{\alpha_t} x, t')`. Only times whose
    ratio the old path reaches are meaningful (a VP path's largest ratio is finite; a linear path's is not)."""
    old = predictor.path

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_old = old.time_of_ratio(path.ratio(t))
        return predictor(x * broadcast(old.alpha(t_old) / path.alpha(t), x), t_old, "eps")

    return Predictor(fn, "eps", path)


_OBJECTIVE_KIND = {"ddpm_eps": "eps", "flow_matching": "velocity", "reflow": "velocity", "ect": "velocity",
                   "consistency_distillation": "velocity", "progressive_distillation": "velocity"}


def predictor_from_trained(model, y: torch.Tensor | None = None) -> Predictor:
    r"""A :class:`~diffbook.checkpoints.TrainedModel` as the :class:`Predictor` it was trained to be.

    Networks see time as :math:`T t`. A DDPM network (objective ``ddpm_eps``), trained on the steps
    :math:`k = 1..T` of its schedule, is the ε-model on that schedule's :class:`~diffbook.paths.DiscretePath`: at
    :math:`t = k/T` it is evaluated at step :math:`k` and noise level :math:`\bar\alpha_k`, exactly as in training
    (between steps, at the fractional step :math:`Tt` and the interpolated level, which it was never trained on).
    Flow-matching networks are velocity models on the linear path, and so are chapter 9's students: an ECT network
    read as ``x0`` is its consistency function :math:`x - tF`, a progressive-distillation student is a velocity whose
    Euler step on its own grid is its learned jump. ``y`` fixes class labels, if any.
    """
    objective = model.config.objective
    if objective not in _OBJECTIVE_KIND:
        raise ValueError(f"objective {objective!r} trains no predictor: expected one of {', '.join(_OBJECTIVE_KIND)}")
    path = model.schedule.path() if objective == "ddpm_eps" else LinearPath()
    scale, net = float(model.config.T), model.net

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x.float(), (scale * t).float().to(x.device), y)

    return Predictor(fn, _OBJECTIVE_KIND[objective], path)


FlatDenoiser = Callable[[torch.Tensor, float], torch.Tensor]
r"""``denoise(x_t, alpha_bar)``: :math:`\hat x_0` (batch, d) of flattened inputs (batch, d) on the variance-preserving
path :math:`x_t = \sqrt{\bar\alpha}x_0 + \sqrt{1-\bar\alpha}\varepsilon` (the denoisers of :mod:`diffbook.locality`)."""


def predictor_from_denoiser(denoise: FlatDenoiser, path: NoisePath) -> Predictor:
    r"""A denoiser on flattened vectors as an ``x0`` :class:`Predictor` on ``path``. A point of any Gaussian path is a
    point of the variance-preserving one after scaling: :math:`x/\sqrt{\alpha^2+\sigma^2}`, with
    :math:`\bar\alpha = \alpha^2/(\alpha^2+\sigma^2)`."""
    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        alpha, sigma = path.alpha(as_time(t)).item(), path.sigma(as_time(t)).item()
        norm = alpha**2 + sigma**2
        return denoise(x.flatten(1) / norm**0.5, alpha**2 / norm).reshape(x.shape).to(x.dtype)

    return Predictor(per_time(fn), "x0", path)
