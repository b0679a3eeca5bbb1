"""The ``full`` profile, proven to run without its GPU: every ``*_full`` config builds, trains two steps and samples.

Readers who run ``full`` on a rented GPU have the most to lose from a shape, dtype or config error that only the
big networks hit; these tests find such errors on a CPU, at batch size 2. The GPU-only code paths (autocast choice,
MPS's missing float64) are checked as far as a CPU can check them.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import diffbook.train as train_module
from diffbook.checkpoints import TrainedModel
from diffbook.configs import CONFIGS
from diffbook.device import autocast_dtype
from diffbook.predictors import predictor_from_trained
from diffbook.losses import OBJECTIVES
from diffbook.flowmaps import flow_map_from_trained
from diffbook.samplers import SAMPLERS, sample_ancestral, sample_flow_map, sample_heun, time_grid

FULL = sorted(name for name in CONFIGS if name.endswith("_full"))
CPU = torch.device("cpu")


def _two_steps(config):
    return config.replace(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, precision="fp32",
                          train_subset=min(config.train_subset or 64, 64))


def test_every_network_has_a_full_config():
    bases = {name for name in CONFIGS if not name.endswith(("_full", "_smoke"))}
    # The digit classifier is a metric's feature network, not a generative model: it has no paper-scale variant. (The
    # noisy classifier of classifier guidance has one: it guides the full profile's larger networks.) CIFAR-10's
    # feature classifier exists only in the full profile, like the data.
    assert {name.removesuffix("_full") for name in FULL} - {"cifar10_classifier"} == bases - {"mnist_classifier"}
    assert "cifar10_classifier_full" in FULL


@pytest.mark.parametrize("name", FULL)
def test_full_config_trains_two_steps_and_samples_on_cpu(name, isolated_cache, tiny_images, monkeypatch):
    # A reflow config trains on its parent's ODE couplings: stand in a two-step parent, not 40,000 steps.
    monkeypatch.setattr(train_module, "load_or_train",
                        lambda config, **kw: train_module.train(_two_steps(config), device=CPU, progress=False))
    config = _two_steps(CONFIGS[name])
    model = train_module.train(config, device=CPU, progress=False)
    assert model.manifest["steps"] == 2 and (train_module.run_dir(config) / f"{config.name}.pt").exists()
    shape = (2, 2) if config.net in ("mlp", "flow_map_mlp") else \
        (2, config.net_config.get("in_channels", 1), *[config.net_config.get("image_size", 28)] * 2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if config.objective in ("classification", "noisy_classification"):  # classifiers: logits, not samples
        logits = model.net(noise, torch.tensor([10.0, 900.0]))
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        return
    if config.objective in ("semigroup", "meanflow"):  # a two-time flow map (chapter 9): jumps, not a Predictor
        jumped = sample_flow_map(flow_map_from_trained(model), noise, time_grid(2))
        assert jumped.shape == noise.shape and torch.isfinite(jumped).all()
        return
    predictor = predictor_from_trained(model)
    with torch.no_grad():
        ode = sample_heun(predictor, noise, time_grid(2))
        sde = sample_ancestral(predictor, noise, time_grid(2), generator=torch.Generator().manual_seed(1))
    assert ode.shape == sde.shape == noise.shape and torch.isfinite(ode).all() and torch.isfinite(sde).all()


def test_autocast_choices_for_each_device(monkeypatch):
    assert autocast_dtype(torch.device("mps"), "auto") is None  # MPS: float32 always (no bf16 autocast there)
    assert autocast_dtype(torch.device("mps"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(torch.device("cuda"), "auto") is None  # e.g. a V100: fp32 rather than emulated bf16
    assert autocast_dtype(torch.device("cuda"), "fp32") is None
    with pytest.raises(ValueError, match="precision must be"):
        autocast_dtype(CPU, "fp16")


class _Float64OffTheCpu(TorchDispatchMode):
    """Records every operation that touches a float64 tensor on a device other than the CPU."""

    def __init__(self):
        super().__init__()
        self.offending = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten((args, kwargs, out))[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "cpu" and value.dtype == torch.float64:
                self.offending.add(str(func))
        return out


# The "meta" device stands in for an accelerator: its tensors have no data, so any float64 on it, any device
# mix-up (a CPU time vector meeting device images) and any .item() on device data fail here as they would on MPS.
META = torch.device("meta")
TRAINED_KINDS = ["mnist_ddpm", "mnist_fm", "ring_eps", "ring_fm"]


@pytest.mark.parametrize("name", TRAINED_KINDS)
def test_every_sampler_keeps_float64_off_the_device(name):
    config = CONFIGS[name]
    model = TrainedModel(net=config.build_net().to(META).eval(), config=config, manifest={}, loss_history=[])
    predictor = predictor_from_trained(model)
    shape = (2, 2) if config.net in ("mlp", "flow_map_mlp") else (2, 1, 28, 28)
    x = torch.randn(shape).to(META)
    for sampler_name, sampler in SAMPLERS.items():
        watch = _Float64OffTheCpu()
        with watch, torch.no_grad():
            # from t < 1: the linear path's log-SNR is -inf at t = 1, which the exponential integrators refuse
            out = sampler(predictor, x, time_grid(3, t_start=0.9), generator=torch.Generator().manual_seed(0))
        assert out.device == META and out.dtype == torch.float32, sampler_name
        assert not watch.offending, f"{sampler_name}: float64 on the device in {sorted(watch.offending)}"


@pytest.mark.parametrize("name", ["mnist_ddpm", "mnist_fm", "mnist_classifier"])
def test_every_training_loss_keeps_float64_off_the_device(name):
    config = CONFIGS[name]
    net = config.build_net().to(META)
    x0 = torch.randn(2, 1, 28, 28).to(META)
    y = torch.tensor([3, 7]).to(META) if config.objective == "classification" else None
    watch = _Float64OffTheCpu()
    with watch:
        loss = OBJECTIVES[config.objective](net, x0, config.build_schedule(), torch.Generator().manual_seed(0), y)
        loss.backward()
    assert loss.device == META and not watch.offending, sorted(watch.offending)


def test_the_cifar10_network_is_the_ddpm_papers():
    # Ho et al. (2020), appendix B: "Our CIFAR10 model has 35.7 million parameters"
    from diffbook.nets import count_parameters
    config = CONFIGS["cifar10_ddpm_full"]
    assert abs(count_parameters(config.build_net()) / 35.7e6 - 1) < 0.005
    assert (config.lr, config.batch_size, config.ema_decay, config.hflip) == (2e-4, 128, 0.9999, True)
    assert config.net_config["dropout"] == 0.1 and tuple(config.net_config["attention_resolutions"]) == (16,)
