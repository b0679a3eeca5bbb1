r"""One place for the five ways a network can describe the same field (chapter 5).

On a path :math:`x = \alpha x_0 + \sigma\varepsilon` a network may predict

========== ===================================================================
``eps``      the noise :math:`\varepsilon`
``x0``       the clean data :math:`x_0` (a denoiser)
``score``    :math:`\nabla\log p_t(x) = -\varepsilon/\sigma` (for the posterior means)
``v``        :math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho 2022)
``velocity`` :math:`u = \dot\alpha x_0 + \dot\sigma\varepsilon`, the probability-flow ODE's :math:`dx/dt`
========== ===================================================================

Given :math:`x`, each is an invertible linear function of the pair :math:`(x_0, \varepsilon)`, so each converts
into every other: :func:`convert` goes through that pair. Exact for the optimal (posterior-mean) predictions,
and the definition of what a trained network of one kind "says" in another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .interpolants import Interpolant, LinearInterpolant, VPInterpolant, broadcast

KINDS = ("eps", "x0", "score", "v", "velocity")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}: expected one of {', '.join(KINDS)}")


def _need_derivatives(d_alpha, d_sigma) -> None:
    if d_alpha is None or d_sigma is None:
        raise ValueError("'velocity' needs the path's time derivatives: pass d_alpha and d_sigma")


def to_x0_eps(prediction: torch.Tensor, kind: str, x: torch.Tensor, alpha, sigma, d_alpha=None, d_sigma=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Solve for :math:`(x_0, \varepsilon)` from :math:`x = \alpha x_0 + \sigma\varepsilon` and one prediction."""
    _check_kind(kind)
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
    _check_kind(kind)
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
    against ``x``; :meth:`Interpolant.coefficients` gives all four.
    """
    if source == target:
        _check_kind(source)
        return prediction
    x0, eps = to_x0_eps(prediction, source, x, alpha, sigma, d_alpha, d_sigma)
    return from_x0_eps(x0, eps, target, alpha, sigma, d_alpha, d_sigma)


@dataclass
class Predictor:
    r"""A model of one kind on one path, queried as any kind at continuous time :math:`t \in [0, 1]`.

    ``fn(x, t)`` returns the ``kind`` prediction; ``t`` has shape (batch,). ``predictor(x, t, "score")``
    converts. Works for networks (:func:`predictor_from_trained`) and exact fields alike.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kind: str
    interpolant: Interpolant

    def __post_init__(self) -> None:
        _check_kind(self.kind)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, kind: str = "velocity") -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        prediction = self.fn(x, t).to(x.dtype)
        return convert(prediction, self.kind, kind, x, *self.interpolant.coefficients(t, x))

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self(x, t, "velocity")

    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self(x, t, "score")


def change_path(predictor: Predictor, interpolant: Interpolant) -> Predictor:
    r"""The same model on another Gaussian path (Kingma et al. 2021; Karras et al. 2022).

    Two paths with equal :math:`\sigma/\alpha` at times :math:`t` and :math:`t'` hold the same noisy data up to
    scale: :math:`x = \alpha_t(x_0 + \tfrac{\sigma}{\alpha}\varepsilon) = \tfrac{\alpha_t}{\alpha'_{t'}}x'`. So the ε-prediction
    carries over: :math:`\hat\varepsilon_\text{new}(x, t) = \hat\varepsilon(\tfrac{\alpha'_{t'}}{\alpha_t} x, t')`. Only times whose
    ratio the old path reaches are meaningful (a VP path's largest ratio is finite; a linear path's is not)."""
    old = predictor.interpolant

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        ratio = interpolant.sigma(t) / interpolant.alpha(t)
        t_old = old.time_of_ratio(ratio)
        return predictor(x * broadcast(old.alpha(t_old) / interpolant.alpha(t), x), t_old, "eps")

    return Predictor(fn, "eps", interpolant)


_OBJECTIVE_KIND = {"ddpm_eps": ("eps", VPInterpolant()), "flow_matching": ("velocity", LinearInterpolant()),
                   "reflow": ("velocity", LinearInterpolant())}


def predictor_from_trained(model, y: torch.Tensor | None = None) -> Predictor:
    r"""Wrap a :class:`~diffbook.train.TrainedModel` as a :class:`Predictor` in continuous time.

    Networks see time as :math:`T t` (DDPM's step index for the VP path), so a DDPM network trained on steps
    :math:`k = 1..T` is the VP path's ε-model at :math:`t = k/T`. ``y`` fixes class labels, if any.
    """
    objective = model.config.objective
    if objective not in _OBJECTIVE_KIND:
        raise ValueError(f"no continuous-time reading for objective {objective!r}")
    kind, interpolant = _OBJECTIVE_KIND[objective]
    if objective == "ddpm_eps":
        if model.config.schedule != "linear":
            raise ValueError(f"only the linear beta schedule has a VP-SDE reading, not {model.config.schedule!r}")
        betas = model.schedule.beta[1:]
        interpolant = VPInterpolant(beta_min=betas[0].item() * model.config.T, beta_max=betas[-1].item() * model.config.T)
    scale, net = float(model.config.T), model.net

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x.float(), (scale * t).float(), y)

    return Predictor(fn, kind, interpolant)
