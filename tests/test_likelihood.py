"""Exact log-likelihood through the probability-flow ODE (diffbook.likelihood) against closed-form densities."""
import torch

from diffbook.likelihood import dequantize, density_bits_per_dim, ode_log_likelihood
from diffbook.paths import LinearPath
from diffbook.samplers import time_grid
from diffbook.toy import GaussianMixture, exact_predictor

GAUSSIAN = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1.0, -2.0]], dtype=torch.float64),
                           torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64))


def test_likelihood_of_gaussian_data_is_its_log_density():
    predictor, x0 = exact_predictor(GAUSSIAN, LinearPath()), GAUSSIAN.sample(200, torch.Generator().manual_seed(4))
    exact = GAUSSIAN.log_prob(x0)
    error_50 = (ode_log_likelihood(predictor, x0, n_steps=50) - exact).abs().max()
    error_200 = (ode_log_likelihood(predictor, x0, n_steps=200) - exact).abs().max()
    assert error_50 < 5e-3 and error_50 / error_200 > 10
    hutchinson = ode_log_likelihood(predictor, x0, n_steps=50, divergence="hutchinson",
                                    generator=torch.Generator().manual_seed(5)) - exact
    assert abs(hutchinson.mean()) < 3 * hutchinson.std() / len(x0) ** 0.5 + 5e-3  # unbiased
    assert hutchinson.abs().max() > 1e-2  # ... but noisy, unlike the exact trace


def test_likelihood_on_its_own_time_grid_is_the_density_of_the_noised_data():
    """With ``times`` the ODE runs on that grid, from its first time: log p_t(x) of the data noised to t = 0.3, whose
    density is exact (GAUSSIAN.noised), on a grid that is finer near t = 0.3 than near 1."""
    predictor, noised = exact_predictor(GAUSSIAN, LinearPath()), GAUSSIAN.noised(0.7, 0.3)  # alpha = 1 - t, sigma = t
    x = noised.sample(200, torch.Generator().manual_seed(6))
    exact = noised.log_prob(x)
    grid = lambda n: 0.3 + 0.7 * torch.linspace(0, 1, n + 1, dtype=torch.float64) ** 2
    on_grid = {n: ode_log_likelihood(predictor, x, times=grid(n)) for n in (20, 40)}
    error_20, error_40 = ((on_grid[n] - exact).abs().max().item() for n in (20, 40))
    assert error_40 < 5e-3 and 3.6 < error_20 / error_40 < 4.4  # Heun's second order on this grid (measured 3.2e-3, 3.98)
    uniform = ode_log_likelihood(predictor, x, n_steps=40, t_start=0.3)  # the same number of steps, spaced evenly
    assert (uniform - on_grid[40]).abs().max() > 1e-4  # the grid given is the grid used ...
    assert torch.equal(ode_log_likelihood(predictor, x, n_steps=5, times=time_grid(40, 0.3, 1.0)), uniform)  # ... whatever n_steps


def test_dequantised_bits_per_dim_of_a_uniform_density_is_eight():
    images = torch.randint(0, 256, (4, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = dequantize(images, torch.Generator().manual_seed(0))
    assert ((x - (images.float() / 127.5 - 1)).abs() <= 1 / 255 + 1e-6).all()
    uniform_log_density = torch.full((4,), 10 * torch.log(torch.tensor(255 / 256 / 2)).item(), dtype=torch.float64)
    torch.testing.assert_close(density_bits_per_dim(uniform_log_density, 10), torch.full((4,), 8.0, dtype=torch.float64))
