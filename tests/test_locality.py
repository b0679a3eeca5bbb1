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


def masked_posterior_mean(x_t, alpha_bar, train, inputs, m):
    """The analytic denoiser (Lukoianov et al. 2025) for one output pixel m, by brute force: the softmax over training
    images of the distance on the input pixels ``inputs`` (a boolean (d,) mask) alone, then the mean of the training
    images' pixel m."""
    distances = ((x_t[:, None, inputs] - math.sqrt(alpha_bar) * train[None, :, inputs]) ** 2).sum(-1)
    return torch.softmax(-distances / (2 * (1 - alpha_bar)), dim=1) @ train[:, m]


def wiener_matrix(train, alpha_bar):
    """W_t = Sigma (Sigma + sigma_t^2 I)^-1 with the unbiased sample covariance, sigma_t^2 = (1 - alpha_bar) / alpha_bar."""
    cov = torch.cov(train.T)
    return cov @ torch.linalg.inv(cov + (1 - alpha_bar) / alpha_bar * torch.eye(len(cov), dtype=torch.float64))


def brute_force_masks(W, theta):
    """Entry (n, m) of W divided by the input pixel's W_nn (1 where W_nn < 1e-6), kept where it is at least theta times
    the largest such ratio: one entry at a time."""
    d = len(W)
    normalised = torch.zeros(d, d, dtype=torch.float64)
    for n in range(d):
        for m in range(d):
            normalised[n, m] = abs(W[n, m]) / (W[n, n] if abs(W[n, n]) >= 1e-6 else 1.0)
    threshold = theta * normalised.max()
    assert ((normalised - threshold).abs() > 1e-9).all()  # no entry on the edge: the comparison is robust to rounding
    return normalised >= threshold


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


def test_sensitivity_field_of_a_nonlinear_denoiser_is_its_mean_absolute_finite_difference_row():
    """The analytic denoiser with an asymmetric mask: nonlinear, and its Jacobian is not symmetric, so the field (the
    row of output pixel m over the inputs) differs from the column; central differences, per sample, then |.|, then
    the batch mean."""
    gen = torch.Generator().manual_seed(11)
    d, pixel, alpha_bar = 9, 4, 0.3
    train = torch.rand(60, d, generator=gen, dtype=torch.float64) * 2 - 1
    masks = (torch.rand(d, d, generator=gen) < 0.4) | torch.eye(d, dtype=torch.bool)
    x_t = torch.randn(8, d, generator=gen, dtype=torch.float64)
    denoiser = lambda x, a: analytic_denoiser(x, a, train, masks)
    field = sensitivity_field(denoiser, x_t, alpha_bar, pixel)
    h, rows = 1e-5, []
    for n in range(d):
        step = torch.zeros(d, dtype=torch.float64)
        step[n] = h
        rows.append((denoiser(x_t + step, alpha_bar) - denoiser(x_t - step, alpha_bar))[:, pixel] / (2 * h))
    jacobian_row = torch.stack(rows, 1)  # (batch, d): d x0_hat[pixel] / d x_t[n] for each sample
    torch.testing.assert_close(field, jacobian_row.abs().mean(0), rtol=1e-6, atol=1e-9)
    assert torch.equal(field > 0, masks[:, pixel])  # output pixel m sees exactly the inputs of mask column m
    assert (field - jacobian_row.mean(0).abs()).max() > 1e-3  # the mean of |.|, not |mean|: the signs differ per sample


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
    # an asymmetric mask: output pixel m looks at the input pixels n of column m, M[n, m]
    masks = (torch.rand(8, 8, generator=gen) < 0.4) | eye
    assert not torch.equal(masks, masks.T)
    per_column = torch.stack([masked_posterior_mean(x_t, 0.4, train, masks[:, m], m) for m in range(8)], 1)
    torch.testing.assert_close(analytic_denoiser(x_t, 0.4, train, masks), per_column)
    assert (analytic_denoiser(x_t, 0.4, train, masks.T) - per_column).abs().max() > 1e-3
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


def test_analytic_masks_are_the_row_normalised_wiener_matrix_by_brute_force():
    """Pixels of unequal variance (and one constant pixel, as MNIST's borders): W_t's diagonal is not constant, so
    dividing entry (n, m) by the input pixel's W_nn (the package's rule) and by the output pixel's W_mm give different
    masks, and so does no normalisation."""
    gen = torch.Generator().manual_seed(12)
    d, alpha_bar, theta = 10, 0.5, 0.2
    scales = torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    train = (torch.randn(300, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
             / 3) * scales
    train[:, 7] = 0.4  # a constant pixel: zero variance, W_77 = 0, counted as 1
    cov = torch.cov(train.T)
    W = cov @ torch.linalg.inv(cov + (1 - alpha_bar) / alpha_bar * torch.eye(d, dtype=torch.float64))  # Sigma (Sigma + s^2 I)^-1
    masks = analytic_masks(WienerFilter.fit(train), alpha_bar, theta)
    assert torch.equal(masks, brute_force_masks(W, theta))
    assert not masks[7].any() and not masks[:, 7].any()  # the constant pixel: no weight in or out
    by_output = (W / W.diagonal().where(W.diagonal().abs() >= 1e-6, torch.ones(d, dtype=torch.float64))).abs()
    assert not torch.equal(masks, by_output >= theta * by_output.max())
    assert not torch.equal(masks, W.abs() >= theta * W.abs().max())
    assert not torch.equal(masks, masks.T)


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
    # a flat denoiser through predictor_from_denoiser: this Wiener filter (mean 0, covariance I) is
    # x0_hat = x_t / sqrt(abar) / (1 + (1 - abar) / abar) = sqrt(abar) x_t at step k
    expected = old_ddim_protocol(lambda x, k: schedule.signal[k].item() * x, x_T.double(), schedule, PAPER_TIMESTEPS)[0]
    torch.testing.assert_close(sample_ddim(predictor_from_denoiser(wiener, path), x_T.double(), times, clip_x0=True),
                               expected, rtol=0, atol=1e-12)


def test_add_pattern_adds_one_amplitude_per_image_on_the_pattern_and_clamps_to_the_data_range():
    from diffbook.locality import add_pattern, w_pattern
    pattern = w_pattern(28)
    assert pattern.sum() > 100 and pattern[:, :7].sum() > 0 and pattern[:, -7:].sum() > 0  # spans the image
    on = pattern.bool()
    # MNIST-like images: background -1 with strokes; on the pattern, pixels at -1 (background), 0, 0.9 and 1 (ink)
    n = 200
    images = -torch.ones(n, 1, 28, 28)
    images[:, 0, 10:18, :] = torch.rand(n, 8, 28, generator=torch.Generator().manual_seed(13)) * 2 - 1
    levels = torch.tensor([-1.0, 0.0, 0.9, 1.0])
    cycle = levels.repeat(int(on.sum()) // 4 + 1)[: int(on.sum())]
    images[:, 0, on] = cycle
    planted = add_pattern(images, pattern, seed=3)
    a = (torch.rand(n, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.5  # U(-0.5, 0.5), from the seed
    assert torch.equal(planted[:, 0, ~on], images[:, 0, ~on])  # off the pattern nothing changes
    shifted = planted[:, 0, on] - images[:, 0, on]
    zero = cycle == 0.0
    torch.testing.assert_close(shifted[:, zero], a[:, None].expand(n, int(zero.sum())))  # + a_i on every pattern pixel
    # the clamp to [-1, 1] matters: it erases the pattern on the background when a_i < 0, and on the ink when a_i > 0
    background, ink, bright = cycle == -1.0, cycle == 1.0, cycle == 0.9
    negative = a < 0
    assert 50 < int(negative.sum()) < 150
    assert (planted[negative][:, 0, on][:, background] == -1).all() and (planted[~negative][:, 0, on][:, ink] == 1).all()
    torch.testing.assert_close(planted[negative][:, 0, on][:, ink], (1 + a[negative])[:, None].expand(-1, int(ink.sum())))
    torch.testing.assert_close(planted[~negative][:, 0, on][:, background],
                               (a[~negative] - 1)[:, None].expand(-1, int(background.sum())))
    torch.testing.assert_close(planted[:, 0, on][:, bright], (0.9 + a[:, None]).clamp(max=1).expand(-1, int(bright.sum())))
    assert planted.min() == -1 and planted.max() == 1
    assert not torch.equal(add_pattern(images, pattern, seed=4), planted)  # another seed, other amplitudes


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


def r_squared_by_hand(x, u):
    """1 - sum_p (x_p - u_p)^2 / (d Var(u)), Var unbiased over the d pixels, image by image."""
    out = []
    for xi, ui in zip(x.flatten(1).tolist(), u.flatten(1).tolist()):
        d, mean = len(ui), sum(ui) / len(ui)
        variance = sum((v - mean) ** 2 for v in ui) / (d - 1)
        out.append(1 - sum((a - b) ** 2 for a, b in zip(xi, ui)) / (d * variance))
    return torch.tensor(out, dtype=torch.float64)


def test_r2_experiment_values_are_the_protocol_run_by_hand():
    """Every number of r2_experiment (final and per-step r² of every row of the paper's table) against the protocol
    run here from the definitions: old_ddim_protocol, brute-force denoisers, r² image by image."""
    from diffbook.locality_protocol import PAPER_TIMESTEPS, paper_denoisers, r2_experiment
    from diffbook.predictors import Predictor
    from diffbook.schedules import NoiseSchedule
    schedule = NoiseSchedule.linear(1000)
    gen = torch.Generator().manual_seed(14)
    train = torch.rand(700, 16, generator=gen, dtype=torch.float64) * 2 - 1  # two batches of 512 (the released code's)
    x_T = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    weights = torch.randn(16, 16, generator=gen, dtype=torch.float64) / 4
    eps_network = lambda x, k: torch.tanh((x.flatten(1) @ weights) * (1 + k / 500)).reshape(x.shape) * 1.5
    unet = Predictor(lambda x, t: eps_network(x, round(t[0].item() * 1000)), "eps", schedule.path())
    theta = 0.05
    result = r2_experiment(unet, paper_denoisers(train, schedule.path(), theta, dtype=torch.float64), x_T, progress=False)

    def analytic(x, a, batches):  # per output pixel, the masked posterior mean; averaged over the batches
        masks = brute_force_masks(wiener_matrix(train, a), theta)
        return torch.stack([torch.stack([masked_posterior_mean(x, a, part, masks[:, m], m) for m in range(16)], 1)
                            for part in batches]).mean(0)

    def nearest(x, a):
        return train[torch.stack([((x_i / math.sqrt(a) - train) ** 2).sum(1).argmin() for x_i in x])]

    by_hand = {"optimal": lambda x, a: brute_force_posterior_mean(x, a, train),
               "wiener": lambda x, a: train.mean(0) + (x / math.sqrt(a) - train.mean(0)) @ wiener_matrix(train, a).T,
               "analytic": lambda x, a: analytic(x, a, [train]),
               "analytic_batch": lambda x, a: analytic(x, a, [train[:512], train[512:]]),
               "nearest": nearest}
    as_step = lambda fn: (lambda x, k: fn(x.flatten(1), schedule.alpha_bar[k].item()).reshape(x.shape))
    unet_x0 = lambda x, k: (x - schedule.noise[k].item() * eps_network(x, k)) / schedule.signal[k].item()
    reference, states, reference_x0 = old_ddim_protocol(unet_x0, x_T, schedule, PAPER_TIMESTEPS)
    assert torch.equal(result.reference, reference)
    assert list(result.final) == list(by_hand)
    for name, fn in by_hand.items():
        final = old_ddim_protocol(as_step(fn), x_T, schedule, PAPER_TIMESTEPS)[0]
        torch.testing.assert_close(result.final[name], r_squared_by_hand(final, reference), rtol=0, atol=1e-9,
                                   msg=name)
        per_step = torch.stack([r_squared_by_hand(as_step(fn)(x, t + 1).clamp(-1, 1), x0)
                                for x, x0, t in zip(states, reference_x0, PAPER_TIMESTEPS)])
        torch.testing.assert_close(result.per_step[name], per_step, rtol=0, atol=1e-9, msg=name)
    values = torch.stack([result.final[name] for name in by_hand])
    assert values.std(0).min() > 0.01  # the rows differ, so a row swapped with another would be seen


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
