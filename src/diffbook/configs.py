"""Training configs: :class:`TrainConfig` (everything that determines a trained network) and the named configs.

Each network has three named configs: the default (the checkpoint shipped under ``checkpoints/``, trained on a CPU;
the ``smoke`` and ``default`` profiles of the chapters load it), ``*_full`` (the paper's scale, for a GPU; the ``full``
profile) and ``*_smoke`` (trains in seconds: the package tests and the chapters' exercises use it).
:data:`CONFIGS` holds them all by name; ``python -m diffbook.train NAME`` trains one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .losses import OBJECTIVES
from .nets import ClassifierConfig, MLPConfig, NoisyClassifierConfig, UNetConfig, build_net
from .schedules import NoiseSchedule

# Fields that do not change the trained weights, and so do not change a run's identity.
_NOT_IDENTITY = ("checkpoint_every",)
# Fields added after checkpoints shipped: at their default they leave the identity (and so every checkpoint) as it was.
_ADDED_LATER = {"label_drop": 0.0}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained network. Two equal configs give identical weights on CPU.

    ``dataset`` names the training data (see :mod:`diffbook.training_data`): an image dataset, a 2-D toy set,
    ``<image dataset>_w`` or ``reflow:<config name>``. ``label_drop`` is the probability that a training label is
    replaced by "no class" (the network's label ``num_classes``): one network learns the conditional and the
    unconditional model, as classifier-free guidance needs (Ho & Salimans 2022).
    """

    name: str
    dataset: str = "mnist"
    net: str = "unet"
    net_config: dict = field(default_factory=dict)
    objective: str = "ddpm_eps"
    schedule: str = "linear"
    T: int = 1000
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 0
    train_subset: int | None = None
    class_conditional: bool = False
    label_drop: float = 0.0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        for name in ("steps", "batch_size", "checkpoint_every", "T"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 <= self.label_drop < 1:
            raise ValueError(f"label_drop must lie in [0, 1), got {self.label_drop}")
        if self.label_drop and not (self.class_conditional and self.net_config.get("num_classes")):
            raise ValueError("label_drop needs class labels and a network with a 'no class' label: set "
                             "class_conditional=True and net_config num_classes (e.g. UNetConfig(num_classes=10))")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def identity(self) -> str:
        """A short hash of the fields that determine the weights."""
        values = {k: v for k, v in self.to_dict().items()
                  if k not in _NOT_IDENTITY and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def build_net(self) -> nn.Module:
        return build_net(self.net, self.net_config)

    def build_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.named(self.schedule, self.T)


_MNIST_UNET = UNetConfig().to_dict()

MNIST_DDPM = TrainConfig(name="mnist_ddpm", dataset="mnist", net="unet", net_config=_MNIST_UNET,
                         objective="ddpm_eps", schedule="linear", T=1000, steps=3000, batch_size=128, lr=1e-3,
                         warmup_steps=200, ema_decay=0.999, seed=0)

# fp32: at this size bf16 autocast is slower on a CPU (0.76x; benchmarks/results/precision_cpu.json), while the
# default and full U-Nets train 2x faster in bf16 where the CPU has bf16 units, so they keep precision="auto".
MNIST_DDPM_SMOKE = MNIST_DDPM.replace(
    name="mnist_ddpm_smoke", steps=30, batch_size=32, train_subset=2048, warmup_steps=5, checkpoint_every=10,
    precision="fp32",
    net_config=UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=()).to_dict())

MNIST_DDPM_FULL = MNIST_DDPM.replace(
    name="mnist_ddpm_full", steps=100_000, lr=2e-4, warmup_steps=5000, ema_decay=0.9999, checkpoint_every=2000,
    net_config=UNetConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(14,),
                          dropout=0.1).to_dict())

# A score / noise model of the 2-D ring mixture (diffbook.toy): an MLP trained with the same ε-loss.
RING_EPS = TrainConfig(name="ring_eps", dataset="ring", net="mlp", net_config=MLPConfig(hidden=256, layers=3).to_dict(),
                       objective="ddpm_eps", schedule="linear", T=1000, steps=6000, batch_size=512, lr=2e-3,
                       warmup_steps=100, ema_decay=0.995, train_subset=50_000, precision="fp32", checkpoint_every=1000)
RING_EPS_SMOKE = RING_EPS.replace(name="ring_eps_smoke", steps=200, net_config=MLPConfig(hidden=64, layers=2).to_dict(),
                                  checkpoint_every=100)
RING_EPS_FULL = RING_EPS.replace(name="ring_eps_full", steps=40_000, lr=1e-3, ema_decay=0.999, checkpoint_every=5000)


def _profiles(bases: tuple[TrainConfig, TrainConfig, TrainConfig], name: str,
              **changes: Any) -> tuple[TrainConfig, ...]:
    """The default, smoke and full configs of ``bases`` with ``changes``, named ``name``, ``name_smoke``, ``name_full``."""
    return tuple(base.replace(name=name + suffix, **changes) for base, suffix in zip(bases, ("", "_smoke", "_full")))


_MNIST_UNET_PROFILES = (MNIST_DDPM, MNIST_DDPM_SMOKE, MNIST_DDPM_FULL)

# Chapter 4: the same networks trained with flow matching on the linear path.
MNIST_FM, MNIST_FM_SMOKE, MNIST_FM_FULL = _profiles(_MNIST_UNET_PROFILES, "mnist_fm", objective="flow_matching")
RING_FM, RING_FM_SMOKE, RING_FM_FULL = _profiles((RING_EPS, RING_EPS_SMOKE, RING_EPS_FULL), "ring_fm",
                                                 objective="flow_matching")

# One reflow step: flow matching on the (data, noise) pairs that ring_fm's ODE couples (dataset "reflow:<parent>").
RING_REFLOW = RING_FM.replace(name="ring_reflow", dataset="reflow:ring_fm", objective="reflow", train_subset=20_000)
RING_REFLOW_SMOKE = RING_FM_SMOKE.replace(name="ring_reflow_smoke", dataset="reflow:ring_fm_smoke", objective="reflow",
                                          train_subset=2_000)
RING_REFLOW_FULL = RING_FM_FULL.replace(name="ring_reflow_full", dataset="reflow:ring_fm_full", objective="reflow",
                                        train_subset=100_000)

# Chapter 7 (locality): the same U-Net and recipe on Fashion-MNIST, and on MNIST with a planted "W" pattern.
FASHION_DDPM, FASHION_DDPM_SMOKE, FASHION_DDPM_FULL = _profiles(_MNIST_UNET_PROFILES, "fashion_ddpm",
                                                                dataset="fashion_mnist")
MNIST_W_DDPM, MNIST_W_DDPM_SMOKE, MNIST_W_DDPM_FULL = _profiles(_MNIST_UNET_PROFILES, "mnist_w_ddpm", dataset="mnist_w")

# The feature network of diffbook.metrics: a small CNN digit classifier (>= 99% test accuracy).
MNIST_CLASSIFIER = TrainConfig(name="mnist_classifier", dataset="mnist", net="classifier",
                               net_config=ClassifierConfig().to_dict(), objective="classification",
                               class_conditional=True, steps=2000, batch_size=128, lr=1e-3, warmup_steps=100,
                               ema_decay=0.999, precision="fp32", checkpoint_every=500)
MNIST_CLASSIFIER_SMOKE = MNIST_CLASSIFIER.replace(
    name="mnist_classifier_smoke", steps=30, batch_size=64, train_subset=2048, warmup_steps=5, checkpoint_every=10,
    net_config=ClassifierConfig(channels=(8, 16), features=32).to_dict())

# Chapter 8 (guidance): the DDPM U-Net with a class embedding, labels dropped 10% of the time (one network is both
# the conditional and the unconditional model); and a classifier of noisy digits for classifier guidance.
MNIST_CFG, MNIST_CFG_SMOKE, MNIST_CFG_FULL = (
    base.replace(name=name, class_conditional=True, label_drop=0.1,
                 net_config={**base.net_config, "num_classes": 10})
    for base, name in zip(_MNIST_UNET_PROFILES, ("mnist_cfg", "mnist_cfg_smoke", "mnist_cfg_full")))

MNIST_NOISY_CLASSIFIER = TrainConfig(name="mnist_noisy_classifier", dataset="mnist", net="noisy_classifier",
                                     net_config=NoisyClassifierConfig().to_dict(), objective="noisy_classification",
                                     class_conditional=True, schedule="linear", T=1000, steps=3000, batch_size=128,
                                     lr=1e-3, warmup_steps=100, ema_decay=0.999, precision="fp32",
                                     checkpoint_every=500)
MNIST_NOISY_CLASSIFIER_SMOKE = MNIST_NOISY_CLASSIFIER.replace(
    name="mnist_noisy_classifier_smoke", steps=30, batch_size=64, train_subset=2048, warmup_steps=5,
    checkpoint_every=10, net_config=NoisyClassifierConfig(channels=(8, 16), features=32, time_dim=16).to_dict())
MNIST_NOISY_CLASSIFIER_FULL = MNIST_NOISY_CLASSIFIER.replace(name="mnist_noisy_classifier_full", steps=20_000,
                                                             lr=3e-4, checkpoint_every=2000)

CONFIGS: dict[str, TrainConfig] = {c.name: c for c in list(globals().values()) if isinstance(c, TrainConfig)}
