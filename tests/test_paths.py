"""Noise paths (diffbook.paths) against their closed forms: marginals, inverses, derivatives, SDEs, and the
DiscretePath of a DDPM schedule."""
import math

import pytest
import torch

from diffbook.paths import CosinePath, DiscretePath, LinearPath, SubVPPath, VEPath, VPPath
from diffbook.schedules import NoiseSchedule

CONTINUOUS = [LinearPath(), VPPath(), SubVPPath(), VEPath(), CosinePath()]
SCHEDULES = {"linear": NoiseSchedule.linear(1000), "cosine": NoiseSchedule.cosine(1000)}


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def central_difference(fn, t, h):
    return (fn(t + h) - fn(t - h)) / (2 * h)


# ------------------------------------------------------------------ continuous paths

@pytest.mark.parametrize("path", CONTINUOUS, ids=lambda p: type(p).__name__)
def test_conditional_velocity_is_the_time_derivative_of_the_path(path):
    x0, eps = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (0.1, 0.5, 0.9):
        h = 1e-6
        numeric = (path.sample(x0, eps, t + h) - path.sample(x0, eps, t - h)) / (2 * h)
        torch.testing.assert_close(path.conditional_velocity(x0, eps, t), numeric, rtol=1e-6, atol=1e-6)


def test_vp_path_is_the_vp_sde_and_matches_ddpm():
    vp = VPPath()
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    beta, integral = 0.1 + t * (20.0 - 0.1), 0.1 * t + 0.5 * (20.0 - 0.1) * t**2  # Song et al.'s VP SDE, by hand
    f, g2 = vp.sde_coefficients(t)
    torch.testing.assert_close(f, -0.5 * beta)  # drift coefficient
    torch.testing.assert_close(g2.clamp_min(0).sqrt(), beta.sqrt())  # diffusion g
    torch.testing.assert_close(vp.alpha(t), torch.exp(-0.5 * integral))  # marginal mean coefficient
    schedule = NoiseSchedule.linear(1000)
    k = torch.arange(1, 1001)
    relative = (vp.alpha(k.double() / 1000) / schedule.signal[k] - 1).abs()
    assert relative[:500].max() < 0.01 and relative.max() < 0.06


def test_sde_marginals():
    t = f64(0.0, 0.3, 1.0)
    vp, sub_vp, ve = VPPath(), SubVPPath(), VEPath()
    m, s = vp.alpha(t), vp.sigma(t)
    assert (m**2 + s**2).tolist() == pytest.approx([1.0, 1.0, 1.0])  # variance preserving for unit data
    m_sub, s_sub = sub_vp.alpha(t), sub_vp.sigma(t)
    assert torch.all(s_sub <= s) and torch.equal(m_sub, m)
    assert ve.sigma(t)[-1].item() == pytest.approx(math.sqrt(50.0**2 - 0.01**2))
    # VP with beta in [0.1, 20] is the continuous limit of DDPM's linear schedule: m(t)^2 ~ alpha_bar at t = i/T
    abar = NoiseSchedule.linear(1000).alpha_bar
    for i in (100, 500, 1000):
        m_i = vp.alpha(torch.tensor(i / 1000.0, dtype=torch.float64)).item()
        assert abs(2 * math.log(m_i) - math.log(abar[i].item())) < 0.1


@pytest.mark.parametrize("path", CONTINUOUS, ids=lambda p: type(p).__name__)
def test_time_of_ratio_and_of_log_snr_invert_the_path(path):
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    torch.testing.assert_close(path.time_of_ratio(path.ratio(t)), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(path.time_of_log_snr(path.log_snr(t)), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(path.ratio(t), path.sigma(t) / path.alpha(t))
    assert bool((path.log_snr(t)[1:] < path.log_snr(t)[:-1]).all())  # noise grows with t
    assert abs(path.time_of_ratio(f64(0.0)).item()) < 1e-12 and path.alpha(f64(0.0)).item() == 1  # clean data at t = 0


@pytest.mark.parametrize("path", CONTINUOUS, ids=lambda p: type(p).__name__)
def test_sde_has_the_paths_marginals(path):
    """x_t = alpha_t x0 + sigma_t eps is the marginal of dx = f x dt + g dW iff d alpha/dt = f alpha and
    d sigma^2/dt = 2 f sigma^2 + g^2; checked with finite differences of alpha and sigma alone."""
    t, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64), 1e-6
    f, g2 = path.sde_coefficients(t)
    d_alpha = central_difference(path.alpha, t, h)
    d_var = central_difference(lambda s: path.sigma(s) ** 2, t, h)
    torch.testing.assert_close(d_alpha, f * path.alpha(t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d_var, 2 * f * path.sigma(t) ** 2 + g2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(path.d_alpha(t), d_alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(path.d_sigma(t), central_difference(path.sigma, t, h), rtol=1e-6, atol=1e-7)
    assert bool((g2 > 0).all())


def test_sde_diffusions_are_song_et_als_closed_forms():
    t = torch.linspace(0.01, 1, 40, dtype=torch.float64)
    beta = 0.1 + t * (20.0 - 0.1)
    integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2
    torch.testing.assert_close(VPPath().sde_coefficients(t)[1], beta)
    torch.testing.assert_close(SubVPPath().sde_coefficients(t)[1], beta * (1 - torch.exp(-2 * integral)))
    torch.testing.assert_close(SubVPPath().sde_coefficients(t)[0], -0.5 * beta)
    s = 0.01 * (50.0 / 0.01) ** t  # VE: g^2 = d s_t^2 / dt = 2 s_t^2 log(sigma_max / sigma_min)
    f, g2 = VEPath().sde_coefficients(t)
    torch.testing.assert_close(g2, 2 * s**2 * math.log(50.0 / 0.01))
    assert torch.equal(f, torch.zeros_like(t))
    torch.testing.assert_close(LinearPath().sde_coefficients(t[:-1])[1], 2 * t[:-1] / (1 - t[:-1]))  # 2t + 2t^2/(1-t)


# ------------------------------------------------------------------ the DiscretePath of a DDPM schedule

@pytest.mark.parametrize("name", list(SCHEDULES))
def test_discrete_path_is_the_schedule_at_every_step(name):
    schedule = SCHEDULES[name]
    path = schedule.path()
    assert isinstance(path, DiscretePath) and path.T == schedule.T
    t = torch.arange(schedule.T + 1, dtype=torch.float64) / schedule.T
    assert torch.equal(path.alpha(t), schedule.signal)  # alpha(k/T)^2 = alpha_bar_k, to the bit
    assert torch.equal(path.sigma(t), schedule.noise)
    for k in (0, 1, 2, 17, 500, 999, 1000):  # one step at a time, too
        tk = torch.tensor(k / schedule.T, dtype=torch.float64)
        assert path.alpha(tk).item() == schedule.signal[k].item() and path.sigma(tk).item() == schedule.noise[k].item()
    torch.testing.assert_close(path.log_snr(t[1:]), schedule.log_snr[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_discrete_time_of_ratio_inverts_ratio_everywhere(name):
    path = SCHEDULES[name].path()
    T = path.T
    steps = torch.arange(1, T + 1, dtype=torch.float64) / T
    between = (torch.arange(1, T, dtype=torch.float64) + f64(0.37, 0.5, 0.91).repeat(T)[: T - 1]) / T
    below = f64(1e-5, 0.3, 0.5, 0.7, 0.999) / T  # the first segment, where sigma^2 (not the log-SNR) is linear
    beyond = 1 + f64(0.5, 1.0, 3.0) / T  # past the last step, the log-SNR continues with the last slope
    for t in (steps, between, below, beyond):
        ratio = path.ratio(t)
        assert bool(torch.isfinite(ratio).all())
        assert (path.time_of_ratio(ratio) - t).abs().max().item() < 1e-12
    assert path.time_of_ratio(f64(0.0)).item() == 0
    assert bool((path.ratio(beyond) > path.ratio(f64(1.0))).all())  # more noise than the schedule ever had


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_discrete_derivatives_are_finite_differences_inside_segments(name):
    path = SCHEDULES[name].path()
    T = path.T
    for k in (0, 1, 10, 250, 700, 998):  # segment (k/T, (k+1)/T); k = 0 is the first one
        t = (k + torch.tensor([0.25, 0.5, 0.8], dtype=torch.float64)) / T
        h = 1e-4 / T
        torch.testing.assert_close(path.d_alpha(t), central_difference(path.alpha, t, h), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(path.d_sigma(t), central_difference(path.sigma, t, h), rtol=1e-6, atol=1e-9)
        f, g2 = path.sde_coefficients(t)  # and the SDE with these marginals
        d_var = central_difference(lambda s: path.sigma(s) ** 2, t, h)
        torch.testing.assert_close(d_var, 2 * f * path.sigma(t) ** 2 + g2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_discrete_log_snr_is_linear_between_steps(name):
    schedule = SCHEDULES[name]
    path, lam = schedule.path(), schedule.log_snr
    for k in (1, 2, 100, 500, 999):
        for w in (0.5, 0.2):
            t = torch.tensor((k + w) / schedule.T, dtype=torch.float64)
            expected = (1 - w) * lam[k] + w * lam[k + 1]
            assert path.log_snr(t).item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-10)
    # on the first segment sigma^2 is linear from 0 to 1 - alpha_bar_1
    t = torch.tensor(0.5 / schedule.T, dtype=torch.float64)
    assert path.sigma(t).item() ** 2 == pytest.approx(0.5 * (1 - schedule.alpha_bar[1].item()), rel=1e-10)


@pytest.mark.parametrize("alpha_bar", [
    torch.ones(2, 3, dtype=torch.float64),  # not 1-D
    f64(1.0),  # no step
    f64(0.9, 0.5),  # alpha_bar_0 must be 1
    f64(1.0, 0.5, 0.5),  # not strictly decreasing
    f64(1.0, 0.5, 0.7),  # increasing
    f64(1.0, 0.5, 0.0),  # reaches 0
    f64(1.0, 0.5, -0.1),
])
def test_discrete_path_rejects_bad_alpha_bar(alpha_bar):
    with pytest.raises(ValueError, match="alpha_bar"):
        DiscretePath(alpha_bar)
