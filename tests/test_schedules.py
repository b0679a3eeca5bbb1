import math

import pytest
import sympy as sp
import torch

from diffbook.schedules import NoiseSchedule, cosine_betas, expand, linear_betas


def test_linear_schedule_endpoints_and_alpha_bar_by_hand():
    s = NoiseSchedule.linear(T=1000)
    assert s.T == 1000 and s.beta[0] == 0
    assert s.beta[1].item() == pytest.approx(1e-4) and s.beta[1000].item() == pytest.approx(0.02)
    # beta_2 = 1e-4 + (0.02 - 1e-4)/999
    assert s.beta[2].item() == pytest.approx(1e-4 + 0.0199 / 999, rel=1e-12)
    assert s.alpha_bar[2].item() == pytest.approx((1 - 1e-4) * (1 - 1e-4 - 0.0199 / 999), rel=1e-12)
    assert s.alpha_bar[1000].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_three_step_schedule_all_quantities_by_hand():
    s = NoiseSchedule.from_betas(torch.tensor([0.1, 0.2, 0.5]))
    assert s.alpha_bar.tolist() == pytest.approx([1.0, 0.9, 0.72, 0.36])
    assert s.snr[1:].tolist() == pytest.approx([9.0, 0.72 / 0.28, 0.36 / 0.64])
    assert s.sigma_ve[3].item() == pytest.approx(math.sqrt(0.64 / 0.36))
    # beta~_2 = beta_2 (1 - abar_1)/(1 - abar_2) = 0.2 * 0.1 / 0.28
    assert s.posterior_variance.tolist() == pytest.approx([0.0, 0.0, 0.2 * 0.1 / 0.28, 0.5 * 0.28 / 0.64])
    c0, ct = s.posterior_mean_coefs
    assert c0[2].item() == pytest.approx(math.sqrt(0.9) * 0.2 / 0.28)
    assert ct[2].item() == pytest.approx(math.sqrt(0.8) * 0.1 / 0.28)


def test_posterior_coefficients_match_sympy_completion_of_the_square():
    beta, abar_prev = sp.symbols("beta abar_prev", positive=True)
    y, xt, x0 = sp.symbols("y x_t x_0", real=True)
    log_post = -(xt - sp.sqrt(1 - beta) * y) ** 2 / (2 * beta) - (y - sp.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev))
    poly = sp.Poly(sp.expand(log_post), y)
    a, b = poly.coeff_monomial(y**2), poly.coeff_monomial(y)
    mean, var = -b / (2 * a), -1 / (2 * a)
    s = NoiseSchedule.cosine(T=50)
    c0, ct = s.posterior_mean_coefs
    for t in (2, 17, 50):
        subs = {beta: s.beta[t].item(), abar_prev: s.alpha_bar[t - 1].item()}
        assert float(sp.diff(mean, x0).subs(subs)) == pytest.approx(c0[t].item(), rel=1e-10)
        assert float(sp.diff(mean, xt).subs(subs)) == pytest.approx(ct[t].item(), rel=1e-10)
        assert float(var.subs(subs)) == pytest.approx(s.posterior_variance[t].item(), rel=1e-10)


def test_cosine_schedule_matches_its_definition():
    s = NoiseSchedule.cosine(T=1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (1, 250, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert cosine_betas(1000).max().item() == pytest.approx(0.999)  # clipped at the end


def test_respaced_keeps_alpha_bar_on_the_kept_steps():
    s = NoiseSchedule.linear(T=1000)
    steps = [1, 250, 500, 1000]
    r = s.respaced(steps)
    assert r.T == 4
    assert r.alpha_bar[1:].tolist() == pytest.approx(s.alpha_bar[steps].tolist(), rel=1e-12)


def test_q_sample_matches_closed_form_statistics():
    s = NoiseSchedule.linear(T=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.5)
    t = torch.full((200_000,), 400)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    assert xt.mean().item() == pytest.approx(0.5 * s.signal[400].item(), abs=5e-3)
    assert xt.std().item() == pytest.approx(s.noise[400].item(), abs=5e-3)
    assert expand(s.signal, t[:3], torch.zeros(3, 1, 2, 2)).shape == (3, 1, 1, 1)


@pytest.mark.parametrize("make, match", [
    (lambda: linear_betas(0), "positive number of steps"),
    (lambda: linear_betas(10, 0.1, 0.01), "beta_start <= beta_end"),
    (lambda: NoiseSchedule(torch.tensor([0.1, 0.2], dtype=torch.float64)), "beta\\[0\\] must be 0"),
    (lambda: NoiseSchedule.from_betas(torch.tensor([0.1, 1.5])), "must lie in \\(0, 1\\)"),
    (lambda: NoiseSchedule.named("quadratic"), "unknown schedule"),
    (lambda: NoiseSchedule.linear(10).respaced([5, 3]), "strictly increasing"),
    (lambda: NoiseSchedule.linear(10).respaced([0, 3]), "must lie in 1..10"),
])
def test_invalid_schedules_say_what_was_expected(make, match):
    with pytest.raises(ValueError, match=match):
        make()
