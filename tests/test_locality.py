"""Denoisers of the locality chapter against closed forms and brute force."""
import math

import pytest
import torch

from diffbook.locality import (WienerFilter, analytic_denoiser, analytic_masks, field_agreement, nearest_training_image,
                               optimal_denoiser, r_squared, sensitivity_field)
from diffbook.toy import GaussianMixture


def brute_force_posterior_mean(x_t, alpha_bar, train):
    logits = -((x_t[:, None, :] - math.sqrt(alpha_bar) * train[None]) ** 2).sum(-1) / (2 * (1 - alpha_bar))
    return torch.softmax(logits, dim=1) @ train


def test_optimal_denoiser_is_the_exact_softmax_whatever_the_chunk():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(300, 6, generator=gen, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    for alpha_bar in (0.99, 0.5, 0.01):
        expected = brute_force_posterior_mean(x_t, alpha_bar, train)
        for chunk in (7, 300, 1000):
            torch.testing.assert_close(optimal_denoiser(x_t, alpha_bar, train, chunk=chunk), expected)
    # low noise: the posterior collapses onto the nearest training image (memorisation)
    noisy = math.sqrt(0.9999) * train[:4] + math.sqrt(1e-4) * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(optimal_denoiser(noisy, 0.9999, train), train[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(nearest_training_image(noisy, 0.9999, train), train[:4])


def test_wiener_filter_is_the_posterior_mean_on_gaussian_data():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    cov, mean = A @ A.T / 5 + 0.1 * torch.eye(5, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    gaussian = GaussianMixture(torch.ones(1, dtype=torch.float64), mean[None], cov[None])
    wiener = WienerFilter(mean, *torch.linalg.eigh(cov))
    x_t = torch.randn(50, 5, generator=gen, dtype=torch.float64)
    for alpha_bar in (0.9, 0.3, 0.02):
        exact = gaussian.posterior_means(x_t, math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar))[0]
        torch.testing.assert_close(wiener(x_t, alpha_bar), exact)
        sigma2 = (1 - alpha_bar) / alpha_bar  # W_t = Sigma (Sigma + sigma^2 I)^-1
        torch.testing.assert_close(wiener.matrix(alpha_bar), cov @ torch.linalg.inv(cov + sigma2 * torch.eye(5, dtype=torch.float64)))


def test_fitted_wiener_filter_recovers_the_sample_statistics():
    train = torch.randn(400, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) @ torch.diag(
        torch.tensor([2.0, 1.0, 0.5, 0.1], dtype=torch.float64))
    wiener = WienerFilter.fit(train)
    torch.testing.assert_close((wiener.U * wiener.lam) @ wiener.U.T, torch.cov(train.T))
    with pytest.raises(ValueError, match="expected x_t"):
        wiener(torch.zeros(3, 5), 0.5)


def test_sensitivity_field_of_the_wiener_filter_is_its_jacobian_row():
    train = torch.randn(200, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    wiener = WienerFilter.fit(train)
    x_t = torch.randn(8, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    field = sensitivity_field(wiener, x_t, 0.3, pixel=4)
    torch.testing.assert_close(field, wiener.jacobian(0.3)[4].abs())  # W is symmetric: row = column
    assert field_agreement(field, 3 * field) == pytest.approx(1.0)


def test_analytic_denoiser_with_full_masks_is_the_optimal_denoiser():
    gen = torch.Generator().manual_seed(5)
    train = torch.rand(120, 8, generator=gen, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    full = torch.ones(8, 8, dtype=torch.bool)
    torch.testing.assert_close(analytic_denoiser(x_t, 0.4, train, full, chunk=50), optimal_denoiser(x_t, 0.4, train))
    # single-pixel masks: each output pixel is a 1-D posterior mean of that pixel alone
    eye = torch.eye(8, dtype=torch.bool)
    per_pixel = torch.stack([brute_force_posterior_mean(x_t[:, m:m + 1], 0.4, train[:, m:m + 1])[:, 0] for m in range(8)], 1)
    torch.testing.assert_close(analytic_denoiser(x_t, 0.4, train, eye), per_pixel)
    # the released code's batch-averaged variant: one batch = exact; several = an average of batch posteriors
    torch.testing.assert_close(analytic_denoiser(x_t, 0.4, train, eye, batch_size=1000), per_pixel)
    batched = analytic_denoiser(x_t, 0.4, train, eye, batch_size=60)
    expected = (analytic_denoiser(x_t, 0.4, train[:60], eye) + analytic_denoiser(x_t, 0.4, train[60:], eye)) / 2
    torch.testing.assert_close(batched, expected)


def test_analytic_masks_grow_with_noise():
    side = 8
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2).double()
    cov = torch.exp(-torch.cdist(coords, coords) ** 2 / 8)  # smooth stationary "image" statistics
    wiener = WienerFilter(torch.zeros(side * side, dtype=torch.float64), *torch.linalg.eigh(cov))
    sizes = [analytic_masks(wiener, alpha_bar, 0.05).sum(0).double().mean().item() for alpha_bar in (0.99, 0.5, 0.05)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_r_squared_is_one_for_identical_images_and_zero_for_the_mean():
    u = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(r_squared(u, u), torch.ones(3, dtype=torch.float64))
    mean_image = u.flatten(1).mean(1)[:, None].expand(3, 16)
    torch.testing.assert_close(r_squared(mean_image, u), torch.full((3,), 1 / 16, dtype=torch.float64))


def test_ddim_protocol_follows_the_paper_and_replays_states():
    from diffbook.locality import add_pattern, w_pattern
    from diffbook.locality_protocol import PAPER_TIMESTEPS, ddim_protocol, flat_denoiser
    from diffbook.schedules import NoiseSchedule
    schedule = NoiseSchedule.linear(1000)
    target = torch.full((2, 1, 4, 4), 0.3)
    calls = []

    def constant(x, k):
        calls.append(k)
        return torch.full_like(x, 2.0) if k == 901 else target  # the first guess is clipped to 1
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    trace = ddim_protocol(constant, x_T, schedule)
    assert calls == [t + 1 for t in PAPER_TIMESTEPS] == list(range(901, 0, -100))
    assert trace.x0_hats[0].max() == 1.0 and torch.equal(trace.final, target)  # the last step lands on x0_hat
    replay = ddim_protocol(constant, x_T, schedule, states=[s + 1 for s in trace.states])
    assert all(torch.equal(a, b + 1) for a, b in zip(replay.states, trace.states))
    wiener = WienerFilter(torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64), torch.eye(16, dtype=torch.float64))
    assert ddim_protocol(flat_denoiser(wiener, schedule), x_T, schedule).final.shape == x_T.shape
    pattern = w_pattern(28)
    assert pattern.sum() > 100 and pattern[:, :7].sum() > 0 and pattern[:, -7:].sum() > 0  # spans the image
    planted = add_pattern(torch.zeros(100, 1, 28, 28), pattern, seed=0)
    assert planted[:, 0, pattern.bool()].std(0).min() > 0.2 and planted[:, 0, ~pattern.bool()].abs().max() == 0


def test_analytic_pair_in_float32_matches_float64_and_never_underflows():
    from diffbook.locality import analytic_denoiser_pair
    gen = torch.Generator().manual_seed(8)
    train = torch.rand(300, 16, generator=gen, dtype=torch.float64) * 2 - 1
    train[150:] += 5  # a far cluster: its batches have negligible weight under the global softmax
    masks = torch.rand(16, 16, generator=gen) < 0.3
    masks |= torch.eye(16, dtype=torch.bool)
    x_t = math.sqrt(0.999) * train[:3] + math.sqrt(0.001) * torch.randn(3, 16, generator=gen, dtype=torch.float64)
    exact64, batched64 = analytic_denoiser_pair(x_t, 0.999, train, masks, batch_size=50)
    exact32, batched32 = analytic_denoiser_pair(x_t, 0.999, train, masks, batch_size=50, dtype=torch.float32)
    assert torch.isfinite(batched64).all()  # each batch normalised by its own maximum
    torch.testing.assert_close(exact64, analytic_denoiser(x_t, 0.999, train, masks))
    torch.testing.assert_close(batched64, analytic_denoiser(x_t, 0.999, train, masks, batch_size=50))
    torch.testing.assert_close(exact32, exact64, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched32, batched64, atol=1e-4, rtol=0)
    # the far cluster's batches pull the batch average away from the exact posterior mean
    assert (batched64 - exact64).abs().max() > 1


def test_r2_experiment_scores_the_reference_itself_as_one_and_shares_analytic_passes(monkeypatch):
    from diffbook import locality_protocol
    from diffbook.locality_protocol import paper_denoisers, r2_experiment
    from diffbook.schedules import NoiseSchedule
    schedule = NoiseSchedule.linear(1000)
    gen = torch.Generator().manual_seed(9)
    train = torch.rand(700, 16, generator=gen, dtype=torch.float64) * 2 - 1  # two batches of the released code
    calls = []
    real_pair = locality_protocol.analytic_denoiser_pair
    monkeypatch.setattr(locality_protocol, "analytic_denoiser_pair", lambda *a, **k: calls.append(1) or real_pair(*a, **k))
    denoisers = paper_denoisers(train, schedule, theta=0.005)
    assert list(denoisers) == ["optimal", "wiener", "analytic", "analytic_batch", "nearest"]
    x_T = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    result = r2_experiment(denoisers["wiener"], denoisers, x_T, schedule, progress=False)
    torch.testing.assert_close(result.final["wiener"], torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(result.per_step["wiener"], torch.ones(10, 5, dtype=torch.float64))
    assert result.per_step["optimal"].shape == (10, 5) and (result.final["optimal"] < 1).all()
    # the two replays share 10 passes; each final run reuses the first (every run starts at x_T)
    assert len(calls) == 10 + 9 + 9
    summary = result.summary()
    assert summary["wiener"]["final"] == pytest.approx(1.0) and summary["wiener"]["final_sem"] == pytest.approx(0.0)
    record = result.to_record()
    assert record["samples"] == 5 and result.max_difference(record) == 0.0
    record["final"]["nearest"][2] += 0.25  # a stored value that this run does not reproduce
    assert result.max_difference(record) == pytest.approx(0.25)
