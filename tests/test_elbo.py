import math

import pytest
import torch

from diffbook.predictors import Predictor
from diffbook.elbo import (BoundEstimate, bits_per_dim, ddpm_bound_estimate, ddpm_bound_terms,
                           discretized_gaussian_log_likelihood, gaussian_kl, geometric_strata)
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


def shrink_eps(schedule: NoiseSchedule) -> Predictor:
    """A crude ε-model, x_t scaled by the noise level: good at large t, poor at small t (terms vary with t)."""
    return Predictor(lambda x, t: x * (1 - t[:, None, None, None]) ** 0.5, "eps", schedule.path())


def test_bound_terms_are_the_kl_of_posterior_and_model_at_the_drawn_x_t():
    schedule = NoiseSchedule.linear(T=50)
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = shrink_eps(schedule)
    terms = ddpm_bound_terms(model, schedule, x0, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    torch.randn(x0.shape, generator=generator)  # x_1's noise (the decoder term); then one draw per t = 2, 3, ...
    t, noise = 2, torch.randn(x0.shape, generator=generator)
    abar, beta = schedule.alpha_bar, schedule.beta
    x_t = abar[t].sqrt().float() * x0 + (1 - abar[t]).sqrt().float() * noise
    eps = model(x_t, t / schedule.T, "eps")
    mean_p = (x_t - beta[t] / (1 - abar[t]).sqrt() * eps) / (1 - beta[t]).sqrt()
    mean_q = (abar[t - 1].sqrt() * beta[t] * x0 + (1 - beta[t]).sqrt() * (1 - abar[t - 1]) * x_t) / (1 - abar[t])
    var_q = beta[t] * (1 - abar[t - 1]) / (1 - abar[t])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean_q, var_q.sqrt()),
                                                 torch.distributions.Normal(mean_p, beta[t].sqrt())).sum((1, 2, 3))
    torch.testing.assert_close(terms[:, t - 1], expected.double(), rtol=1e-4, atol=1e-5)


def test_stratified_bound_estimate_is_unbiased():
    schedule = NoiseSchedule.linear(T=40)
    x0 = (torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1).repeat(4000, 1, 1, 1)
    model = shrink_eps(schedule)
    full = ddpm_bound_terms(model, schedule, x0, torch.Generator().manual_seed(3)).sum(1)
    strat = ddpm_bound_estimate(model, schedule, x0, torch.Generator().manual_seed(4), n_strata=5).total()
    difference = strat.mean() - full.mean()
    sem = (strat.var() / len(strat) + full.var() / len(full)).sqrt()
    assert abs(difference) < 4 * sem, (difference, sem)


def test_geometric_strata_partition_the_kl_steps():
    for T, n in [(1000, 1), (1000, 40), (1000, 999), (1000, 5000), (3, 5)]:
        strata = geometric_strata(T, n)
        assert strata[0][0] == 2 and strata[-1][1] == T and len(strata) == min(n, T - 1)
        assert all(a <= b and b + 1 == c for (a, b), (c, _) in zip(strata, strata[1:]))


def test_single_steps_until_is_where_the_strata_stop_being_single_steps():
    def until(strata) -> int:
        empty = torch.zeros(0)
        return BoundEstimate(empty, empty, empty, empty, tuple(strata)).single_steps_until

    for T, n in [(1000, 40), (1000, 100), (1000, 999)]:
        strata = geometric_strata(T, n)
        expected = max(first for first, last in strata if first == last and all(
            a == b for a, b in strata[: strata.index((first, last)) + 1]))
        assert until(strata) == expected
    assert until(geometric_strata(1000, 100)) == 54 and until(geometric_strata(1000, 40)) == 14
    assert until(geometric_strata(1000, 999)) == 1000  # every step its own stratum
    assert until([(2, 5), (6, 6)]) == 1  # the first stratum is wide: no step is a stratum of its own
    assert until([(2, 2), (3, 3), (4, 9), (10, 10)]) == 3  # a lone single step later on does not count

