"""Unadjusted Langevin dynamics (diffbook.langevin) for one fixed density. (Its annealed form is a sampler:
tests/test_samplers.py.)"""
import pytest
import torch

from diffbook.langevin import langevin
from diffbook.toy import GaussianMixture

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.6, 0.25], [0.25, 0.4]], dtype=torch.float64)
GAUSS = GaussianMixture(torch.ones(1, dtype=torch.float64), MU[None], SIGMA[None])


def test_langevin_with_exact_score_matches_target_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8000, 2, generator=g, dtype=torch.float64) * 3
    x = langevin(GAUSS.score, x, step_size=0.01, n_steps=1500, generator=g)
    assert torch.allclose(x.mean(0), MU, atol=0.03)
    assert torch.allclose(torch.cov(x.T), SIGMA, atol=0.03)  # step-size bias is O(step) ~ 0.3% here


def test_langevin_rejects_a_bad_step():
    with pytest.raises(ValueError, match="step_size > 0"):
        langevin(GAUSS.score, torch.zeros(2, 2, dtype=torch.float64), step_size=0.0, n_steps=1)
