"""Exact log-likelihood through the probability-flow ODE (diffbook.likelihood) against closed-form densities."""
import torch

from diffbook.likelihood import dequantize, density_bits_per_dim, ode_log_likelihood
from diffbook.paths import LinearPath
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


def test_dequantised_bits_per_dim_of_a_uniform_density_is_eight():
    images = torch.randint(0, 256, (4, 10), dtype=torch.uint8)
    x = dequantize(images, torch.Generator().manual_seed(0))
    assert ((x - (images.float() / 127.5 - 1)).abs() <= 1 / 255 + 1e-6).all()
    uniform_log_density = torch.full((4,), 10 * torch.log(torch.tensor(255 / 256 / 2)).item(), dtype=torch.float64)
    torch.testing.assert_close(density_bits_per_dim(uniform_log_density, 10), torch.full((4,), 8.0, dtype=torch.float64))
