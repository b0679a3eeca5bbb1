"""Interpolants, prediction conversions, ODE samplers and the PF-ODE likelihood, against closed forms."""
import itertools

import pytest
import torch

from diffbook.configs import MNIST_DDPM_SMOKE, MNIST_FM_SMOKE
from diffbook.conversions import KINDS, change_path, convert, from_x0_eps, predictor_from_trained, to_x0_eps
from diffbook.interpolants import LinearInterpolant, VPInterpolant
from diffbook.likelihood import dequantize, density_bits_per_dim, ode_log_likelihood
from diffbook.losses import flow_matching_loss, reflow_loss
from diffbook.ode import euler, heun, straightness, time_grid
from diffbook.schedules import NoiseSchedule
from diffbook.sde import VPSDE, reverse_sde_euler_maruyama
from diffbook.toy import GaussianMixture, exact_predictor, ring_mixture
from diffbook.train import TrainedModel

GAUSSIAN = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1.0, -2.0]], dtype=torch.float64),
                           torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64))


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


def test_conditional_velocity_is_the_time_derivative_of_the_path():
    x0, eps = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for interpolant in (LinearInterpolant(), VPInterpolant()):
        for t in (0.1, 0.5, 0.9):
            h = 1e-6
            numeric = (interpolant.sample(x0, eps, t + h) - interpolant.sample(x0, eps, t - h)) / (2 * h)
            torch.testing.assert_close(interpolant.conditional_velocity(x0, eps, t), numeric, rtol=1e-6, atol=1e-6)


def test_vp_interpolant_is_the_vp_sde_and_matches_ddpm():
    vp, sde = VPInterpolant(), VPSDE()
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp.drift_coef(t), sde.drift_coef(t))
    torch.testing.assert_close(vp.diffusion(t), sde.diffusion(t))
    torch.testing.assert_close(vp.alpha(t), sde.marginal(t)[0])
    schedule = NoiseSchedule.linear(1000)
    k = torch.arange(1, 1001)
    relative = (vp.alpha(k / 1000) / schedule.signal[k] - 1).abs()
    assert relative[:500].max() < 0.01 and relative.max() < 0.06


def test_posterior_means_agree_with_the_score():
    mixture, x = ring_mixture(), torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    x0, eps = mixture.posterior_means(x, 0.6, 0.8)
    torch.testing.assert_close(-eps / 0.8, mixture.noised(0.6, 0.8).score(x))  # Tweedie
    torch.testing.assert_close(0.6 * x0 + 0.8 * eps, x)


@pytest.mark.parametrize("interpolant", [LinearInterpolant(), VPInterpolant()])
def test_exact_velocity_transports_noise_to_the_gaussian(interpolant):
    z = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t_end = 0.0 if isinstance(interpolant, LinearInterpolant) else 1e-3  # the VP velocity is singular at t = 0
    x = heun(exact_predictor(GAUSSIAN, interpolant).velocity, z, time_grid(100, 1.0, t_end))
    assert (x.mean(0) - GAUSSIAN.mean).abs().max() < 0.03
    assert (torch.cov(x.T) - GAUSSIAN.covariance).abs().max() < 0.05


def test_heun_is_second_order_and_euler_first():
    predictor, z = exact_predictor(GAUSSIAN, LinearInterpolant()), torch.randn(500, 2, dtype=torch.float64)
    reference = heun(predictor.velocity, z, time_grid(400))
    error = lambda sampler, n: (sampler(predictor.velocity, z, time_grid(n)) - reference).norm(dim=1).mean().item()
    assert 1.6 < error(euler, 10) / error(euler, 20) < 2.4
    assert 3.2 < error(heun, 10) / error(heun, 20) < 4.8


def test_likelihood_of_gaussian_data_is_its_log_density():
    predictor, x0 = exact_predictor(GAUSSIAN, LinearInterpolant()), GAUSSIAN.sample(200, torch.Generator().manual_seed(4))
    exact = GAUSSIAN.log_prob(x0)
    error_50 = (ode_log_likelihood(predictor.velocity, x0, n_steps=50) - exact).abs().max()
    error_200 = (ode_log_likelihood(predictor.velocity, x0, n_steps=200) - exact).abs().max()
    assert error_50 < 5e-3 and error_50 / error_200 > 10
    hutchinson = ode_log_likelihood(predictor.velocity, x0, n_steps=50, divergence="hutchinson",
                                    generator=torch.Generator().manual_seed(5)) - exact
    assert abs(hutchinson.mean()) < 3 * hutchinson.std() / len(x0) ** 0.5 + 5e-3  # unbiased
    assert hutchinson.abs().max() > 1e-2  # ... but noisy, unlike the exact trace


def test_reverse_sde_on_the_linear_path_samples_the_gaussian():
    interpolant = LinearInterpolant()
    z = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = reverse_sde_euler_maruyama(interpolant, exact_predictor(GAUSSIAN, interpolant).score, z * 0.999, 400,
                                   torch.Generator().manual_seed(7), t_end=1e-3, t_start=0.999)
    assert (x.mean(0) - GAUSSIAN.mean).abs().max() < 0.05
    assert (torch.cov(x.T) - GAUSSIAN.covariance).abs().max() < 0.1


def test_straightness_is_zero_only_for_straight_constant_speed_paths():
    times = time_grid(10)
    line = [torch.tensor([[1.0, 2.0]]) * t.item() for t in times]
    curve = [torch.tensor([[torch.sin(3 * t).item(), t.item()]]) for t in times]
    assert straightness(line, times).item() == pytest.approx(0, abs=1e-12)
    assert straightness(curve, times).item() > 0.1


def test_flow_matching_loss_prefers_the_exact_velocity():
    schedule = NoiseSchedule.linear(1000)
    x0 = GAUSSIAN.sample(100_000, torch.Generator().manual_seed(8))
    mu, cov = GAUSSIAN.means[0], GAUSSIAN.covs[0]

    def net(x, t_scaled, y=None):  # the exact velocity, each sample at its own time
        t = t_scaled.double() / 1000
        alpha, sigma = (1 - t)[:, None, None], t[:, None, None]
        solved = torch.linalg.solve(alpha**2 * cov + sigma**2 * torch.eye(2), (x - alpha[..., 0] * mu).unsqueeze(-1))
        x0, eps = mu + (alpha * cov @ solved).squeeze(-1), (sigma * solved).squeeze(-1)
        return eps - x0

    shifted = lambda x, t_scaled, y=None: net(x, t_scaled) + 0.1
    loss = lambda f: flow_matching_loss(f, x0, schedule, torch.Generator().manual_seed(9)).item()
    assert loss(net) < loss(shifted)
    # E|u + c - target|^2 = E|u - target|^2 + c^2 because E[target | x_t] = u: the gap is 0.1^2 (Monte Carlo se ~7e-4)
    assert loss(shifted) - loss(net) == pytest.approx(0.01, abs=2.5e-3)
    with pytest.raises(ValueError, match="pairs of shape"):
        reflow_loss(net, x0, schedule, torch.Generator())


def test_predictor_from_a_trained_model_reads_its_path():
    for config, kind, interpolant in ((MNIST_DDPM_SMOKE, "eps", VPInterpolant(0.1, 20.0)),
                                      (MNIST_FM_SMOKE, "velocity", LinearInterpolant())):
        net = config.build_net().eval()
        predictor = predictor_from_trained(TrainedModel(net, config, {}, []))
        assert predictor.kind == kind and predictor.interpolant == interpolant
        x, t = torch.randn(3, 1, 28, 28), torch.tensor([0.2, 0.5, 0.8])
        with torch.no_grad():  # the network sees T t
            torch.testing.assert_close(predictor(x, t, kind), net(x, 1000 * t))


def test_dequantised_bits_per_dim_of_a_uniform_density_is_eight():
    images = torch.randint(0, 256, (4, 10), dtype=torch.uint8)
    x = dequantize(images, torch.Generator().manual_seed(0))
    assert ((x - (images.float() / 127.5 - 1)).abs() <= 1 / 255 + 1e-6).all()
    uniform_log_density = torch.full((4,), 10 * torch.log(torch.tensor(255 / 256 / 2)).item(), dtype=torch.float64)
    torch.testing.assert_close(density_bits_per_dim(uniform_log_density, 10), torch.full((4,), 8.0, dtype=torch.float64))


def test_changing_path_keeps_the_model():
    for old, new in ((VPInterpolant(), LinearInterpolant()), (LinearInterpolant(), VPInterpolant())):
        t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
        torch.testing.assert_close(old.time_of_ratio(old.sigma(t) / old.alpha(t)), t)
        moved = change_path(exact_predictor(GAUSSIAN, old), new)
        x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10)) * 2
        for t_value, kind in itertools.product((0.1, 0.5, 0.9), ("eps", "velocity", "score")):  # one time per batch
            torch.testing.assert_close(moved(x, t_value, kind), exact_predictor(GAUSSIAN, new)(x, t_value, kind))
