"""One model convention (diffbook.predictors): conversions between prediction kinds, Predictor, change of path, and
the reading of trained networks on the path and at the steps they were trained on."""
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffbook.checkpoints import TrainedModel
from diffbook.configs import MNIST_DDPM_SMOKE, MNIST_FM_SMOKE
from diffbook.paths import CosinePath, DiscretePath, LinearPath, SubVPPath, VEPath, VPPath
from diffbook.predictors import (KINDS, Predictor, change_path, convert, from_x0_eps, per_time, predictor_from_denoiser,
                                 predictor_from_trained, to_x0_eps)
from diffbook.schedules import NoiseSchedule
from diffbook.toy import GaussianMixture, exact_predictor

GAUSSIAN = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1.0, -2.0]], dtype=torch.float64),
                           torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64))
PATHS = [LinearPath(), VPPath(), SubVPPath(), VEPath(), CosinePath(), NoiseSchedule.linear(1000).path(),
         NoiseSchedule.cosine(1000).path()]
PATH_IDS = ["linear", "vp", "subvp", "ve", "cosine", "ddpm-linear", "ddpm-cosine"]


def fake_trained(net: nn.Module, schedule: NoiseSchedule, objective: str = "ddpm_eps"):
    """What predictor_from_trained reads of a TrainedModel: config.objective, config.T, net, schedule."""
    return SimpleNamespace(net=net, schedule=schedule, config=SimpleNamespace(objective=objective, T=schedule.T))


class RecordingNet(nn.Module):
    """A deterministic 'network' that records the inputs and times it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone()))
        return torch.tanh(x) + 0.01 * t.reshape(-1, *([1] * (x.ndim - 1)))


# ------------------------------------------------------------------ conversions

@pytest.mark.parametrize("source,target", list(itertools.product(KINDS, KINDS)))
def test_conversions_agree_with_the_definitions(source, target):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    coefs = (0.7, 0.4, -1.3, 0.9)  # alpha, sigma, d_alpha, d_sigma
    x = coefs[0] * x0 + coefs[1] * eps
    converted = convert(from_x0_eps(x0, eps, source, *coefs), source, target, x, *coefs)
    torch.testing.assert_close(converted, from_x0_eps(x0, eps, target, *coefs))
    recovered = to_x0_eps(converted, target, x, *coefs)
    torch.testing.assert_close(recovered[0], x0)
    torch.testing.assert_close(recovered[1], eps)


def test_conversions_reject_unknown_kinds_and_missing_derivatives():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="expected one of"):
        convert(x, "noise", "eps", x, 1.0, 0.5)
    with pytest.raises(ValueError, match="d_alpha and d_sigma"):
        convert(x, "eps", "velocity", x, 1.0, 0.5)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_conversions_recover_every_kind_from_its_definition_on_every_path(path):
    """Not true by construction: the five targets are written here from their definitions, not with from_x0_eps."""
    gen = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)
    t = torch.linspace(0.03, 0.97, 12, dtype=torch.float64)  # one time per sample, on and between steps
    t[3], t[4] = 0.5, 0.25  # exact steps of a DiscretePath
    alpha, sigma, d_alpha, d_sigma = path.coefficients(t, x0)
    x = alpha * x0 + sigma * eps
    truth = {"eps": eps, "x0": x0, "score": -eps / sigma, "v": alpha * eps - sigma * x0,
             "velocity": d_alpha * x0 + d_sigma * eps}
    # the velocity is the time derivative of x_t = alpha_t x0 + sigma_t eps along the path
    h = 1e-6
    numeric = (path.sample(x0, eps, t + h) - path.sample(x0, eps, t - h)) / (2 * h)
    if not isinstance(path, DiscretePath):  # (a DiscretePath has kinks at its steps)
        torch.testing.assert_close(truth["velocity"], numeric, rtol=1e-6, atol=1e-6)
    for source, target in itertools.product(KINDS, KINDS):
        converted = convert(truth[source], source, target, x, alpha, sigma, d_alpha, d_sigma)
        torch.testing.assert_close(converted, truth[target], rtol=1e-9, atol=1e-9, msg=f"{source} -> {target}")


# ------------------------------------------------------------------ Predictor

def test_predictor_evaluates_converts_and_checks_its_times():
    path, seen = VPPath(), []

    def fn(x, t):
        seen.append(t)
        return torch.ones_like(x)  # an eps prediction

    predictor = Predictor(fn, "eps", path)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(predictor(x, 0.5, "eps"), torch.ones_like(x))  # its own kind: returned as is
    assert seen[-1].dtype == torch.float64 and torch.equal(seen[-1], torch.full((4,), 0.5, dtype=torch.float64))
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    alpha, sigma = path.alpha(t)[:, None], path.sigma(t)[:, None]
    torch.testing.assert_close(predictor(x, t, "x0"), (x - sigma) / alpha)  # per-sample times
    torch.testing.assert_close(predictor.score(x, t), -1 / sigma.expand_as(x))
    with pytest.raises(ValueError, match="one per sample"):
        predictor(x, torch.tensor([0.1, 0.2]), "eps")
    with pytest.raises(ValueError, match="expected one of"):
        Predictor(fn, "noise", path)


def test_per_time_calls_once_per_distinct_time_and_keeps_rows_in_place():
    calls = []

    def fn(x, t):
        calls.append((len(x), t))
        return x * t

    predict = per_time(fn)
    x = torch.arange(5, dtype=torch.float64)[:, None]
    t = torch.tensor([0.5, 0.25, 0.5, 0.75, 0.25], dtype=torch.float64)
    torch.testing.assert_close(predict(x, t), x * t[:, None])
    assert sorted(calls) == [(1, 0.75), (2, 0.25), (2, 0.5)]
    calls.clear()
    predict(x, torch.full((5,), 0.3, dtype=torch.float64))
    assert calls == [(5, 0.3)]


# ------------------------------------------------------------------ change of path

def test_changing_path_keeps_the_model():
    for old, new in ((VPPath(), LinearPath()), (LinearPath(), VPPath())):
        t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
        torch.testing.assert_close(old.time_of_ratio(old.sigma(t) / old.alpha(t)), t)
        moved = change_path(exact_predictor(GAUSSIAN, old), new)
        x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10)) * 2
        for t_value, kind in itertools.product((0.1, 0.5, 0.9), ("eps", "velocity", "score")):  # one time per batch
            torch.testing.assert_close(moved(x, t_value, kind), exact_predictor(GAUSSIAN, new)(x, t_value, kind))


@pytest.mark.parametrize("source", [VPPath(), CosinePath(), VEPath(), NoiseSchedule.linear(1000).path()],
                         ids=["vp", "cosine", "ve", "ddpm-linear"])
def test_change_path_round_trip_is_exact(source):
    """An exact predictor moved to the linear path is the linear path's exact predictor, and moving it back gives the
    original: per-sample times, kinds eps and velocity, to 1e-10."""
    x = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12)) * 2
    t = torch.linspace(0.05, 0.9, 9, dtype=torch.float64)
    original = exact_predictor(GAUSSIAN, source, "eps")
    moved = change_path(original, LinearPath())
    direct = exact_predictor(GAUSSIAN, LinearPath(), "velocity")
    back = change_path(moved, source)
    for kind in ("eps", "velocity"):
        torch.testing.assert_close(moved(x, t, kind), direct(x, t, kind), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(back(x, t, kind), original(x, t, kind), rtol=1e-10, atol=1e-10)
    assert moved.path == LinearPath() and back.path is source


def test_a_ddpm_network_moved_to_the_linear_path_sees_the_matching_discrete_step():
    schedule, net = NoiseSchedule.linear(1000), RecordingNet()
    ddpm = predictor_from_trained(fake_trained(net, schedule))
    moved = change_path(ddpm, LinearPath())
    steps = torch.tensor([1, 7, 250, 500, 999, 1000])
    ratio = schedule.sigma_ve[steps]  # sqrt((1 - alpha_bar_k) / alpha_bar_k)
    t_linear = ratio / (1 + ratio)  # the linear-path times with those noise levels
    x = torch.randn(len(steps), 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    eps = moved(x, t_linear, "eps")
    (x_seen, t_seen), = net.calls
    assert torch.equal(t_seen, steps.float())  # the very steps it was trained on
    scale = (schedule.signal[steps] / (1 - t_linear)).reshape(-1, 1, 1, 1)  # x on the DDPM path: alpha_k x / alpha_lin
    torch.testing.assert_close(x_seen.double(), x * scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps, net(x_seen, t_seen).double())
    # between steps the network sees the fractional step with the same sigma/alpha
    net.calls.clear()
    t_between = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    moved(torch.zeros(3, 1, 2, 2, dtype=torch.float64), t_between, "eps")
    t_seen = net.calls[0][1].double()
    torch.testing.assert_close(schedule.path().ratio(t_seen / 1000), t_between / (1 - t_between), rtol=1e-5, atol=0)


# ------------------------------------------------------------------ trained networks and denoisers

def test_predictor_from_a_trained_model_reads_its_path():
    for config, kind in ((MNIST_DDPM_SMOKE, "eps"), (MNIST_FM_SMOKE, "velocity")):
        net = config.build_net().eval()
        model = TrainedModel(net, config, {}, [])
        predictor = predictor_from_trained(model)
        assert predictor.kind == kind
        if kind == "eps":  # a DDPM network lives on its schedule's own DiscretePath (alpha_bar at every step k/T)
            assert isinstance(predictor.path, DiscretePath)
            assert torch.equal(predictor.path.alpha_bar, model.schedule.alpha_bar)
        else:
            assert predictor.path == LinearPath()
        x, t = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(15)), torch.tensor([0.2, 0.5, 0.8])
        with torch.no_grad():  # the network sees T t
            torch.testing.assert_close(predictor(x, t, kind), net(x, 1000 * t))


def test_predictor_from_trained_rejects_objectives_without_a_prediction():
    with pytest.raises(ValueError, match="classification"):
        predictor_from_trained(fake_trained(RecordingNet(), NoiseSchedule.linear(10), objective="classification"))


@pytest.mark.parametrize("path", [LinearPath(), VEPath(), VPPath()], ids=["linear", "ve", "vp"])
def test_a_variance_preserving_denoiser_reads_on_any_path(path):
    """predictor_from_denoiser rescales a point of any path onto the VP path: with the exact denoiser of Gaussian
    data (E[x0 | x] = m + a s^2 (x - a m) / (a^2 s^2 + 1 - a^2), a^2 = alpha_bar) it is the exact x0 predictor."""
    m, s = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7
    data = GaussianMixture.isotropic(m[None], s)

    def denoise(x_flat, alpha_bar):
        a = alpha_bar**0.5
        return m + a * s**2 * (x_flat - a * m) / (alpha_bar * s**2 + 1 - alpha_bar)

    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    t = torch.tensor([0.1, 0.1, 0.4, 0.6, 0.6, 0.9], dtype=torch.float64)
    torch.testing.assert_close(predictor_from_denoiser(denoise, path)(x, t, "x0"),
                               exact_predictor(data, path, "x0")(x, t, "x0"))
