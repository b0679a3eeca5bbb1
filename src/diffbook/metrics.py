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
nearest training image (memorisation); and, for readers who have them, the standard FID with the published
Inception weights (:func:`standard_fid`, computed by the maintained torch-fidelity library).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .data import to_uint8
from .device import describe_hardware
from .storage import atomic_torch_save, cache_dir, sha256_bytes

STANDARD_FID_LIBRARY = "torch-fidelity"
"""The library that computes :func:`standard_fid` (Obukhov et al., https://github.com/toshas/torch-fidelity): its
Inception-v3 is a port of the TensorFlow graph and weights of the original FID code, whose values, its authors
state, it matches to floating-point precision (torch-fidelity 0.4.0's README; not checked here, where it cannot run:
it needs torchvision, which has no CPU build for this torch)."""


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


def _require_eval(classifier: nn.Module) -> None:
    if any(module.training for module in classifier.modules()):
        raise ValueError("the classifier is in training mode (dropout on): call .eval() on it first")


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features (float64, CPU) of images in [-1, 1]; out-of-range pixels are clipped. The classifier
    must be in eval mode (dropout off), or its features would be random."""
    _require_eval(classifier)
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


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype (bfloat16 included, which numpy does not know)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined interactively: its name only
        return getattr(obj, "__qualname__", repr(obj))


def _features_key(classifier: nn.Module, images: torch.Tensor) -> str:
    """What the features of ``images`` depend on: the classifier's code (the source of the module that defines each of
    its layers' classes, and of :func:`classifier_features`), its weights, the images, and the numerics: torch version,
    device and hardware (model and threads), float32 matmul precision and TF32 switches (kernels differ in their last
    bits)."""
    digest = hashlib.sha256()
    device = next(classifier.parameters()).device
    numerics = [torch.__version__, device.type, describe_hardware(device), torch.get_float32_matmul_precision(),
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.version()]
    digest.update("|".join(map(str, numerics)).encode())
    for module_name in sorted({type(layer).__module__ for layer in classifier.modules()}):
        digest.update(_source(sys.modules[module_name]).encode())
    digest.update(_source(classifier_features).encode())
    for name, tensor in classifier.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    digest.update(f"images|{images.dtype}|{tuple(images.shape)}|".encode())
    digest.update(_tensor_bytes(images))
    return digest.hexdigest()


def stored_classifier_features(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """:func:`classifier_features`, kept on disk (``<cache_dir>/features/<key>.pt``) under a key of everything they
    depend on (:func:`_features_key`): the 70,000 real digits that chapters 6, 8 and 9 compare against go through the
    classifier once per machine. A missing or unreadable file is recomputed and written atomically."""
    _require_eval(classifier)  # before the key: a training-mode classifier's features are never stored
    path = cache_dir() / "features" / f"{_features_key(classifier, images)}.pt"
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
        if features.shape[0] == len(images) and features.dtype == torch.float64:
            return features
    except Exception:  # missing, truncated or not a tensor: compute it again
        pass
    features = classifier_features(classifier, images)
    atomic_torch_save(features, path)
    return features


class QualityReference:
    """A classifier and the statistics of the real data it is compared against: :meth:`fd` scores a set of
    samples, :meth:`floor` says what real images of the same number would score. The real images' features are
    stored on disk (:func:`stored_classifier_features`)."""

    def __init__(self, classifier: nn.Module, train_images: torch.Tensor, test_images: torch.Tensor):
        self.classifier = classifier
        self.train_features = stored_classifier_features(classifier, train_images)
        self.test_features = stored_classifier_features(classifier, test_images)
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


class _RGB8(torch.utils.data.Dataset):
    """Images in [-1, 1] as torch-fidelity reads them: one uint8 (3, H, W) tensor per item (grey repeated)."""

    def __init__(self, images: torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (n, 1 or 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        self.pixels = to_uint8(images.cpu())

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pixels[i].expand(3, *self.pixels.shape[2:]).contiguous()


def standard_fid(samples: torch.Tensor, reference: torch.Tensor, *, weights_path: str | os.PathLike | None = None,
                 device: torch.device | None = None, batch_size: int = 200) -> float:
    """The standard FID (Heusel et al. 2017), as published numbers report it: the Fréchet distance between the
    2048-d pool features of Inception-v3 (the TensorFlow weights of the original code) of ``samples`` and of
    ``reference``, both in [-1, 1] and quantised to 8 bits, computed by :data:`STANDARD_FID_LIBRARY`
    (``pip install torch-fidelity``; it needs torchvision). ``weights_path`` is that library's Inception weights file
    (``weights-inception-2015-12-05-6726825d.pth``), for machines without internet; otherwise it downloads it once.

    Comparable with a paper's FID only at the paper's sample count and reference set (Ho et al. 2020: 50,000 samples
    against the 50,000 CIFAR-10 training images): the estimate is biased upwards at smaller counts."""
    try:
        import torch_fidelity
    except ImportError as error:
        raise ImportError(f"the standard FID is computed by {STANDARD_FID_LIBRARY}, which is not installed: "
                          f"pip install {STANDARD_FID_LIBRARY} (it needs torchvision). The classifier Fréchet distance "
                          f"of this module (QualityReference) needs neither.") from error
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(f"no Inception weights at {weights_path}: pass the torch-fidelity weights file "
                                "(weights-inception-2015-12-05-6726825d.pth), or None to let it download them")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real = _RGB8(reference)
    # the reference's Inception statistics are kept by the library under a name for exactly these images
    name = "diffbook-" + sha256_bytes(_tensor_bytes(real.pixels))[:20]
    metrics = torch_fidelity.calculate_metrics(
        input1=_RGB8(samples), input2=real, fid=True, cuda=device.type == "cuda", batch_size=batch_size,
        feature_extractor_weights_path=None if weights_path is None else str(weights_path), cache=True,
        input2_cache_name=name, cache_root=str(cache_dir() / STANDARD_FID_LIBRARY), verbose=False)
    return float(metrics["frechet_inception_distance"])

