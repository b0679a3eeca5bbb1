"""Training data: the tensors a config trains on, looked up in a small registry by the form of ``config.dataset``.

The kinds of :data:`KINDS`, tried in order (the first pattern that matches the name wins):

- ``*_w`` (e.g. ``mnist_w``): an image dataset with chapter 7's "W" pattern planted in every image
  (:func:`pattern_dataset`);
- ``reflow:*`` (e.g. ``reflow:ring_fm``): the (data, noise) pairs that a trained flow's ODE couples
  (:func:`reflow_pairs`; the part after ``reflow:`` names the parent config);
- a 2-D toy set of :data:`diffbook.toy.TOY_DATASETS` (``ring``): a fixed sample of points;
- an image dataset of :data:`diffbook.data.DATASETS`: its training split, scaled to [-1, 1].

:func:`load_training_data` returns ``(x, labels)``, labels only for class-conditional configs. Reflow needs the
parent network: the caller passes ``load_model(config) -> TrainedModel`` (the training loop passes
:func:`diffbook.train.load_or_train`), so this module does not import the training loop.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Callable

import torch

from .checkpoints import TrainedModel
from .configs import CONFIGS, TrainConfig
from .data import DATASETS, load_dataset
from .locality import add_pattern, w_pattern
from .nets import MLPConfig
from .predictors import predictor_from_trained
from .samplers import sample_heun, time_grid
from .toy import TOY_DATASETS, toy_samples

LoadModel = Callable[[TrainConfig], TrainedModel]
"""``load_model(config)``: the trained network of ``config`` (loaded, or trained now)."""
Loader = Callable[[TrainConfig, LoadModel], tuple[torch.Tensor, torch.Tensor | None]]
"""``loader(config, load_model) -> (x, labels or None)``: one kind of training data."""

REFLOW_ODE_STEPS = 100  # Heun steps used to couple noise with data for reflow


def load_training_data(config: TrainConfig, load_model: LoadModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training set of ``config``: ``x`` (N, ...) float32 on the CPU, and its labels (N,) if
    ``config.class_conditional`` (else None)."""
    for pattern, loader in KINDS.items():
        if fnmatchcase(config.dataset, pattern):
            return loader(config, load_model)
    raise ValueError(f"unknown training data {config.dataset!r}: expected an image dataset "
                     f"({', '.join(DATASETS)}), a toy set ({', '.join(TOY_DATASETS)}), "
                     "'<image dataset>_w' or 'reflow:<config name>'")


def pattern_dataset(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``<dataset>_w``: the training split of ``<dataset>`` with the locality chapter's "W" pattern planted at a
    random amplitude per image (seeded by ``seed``); returns the images in [-1, 1] and all the labels."""
    dataset = load_dataset(name.removesuffix("_w"), "train")
    return add_pattern(dataset.tensor(), w_pattern(dataset.images.shape[-1]), seed), torch.from_numpy(dataset.labels)


def reflow_pairs(model: TrainedModel, n: int, seed: int) -> torch.Tensor:
    """(n, 2, ...) pairs ``[ODE(noise), noise]``: the coupling the trained flow ``model`` defines, integrated with
    :data:`REFLOW_ODE_STEPS` Heun steps from a batch of noise seeded by ``seed``."""
    net_config = model.net.config
    shape = (net_config.dim,) if isinstance(net_config, MLPConfig) else \
        (net_config.in_channels, net_config.image_size, net_config.image_size)
    noise = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        data = sample_heun(predictor_from_trained(model), noise.to(next(model.net.parameters()).device),
                           time_grid(REFLOW_ODE_STEPS)).cpu()
    return torch.stack([data, noise], dim=1)


def _subset(config: TrainConfig, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``config.train_subset`` examples (all if None); the labels only if the config is conditional."""
    if config.train_subset is not None:
        x, labels = x[: config.train_subset], labels[: config.train_subset]
    return x, (labels if config.class_conditional else None)


def _pattern_images(config: TrainConfig, load_model: LoadModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _subset(config, *pattern_dataset(config.dataset, config.seed))


def _reflow(config: TrainConfig, load_model: LoadModel) -> tuple[torch.Tensor, None]:
    parent = config.dataset.removeprefix("reflow:")
    if parent not in CONFIGS:
        raise ValueError(f"unknown reflow parent {parent!r}: expected a config name such as 'ring_fm'")
    return reflow_pairs(load_model(CONFIGS[parent]), config.train_subset or 10_000, config.seed), None


def _toy_points(config: TrainConfig, load_model: LoadModel) -> tuple[torch.Tensor, None]:
    """A fixed sample of ``train_subset`` points (100,000 if None)."""
    return toy_samples(config.dataset, config.train_subset or 100_000, seed=config.seed), None


def _images(config: TrainConfig, load_model: LoadModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    dataset = load_dataset(config.dataset, "train")
    return _subset(config, dataset.tensor(), torch.from_numpy(dataset.labels))


KINDS: dict[str, Loader] = {
    "*_w": _pattern_images,
    "reflow:*": _reflow,
    **{name: _toy_points for name in TOY_DATASETS},
    **{name: _images for name in DATASETS},
}
"""The registry: a name pattern (:func:`fnmatch.fnmatchcase`) → the loader of that kind, tried in order."""
