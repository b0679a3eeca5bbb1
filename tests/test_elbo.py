import math

import pytest
import torch

from diffbook.predictors import Predictor
from diffbook.elbo import bits_per_dim, ddpm_bound_terms, discretized_gaussian_log_likelihood, gaussian_kl
from diffbook.schedules import NoiseSchedule


def test_gaussian_kl_matches_torch_distributions():
    mq, mp = torch.tensor([0.3, -1.0]), torch.tensor([-0.2, 2.0])
    vq, vp = torch.tensor([0.25, 2.0]), torch.tensor([0.64, 0.5])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mq, vq.sqrt()),
                                                 torch.distributions.Normal(mp, vp.sqrt()))
    assert torch.allclose(gaussian_kl(mq, vq, mp, vp), expected, atol=1e-6)
    assert gaussian_kl(mq, 0.3, mq, 0.3).abs().max() < 1e-7


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, std in [(0.0, 0.1), (0.95, 0.02), (-1.3, 0.5)]:
        probs = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), std).exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def zero_eps(schedule: NoiseSchedule) -> Predictor:
    return Predictor(lambda x, t: torch.zeros_like(x), "eps", schedule.path())


def test_bound_terms_prior_term_has_closed_form_and_bound_is_finite():
    schedule = NoiseSchedule.linear(T=50)
    x0 = torch.zeros(3, 1, 4, 4)
    terms = ddpm_bound_terms(zero_eps(schedule), schedule, x0, torch.Generator().manual_seed(0))
    assert terms.shape == (3, 51) and torch.isfinite(terms).all() and (terms[:, 1:] >= 0).all()
    abar_T = schedule.alpha_bar[-1].item()  # KL(N(0, 1 - abar) || N(0, 1)) per pixel, x0 = 0
    expected = 16 * 0.5 * (-math.log(1 - abar_T) + (1 - abar_T) - 1)
    assert terms[:, -1].tolist() == pytest.approx([expected] * 3, rel=1e-5)
    assert bits_per_dim(torch.tensor(16 * math.log(2)), 16).item() == pytest.approx(1.0)
