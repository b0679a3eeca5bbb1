r"""Sample quality without downloads: distances in the feature space of the package's own digit classifier.

FID (Heusel et al. 2017) compares Gaussians fitted to Inception features; Inception weights cannot be
downloaded here and were never meant for 28x28 digits. The same construction with a small classifier
trained on the same data (:data:`diffbook.configs.MNIST_CLASSIFIER`) is the honest equivalent:

.. math::
    \mathrm{FD}(\mu_1, \Sigma_1; \mu_2, \Sigma_2) = \lVert\mu_1 - \mu_2\rVert^2
      + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2}\big).

Its numbers are only comparable with each other (same classifier, same sample size), and always next
to the **floor**: the distance between two sets of real images of the same size (:func:`fd_floor`).
Also here: k-NN precision and recall (Kynkäänniemi et al. 2019) and the distance of each sample to its
nearest training image (memorisation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import nn


@dataclass(frozen=True)
class GaussianStats:
    """Mean (d,) and covariance (d, d) of a set of feature vectors, float64."""

    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> "GaussianStats":
        feats = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"expected features of shape (n >= 2, d), got {feats.shape}")
        return cls(feats.mean(0), np.cov(feats, rowvar=False))


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """The Fréchet (2-Wasserstein) distance between N(a.mean, a.cov) and N(b.mean, b.cov), squared as in FID."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape} vs {b.mean.shape}")
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
    if not np.isfinite(covmean).all():  # singular product: regularise as FID implementations do
        offset = 1e-6 * np.eye(len(a.mean))
        covmean = scipy.linalg.sqrtm((a.cov + offset) @ (b.cov + offset))
    covmean = covmean.real
    return float(((a.mean - b.mean) ** 2).sum() + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(covmean))


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features (float64, CPU) of images in [-1, 1]; out-of-range pixels are clipped."""
    device = next(classifier.parameters()).device
    chunks = [classifier.features(images[i:i + batch_size].clamp(-1, 1).float().to(device)).cpu().double()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    device = next(classifier.parameters()).device
    correct = sum((classifier(images[i:i + batch_size].float().to(device)).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = []
    for i in range(0, len(features), chunk):
        d = torch.cdist(features[i:i + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Whether each point lies within some ball (centre, radius)."""
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the real (fake) manifold is the union of balls
    reaching each point's k-th nearest neighbour. Precision: the fraction of fakes inside the real manifold
    (quality); recall: the fraction of reals inside the fake manifold (coverage)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two (n, d) feature sets, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} points in each set")
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_neighbour_radii(real, k)).double().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radii(fake, k)).double().mean().item()
    return precision, recall


def nearest_neighbour_distances(samples: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per sample, the pixel-space L2 distance to the closest image in ``reference`` (e.g. the training set).
    Memorised samples sit much closer to a training image than held-out real images do."""
    flat_ref = reference.flatten(1).float()
    return torch.cat([torch.cdist(samples[i:i + chunk].flatten(1).float(), flat_ref,
                                  compute_mode="donot_use_mm_for_euclid_dist").min(1).values
                      for i in range(0, len(samples), chunk)])


@dataclass(frozen=True)
class Floor:
    """FD between two disjoint sets of real images of size ``n``: mean and spread over ``seeds``."""

    n: int
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


def fd_floor(train_features: torch.Tensor, test_features: torch.Tensor, n: int, seeds: int = 5) -> Floor:
    """The FD a perfect generator would score at sample size ``n``: ``n`` random test images against the
    reference statistics of the training set, over ``seeds`` draws."""
    if n > len(test_features):
        raise ValueError(f"n={n} exceeds the {len(test_features)} test images")
    reference = GaussianStats.of(train_features)
    values = []
    for seed in range(seeds):
        idx = torch.randperm(len(test_features), generator=torch.Generator().manual_seed(seed))[:n]
        values.append(frechet_distance(GaussianStats.of(test_features[idx]), reference))
    return Floor(n, tuple(values))


class QualityReference:
    """A classifier and the statistics of the real data it is compared against: :meth:`fd` scores a set of
    samples, :meth:`floor` says what real images of the same number would score."""

    def __init__(self, classifier: nn.Module, train_images: torch.Tensor, test_images: torch.Tensor):
        self.classifier = classifier
        self.train_features = classifier_features(classifier, train_images)
        self.test_features = classifier_features(classifier, test_images)
        self.stats = GaussianStats.of(self.train_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return classifier_features(self.classifier, images)

    def fd(self, images: torch.Tensor) -> float:
        """Classifier Fréchet distance of ``images`` (in [-1, 1]) to the training set."""
        return frechet_distance(GaussianStats.of(self.features(images)), self.stats)

    def floor(self, n: int, seeds: int = 5) -> Floor:
        return fd_floor(self.train_features, self.test_features, n, seeds)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    r"""Sliced 2-Wasserstein distance between two point sets of equal size (Rabin et al. 2011): the square root of the
    mean, over ``projections`` random unit directions :math:`\theta`, of the squared 1-D Wasserstein-2 distance between
    the projections :math:`\theta^\top a_i` and :math:`\theta^\top b_j`, each computed exactly by sorting. For two
    Gaussians :math:`N(\mu_1, \Sigma)`, :math:`N(\mu_2, \Sigma)` in :math:`d` dimensions its square tends to
    :math:`\lVert\mu_1 - \mu_2\rVert^2/d`. Two finite samples of one law score above 0: compare with that floor."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two point sets of the same shape (n, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(projections, a.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa, pb = (a.double().cpu() @ directions.T).sort(0).values, (b.double().cpu() @ directions.T).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def straightness(trajectory: list[torch.Tensor], times: torch.Tensor) -> torch.Tensor:
    r"""Per-sample curvature of a discretised path, Liu et al. (2023)'s straightness:
    :math:`S = \int_0^1 \lVert \dot x_t - (x_1 - x_0)\rVert^2 dt` (with :math:`\dot x` from finite differences);
    0 exactly when the path is a straight line at constant speed. ``trajectory`` holds the states at ``times``
    (:meth:`diffbook.samplers.Trajectory.states`)."""
    if times.ndim != 1 or len(times) < 2 or len(trajectory) != len(times):
        raise ValueError(f"need one state per time: {len(trajectory)} states for {tuple(times.shape)} times")
    chord = (trajectory[0] - trajectory[-1]) / (times[0] - times[-1]).item()
    total = torch.zeros(trajectory[0].shape[0], dtype=torch.float64)
    for i in range(len(times) - 1):
        h = (times[i + 1] - times[i]).item()
        speed = (trajectory[i + 1] - trajectory[i]) / h
        total += abs(h) * (speed - chord).flatten(1).pow(2).sum(1).cpu().double()
    return total

