r"""Guidance as a change of the predictor, never of the sampler (chapter 8).

Bayes' rule for scores, :math:`\nabla\log p_t(x\mid c) = \nabla\log p_t(x) + \nabla\log p_t(c\mid x)`, makes every kind of
guidance a new :class:`~diffbook.predictors.Predictor` on the same path, which any sampler of
:mod:`diffbook.samplers` then integrates:

=============================== ===================================================================================
:func:`guided`                  classifier-free guidance, :math:`\hat\varepsilon_c + w(\hat\varepsilon_c - \hat\varepsilon_u)`
                                (Ho & Salimans 2022, eq. 6); :math:`w = 0` is the conditional model
:func:`classifier_guided`       :math:`\nabla\log p_t(x) + w\,\nabla_x\log p_\phi(c\mid x_t)` with a classifier of noisy
                                data (Dhariwal & Nichol 2021; Song et al. 2021, eq. 14)
:func:`tweedie_guided`          training-free: a classifier of *clean* data applied to Tweedie's :math:`\hat x_0(x_t)`,
                                differentiated through the denoiser (Bansal et al. 2024, "forward universal guidance";
                                Chung et al. 2023 for the same gradient in inverse problems)
=============================== ===================================================================================

A guidance scale in the other convention in use, :math:`\hat\varepsilon_u + s(\hat\varepsilon_c - \hat\varepsilon_u)`
(DiT, the MIT 6.S184 labs; :math:`s = 1` unguided), is :math:`w = s - 1` here (:func:`w_from_unit_scale`).
Each guided evaluation costs the evaluations of its parts: two network calls for :func:`guided`, a network call and a
classifier gradient for :func:`classifier_guided`, a network call with its backward pass for :func:`tweedie_guided`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .predictors import Predictor, convert

LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
r"""``log_likelihood(x, t)``: :math:`\log p(c\mid x_t = x)` per sample (batch,), differentiable in ``x``; ``t`` (batch,)
float64 on the CPU, as a :data:`~diffbook.predictors.PredictFn` receives it."""


def _same_path(a: Predictor, b: Predictor) -> None:
    """Refuse two different paths; compared by their coefficients (two builds of one schedule's path are equal)."""
    times = torch.linspace(0, 1, 65, dtype=torch.float64)
    if a.path is not b.path and not (type(a.path) is type(b.path)
                                     and torch.allclose(a.path.alpha(times), b.path.alpha(times), rtol=1e-12, atol=0)
                                     and torch.allclose(a.path.sigma(times), b.path.sigma(times), rtol=1e-12, atol=0)):
        raise ValueError(f"guidance combines predictions on one path; got {a.path} and {b.path} (move one with "
                         "diffbook.predictors.change_path)")


def w_from_unit_scale(scale: float) -> float:
    r"""Ho & Salimans' :math:`w` for a scale :math:`s` of the form :math:`\hat\varepsilon_u + s(\hat\varepsilon_c - \hat\varepsilon_u)`."""
    return scale - 1.0


def guided(conditional: Predictor, unconditional: Predictor, w: float) -> Predictor:
    r"""Classifier-free guidance (Ho & Salimans 2022, eq. 6):
    :math:`\tilde\varepsilon = (1 + w)\,\hat\varepsilon(x, t \mid c) - w\,\hat\varepsilon(x, t)`.

    Every kind of prediction is an affine function of :math:`\hat\varepsilon` at fixed :math:`(x, t)` with weights
    that sum to one here, so the same combination holds for :math:`\hat x_0`, the score, :math:`v` and the velocity:
    the result is one predictor (of the conditional model's kind), queried as any kind. Both parts must live on the
    same path."""
    _same_path(conditional, unconditional)
    if not isinstance(w, (int, float)) or w != w:
        raise ValueError(f"the guidance scale w must be a number (0: the conditional model), got {w!r}")

    kind = conditional.kind  # combined in the conditional model's own kind: no conversion, no division by alpha

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = conditional(x, t, kind)
        return c if w == 0 else c + w * (c - unconditional(x, t, kind))

    return Predictor(fn, kind, conditional.path)


def _input_gradient(log_likelihood: LogLikelihood, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        return torch.autograd.grad(log_likelihood(leaf, t).sum(), leaf)[0]


def classifier_guided(model: Predictor, log_likelihood: LogLikelihood, w: float) -> Predictor:
    r"""Classifier guidance: the score :math:`\nabla\log p_t(x) + w\,\nabla_x\log p_\phi(c\mid x_t = x)`, the exact score
    of the tilted density :math:`p_t(x)\,p_t(c\mid x)^w / Z` when both parts are exact (Dhariwal & Nichol 2021 shift
    DDPM's mean by the same gradient, their Algorithm 1). ``log_likelihood`` is a classifier of *noisy* data
    (:func:`noisy_classifier_log_likelihood`, or the exact one of a toy mixture)."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gradient = _input_gradient(log_likelihood, x, t).to(x.dtype)
        return model(x, t, "score") + w * gradient

    return Predictor(fn, "score", model.path)


def noisy_classifier_log_likelihood(classifier: nn.Module, labels: torch.Tensor, T: int) -> LogLikelihood:
    r""":math:`\log p_\phi(c\mid x_t)` of a classifier of noisy images trained at the network times :math:`Tt`
    (:class:`~diffbook.nets.NoisyClassifier`, objective ``noisy_classification``), for the requested ``labels``."""
    def log_likelihood(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = classifier(x.float(), (T * t).float().to(x.device))
        return torch.log_softmax(logits.float(), dim=1).gather(1, labels.to(x.device)[:, None])[:, 0]

    return log_likelihood


def tweedie_guided(model: Predictor, classifier: nn.Module, labels: torch.Tensor, w: float) -> Predictor:
    r"""Training-free guidance: the score :math:`\nabla\log p_t(x) + w\,\nabla_x\log p_\phi(c\mid\hat x_0(x, t))` with a
    classifier :math:`p_\phi` of *clean* images and Tweedie's denoiser :math:`\hat x_0` (Bansal et al. 2024, forward
    universal guidance). The gradient runs back through the denoiser, so one evaluation costs a forward and a backward
    pass of the network; it approximates the noisy classifier's gradient, it is not that gradient."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            x0 = model(leaf, t, "x0")
            log_p = torch.log_softmax(classifier(x0.to(next(classifier.parameters()).dtype)).float(), dim=1)
            gradient = torch.autograd.grad(log_p.gather(1, labels.to(x.device)[:, None]).sum(), leaf)[0]
        coefficients = model.path.coefficients(t, x)
        score = convert(x0.detach(), "x0", "score", x, *coefficients)
        return score + w * gradient.to(x.dtype)

    return Predictor(fn, "score", model.path)


def null_labels(n: int, num_classes: int) -> torch.Tensor:
    """``n`` copies of the "no class" label of a network trained with label dropout (``num_classes`` itself)."""
    return torch.full((n,), num_classes, dtype=torch.long)

