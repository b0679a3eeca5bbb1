import math

import pytest
import torch

from diffbook.paths import LinearPath, VEPath, VPPath
from diffbook.toy import GaussianMixture, exact_predictor, ring_mixture


def test_score_is_the_gradient_of_log_prob_in_any_dimension():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    covs = torch.stack([a @ a.T + 0.5 * torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)])
    mix = GaussianMixture(torch.tensor([0.3, 0.7], dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64), covs)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    (autograd_score,) = torch.autograd.grad(mix.log_prob(x).sum(), x)
    assert torch.allclose(mix.score(x), autograd_score, atol=1e-10)


def test_single_gaussian_log_prob_and_score_closed_form():
    mix = GaussianMixture.isotropic([[1.0, -2.0]], 0.5)
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    expected_log_prob = -0.5 * (1 + 4) / 0.25 - math.log(2 * math.pi * 0.25)
    assert mix.log_prob(x).item() == pytest.approx(expected_log_prob)
    assert mix.score(x)[0].tolist() == pytest.approx([4.0, -8.0])  # (mu - x) / s^2


def test_noised_mixture_matches_noised_samples_moments():
    mix = ring_mixture()
    g = torch.Generator().manual_seed(1)
    x0 = mix.sample(200_000, g)
    xt = 0.6 * x0 + 0.8 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    noised = mix.noised(0.6, 0.8)
    assert torch.allclose(xt.mean(0), noised.mean, atol=0.02)
    assert torch.allclose(torch.cov(xt.T), noised.covariance, atol=0.05)
    assert torch.allclose(torch.cov(x0.T), mix.covariance, atol=0.05)


def test_invalid_mixture_shapes_and_weights():
    with pytest.raises(ValueError, match="expected weights"):
        GaussianMixture(torch.ones(2, dtype=torch.float64) / 2, torch.zeros(3, 2, dtype=torch.float64),
                        torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture.isotropic([[0.0], [1.0]], 1.0, weights=[0.5, 0.6])
    with pytest.raises(ValueError, match=r"expected points of shape \(n, 2\)"):
        ring_mixture().score(torch.zeros(4, 3))


def test_posterior_means_agree_with_the_score():
    mixture, x = ring_mixture(), torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    x0, eps = mixture.posterior_means(x, 0.6, 0.8)
    torch.testing.assert_close(-eps / 0.8, mixture.noised(0.6, 0.8).score(x))  # Tweedie
    torch.testing.assert_close(0.6 * x0 + 0.8 * eps, x)


@pytest.mark.parametrize("path", [LinearPath(), VPPath(), VEPath()], ids=["linear", "vp", "ve"])
def test_exact_predictor_is_the_score_of_the_noised_mixture_at_each_samples_time(path):
    mixture = ring_mixture()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    t = torch.tensor([0.2, 0.7, 0.2, 0.45, 0.7, 0.2], dtype=torch.float64)
    expected = torch.empty_like(x)
    for value in t.unique():
        rows = t == value
        alpha, sigma = path.alpha(value).item(), path.sigma(value).item()
        expected[rows] = mixture.noised(alpha, sigma).score(x[rows])
    for kind in ("score", "eps", "x0", "v", "velocity"):  # made in any kind, read as a score
        torch.testing.assert_close(exact_predictor(mixture, path, kind)(x, t, "score"), expected)


def test_mode_weight_tv_null_matches_direct_sampling():
    mixture, g = ring_mixture(), torch.Generator().manual_seed(4)
    null = mixture.mode_weight_tv_null(500, draws=2000, generator=g)
    direct = torch.tensor([mixture.mode_weight_tv(mixture.sample(500, g)) for _ in range(300)], dtype=torch.float64)
    assert null.shape == (2000,) and (null >= 0).all()
    # means agree within 4 standard errors of their difference (300 and 2000 draws)
    se = (direct.var() / 300 + null.var() / 2000).sqrt()
    assert abs(direct.mean() - null.mean()) < 4 * se
    # and the mean is about the normal approximation 1/2 sum_k sqrt(2 w_k (1 - w_k) / (pi n))
    w = mixture.weights
    assert null.mean().item() == pytest.approx(0.5 * (2 * w * (1 - w) / (math.pi * 500)).sqrt().sum().item(), rel=0.1)
