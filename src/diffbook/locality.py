r"""Analytic denoisers and sensitivity fields for the locality chapter (Lukoianov et al. 2025).

Setting: DDPM's discrete forward process :math:`x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon` and
:math:`\sigma_t^2 = (1-\bar\alpha_t)/\bar\alpha_t`. Images are flattened to vectors of :math:`d` pixels. Every denoiser
here maps ``(x_t (batch, d), alpha_bar_t)`` to :math:`\hat x_0` (batch, d).

- :func:`optimal_denoiser`: the posterior mean over the empirical training distribution (exact, streaming).
- :class:`WienerFilter`: the optimal linear denoiser, :math:`\mu + U\,\mathrm{diag}(\lambda/(\lambda+\sigma_t^2))U^\top(x_t/\sqrt{\bar\alpha_t} - \mu)`.
- :func:`analytic_masks`, :func:`analytic_denoiser`: the paper's denoiser, a per-pixel posterior mean over
  the training set restricted to the pixels the Wiener filter's sensitivity field keeps.
- :func:`jacobian_rows`, :func:`sensitivity_field`: Jacobian rows of any denoiser by autograd, per input (signed) and
  averaged in magnitude (the paper's field); :func:`half_mass_radius` measures a field's width and
  :func:`mean_field_statistic` gives a statistic of the averaged field with its bootstrap standard error.
- :func:`w_pattern`, :func:`pattern_amplitudes`, :func:`add_pattern`: the data of the manipulation experiment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def _check_flat(x: torch.Tensor, d: int, name: str = "x_t") -> None:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"expected {name} of shape (batch, {d}) (flattened images), got {tuple(x.shape)}")


def _streaming_posterior_mean(logits_fn: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, chunk: int,
                              combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                              block_means: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Softmax-weighted means over the rows of ``values``, in chunks with a running log-sum-exp, so memory stays
    O(batch x chunk) whatever the training-set size. ``logits_fn(block)`` has shape (n_block, batch, k): k = 1 for
    one softmax per sample, k = d for one per output pixel (it may be overwritten). ``combine(weights, block)``
    sums the weighted block into the (batch, d) output. If ``block_means`` is a list, each chunk's own softmax
    mean is appended to it."""
    running_max = running_sum = weighted = None
    for start in range(0, len(values), chunk):
        block = values[start:start + chunk]
        weights = logits_fn(block)
        block_max = weights.max(dim=0).values  # (batch, k)
        weights.sub_(block_max).exp_()
        part_sum, part = weights.sum(0), combine(weights, block)
        if block_means is not None:
            block_means.append(part / part_sum)
        if running_max is None:
            running_max, running_sum, weighted = block_max, part_sum, part
        else:
            new_max = torch.maximum(running_max, block_max)
            old_scale, new_scale = torch.exp(running_max - new_max), torch.exp(block_max - new_max)
            running_sum = running_sum * old_scale + part_sum * new_scale
            weighted = weighted * old_scale + part * new_scale
            running_max = new_max
    return weighted / running_sum


def optimal_denoiser(x_t: torch.Tensor, alpha_bar: float, train: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    r"""The exact posterior mean when the data distribution is the training set itself:
    :math:`\hat x_0 = \sum_i w_i x^{(i)}`, :math:`w = \mathrm{softmax}_i\big(-\lVert x_t - \sqrt{\bar\alpha_t}x^{(i)}\rVert^2 / (2(1-\bar\alpha_t))\big)`.
    No nearest-neighbour truncation: every training image contributes (float64 throughout)."""
    _check_flat(x_t, train.shape[1])
    x = x_t.double()
    scale, var = math.sqrt(alpha_bar), 1 - alpha_bar

    def logits(block: torch.Tensor) -> torch.Tensor:  # (n_block, batch, 1)
        distances = torch.cdist(scale * block, x, compute_mode="donot_use_mm_for_euclid_dist")
        return -distances.pow(2)[..., None] / (2 * var)

    def combine(weights: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return weights[..., 0].T @ block

    return _streaming_posterior_mean(logits, train.double(), chunk, combine).to(x_t.dtype)


def nearest_training_image(x_t: torch.Tensor, alpha_bar: float, train: torch.Tensor) -> torch.Tensor:
    r"""The training image closest to :math:`x_t/\sqrt{\bar\alpha_t}`: the zero-temperature limit of :func:`optimal_denoiser`
    (its largest weight). The authors' released code compares :math:`x_t` itself, without the division, which is
    another baseline at high noise."""
    _check_flat(x_t, train.shape[1])
    index = torch.cdist(x_t.double() / math.sqrt(alpha_bar), train.double()).argmin(1)
    return train[index].to(x_t.dtype)


@dataclass
class WienerFilter:
    """Mean ``mu`` (d,), eigenvalues ``lam`` (d,) and eigenvectors ``U`` (d, d) of the training covariance, float64."""

    mu: torch.Tensor
    lam: torch.Tensor
    U: torch.Tensor

    @classmethod
    def fit(cls, train: torch.Tensor) -> "WienerFilter":
        """Fit to flattened training images (n, d): unbiased covariance, symmetric eigendecomposition."""
        if train.ndim != 2 or len(train) < 2:
            raise ValueError(f"expected training data of shape (n >= 2, d), got {tuple(train.shape)}")
        data = train.double()
        mu = data.mean(0)
        centred = data - mu
        cov = centred.T @ centred / (len(data) - 1)
        lam, U = torch.linalg.eigh(cov)
        return cls(mu, lam.clamp_min(0), U)

    @staticmethod
    def sigma2(alpha_bar: float) -> float:
        return (1 - alpha_bar) / alpha_bar

    def gains(self, alpha_bar: float) -> torch.Tensor:
        r"""Per-component gain :math:`\lambda/(\lambda + \sigma_t^2)`, close to :math:`1[\lambda > \sigma_t^2]`."""
        return self.lam / (self.lam + self.sigma2(alpha_bar))

    def matrix(self, alpha_bar: float) -> torch.Tensor:
        r""":math:`W_t = \Sigma(\Sigma + \sigma_t^2 I)^{-1} = U\,\mathrm{diag}(\text{gains})\,U^\top` (d, d)."""
        return (self.U * self.gains(alpha_bar)) @ self.U.T

    def jacobian(self, alpha_bar: float) -> torch.Tensor:
        r""":math:`\partial\hat x_0/\partial x_t = W_t/\sqrt{\bar\alpha_t}`, the same for every input: its rows are the sensitivity fields."""
        return self.matrix(alpha_bar) / math.sqrt(alpha_bar)

    def __call__(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        _check_flat(x_t, len(self.mu))
        centred = x_t.double() / math.sqrt(alpha_bar) - self.mu
        return (self.mu + ((centred @ self.U) * self.gains(alpha_bar)) @ self.U.T).to(x_t.dtype)


def analytic_masks(wiener: WienerFilter, alpha_bar: float, theta: float) -> torch.Tensor:
    r"""Boolean (d_in, d_out) masks of the paper's denoiser: :math:`W_t` with entry :math:`(n, m)` divided by the
    input pixel's diagonal :math:`W_{nn}` (diagonals below 1e-6 count as 1), kept where its magnitude is at least
    ``theta`` times the global maximum. Column :math:`m` lists the input pixels that output pixel :math:`m` looks at."""
    W = wiener.matrix(alpha_bar)
    diagonal = W.diagonal().clone()
    diagonal[diagonal.abs() < 1e-6] = 1.0
    normalised = (W / diagonal[:, None]).abs()
    return normalised >= theta * normalised.max()


def analytic_denoiser(x_t: torch.Tensor, alpha_bar: float, train: torch.Tensor, masks: torch.Tensor,
                      batch_size: int | None = None, chunk: int = 512,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""The paper's analytic denoiser. For each output pixel :math:`m`, a posterior mean over training images whose
    distance counts only the masked input pixels :math:`n \in M_m`:

    .. math::
        \hat x_{0,m} = \sum_i \mathrm{softmax}_i\Big(-\frac{\sum_{n\in M_m}(x_{t,n} - \sqrt{\bar\alpha_t}x^{(i)}_n)^2}{2(1-\bar\alpha_t)}\Big)\,x^{(i)}_m .

    ``batch_size=None`` is this formula (one softmax over the whole training set). An integer reproduces the
    authors' released code instead: the softmax is taken within consecutive batches of that many training
    images and the per-batch results are averaged, which is a different estimator. ``chunk`` (training images
    per pass) only trades memory for speed. ``dtype`` is the arithmetic of the logits and sums: float32 is twice
    as fast as float64 and agrees with it to about 1e-5 on MNIST."""
    exact, averaged = analytic_denoiser_pair(x_t, alpha_bar, train, masks, batch_size or chunk, dtype)
    return exact if batch_size is None else averaged


def analytic_denoiser_pair(x_t: torch.Tensor, alpha_bar: float, train: torch.Tensor, masks: torch.Tensor,
                           batch_size: int = 512, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Both variants of :func:`analytic_denoiser` from one pass over the training set: (exact, batch-averaged).

    The term :math:`\sum_{n\in M_m} x_{t,n}^2` is the same for every training image, so it drops out of the
    softmax; what remains, :math:`2\sqrt{\bar\alpha_t}\sum_n M_{nm}x_{t,n}x^{(i)}_n - \bar\alpha_t\sum_n M_{nm}(x^{(i)}_n)^2`,
    is one matrix product of the training images with the stacked matrices :math:`\mathrm{diag}(x_t)M` of the batch."""
    d = train.shape[1]
    _check_flat(x_t, d)
    if masks.shape != (d, d):
        raise ValueError(f"expected masks of shape ({d}, {d}), got {tuple(masks.shape)}")
    batch = len(x_t)
    M = masks.to(dtype)
    stacked = (x_t.to(dtype)[:, :, None] * M[None]).permute(1, 0, 2).reshape(d, batch * d)  # (d_in, batch * d_out)
    scale, var = math.sqrt(alpha_bar), 1 - alpha_bar

    def masked_logits(block: torch.Tensor) -> torch.Tensor:  # (n_block, batch, d_out)
        logits = (block @ stacked).view(len(block), batch, d).mul_(scale / var)
        return logits.sub_(((block * block) @ M).mul_(alpha_bar / (2 * var))[:, None, :])

    def combine(weights: torch.Tensor, block: torch.Tensor) -> torch.Tensor:  # sum_i weights[i, b, m] block[i, m]
        return torch.einsum("ibm,im->bm", weights, block)

    block_means: list[torch.Tensor] = []
    exact = _streaming_posterior_mean(masked_logits, train.to(dtype), batch_size, combine, block_means)
    return exact.to(x_t.dtype), torch.stack(block_means).mean(0).to(x_t.dtype)


def jacobian_rows(denoiser: Denoiser, x_t: torch.Tensor, alpha_bar: float, pixels: Sequence[int]) -> torch.Tensor:
    r"""Signed Jacobian rows :math:`\partial\hat x_{0,m}/\partial x_t` of output pixels ``pixels`` at every input of
    the batch ``x_t`` (batch, d), shape (len(pixels), batch, d): one forward pass and one vector-Jacobian product per
    pixel (autograd through ``denoiser``). The samples of a batch must not interact (no batch statistics), as in the
    U-Nets and denoisers of this package."""
    x = x_t.detach().clone().requires_grad_(True)
    rows = []
    with torch.enable_grad():
        out = denoiser(x, alpha_bar)
        for i, pixel in enumerate(pixels):
            (grad,) = torch.autograd.grad(out[:, pixel].sum(), x, retain_graph=i + 1 < len(pixels))
            rows.append(grad.detach())
    return torch.stack(rows)


def sensitivity_field(denoiser: Denoiser, x_t: torch.Tensor, alpha_bar: float, pixel: int) -> torch.Tensor:
    r""":math:`\mathbb E\,\lvert\partial\hat x_{0,\text{pixel}}/\partial x_t\rvert` over the batch ``x_t`` (d,): the
    sensitivity field of Lukoianov et al. (2025), the mean magnitude of :func:`jacobian_rows`."""
    return jacobian_rows(denoiser, x_t, alpha_bar, [pixel])[0].abs().mean(0)


def field_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two fields (1 = same shape, scale ignored). Compare like with like: two magnitudes
    (non-negative fields) or two signed rows."""
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def half_mass_radius(fields: torch.Tensor, pixel: int, side: int) -> torch.Tensor:
    """Width of sensitivity fields (..., side * side) of output ``pixel`` on a ``side`` x ``side`` image: the radius
    (in pixels) of the smallest disc around the pixel that holds half of the field's magnitude. Shape (...)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], 1).double()
    distance = (coords - coords[pixel]).norm(dim=1)
    order = distance.argsort()
    mass = fields.abs().double()[..., order].cumsum(-1)
    first = (mass >= 0.5 * mass[..., -1:]).double().argmax(-1)  # the first disc that holds half the mass
    return distance[order][first]


def mean_field_statistic(rows: torch.Tensor, statistic: Callable[[torch.Tensor], torch.Tensor],
                         resamples: int = 200, seed: int = 0) -> tuple[float, float]:
    """``statistic`` (a map from fields (k, d) to values (k,)) of the mean of per-input fields ``rows`` (n, d), and
    its bootstrap standard error over the n inputs (``resamples`` resamples with replacement, seeded): the sampling
    error of a cosine, width or contrast of an averaged sensitivity field."""
    rows = rows.double()
    n = len(rows)
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 inputs, got {n}")
    index = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, index, torch.ones(resamples, n,
                                                                                            dtype=torch.float64))
    value = float(statistic(rows.mean(0, keepdim=True))[0])
    return value, float(statistic(counts @ rows / n).std())


def r_squared(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    r"""Per image, :math:`r^2 = 1 - \sum_p (x_p - u_p)^2 / (d\,\mathrm{Var}(u))` with :math:`u` the ``reference``
    (e.g. the U-Net's sample) and Var the unbiased variance over its pixels."""
    x, u = x.flatten(1).double(), reference.flatten(1).double()
    return 1 - (x - u).pow(2).sum(1) / (u.shape[1] * u.var(dim=1, unbiased=True))


def w_pattern(size: int = 28, width: int = 2) -> torch.Tensor:
    """A (size, size) 0/1 mask shaped like a "W" spanning the whole image: four strokes, two pixels wide.
    Added to every training image with a random amplitude, it plants a non-local correlation in the data."""
    pattern = torch.zeros(size, size)
    rows = torch.arange(size)
    corners = [0, size // 4, size // 2, 3 * size // 4, size - 1]
    top, bottom = 2, size - 3
    for i in range(4):  # stroke i goes from column corners[i] to corners[i+1], alternating down and up
        start, end = (top, bottom) if i % 2 == 0 else (bottom, top)
        for r in rows[top:bottom + 1]:
            frac = (r - start).abs().item() / (bottom - top)
            col = round(corners[i] + frac * (corners[i + 1] - corners[i]))
            pattern[r, max(0, col - width // 2): col + (width + 1) // 2] = 1
    return pattern


def pattern_amplitudes(n: int, seed: int, amplitude: float = 0.5) -> torch.Tensor:
    r"""The amplitudes :math:`a_i \sim U(-\text{amplitude}, \text{amplitude})` that :func:`add_pattern` draws for
    ``n`` images from ``seed`` (float32, the same numbers)."""
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * amplitude


def add_pattern(images: torch.Tensor, pattern: torch.Tensor, seed: int, amplitude: float = 0.5) -> torch.Tensor:
    r"""``images`` (n, 1, H, W) in [-1, 1] plus :math:`a_i P` with :math:`a_i` from :func:`pattern_amplitudes`,
    clipped to [-1, 1]: the data of the manipulation experiment. The clip erases part of the pattern: on a
    background at -1 everything of a negative :math:`a_i`, on ink at +1 everything of a positive one."""
    a = pattern_amplitudes(len(images), seed, amplitude)
    return (images + a[:, None, None, None] * pattern.to(images.dtype)).clamp(-1, 1)
