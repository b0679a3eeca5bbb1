"""Training configs: :class:`TrainConfig` (everything that determines a trained network) and the named configs.

Each network has three named configs: the default (the checkpoint shipped under ``checkpoints/``, trained on a CPU;
the ``smoke`` and ``default`` profiles of the chapters load it), ``*_full`` (the paper's scale, for a GPU; the ``full``
profile) and ``*_smoke`` (trains in seconds: the package tests and the chapters' exercises use it).
:data:`CONFIGS` holds them all by name; ``python -m diffbook.train NAME`` trains one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
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
_ADDED_LATER = {"label_drop": 0.0, "init_from": None, "objective_options": {}, "hflip": False}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained network. Two equal configs give identical weights on CPU.

    ``dataset`` names the training data (see :mod:`diffbook.training_data`): an image dataset, a 2-D toy set,
    ``<image dataset>_w`` or ``reflow:<config name>``. ``label_drop`` is the probability that a training label is
    replaced by "no class" (the network's label ``num_classes``): one network learns the conditional and the
    unconditional model, as classifier-free guidance needs (Ho & Salimans 2022). ``init_from`` names a config whose
    trained network (same architecture) is the starting point and, for an objective that takes one, the ``teacher``
    (distillation); ``objective_options`` are the objective's keyword arguments (e.g. ``student_steps``). ``hflip``
    flips each training image left-right with probability 1/2 (DDPM's CIFAR-10 augmentation), drawn from the run's
    generator on the CPU.
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
    init_from: str | None = None
    objective_options: dict = field(default_factory=dict)
    hflip: bool = False
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
        options = inspect.signature(OBJECTIVES[self.objective]).parameters
        unknown = sorted(set(self.objective_options) - set(options) - {"teacher", "progress"})
        if unknown or {"teacher", "progress"} & set(self.objective_options):
            settable = [p for p in options if p not in ("net", "x0", "schedule", "generator", "y", "teacher", "progress")]
            raise ValueError(f"objective {self.objective!r} has no option {', '.join(unknown) or 'teacher/progress'}: "
                             f"its options are {', '.join(settable) or 'none'}")
        if "teacher" in options and options["teacher"].default is inspect.Parameter.empty and self.init_from is None:
            raise ValueError(f"objective {self.objective!r} distils a teacher: set init_from to the teacher's config name")
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

# Chapter 9 (few-step generators): students of chapter 4's flow-matching network, which is also their starting point.
# ECT tunes it into a consistency model; progressive distillation halves the steps of its Euler (= DDIM) sampler on
# evenly spaced times, 16 -> 8 -> 4 -> 2 -> 1, each student the next one's teacher.
_FM_PROFILES = (MNIST_FM, MNIST_FM_SMOKE, MNIST_FM_FULL)
MNIST_ECT, MNIST_ECT_SMOKE, MNIST_ECT_FULL = (
    base.replace(name=name, objective="ect", init_from=base.name, steps=steps, lr=lr, warmup_steps=warmup,
                 ema_decay=ema, checkpoint_every=every)
    for base, name, steps, lr, warmup, ema, every in zip(
        _FM_PROFILES, ("mnist_ect", "mnist_ect_smoke", "mnist_ect_full"), (2000, 20, 50_000), (1e-4, 1e-4, 1e-4),
        (50, 5, 1000), (0.999, 0.99, 0.9999), (250, 10, 2000)))


def _distillation_chain(base: TrainConfig, suffix: str, steps: int, **changes: Any) -> list[TrainConfig]:
    """Progressive-distillation students of ``base``: ``mnist_pd<N><suffix>`` for N = 8, 4, 2, 1 steps, each starting
    from (and taught by) the one before, the first by ``base`` sampled with 16 steps (its student has 8)."""
    chain, parent = [], base.name
    for student_steps in (8, 4, 2, 1):
        chain.append(base.replace(name=f"mnist_pd{student_steps}{suffix}", objective="progressive_distillation",
                                  init_from=parent, objective_options={"student_steps": student_steps}, steps=steps,
                                  **changes))
        parent = chain[-1].name
    return chain


MNIST_PD = _distillation_chain(MNIST_FM, "", 450, lr=1e-4, warmup_steps=20, ema_decay=0.995,
                               checkpoint_every=100)
MNIST_PD_SMOKE = _distillation_chain(MNIST_FM_SMOKE, "_smoke", 10, lr=1e-4, warmup_steps=2, ema_decay=0.9,
                                     checkpoint_every=5)
MNIST_PD_FULL = _distillation_chain(MNIST_FM_FULL, "_full", 20_000, lr=5e-5, warmup_steps=500,
                                    ema_decay=0.9995, checkpoint_every=2000)

# MeanFlow: the networks see t itself (T = 1), not 1000 t: the JVP's time derivative of a sinusoidal embedding of
# 1000 t is dominated by its fastest features, and the bootstrapped target diverged on the ring (chapter 9). A quarter
# of each batch is plain flow matching (the official CIFAR-10 setting), plain squared error.
_MEANFLOW_OPTIONS = {"flow_matching_share": 0.25, "adaptive_power": 0.0}
# MeanFlow on MNIST: the U-Net with a second time input, trained from scratch, in fp32 (bf16 autocast breaks the JVP).
# A JVP per step: the default network is trained on a GPU where one is lent (its manifest says where).
MNIST_MEANFLOW, MNIST_MEANFLOW_SMOKE, MNIST_MEANFLOW_FULL = _profiles(
    _FM_PROFILES, "mnist_meanflow", net="flow_map_unet", objective="meanflow", precision="fp32", T=1,
    objective_options=_MEANFLOW_OPTIONS)
MNIST_MEANFLOW = MNIST_MEANFLOW.replace(steps=3000)  # trained on an H100 (its JVP makes a CPU run take hours)

# On the 2-D ring: ECT from ring_fm (its sigma_data is the ring's per-coordinate spread, about 2.9, and the times are
# shifted by log(2.9 / 0.5) as EDM's would be for that spread), and two flow maps trained from scratch on a two-time MLP.
_RING_PROFILES = (RING_FM, RING_FM_SMOKE, RING_FM_FULL)
_RING_ECT_OPTIONS = {"sigma_data": 2.9, "log_rho_mean": 0.66}
RING_ECT, RING_ECT_SMOKE, RING_ECT_FULL = (
    base.replace(name=f"ring_ect{suffix}", objective="ect", init_from=base.name, steps=steps, lr=1e-4,
                 objective_options=_RING_ECT_OPTIONS)
    for base, suffix, steps in zip(_RING_PROFILES, ("", "_smoke", "_full"), (6000, 100, 40_000)))
RING_SEMIGROUP, RING_SEMIGROUP_SMOKE, RING_SEMIGROUP_FULL = (
    base.replace(name=f"ring_semigroup{suffix}", net="flow_map_mlp", objective="semigroup", steps=steps)
    for base, suffix, steps in zip(_RING_PROFILES, ("", "_smoke", "_full"), (10_000, 100, 40_000)))
RING_MEANFLOW, RING_MEANFLOW_SMOKE, RING_MEANFLOW_FULL = (
    base.replace(name=f"ring_meanflow{suffix}", net="flow_map_mlp", objective="meanflow", steps=steps, T=1, lr=1e-3,
                 objective_options=_MEANFLOW_OPTIONS)
    for base, suffix, steps in zip(_RING_PROFILES, ("", "_smoke", "_full"), (10_000, 100, 40_000)))

# CIFAR-10, for readers with a GPU (no checkpoint ships: the data has no offline source here). `_full` is the DDPM
# paper's network and recipe (Ho et al. 2020, appendix B: 128 channels, multipliers 1, 2, 2, 2, two residual blocks,
# attention at 16x16, dropout 0.1, random horizontal flips, EMA 0.9999, lr 2e-4, batch 128, 800k steps): 35.7M
# parameters. The default is a quarter of its width (2.2M parameters) for one consumer GPU; smoke trains in seconds.
_CIFAR_UNET = dict(image_size=32, in_channels=3, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                   attention_resolutions=(16,), dropout=0.1)
CIFAR10_DDPM_FULL = TrainConfig(name="cifar10_ddpm_full", dataset="cifar10", net="unet",
                                net_config=UNetConfig(base_channels=128, **_CIFAR_UNET).to_dict(), objective="ddpm_eps",
                                schedule="linear", T=1000, steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000,
                                ema_decay=0.9999, grad_clip=1.0, hflip=True, checkpoint_every=5000)
CIFAR10_DDPM = CIFAR10_DDPM_FULL.replace(name="cifar10_ddpm", steps=200_000, warmup_steps=2000, ema_decay=0.9995,
                                         net_config=UNetConfig(base_channels=32, **_CIFAR_UNET).to_dict())
CIFAR10_DDPM_SMOKE = CIFAR10_DDPM_FULL.replace(
    name="cifar10_ddpm_smoke", steps=30, batch_size=32, train_subset=2048, warmup_steps=5, checkpoint_every=10,
    precision="fp32", ema_decay=0.999,
    net_config=UNetConfig(base_channels=8, image_size=32, in_channels=3, channel_mults=(1, 2),
                          attention_resolutions=()).to_dict())

# The feature network of diffbook.metrics for CIFAR-10 (its classifier Fréchet distance, offline): the digit
# classifier's architecture at 32x32x3, twice as wide, trained with the DDPM's flips (30k steps of batch 128); like
# the CIFAR-10 DDPMs it ships no checkpoint (`python -m diffbook.train cifar10_classifier_full`).
CIFAR10_CLASSIFIER_FULL = MNIST_CLASSIFIER.replace(
    name="cifar10_classifier_full", dataset="cifar10", steps=30_000, warmup_steps=500, hflip=True, checkpoint_every=2000,
    net_config=ClassifierConfig(image_size=32, in_channels=3, channels=(64, 128), features=256).to_dict())
CIFAR10_CLASSIFIER_SMOKE = CIFAR10_CLASSIFIER_FULL.replace(
    name="cifar10_classifier_smoke", steps=30, batch_size=64, train_subset=2048, warmup_steps=5, checkpoint_every=10,
    net_config=ClassifierConfig(image_size=32, in_channels=3, channels=(8, 16), features=32).to_dict())

CONFIGS: dict[str, TrainConfig] = {c.name: c for c in list(globals().values()) if isinstance(c, TrainConfig)}
CONFIGS.update({c.name: c for c in MNIST_PD + MNIST_PD_SMOKE + MNIST_PD_FULL})
