"""Named training configs: the ones chapters load, and the ones ``python -m diffbook.train NAME`` runs.

Each chapter uses three of them through its profile: ``*_smoke`` (seconds, for tests), the default (the
checkpoint shipped under ``checkpoints/``, trained on a CPU) and ``*_full`` (the paper's scale, for a GPU).
"""
from __future__ import annotations

from .nets import ClassifierConfig, MLPConfig, UNetConfig
from .train import TrainConfig

_MNIST_UNET = UNetConfig().to_dict()

MNIST_DDPM = TrainConfig(name="mnist_ddpm", dataset="mnist", net="unet", net_config=_MNIST_UNET,
                         objective="ddpm_eps", schedule="linear", T=1000, steps=3000, batch_size=128, lr=1e-3,
                         warmup_steps=200, ema_decay=0.999, seed=0)

MNIST_DDPM_SMOKE = MNIST_DDPM.replace(
    name="mnist_ddpm_smoke", steps=30, batch_size=32, train_subset=2048, warmup_steps=5, checkpoint_every=10,
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


def _profiles(bases: tuple[TrainConfig, TrainConfig, TrainConfig], name: str, **changes) -> tuple[TrainConfig, ...]:
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
FASHION_CLASSIFIER = MNIST_CLASSIFIER.replace(name="fashion_classifier", dataset="fashion_mnist", steps=4000)

CONFIGS: dict[str, TrainConfig] = {c.name: c for c in list(globals().values()) if isinstance(c, TrainConfig)}
