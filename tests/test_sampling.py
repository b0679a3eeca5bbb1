import pytest
import torch
from torch import nn

from diffbook.nets import UNet, UNetConfig
from diffbook.sampling import ddpm_steps, ddpm_timesteps, sample_ddpm
from diffbook.schedules import NoiseSchedule


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


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_sampling_with_exact_eps_returns_the_data_distribution(variance):
    schedule = NoiseSchedule.linear(T=1000)
    model = ExactGaussianEps(schedule, mu=0.5, s=0.3)
    x = sample_ddpm(model, schedule, (40_000, 1), generator=torch.Generator().manual_seed(0),
                    variance=variance, clip_x0=False)
    assert x.mean().item() == pytest.approx(0.5, abs=0.01)
    assert x.std().item() == pytest.approx(0.3, abs=0.015)


def test_sampler_smoke_on_a_tiny_net_is_seeded_and_yields_every_step():
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=()))
    schedule = NoiseSchedule.linear(T=1000)
    a = sample_ddpm(net, schedule, (2, 1, 28, 28), steps=10, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(net, schedule, (2, 1, 28, 28), steps=10, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 1, 28, 28) and torch.equal(a, b)
    x_T = torch.randn(2, 1, 28, 28)
    steps = list(ddpm_steps(net, schedule, x_T, steps=10, generator=torch.Generator().manual_seed(3)))
    assert [s.t for s in steps] == ddpm_timesteps(1000, 10)[::-1]
    assert all(s.x0_hat.abs().max() <= 1 for s in steps)  # clipped to the data range


def test_timesteps_and_invalid_arguments():
    assert ddpm_timesteps(1000, None) == list(range(1, 1001))
    assert ddpm_timesteps(1000, 4) == [1, 334, 667, 1000]
    assert ddpm_timesteps(1000, 1) == [1000]
    with pytest.raises(ValueError, match="steps must lie in 1..1000"):
        ddpm_timesteps(1000, 0)
    with pytest.raises(ValueError, match="variance must be"):
        next(ddpm_steps(nn.Identity(), NoiseSchedule.linear(10), torch.zeros(1, 2), variance="learned"))
