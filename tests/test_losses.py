"""Training objectives (diffbook.losses) are minimised by the exact fields."""
import pytest
import torch

from diffbook.losses import denoising_score_matching_loss, flow_matching_loss, reflow_loss
from diffbook.schedules import NoiseSchedule
from diffbook.toy import GaussianMixture, ring_mixture

GAUSSIAN = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1.0, -2.0]], dtype=torch.float64),
                           torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64))


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
        reflow_loss(net, x0, schedule, torch.Generator().manual_seed(10))


def test_dsm_loss_is_minimised_by_the_score_of_the_noised_data():
    mix, g = ring_mixture(), torch.Generator().manual_seed(3)
    x0 = mix.sample(50_000, g)
    sigma = 0.7
    exact = lambda x, s: mix.noised(1.0, s).score(x)
    losses = {scale: denoising_score_matching_loss(lambda x, s: scale * exact(x, s), x0, sigma,
                                                   torch.Generator().manual_seed(4)).item()
              for scale in (0.9, 1.0, 1.1)}
    assert losses[1.0] < losses[0.9] and losses[1.0] < losses[1.1]


def test_logit_normal_times_have_the_logit_normal_quantiles():
    from diffbook.checks import binomial_sem
    from diffbook.losses import logit_normal_times, uniform_times
    n = 20_000
    t = logit_normal_times(n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and bool(((t > 0) & (t < 1)).all())
    # P(t < sigmoid(1)) = P(n < 1) = Phi(1)
    fraction = float((t < torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))).double().mean())
    assert abs(fraction - 0.8413447460685429) < 4 * binomial_sem(0.8413447460685429, n)
    u = uniform_times(n, torch.Generator().manual_seed(0))
    middle = lambda x: float(((x > 0.25) & (x < 0.75)).double().mean())  # noqa: E731
    assert middle(t) > middle(u) + 4 * binomial_sem(0.5, n)  # more training times mid-path than uniform
