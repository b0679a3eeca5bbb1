r"""Gaussian mixtures in any dimension: the book's toy data, with exact densities and exact scores.

A mixture stays a mixture under the forward process: if :math:`x_0 \sim \sum_k w_k N(\mu_k, \Sigma_k)` then
:math:`a x_0 + s\varepsilon \sim \sum_k w_k N(a\mu_k, a^2\Sigma_k + s^2 I)`. So the score of the noised data,
which a network can only approximate on images, is known in closed form here:

.. math::
    \nabla_x \log p(x) = \sum_k r_k(x)\, C_k^{-1}(m_k - x),\qquad
    r_k(x) = \frac{w_k N(x; m_k, C_k)}{\sum_j w_j N(x; m_j, C_j)} .
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .paths import NoisePath
from .predictors import Predictor, from_x0_eps, per_time


@dataclass(frozen=True)
class GaussianMixture:
    """:math:`\\sum_k w_k N(\\mu_k, \\Sigma_k)` with ``weights`` (K,), ``means`` (K, d), ``covs`` (K, d, d); float64."""

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def __post_init__(self) -> None:
        k, d = self.means.shape if self.means.ndim == 2 else (None, None)
        if k is None or self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"expected weights (K,), means (K, d), covs (K, d, d); got {tuple(self.weights.shape)}, "
                             f"{tuple(self.means.shape)}, {tuple(self.covs.shape)}")
        if (self.weights < 0).any() or abs(self.weights.sum().item() - 1) > 1e-9:
            raise ValueError("weights must be non-negative and sum to 1")

    @classmethod
    def isotropic(cls, means, std: float | list[float], weights=None) -> "GaussianMixture":
        """Components :math:`N(\\mu_k, s_k^2 I)`; equal weights unless given."""
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        stds = torch.as_tensor(std, dtype=torch.float64).expand(k)
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        covs = stds[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64)
        return cls(weights, means, covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """Law of total covariance: :math:`\\sum_k w_k(\\Sigma_k + \\mu_k\\mu_k^\\top) - \\mu\\mu^\\top`."""
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - torch.outer(self.mean, self.mean)

    def noised(self, signal: float, noise: float) -> "GaussianMixture":
        """The law of ``signal * x0 + noise * eps`` for ``x0`` from this mixture and ``eps ~ N(0, I)``."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, signal * self.means, signal**2 * self.covs + noise**2 * eye)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[components] + (chol[components] @ z[:, :, None])[:, :, 0]

    def _component_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-component log w_k N(x; m_k, C_k) (n, K) and C_k^{-1}(m_k - x) (n, K, d)."""
        x = x.to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected points of shape (n, {self.dim}), got {tuple(x.shape)}")
        chol = torch.linalg.cholesky(self.covs)
        diff = self.means[None] - x[:, None]  # (n, K, d)
        solved = torch.cholesky_solve(diff[..., None].transpose(0, 1), chol[:, None]).squeeze(-1).transpose(0, 1)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        quad = (diff * solved).sum(-1)
        log_terms = torch.log(self.weights)[None] - 0.5 * (quad + log_det[None] + self.dim * math.log(2 * math.pi))
        return log_terms, solved

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._component_terms(x)[0], dim=1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior probabilities of the components, :math:`r_k(x)`, shape (n, K)."""
        return torch.softmax(self._component_terms(x)[0], dim=1)

    def mode_weights(self, samples: torch.Tensor) -> torch.Tensor:
        """Fraction of ``samples`` assigned to each component (its most responsible one)."""
        counts = torch.bincount(self.responsibilities(samples.double()).argmax(1), minlength=len(self.weights))
        return counts.double() / counts.sum()

    def mode_weight_tv(self, samples: torch.Tensor) -> float:
        r"""Total variation :math:`\tfrac12\sum_k |\hat w_k - w_k|` between the samples' mode weights and the true ones."""
        return 0.5 * (self.mode_weights(samples) - self.weights).abs().sum().item()

    def mode_weight_tv_null(self, n: int, draws: int = 4000, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""The sampling noise of :meth:`mode_weight_tv` at sample size ``n``: its value for ``draws`` exact samples
        of ``n`` points each, drawn as multinomial counts (component by component, each count binomial given the
        ones before). Assumes well-separated components, so that a sample's most responsible component is the one
        that drew it. Shape (draws,), float64."""
        if n < 1 or draws < 1:
            raise ValueError(f"need n >= 1 and draws >= 1, got {n}, {draws}")
        left = torch.full((draws,), float(n), dtype=torch.float64)
        mass_left, counts = 1.0, []
        for w in self.weights.tolist():
            p = torch.full((draws,), min(1.0, w / mass_left) if mass_left > 0 else 0.0, dtype=torch.float64)
            counts.append(torch.binomial(left, p, generator=generator))
            left, mass_left = left - counts[-1], mass_left - w
        return 0.5 * (torch.stack(counts, 1) / n - self.weights).abs().sum(1)

    def posterior_means(self, x: torch.Tensor, signal: float, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Exact :math:`(\mathbb{E}[x_0 \mid x], \mathbb{E}[\varepsilon \mid x])` for :math:`x = a x_0 + s\varepsilon`,
        ``a`` = ``signal``, ``s`` = ``noise``: per component, with :math:`C_k = a^2\Sigma_k + s^2 I`,
        :math:`\mathbb{E}[x_0 \mid x, k] = \mu_k + a\Sigma_k C_k^{-1}(x - a\mu_k)` and
        :math:`\mathbb{E}[\varepsilon \mid x, k] = s\,C_k^{-1}(x - a\mu_k)`, averaged with the responsibilities.
        Finite at both ends of a path, where converting a score would divide by zero."""
        cov = signal**2 * self.covs + noise**2 * torch.eye(self.dim, dtype=self.covs.dtype)
        centred = x.double()[:, None, :] - signal * self.means[None]  # (n, K, d)
        solved = torch.linalg.solve(cov[None], centred.unsqueeze(-1)).squeeze(-1)  # C_k^{-1}(x - a mu_k)
        x0_k = self.means[None] + signal * torch.einsum("kij,nkj->nki", self.covs, solved)
        weights = self.noised(signal, noise).responsibilities(x.double())[:, :, None]
        return (weights * x0_k).sum(1).to(x.dtype), (weights * noise * solved).sum(1).to(x.dtype)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\nabla_x \\log p(x)`, exact; shape (n, d), float64."""
        log_terms, solved = self._component_terms(x)
        return (torch.softmax(log_terms, dim=1)[..., None] * solved).sum(1)


@dataclass(frozen=True)
class LabelledMixture:
    r"""A mixture whose components carry class labels (``labels`` (K,), integers): the joint law of :math:`(x_0, c)`.
    Every conditional :math:`p(x_0\mid c)` is again a mixture, and so is its noised version, which gives the exact
    conditional scores and the exact classifier of noisy data :math:`p_t(c\mid x)` (chapter 8)."""

    mixture: GaussianMixture
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.labels.shape != self.mixture.weights.shape or self.labels.dtype != torch.long:
            raise ValueError(f"labels must be integer class labels, one per component ({len(self.mixture.weights)}), "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.labels.tolist()))

    def class_prior(self, c: int) -> float:
        return self.mixture.weights[self.labels == c].sum().item()

    def conditional(self, c: int) -> GaussianMixture:
        r""":math:`p(x_0\mid c)`: the components of class ``c``, their weights renormalised."""
        keep = self.labels == c
        if not bool(keep.any()):
            raise ValueError(f"no component has label {c}; the labels are {self.classes}")
        weights = self.mixture.weights[keep]
        return GaussianMixture(weights / weights.sum(), self.mixture.means[keep], self.mixture.covs[keep])

    def class_log_prob(self, x: torch.Tensor, c: int, signal: float, noise: float) -> torch.Tensor:
        r""":math:`\log p(c\mid x)` for :math:`x = a x_0 + s\varepsilon` (``signal`` a, ``noise`` s): the log of the summed
        responsibilities of class ``c``'s components in the noised mixture. Differentiable in ``x``; shape (n,)."""
        log_terms = self.mixture.noised(signal, noise)._component_terms(x)[0]
        return torch.logsumexp(log_terms[:, self.labels == c], dim=1) - torch.logsumexp(log_terms, dim=1)


def exact_class_log_likelihood(labelled: LabelledMixture, c: int, path: NoisePath):
    r""":math:`\log p_t(c\mid x_t = x)` on ``path``, exact: the perfect classifier of noisy data, as a
    :data:`diffbook.guidance.LogLikelihood` ``(x, t) -> (batch,)`` (one time per call, or one per sample)."""
    def log_likelihood(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        values = t.unique()
        out = torch.empty(x.shape[0], dtype=torch.float64)
        parts = []
        for value in values:
            rows = t == value
            alpha, sigma = path.alpha(value).item(), path.sigma(value).item()
            parts.append((rows, labelled.class_log_prob(x[rows], c, alpha, sigma)))
        if len(parts) == 1:
            return parts[0][1]
        return out.index_put((torch.cat([r.nonzero()[:, 0] for r, _ in parts]),), torch.cat([v for _, v in parts]))
    return log_likelihood


def ring_mixture(radius: float = 4.0, std: float = 0.4) -> GaussianMixture:
    """The book's standard 2-D example: eight well-separated components on a circle, unequal weights."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    weights = torch.tensor([3, 1, 2, 1, 3, 1, 2, 1], dtype=torch.float64)
    return GaussianMixture.isotropic(means, std, weights / weights.sum())


def exact_predictor(mixture: GaussianMixture, path: NoisePath, kind: str = "velocity") -> Predictor:
    r"""The exact ``kind`` prediction for data ``mixture`` on ``path``, from its posterior means
    :math:`(\mathbb E[x_0\mid x_t], \mathbb E[\varepsilon\mid x_t])`: what a perfectly trained network would output.
    Computed directly in ``kind`` (no conversion, so no division by a vanishing α or σ); each sample may have
    its own time."""
    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        coefficients = path.coefficients(t, x)
        x0, eps = mixture.posterior_means(x, coefficients[0].item(), coefficients[1].item())
        return from_x0_eps(x0, eps, kind, *coefficients).to(x.dtype)
    return Predictor(per_time(predict), kind, path)


TOY_DATASETS = {"ring": ring_mixture}


def toy_samples(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` float32 samples of the named toy distribution (a fixed seed: the same training set every time)."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}: expected one of {', '.join(TOY_DATASETS)}")
    return TOY_DATASETS[name]().sample(n, torch.Generator().manual_seed(seed)).float()
