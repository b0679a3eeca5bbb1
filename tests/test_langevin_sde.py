import math

import pytest
import torch

from diffbook.langevin import annealed_langevin, langevin
from diffbook.losses import denoising_score_matching_loss
from diffbook.schedules import NoiseSchedule
from diffbook.sde import (SubVPSDE, VESDE, VPSDE, predictor_corrector, probability_flow_euler,
                          reverse_sde_euler_maruyama)
from diffbook.toy import GaussianMixture, ring_mixture

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.6, 0.25], [0.25, 0.4]], dtype=torch.float64)
GAUSS = GaussianMixture(torch.ones(1, dtype=torch.float64), MU[None], SIGMA[None])


def mode_weights(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(mixture.responsibilities(x).argmax(1), minlength=len(mixture.weights))
    return counts / counts.sum()


def test_langevin_with_exact_score_matches_target_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8000, 2, generator=g, dtype=torch.float64) * 3
    x = langevin(GAUSS.score, x, step_size=0.01, n_steps=1500, generator=g)
    assert torch.allclose(x.mean(0), MU, atol=0.03)
    assert torch.allclose(torch.cov(x.T), SIGMA, atol=0.03)  # step-size bias is O(step) ~ 0.3% here


def test_annealed_langevin_recovers_mode_weights_of_separated_modes():
    mix, g = ring_mixture(), torch.Generator().manual_seed(1)
    sigmas = torch.logspace(math.log10(8.0), math.log10(0.05), 20).tolist()
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64) * 8
    x = annealed_langevin(lambda v, s: mix.noised(1.0, s).score(v), x, sigmas, epsilon=2e-3, steps_per_level=60,
                          generator=g)
    total_variation = 0.5 * (mode_weights(mix, x) - mix.weights).abs().sum().item()
    assert total_variation < 0.05
    with pytest.raises(ValueError, match="strictly decreasing"):
        annealed_langevin(mix.score, x, [0.1, 1.0], 1e-3, 1)


def _vp_exact_score(sde, data: GaussianMixture):
    def score(x, t):
        mean_coef, std = sde.marginal(t[:1])
        return data.noised(mean_coef.item(), std.item()).score(x)
    return score


@pytest.mark.parametrize("sampler", ["em", "pf_ode", "pc"])
def test_reverse_processes_with_exact_score_return_gaussian_data(sampler):
    sde, g = VPSDE(), torch.Generator().manual_seed(2)
    x = torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    score = _vp_exact_score(sde, GAUSS)
    if sampler == "em":
        x = reverse_sde_euler_maruyama(sde, score, x, 500, g)
    elif sampler == "pf_ode":
        x = probability_flow_euler(sde, score, x, 500)
    else:
        x = predictor_corrector(sde, score, x, 200, g)
    assert torch.allclose(x.mean(0), MU, atol=0.03)
    assert torch.allclose(torch.cov(x.T), SIGMA, atol=0.04)


def test_sde_marginals():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    m, s = VPSDE().marginal(t)
    assert (m**2 + s**2).tolist() == pytest.approx([1.0, 1.0, 1.0])  # variance preserving for unit data
    m_sub, s_sub = SubVPSDE().marginal(t)
    assert torch.all(s_sub <= s) and torch.equal(m_sub, m)
    assert VESDE().marginal(t)[1][-1].item() == pytest.approx(math.sqrt(50.0**2 - 0.01**2))
    # VP with beta in [0.1, 20] is the continuous limit of DDPM's linear schedule: m(t)^2 ~ alpha_bar at t = i/T
    abar = NoiseSchedule.linear(1000).alpha_bar
    for i in (100, 500, 1000):
        m_i = VPSDE().marginal(torch.tensor(i / 1000.0, dtype=torch.float64))[0].item()
        assert abs(2 * math.log(m_i) - math.log(abar[i].item())) < 0.1


def test_dsm_loss_is_minimised_by_the_score_of_the_noised_data():
    mix, g = ring_mixture(), torch.Generator().manual_seed(3)
    x0 = mix.sample(50_000, g)
    sigma = 0.7
    exact = lambda x, s: mix.noised(1.0, s).score(x)
    losses = {scale: denoising_score_matching_loss(lambda x, s: scale * exact(x, s), x0, sigma,
                                                   torch.Generator().manual_seed(4)).item()
              for scale in (0.9, 1.0, 1.1)}
    assert losses[1.0] < losses[0.9] and losses[1.0] < losses[1.1]
