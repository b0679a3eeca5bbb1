"""Every sampler (diffbook.samplers) against closed forms: on Gaussian(-mixture) data the exact predictions are known,
and DDPM's ancestral chain is checked bit for bit against Ho et al.'s Algorithm 2 written out here."""
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffbook.checks import Z_CHECK
from diffbook.metrics import straightness
from diffbook.nets import UNet, UNetConfig
from diffbook.paths import LinearPath, VEPath, VPPath
from diffbook.predictors import Predictor, per_time, predictor_from_trained
from diffbook.samplers import (SAMPLERS, Trajectory, karras_times, sample_ancestral, sample_annealed_langevin,
                               sample_ddim, sample_dpm_solver_pp_2m, sample_edm_stochastic, sample_euler,
                               sample_euler_maruyama, sample_heun, sample_predictor_corrector, step_times, time_grid)
from diffbook.schedules import NoiseSchedule
from diffbook.toy import GaussianMixture, exact_predictor, ring_mixture

GAUSSIAN = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1.0, -2.0]], dtype=torch.float64),
                           torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64))
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.6, 0.25], [0.25, 0.4]], dtype=torch.float64)
GAUSS = GaussianMixture(torch.ones(1, dtype=torch.float64), MU[None], SIGMA[None])

edm_heun = functools.partial(sample_heun, scaled=True)  # Karras et al.'s Algorithm 1 (the old samplers.sample_heun)


def gaussian_flow(path, x, t, s, data=None):
    """The exact probability-flow map of Gaussian data N(mu, S) (``data``, GAUSSIAN by default) from time t to time s:
    the marginals N(alpha mu, alpha^2 S + sigma^2 I) all commute with S, and in S's eigenbasis each coordinate is a 1-D
    Gaussian whose flow is the monotone affine map, x_s = alpha_s mu + C_s C_t^-1 (x_t - alpha_t mu),
    C = (alpha^2 S + sigma^2 I)^1/2."""
    data = GAUSSIAN if data is None else data
    lam, vectors = torch.linalg.eigh(data.covs[0])
    (a_t, s_t), (a_s, s_s) = ((path.alpha(v).item(), path.sigma(v).item())
                              for v in (torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)))
    gain = ((a_s**2 * lam + s_s**2) / (a_t**2 * lam + s_t**2)).sqrt()
    mu = data.means[0]
    return a_s * mu + ((x - a_t * mu) @ vectors * gain) @ vectors.T


def marginal(data, path, t):
    """Mean and covariance of x_t for Gaussian data: alpha_t mu and alpha_t^2 S + sigma_t^2 I."""
    t = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = path.alpha(t).item(), path.sigma(t).item()
    return alpha * data.means[0], alpha**2 * data.covs[0] + sigma**2 * torch.eye(2, dtype=torch.float64)


def assert_moments(x, mean, cov):
    """The sample mean and covariance of x (n, 2) within Z_CHECK standard errors of ``mean`` and ``cov``: the SE of a
    sample mean is sqrt(C_jj / n), of a sample covariance sqrt((C_jj C_kk + C_jk^2) / n) (normal data)."""
    n, var = len(x), cov.diagonal()
    mean_z = (x.mean(0) - mean) / (var / n).sqrt()
    cov_z = (torch.cov(x.T) - cov) / ((var[:, None] * var[None] + cov**2) / n).sqrt()
    assert (mean_z.abs() < Z_CHECK).all() and (cov_z.abs() < Z_CHECK).all(), (mean_z, cov_z)


def exact_eps(mixture, path):
    return exact_predictor(mixture, path, "eps")


def fake_trained(net: nn.Module, schedule: NoiseSchedule):
    """What predictor_from_trained reads of a DDPM TrainedModel: config.objective, config.T, net, schedule."""
    return SimpleNamespace(net=net, schedule=schedule, config=SimpleNamespace(objective="ddpm_eps", T=schedule.T))


def mode_weights(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(mixture.responsibilities(x).argmax(1), minlength=len(mixture.weights))
    return counts / counts.sum()


# ------------------------------------------------------------------ time grids

def rho_roots_are_evenly_spaced(path, times, rho=7.0) -> bool:
    """Karras et al.'s eq. 5: (sigma/alpha)^(1/rho) is linear in the step index."""
    step = (path.ratio(times) ** (1 / rho)).diff()
    return bool(((step - step.mean()).abs() < 1e-9 * step.abs().mean()).all())


def test_karras_times_are_decreasing_and_hit_the_ends():
    times = karras_times(VPPath(), 10)
    assert len(times) == 11 and times[0] == 1.0 and times[-2] == 1e-3 and times[-1] == 0
    assert bool((times[1:] < times[:-1]).all())
    assert rho_roots_are_evenly_spaced(VPPath(), times[:-1])  # the 10 noise levels; the 11th step goes to 0
    assert not rho_roots_are_evenly_spaced(VPPath(), time_grid(9, 1.0, 1e-3))  # a uniform grid with the same ends
    assert rho_roots_are_evenly_spaced(VPPath(), karras_times(VPPath(), 10, rho=3.0)[:-1], rho=3.0)  # rho is used
    assert not rho_roots_are_evenly_spaced(VPPath(), karras_times(VPPath(), 10, rho=3.0)[:-1], rho=7.0)
    ends = VPPath().ratio(torch.tensor([1.0, 1e-3], dtype=torch.float64))  # sigma_max, sigma_min of the path
    torch.testing.assert_close(VPPath().ratio(times[[0, -2]]), ends, rtol=1e-12, atol=0)
    open_grid = karras_times(VPPath(), 10, t_start=0.8, t_end=0.01, to_zero=False)  # 11 levels, none of them 0
    assert len(open_grid) == 11 and open_grid[0] == 0.8 and open_grid[-1] == 0.01
    assert rho_roots_are_evenly_spaced(VPPath(), open_grid)
    assert torch.equal(karras_times(VPPath(), 1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert karras_times(VPPath(), 10, to_zero=False)[-1] == 1e-3
    with pytest.raises(ValueError, match="decreasing"):
        sample_ddim(exact_eps(GAUSSIAN, VPPath()), torch.zeros(2, 2), torch.tensor([0.1, 0.5]))


def test_karras_times_on_the_linear_path_need_a_finite_noise_level_at_the_start():
    with pytest.raises(ValueError, match="t_start"):  # sigma/alpha = 1/0 at t = 1
        karras_times(LinearPath(), 10)
    times = karras_times(LinearPath(), 10, t_start=0.99)
    assert len(times) == 11 and times[0] == 0.99 and times[-2] == 1e-3 and times[-1] == 0
    assert bool(torch.isfinite(times).all()) and bool((times[1:] < times[:-1]).all())
    assert rho_roots_are_evenly_spaced(LinearPath(), times[:-1])
    assert not rho_roots_are_evenly_spaced(LinearPath(), time_grid(9, 0.99, 1e-3))


def test_step_times_are_ddpms_timesteps_and_invalid_arguments():
    assert torch.equal(step_times(1000), torch.arange(1000, -1, -1, dtype=torch.float64) / 1000)  # every step 1..T
    assert torch.equal(step_times(1000, 4), torch.tensor([1000, 667, 334, 1, 0], dtype=torch.float64) / 1000)
    assert torch.equal(step_times(1000, 1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="steps must lie in 1..1000"):
        step_times(1000, 0)
    with pytest.raises(ValueError, match="variance must be"):
        sample_ancestral(Predictor(lambda x, t: x, "eps", NoiseSchedule.linear(10).path()), torch.zeros(1, 2),
                         step_times(10), variance="learned")
    torch.testing.assert_close(time_grid(4, 1.0, 0.2), torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        time_grid(0)


# ------------------------------------------------------------------ ancestral sampling (DDPM)

class ExactGaussianEps(nn.Module):
    """The optimal ε-predictor for data N(mu, s²) in every coordinate:
    E[ε | x_t] = sqrt(1-ᾱ) (x_t - sqrt(ᾱ) mu) / (ᾱ s² + 1 - ᾱ)."""

    def __init__(self, schedule: NoiseSchedule, mu: float, s: float):
        super().__init__()
        self.abar, self.mu, self.s = schedule.alpha_bar.float(), mu, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        abar = self.abar[t.long()].reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - abar).sqrt() * (x - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)


class RecordingNet(nn.Module):
    """Passes through to ``net`` and keeps the times it was called with."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.times = net, []

    def forward(self, x, t, y=None):
        self.times.append(t.clone())
        return self.net(x, t, y)


def tiny_unet(image_size: int = 28) -> nn.Module:
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=image_size, base_channels=8, channel_mults=(1, 2),
                           attention_resolutions=())).eval()


def ddpm_algorithm_2(net, schedule, x, steps, generator, clip_x0=True):
    """Ho et al. (2020), Algorithm 2, from the schedule's beta and alpha_bar (respaced to ``steps`` evenly spaced steps,
    Nichol & Dhariwal 2021): x_{t-1} = c0 x0_hat + ct x_t + sqrt(beta_t) z, no noise on the last step; with
    ``clip_x0`` the posterior mean of the clipped x0_hat (eq. 7), without it Algorithm 2's line 4 as printed."""
    T = schedule.T
    ks = sorted({round(1 + i * (T - 1) / max(1, steps - 1)) for i in range(steps)}) if steps > 1 else [T]
    sub = schedule.respaced(ks) if steps < T else schedule
    beta, abar = sub.beta.tolist(), sub.alpha_bar.tolist()
    for i in range(len(ks), 0, -1):
        eps = net(x, torch.full((x.shape[0],), float(ks[i - 1])))
        if clip_x0:
            x0 = ((x - (1 - abar[i]) ** 0.5 * eps) / abar[i] ** 0.5).clamp(-1, 1)
            c0 = abar[i - 1] ** 0.5 * beta[i] / (1 - abar[i])
            ct = (1 - beta[i]) ** 0.5 * (1 - abar[i - 1]) / (1 - abar[i])
            mean = c0 * x0 + ct * x
        else:
            mean = (x - beta[i] / (1 - abar[i]) ** 0.5 * eps) / (1 - beta[i]) ** 0.5
        x = mean + beta[i] ** 0.5 * torch.randn(x.shape, generator=generator) if i > 1 else mean
    return x, ks


def ancestral_moments(schedule: NoiseSchedule, mu: float, s: float, variance: str) -> tuple[float, float]:
    """Mean and standard deviation of DDPM's chain (Ho et al. 2020, Algorithm 2, from x_T ~ N(0, 1)) with the exact eps
    of N(mu, s^2) data, written out: each step is affine in x_t plus noise, so the moments propagate exactly."""
    abar, beta = schedule.alpha_bar.tolist(), schedule.beta.tolist()
    mean, var = 0.0, 1.0
    for k in range(schedule.T, 0, -1):
        a, d = abar[k], abar[k] * s**2 + 1 - abar[k]  # eps_hat = sqrt(1 - a) (x - sqrt(a) mu) / d
        x0_slope, x0_offset = s**2 * math.sqrt(a) / d, (1 - a) * mu / d  # x0_hat = (x - sqrt(1 - a) eps_hat) / sqrt(a)
        c0, ct = math.sqrt(abar[k - 1]) * beta[k] / (1 - a), math.sqrt(1 - beta[k]) * (1 - abar[k - 1]) / (1 - a)
        noise = (beta[k] if variance == "beta" else beta[k] * (1 - abar[k - 1]) / (1 - a)) if k > 1 else 0.0
        mean, var = (c0 * x0_slope + ct) * mean + c0 * x0_offset, (c0 * x0_slope + ct) ** 2 * var + noise
    return mean, math.sqrt(var)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_sampling_with_exact_eps_returns_the_data_distribution(variance):
    schedule, n = NoiseSchedule.linear(T=1000), 40_000
    model = predictor_from_trained(fake_trained(ExactGaussianEps(schedule, mu=0.5, s=0.3), schedule))
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn((n, 1), generator=generator)
    x = sample_ancestral(model, x_T, step_times(1000), generator=generator, variance=variance, clip_x0=False)
    mean, std = ancestral_moments(schedule, 0.5, 0.3, variance)
    # the chain's own moments, within Z_CHECK standard errors of n samples (mean std/sqrt(n), std std/sqrt(2n))
    assert abs(x.mean().item() - mean) < Z_CHECK * std / math.sqrt(n)
    assert abs(x.std().item() - std) < Z_CHECK * std / math.sqrt(2 * n)
    # ... are the data's up to the 1000-step chain's bias: the mean is exact to 2e-6; the std is 0.3009 with beta_t,
    # 0.2963 with the posterior's beta~_t (Ho et al.'s upper and lower bounds on the reverse step's variance, sec. 3.2)
    assert abs(mean - 0.5) < 1e-5
    assert (0.3 < std < 0.302) if variance == "beta" else (0.295 < std < 0.3)


def test_ancestral_smoke_on_a_tiny_net_is_seeded_and_yields_every_step():
    net, schedule = tiny_unet(), NoiseSchedule.linear(T=1000)
    model = predictor_from_trained(fake_trained(net, schedule))

    def sample(callback=None):
        generator = torch.Generator().manual_seed(3)
        x_T = torch.randn((2, 1, 28, 28), generator=generator)
        return sample_ancestral(model, x_T, step_times(1000, 10), generator=generator, clip_x0=True, callback=callback)

    a, b = sample(), sample()
    assert a.shape == (2, 1, 28, 28) and torch.equal(a, b)
    trajectory = Trajectory()
    assert torch.equal(sample(trajectory), a)
    steps = trajectory.steps
    assert [s.t for s in steps] == [k / 1000 for k in (1000, 889, 778, 667, 556, 445, 334, 223, 112, 1)]
    assert all(s.x0_hat.abs().max() <= 1 for s in steps)  # clipped to the data range


@pytest.mark.parametrize("T,steps", [(100, 100), (1000, 10), (1000, 37)])
def test_ancestral_on_the_discrete_path_is_ddpm_algorithm_2_bit_for_bit(T, steps):
    """A DDPM network read through its DiscretePath at step_times is exactly DDPM's chain (respaced when steps < T),
    and the network is evaluated at the integer steps it was trained on."""
    schedule = NoiseSchedule.linear(T)
    net = RecordingNet(tiny_unet(image_size=8))
    x_T = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, ks = ddpm_algorithm_2(net, schedule, x_T, steps, torch.Generator().manual_seed(2))
        net.times.clear()
        got = sample_ancestral(predictor_from_trained(fake_trained(net, schedule)), x_T, step_times(T, steps),
                               generator=torch.Generator().manual_seed(2), clip_x0=True)
    assert torch.equal(got, expected)
    seen = torch.stack(net.times)  # (steps, batch)
    assert torch.equal(seen, seen.round())
    assert torch.equal(seen, torch.tensor(ks[::-1], dtype=torch.float32)[:, None].expand(-1, 3))
    if steps == T:  # unclipped: Algorithm 2's update as printed, to rounding
        with torch.no_grad():
            printed, _ = ddpm_algorithm_2(net, schedule, x_T, steps, torch.Generator().manual_seed(2), clip_x0=False)
            got = sample_ancestral(predictor_from_trained(fake_trained(net, schedule)), x_T, step_times(T),
                                   generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(got, printed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path_name", ["ddpm", "vp"])
def test_ddim_with_eta_one_is_the_ancestral_posterior_step(path_name):
    """Song et al. (2021): DDIM with eta = 1 is DDPM's ancestral step with the posterior variance, and in code: the
    same noise draws give the same samples, to rounding (the two samplers compute the step differently)."""
    if path_name == "ddpm":  # DDPM's own schedule and respaced steps, a nonlinear "network"
        schedule = NoiseSchedule.linear(1000)
        model = Predictor(lambda x, t: torch.tanh(1.5 * x) + t[:, None], "eps", schedule.path())
        times = step_times(1000, 25)
    else:  # a continuous path down to t = 0, the exact ring-mixture predictor
        model, times = exact_eps(ring_mixture(), VPPath()), time_grid(25, 1.0, 0.0)
    x_T = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(24))
    run = lambda sampler, **knobs: sampler(model, x_T, times, generator=torch.Generator().manual_seed(25), **knobs)
    ddim = run(sample_ddim, eta=1.0)
    torch.testing.assert_close(ddim, run(sample_ancestral, variance="posterior"), rtol=1e-10, atol=1e-10)
    assert (ddim - run(sample_ancestral, variance="beta")).abs().max() > 0.01  # the other variance is another step
    assert (ddim - run(sample_ddim, eta=0.5)).abs().max() > 0.01


# ------------------------------------------------------------------ the probability-flow ODE in the path's time

@pytest.mark.parametrize("path", [LinearPath(), VPPath()], ids=["linear", "vp"])
def test_exact_velocity_transports_noise_to_the_gaussian(path):
    z = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t_end = 0.0 if isinstance(path, LinearPath) else 1e-3  # the VP velocity is singular at t = 0
    x = sample_heun(exact_predictor(GAUSSIAN, path), z, time_grid(100, 1.0, t_end))
    # every sample lands where the exact flow takes its noise (Heun's error at 100 steps, measured: 1e-4 on the linear
    # path, 6e-4 on VP)
    assert (x - gaussian_flow(path, z, 1.0, t_end)).norm(dim=1).max() < 1e-3


def test_heun_is_second_order_and_euler_first():
    predictor = exact_predictor(GAUSSIAN, LinearPath())
    z = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    exact = gaussian_flow(LinearPath(), z, 1.0, 0.0)
    error = lambda sampler, n: (sampler(predictor, z, time_grid(n)) - exact).norm(dim=1).mean().item()
    assert 1.8 < error(sample_euler, 20) / error(sample_euler, 40) < 2.2  # measured 1.97
    assert 3.6 < error(sample_heun, 20) / error(sample_heun, 40) < 4.4  # measured 4.16


def test_the_probability_flow_ode_runs_both_ways():
    predictor = exact_predictor(GAUSSIAN, LinearPath())
    x0 = GAUSSIAN.sample(300, torch.Generator().manual_seed(16))
    noise = sample_heun(predictor, x0, time_grid(200, 0.0, 1.0))  # data to noise: an increasing grid
    # the exact flow's noise, and back to the data (Heun at 200 steps, measured: 3e-5 and 7e-7)
    torch.testing.assert_close(noise, gaussian_flow(LinearPath(), x0, 0.0, 1.0), rtol=0, atol=1e-4)
    torch.testing.assert_close(sample_heun(predictor, noise, time_grid(200, 1.0, 0.0)), x0, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="decreasing"):  # but Karras's Heun in (rho, y) runs only towards data
        edm_heun(predictor, x0, time_grid(4, 0.0, 0.5))


def test_straightness_is_zero_only_for_straight_constant_speed_paths():
    times = time_grid(10)
    line = [torch.tensor([[1.0, 2.0]]) * t.item() for t in times]
    curve = [torch.tensor([[torch.sin(3 * t).item(), t.item()]]) for t in times]
    assert straightness(line, times).item() == pytest.approx(0, abs=1e-12)
    assert straightness(curve, times).item() > 0.1


def test_trajectory_records_the_states_of_straight_and_curved_flows():
    point = GaussianMixture.isotropic([[1.0, -2.0]], 1e-4)  # (almost) one point: its linear-path flow is a line
    z = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    for path, t_end, straight in ((LinearPath(), 0.0, True), (VPPath(), 1e-3, False)):
        times, trajectory = time_grid(20, 1.0, t_end), Trajectory()
        final = sample_euler(exact_predictor(point, path), z, times, callback=trajectory)
        states = trajectory.states(final)
        assert len(states) == 21 and states[0] is z and states[-1] is final and len(trajectory.x0_hats) == 20
        torch.testing.assert_close(trajectory.x0_hats[-1], point.means.expand(50, 2), rtol=0, atol=1e-3)
        value = straightness(states, times)
        assert (value.max() < 1e-6) if straight else (value.min() > 0.1)


# ------------------------------------------------------------------ reverse-time SDEs and Langevin

def euler_maruyama_moments(data, path, times, mean, cov):
    """Mean and covariance after the reverse-SDE Euler-Maruyama chain (Song et al. 2021) with the exact score of
    Gaussian ``data``, written out: x_s = x - (f x - g^2 score(x)) (t - s) + g sqrt(t - s) z, no noise on the last step,
    score(x) = -C_t^-1 (x - alpha_t mu) is affine, so the moments propagate exactly from those at times[0]."""
    eye, grid = torch.eye(2, dtype=torch.float64), times.tolist()
    for i, (t, s) in enumerate(zip(grid, grid[1:])):
        f, g2 = (c.item() for c in path.sde_coefficients(torch.tensor(t, dtype=torch.float64)))
        alpha_mu, marginal_cov = marginal(data, path, t)
        precision = torch.linalg.inv(marginal_cov)
        P = (1 - f * (t - s)) * eye - g2 * (t - s) * precision
        mean, cov = P @ mean + g2 * (t - s) * precision @ alpha_mu, P @ cov @ P.T
        if i < len(grid) - 2:
            cov = cov + g2 * (t - s) * eye
    return mean, cov


def test_reverse_sde_on_the_linear_path_samples_the_gaussian():
    path, n = LinearPath(), 20_000
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    times = time_grid(400, 0.999, 1e-3)
    x = sample_euler_maruyama(exact_predictor(GAUSSIAN, path), z * 0.999, times,
                              generator=torch.Generator().manual_seed(7))
    start = (torch.zeros(2, dtype=torch.float64), 0.999**2 * torch.eye(2, dtype=torch.float64))
    assert_moments(x, *euler_maruyama_moments(GAUSSIAN, path, times, *start))  # the chain's own moments
    # which are the data's at t = 1e-3 up to a discretisation bias of 1e-5 (and 2e-4 at 100 steps: it converges)
    truth = marginal(GAUSSIAN, path, 1e-3)
    bias = [(euler_maruyama_moments(GAUSSIAN, path, time_grid(k, 0.999, 1e-3), *start)[1] - truth[1]).abs().max()
            for k in (100, 400)]
    assert bias[1] < 3e-5 and bias[0] > 4 * bias[1]


@pytest.mark.parametrize("sampler", ["em", "pf_ode", "pc"])
def test_reverse_processes_with_exact_score_return_gaussian_data(sampler):
    path, g = VPPath(), torch.Generator().manual_seed(2)  # the VP SDE
    x = torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    model = exact_predictor(GAUSS, path, "score")
    if sampler == "em":
        times = time_grid(500, 1.0, 1e-3)
        out = sample_euler_maruyama(model, x, times, generator=g)
        moments = euler_maruyama_moments(GAUSS, path, times, torch.zeros(2, dtype=torch.float64),
                                         torch.eye(2, dtype=torch.float64))
        truth = marginal(GAUSS, path, 1e-3)
        assert (moments[0] - truth[0]).abs().max() < 2e-3 and (moments[1] - truth[1]).abs().max() < 2e-3  # 500 steps
        assert_moments(out, *moments)
    elif sampler == "pf_ode":  # Euler on dx/dt = f x - g^2 score / 2, the velocity: against the exact flow
        out = sample_euler(model, x[:2000], time_grid(500, 1.0, 1e-3))
        error = (out - gaussian_flow(path, x[:2000], 1.0, 1e-3, data=GAUSS)).norm(dim=1)
        assert error.mean() < 1.5e-3, error.mean()  # Euler's first-order error, measured 7e-4 (1.3e-3 at 250 steps)
    else:  # the corrector's step size depends on the batch: no closed form, so the data's moments (its bias is not
        # computed here; measured within 1.6 SE)
        out = sample_predictor_corrector(model, x, time_grid(200, 1.0, 1e-3), generator=g)
        assert_moments(out, *marginal(GAUSS, path, 1e-3))


def test_annealed_langevin_recovers_mode_weights_of_separated_modes():
    mix, g = ring_mixture(), torch.Generator().manual_seed(1)
    sigmas = torch.logspace(math.log10(8.0), math.log10(0.05), 20).tolist()
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64) * 8
    path = VEPath()  # alpha = 1: its sigma/alpha is NCSN's noise level
    times = path.time_of_ratio(torch.tensor(sigmas + [0.0], dtype=torch.float64))
    torch.testing.assert_close(path.sigma(times[:-1]), torch.tensor(sigmas, dtype=torch.float64))
    # the score of the data noised at each level, as NCSN's sampler used it (one time per call)
    model = Predictor(per_time(lambda v, t: mix.noised(1.0, path.sigma(torch.tensor(t)).item()).score(v)), "score", path)
    probe = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(22)) * 3
    torch.testing.assert_close(model(probe, times[3], "score"), exact_predictor(mix, path, "score")(probe, times[3], "score"),
                               rtol=1e-6, atol=1e-6)  # Tweedie: the same field as the exact predictor
    x = sample_annealed_langevin(model, x, times, epsilon=2e-3, steps_per_level=60, generator=g)
    total_variation = 0.5 * (mode_weights(mix, x) - mix.weights).abs().sum().item()
    assert total_variation < 0.05
    with pytest.raises(ValueError, match="decreasing"):
        sample_annealed_langevin(model, x, path.time_of_ratio(torch.tensor([0.1, 1.0])), epsilon=1e-3,
                                 steps_per_level=1)


# ------------------------------------------------------------------ fast samplers in (rho, y) and lambda

@functools.lru_cache(maxsize=1)
def ring_reference():
    """500 noise points and their images under the ring mixture's flow (EDM's Heun, 1000 steps), computed once."""
    predictor = exact_eps(ring_mixture(), VPPath())
    noise = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return predictor, noise, edm_heun(predictor, noise, karras_times(VPPath(), 1000))


@pytest.mark.parametrize("sampler,order", [(sample_ddim, 1), (edm_heun, 2), (sample_dpm_solver_pp_2m, 2)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    path = VPPath()
    predictor, noise, reference = ring_reference()
    error = lambda n: (sampler(predictor, noise, karras_times(path, n)) - reference).norm(dim=1).mean().item()
    slope = torch.log2(torch.tensor(error(40) / error(80))).item()
    assert abs(slope - order) < 0.25, slope  # measured 1.02 (DDIM), 2.10 (Heun), 2.14 (DPM-Solver++)


def ddim_moments(path, times, eta, mean, cov):
    """Mean and covariance after DDIM (Song et al. 2021, eq. 12) on GAUSSIAN data with the exact x0, written out: every
    step is affine plus Gaussian noise, x_s = P x_t + q + s_eta z, so the moments propagate exactly (m <- P m + q,
    C <- P C P^T + s_eta^2 I) from those of x at times[0]."""
    mu, S, eye = GAUSSIAN.means[0], GAUSSIAN.covs[0], torch.eye(2, dtype=torch.float64)
    grid = times.tolist()
    for t, s in zip(grid, grid[1:]):
        (a_t, s_t), (a_s, s_s) = ((path.alpha(torch.tensor(v, dtype=torch.float64)).item(),
                                   path.sigma(torch.tensor(v, dtype=torch.float64)).item()) for v in (t, s))
        K = a_t * S @ torch.linalg.inv(a_t**2 * S + s_t**2 * eye)  # x0_hat = mu + K (x - a_t mu), eps_hat = (x - a_t x0_hat) / s_t
        s_eta = eta * s_s * math.sqrt(1 - (a_t * s_s / (a_s * s_t)) ** 2)
        c = math.sqrt(s_s**2 - s_eta**2)
        P = a_s * K + c * (eye - a_t * K) / s_t
        q = (a_s - c * a_t / s_t) * (mu - a_t * K @ mu)
        mean, cov = P @ mean + q, P @ cov @ P.T + s_eta**2 * eye
    return mean, cov


@pytest.mark.parametrize("path", [VPPath(), LinearPath()], ids=["vp", "linear"])
def test_samplers_reach_the_gaussian(path):
    predictor = exact_eps(GAUSSIAN, path)
    t_start, t_end = (1.0 if isinstance(path, VPPath) else 0.999), 1e-3
    sigma_start = path.sigma(torch.tensor(t_start, dtype=torch.float64)).item()
    # the deterministic samplers against the exact flow, sample by sample (mean discretisation errors at 200 steps,
    # measured on the linear path and VP: DDIM 9e-3 and 1.2e-2, Heun 4e-4 and 1.5e-4, DPM-Solver++ 1.7e-4 and 4.5e-4)
    noise = sigma_start * torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = gaussian_flow(path, noise, t_start, t_end)
    for sampler, tolerance in ((sample_ddim, 0.025), (edm_heun, 1e-3), (sample_dpm_solver_pp_2m, 1e-3)):
        error = (sampler(predictor, noise, time_grid(200, t_start, t_end)) - exact).norm(dim=1)
        assert error.mean() < tolerance, (sampler, error.mean())
    # stochastic DDIM: its samples have the moments that its steps propagate exactly, within Z_CHECK standard errors ...
    n, times = 20_000, time_grid(100, t_start, t_end)
    noise = sigma_start * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = sample_ddim(predictor, noise, times, eta=1.0, generator=torch.Generator().manual_seed(3))
    start = (torch.zeros(2, dtype=torch.float64), sigma_start**2 * torch.eye(2, dtype=torch.float64))
    assert_moments(x, *ddim_moments(path, times, 1.0, *start))
    # ... and those converge to the data's at first order: the covariance's error halves when the steps double
    truth = marginal(GAUSSIAN, path, t_end)[1]
    bias = [(ddim_moments(path, time_grid(k, t_start, t_end), 1.0, *start)[1] - truth).abs().max().item()
            for k in (100, 200, 400)]
    assert 1.8 < bias[0] / bias[1] < 2.2 and 1.8 < bias[1] / bias[2] < 2.2, bias


def test_ddim_is_dpm_solver_first_order():
    predictor = exact_eps(GAUSSIAN, VPPath())
    noise = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    times = time_grid(1, 1.0, 1e-3)  # one step: DPM-Solver++ uses its first-order update, which is DDIM's
    torch.testing.assert_close(sample_dpm_solver_pp_2m(predictor, noise, times), sample_ddim(predictor, noise, times))


def dpm_solver_pp_2m_on_the_linear_path(x, times):
    """Lu et al. (2022), DPM-Solver++(2M), written out for the linear path (alpha = 1 - t, sigma = t,
    lambda = log((1 - t) / t)) and the exact x0 of GAUSSIAN, E[x0 | x_t] = mu + alpha S (alpha^2 S + sigma^2 I)^-1
    (x_t - alpha mu): first-order (DDIM) first and last steps, as k-diffusion and diffusers do."""
    mu, cov = GAUSSIAN.means[0], GAUSSIAN.covs[0]
    eye = torch.eye(2, dtype=torch.float64)
    grid = times.tolist()
    lam = [math.log((1 - t) / t) for t in grid]
    x0_previous = None
    for i in range(len(grid) - 1):
        a, s = 1 - grid[i], grid[i]
        x0 = mu + (x - a * mu) @ torch.linalg.inv(a**2 * cov + s**2 * eye) @ (a * cov)  # symmetric: right-multiply
        h = lam[i + 1] - lam[i]
        if x0_previous is None or i == len(grid) - 2:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_previous
        x = (grid[i + 1] / s) * x - (1 - grid[i + 1]) * math.expm1(-h) * d
        x0_previous = x0
    return x


def test_dpm_solver_pp_2m_on_the_linear_path_is_lu_et_als_update_and_second_order():
    path = LinearPath()
    predictor = exact_eps(GAUSSIAN, path)
    noise = 0.99 * torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    times = karras_times(path, 12, t_start=0.99, to_zero=False)  # unequal lambda steps: r != 1 at every step
    torch.testing.assert_close(sample_dpm_solver_pp_2m(predictor, noise, times),
                               dpm_solver_pp_2m_on_the_linear_path(noise, times), rtol=1e-12, atol=1e-12)
    # against the exact flow: the error falls ~4x per doubling of the steps (DDIM's ~2x: the 2M branch is what does it)
    error = lambda sampler, n: (sampler(predictor, noise, karras_times(path, n, t_start=0.99))
                                - gaussian_flow(path, noise, 0.99, 0.0)).norm(dim=1).mean().item()
    assert 3.6 < error(sample_dpm_solver_pp_2m, 80) / error(sample_dpm_solver_pp_2m, 160) < 4.4  # measured 4.17
    assert 1.8 < error(sample_ddim, 80) / error(sample_ddim, 160) < 2.2  # measured 2.00


def test_edm_without_churn_is_heun_exactly():
    mixture = ring_mixture()
    x = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    for path, times in ((VPPath(), karras_times(VPPath(), 12)), (VPPath(), time_grid(7, 1.0, 1e-3)),
                        (LinearPath(), karras_times(LinearPath(), 9, t_start=0.99))):
        model = exact_eps(mixture, path)
        heun = edm_heun(model, x * path.sigma(times[:1]).item(), times)
        for knobs in ({"churn": 0.0}, {"churn": 40.0, "churn_max": 0.0}):  # no level gets churned either way
            edm = sample_edm_stochastic(model, x * path.sigma(times[:1]).item(), times,
                                        generator=torch.Generator().manual_seed(19), **knobs)
            assert torch.equal(edm, heun), knobs


def test_edm_with_churn_samples_gaussian_data():
    m, s, n = 1.5, 0.5, 5000
    data, path = GaussianMixture.isotropic([[m]], s), VPPath()
    model = exact_eps(data, path)
    generator = torch.Generator().manual_seed(20)
    one = torch.tensor(1.0, dtype=torch.float64)
    alpha, sigma = path.alpha(one).item(), path.sigma(one).item()  # the exact marginal at t = 1
    x_T = alpha * m + math.sqrt(alpha**2 * s**2 + sigma**2) * torch.randn(n, 1, generator=generator, dtype=torch.float64)
    times = karras_times(path, 96)  # the discretisation bias of the std (~5 % at 32 steps, first order) is ~1 SE here
    x = sample_edm_stochastic(model, x_T, times, generator=generator, churn=40.0)  # gamma = sqrt(2) - 1 at every step
    # standard errors of n = 5000 samples of N(m, s^2): mean s/sqrt(n) = 0.0071, std s/sqrt(2n) = 0.0050; allow 4
    assert abs(x.mean().item() - m) < 4 * s / math.sqrt(n)
    assert abs(x.std().item() - s) < 4 * s / math.sqrt(2 * n)
    heun = edm_heun(model, x_T, times)
    assert (x - heun).abs().mean() > 0.05  # the churn does move the samples (Heun's are a deterministic map)


# ------------------------------------------------------------------ callbacks: every sampler

CALLBACK_CASES = [(name, {}) for name in SAMPLERS] + [
    ("ddim", {"eta": 1.0}), ("ddim", {"clip_x0": True}), ("heun", {"scaled": True}),
    ("ancestral", {"variance": "posterior", "clip_x0": True}), ("predictor-corrector", {"corrector_steps": 2}),
    ("annealed-langevin", {"epsilon": 1e-5, "steps_per_level": 3}),
]


@pytest.mark.parametrize("name,knobs", CALLBACK_CASES,
                         ids=[name + "".join(f",{k}={v}" for k, v in knobs.items()) for name, knobs in CALLBACK_CASES])
def test_callback_sees_every_step_and_changes_nothing(name, knobs):
    sampler = functools.partial(SAMPLERS[name], **knobs)
    model = exact_eps(ring_mixture(), VPPath())
    times = time_grid(4, 1.0, 1e-3)
    grid = times.tolist()
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(20))
    plain = sampler(model, x_T, times, generator=torch.Generator().manual_seed(21))

    steps, generator_states, generator = [], [], torch.Generator().manual_seed(21)

    def callback(step):
        steps.append(step)
        generator_states.append(generator.get_state())

    watched = sampler(model, x_T, times, generator=generator, callback=callback)
    assert torch.equal(watched, plain)  # watching changes nothing
    assert [step.index for step in steps] == [0, 1, 2, 3]
    assert [(step.t, step.t_next) for step in steps] == list(zip(grid[:-1], grid[1:]))
    assert all(step.x0_hat.shape == x_T.shape and bool(torch.isfinite(step.x0_hat).all()) for step in steps)
    assert torch.equal(steps[0].x, x_T)
    # Each step's x is the state the previous steps produced: restarted from it on the rest of the grid, with the
    # generator as it was when that step began, the sampler ends exactly where the whole run ended. (EDM draws its
    # churn noise before it evaluates the model, every other sampler after: its step i begins where step i - 1's
    # callback left the generator.)
    for i, step in enumerate(steps):
        if name == "dpm++2m" and 0 < i < len(steps) - 1:
            continue  # a multistep method: its middle steps use the previous x0_hat (checked below)
        generator = torch.Generator().manual_seed(21)
        if name != "edm":
            generator.set_state(generator_states[i])
        elif i > 0:
            generator.set_state(generator_states[i - 1])
        assert torch.equal(sampler(model, step.x, times[i:], generator=generator), plain), i
    assert all(not torch.equal(a.x, b.x) for a, b in zip(steps, steps[1:]))
    if name == "dpm++2m":  # the 2M update (Lu et al. 2022, Alg. 2) from the recorded states and predictions
        path = VPPath()
        lam = [math.log(path.alpha(torch.tensor(t, dtype=torch.float64)).item()
                        / path.sigma(torch.tensor(t, dtype=torch.float64)).item()) for t in grid]
        assert torch.equal(steps[1].x, sampler(model, x_T, times[:2]))  # first step: no history yet
        for i in range(1, len(steps) - 1):
            h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            r = h_prev / h
            data = (1 + 1 / (2 * r)) * steps[i].x0_hat - (1 / (2 * r)) * steps[i - 1].x0_hat
            t, s = (torch.tensor(v, dtype=torch.float64) for v in grid[i:i + 2])
            expected = (path.sigma(s) / path.sigma(t)) * steps[i].x - path.alpha(s) * math.expm1(-h) * data
            torch.testing.assert_close(steps[i + 1].x, expected)
