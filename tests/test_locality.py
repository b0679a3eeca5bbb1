"""Denoisers of the locality chapter against closed forms and brute force."""
import json
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


def old_ddim_protocol(denoise, x_T, schedule, timesteps):
    """The pre-refactor ``ddim_protocol`` written out: DDIM (eta = 0) at steps k = t + 1 with x0_hat clipped to
    [-1, 1] and eps recomputed from it; the step after the last time goes to clean data."""
    x, states, x0_hats = x_T, [], []
    for i, t in enumerate(timesteps):
        k = t + 1
        states.append(x)
        x0 = denoise(x, k).clamp(-1, 1)
        x0_hats.append(x0)
        eps = (x - schedule.signal[k].item() * x0) / schedule.noise[k].item()
        k_prev = timesteps[i + 1] + 1 if i + 1 < len(timesteps) else 0
        x = schedule.signal[k_prev].item() * x0 + schedule.noise[k_prev].item() * eps
    return x, states, x0_hats


def test_ddim_protocol_is_sample_ddim_with_clipping_and_replays_states():
    from diffbook.locality import add_pattern, w_pattern
    from diffbook.locality_protocol import PAPER_TIMESTEPS, protocol_times, r2_experiment
    from diffbook.predictors import Predictor, predictor_from_denoiser
    from diffbook.samplers import Trajectory, sample_ddim
    from diffbook.schedules import NoiseSchedule
    schedule = NoiseSchedule.linear(1000)
    path = schedule.path()
    times = protocol_times(schedule.T)
    assert times.tolist() == [(t + 1) / 1000 for t in PAPER_TIMESTEPS] + [0.0]
    target = torch.full((2, 1, 4, 4), 0.3)
    calls = []

    def constant(x, t):
        k = round(t[0].item() * schedule.T)
        calls.append(k)
        return torch.full_like(x, 2.0) if k == 901 else target  # the first guess is clipped to 1
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    trajectory = Trajectory()
    final = sample_ddim(Predictor(constant, "x0", path), x_T, times, clip_x0=True, callback=trajectory)
    assert calls == [t + 1 for t in PAPER_TIMESTEPS] == list(range(901, 0, -100))
    assert trajectory.x0_hats[0].max() == 1.0 and torch.equal(final, target)  # the last step lands on x0_hat
    # the per-step comparison evaluates each denoiser on the reference's states, not on its own trajectory
    seen = []
    probe = Predictor(lambda x, t: seen.append(x) or torch.zeros_like(x), "x0", path)
    result = r2_experiment(Predictor(constant, "x0", path), {"probe": probe}, x_T + 1, times, progress=False)
    replayed, own = seen[:10], seen[10:]
    assert all(torch.equal(a, step.x) for a, step in zip(replayed, result.trajectory.steps))
    assert torch.equal(own[0], x_T + 1) and not torch.equal(own[1], result.trajectory.steps[1].x)
    wiener = WienerFilter(torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64), torch.eye(16, dtype=torch.float64))
    assert sample_ddim(predictor_from_denoiser(wiener, path), x_T, times, clip_x0=True).shape == x_T.shape
    pattern = w_pattern(28)
    assert pattern.sum() > 100 and pattern[:, :7].sum() > 0 and pattern[:, -7:].sum() > 0  # spans the image
    planted = add_pattern(torch.zeros(100, 1, 28, 28), pattern, seed=0)
    assert planted[:, 0, pattern.bool()].std(0).min() > 0.2 and planted[:, 0, ~pattern.bool()].abs().max() == 0


def test_sample_ddim_with_clipping_is_the_old_protocol_bit_for_bit():
    from diffbook.locality_protocol import PAPER_TIMESTEPS, protocol_times
    from diffbook.predictors import Predictor, predictor_from_denoiser
    from diffbook.samplers import Trajectory, sample_ddim
    from diffbook.schedules import NoiseSchedule
    schedule = NoiseSchedule.linear(1000)
    path, times = schedule.path(), protocol_times(schedule.T)
    gen = torch.Generator().manual_seed(10)
    x_T = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    weights = torch.randn(16, 16, generator=gen, dtype=torch.float64) / 4

    def eps_network(x, k):  # a nonlinear stand-in for the U-Net's eps at step k, large enough to be clipped
        return torch.tanh((x.flatten(1) @ weights) * (1 + k / 500)).reshape(x.shape) * 1.5

    def unet_denoiser(x, k):  # the old unet_denoiser: eps -> x0 at step k
        return (x - schedule.noise[k].item() * eps_network(x, k)) / schedule.signal[k].item()
    expected, states, x0_hats = old_ddim_protocol(unet_denoiser, x_T, schedule, PAPER_TIMESTEPS)
    assert max(x0.abs().max() for x0 in x0_hats) == 1.0  # clipping is exercised
    unet = Predictor(lambda x, t: eps_network(x, round(t[0].item() * schedule.T)), "eps", path)
    trajectory = Trajectory()
    final = sample_ddim(unet, x_T, times, clip_x0=True, callback=trajectory)
    assert torch.equal(final, expected)
    assert all(torch.equal(a, b) for a, b in zip(trajectory.states(final), states + [expected]))
    assert all(torch.equal(a, b) for a, b in zip(trajectory.x0_hats, x0_hats))
    # a flat denoiser (old flat_denoiser: fn(x_flat, alpha_bar_k)) through predictor_from_denoiser: same to rounding
    train = torch.rand(50, 16, generator=gen, dtype=torch.float64) * 2 - 1
    wiener = WienerFilter.fit(train)
    for fn in (wiener, lambda x, a: optimal_denoiser(x, a, train)):
        flat = lambda x, k: fn(x.flatten(1), schedule.alpha_bar[k].item()).reshape(x.shape)
        expected = old_ddim_protocol(flat, x_T, schedule, PAPER_TIMESTEPS)[0]
        final = sample_ddim(predictor_from_denoiser(fn, path), x_T, times, clip_x0=True)
        torch.testing.assert_close(final, expected, atol=1e-12, rtol=0)


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


def test_r2_experiment_scores_the_reference_itself_as_one_and_shares_analytic_passes(monkeypatch, tmp_path):
    from diffbook import locality_protocol
    from diffbook.locality_protocol import load_r2_record, paper_denoisers, r2_experiment
    from diffbook.schedules import NoiseSchedule
    schedule = NoiseSchedule.linear(1000)
    path = schedule.path()
    gen = torch.Generator().manual_seed(9)
    train = torch.rand(700, 16, generator=gen, dtype=torch.float64) * 2 - 1  # two batches of the released code
    calls = []
    real_pair = locality_protocol.analytic_denoiser_pair
    monkeypatch.setattr(locality_protocol, "analytic_denoiser_pair", lambda *a, **k: calls.append(1) or real_pair(*a, **k))
    denoisers = paper_denoisers(train, path, theta=0.005)
    assert list(denoisers) == ["optimal", "wiener", "analytic", "analytic_batch", "nearest"]
    x_T = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    result = r2_experiment(denoisers["wiener"], denoisers, x_T, progress=False)
    torch.testing.assert_close(result.final["wiener"], torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(result.per_step["wiener"], torch.ones(10, 5, dtype=torch.float64))
    assert result.per_step["optimal"].shape == (10, 5) and (result.final["optimal"] < 1).all()
    # the two replays share 10 passes; each final run reuses the first (every run starts at x_T)
    assert len(calls) == 10 + 9 + 9
    summary = result.summary()
    assert summary["wiener"]["final"] == pytest.approx(1.0) and summary["wiener"]["final_sem"] == pytest.approx(0.0)
    record = result.to_record()
    assert record["samples"] == 5 and result.max_difference(record) == 0.0
    stored = tmp_path / "locality_r2_test.json"  # the package reads records from the path it is given
    stored.write_text(json.dumps(record, indent=1))
    assert result.max_difference(load_r2_record(stored)) == 0.0 and load_r2_record(tmp_path / "none.json") is None
    record["final"]["nearest"][2] += 0.25  # a stored value that this run does not reproduce
    assert result.max_difference(record) == pytest.approx(0.25)
