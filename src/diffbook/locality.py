r"""Analytic denoisers and sensitivity fields for the locality chapter (Lukoianov et al. 2025).

Setting: DDPM's discrete forward process :math:`x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon` and
:math:`\sigma_t^2 = (1-\bar\alpha_t)/\bar\alpha_t`. Images are flattened to vectors of :math:`d` pixels. Every denoiser
here maps ``(x_t (batch, d), alpha_bar_t)`` to :math:`\hat x_0` (batch, d).

- :func:`optimal_denoiser`: the posterior mean over the empirical training distribution (exact, streaming).
- :class:`WienerFilter`: the optimal linear denoiser, :math:`\mu + U\,\mathrm{diag}(\lambda/(\lambda+\sigma_t^2))U^\top(x_t/\sqrt{\bar\alpha_t} - \mu)`.
- :func:`analytic_masks`, :func:`analytic_denoiser`: the paper's denoiser, a per-pixel posterior mean over
  the training set restricted to the pixels the Wiener filter's sensitivity field keeps.
- :func:`sensitivity_field`: the averaged absolute Jacobian row of any denoiser, by autograd.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .schedules import NoiseSchedule

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def _check_flat(x: torch.Tensor, d: int, name: str = "x_t") -> None:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"expected {name} of shape (batch, {d}) (flattened images), got {tuple(x.shape)}")


def _streaming_posterior_mean(logits_fn: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, chunk: int,
                              combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Softmax-weighted means over the rows of ``values``, in chunks with a running log-sum-exp, so memory stays
    O(batch x chunk) whatever the training-set size. ``logits_fn(block)`` has shape (batch, n_block, k): k = 1 for
    one softmax per sample, k = d for one per output pixel. ``combine(weights, block)`` sums the weighted block into
    the (batch, d) output."""
    running_max = running_sum = weighted = None
    for start in range(0, len(values), chunk):
        block = values[start:start + chunk]
        logits = logits_fn(block)
        block_max = logits.max(dim=1, keepdim=True).values
        new_max = block_max if running_max is None else torch.maximum(running_max, block_max)
        weights = torch.exp(logits - new_max)
        part_sum, part = weights.sum(1), combine(weights, block)
        if running_max is None:
            running_sum, weighted = part_sum, part
        else:
            rescale = torch.exp(running_max - new_max).squeeze(1)
            running_sum, weighted = running_sum * rescale + part_sum, weighted * rescale + part
        running_max = new_max
    return weighted / running_sum


def optimal_denoiser(x_t: torch.Tensor, alpha_bar: float, train: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    r"""The exact posterior mean when the data distribution is the training set itself:
    :math:`\hat x_0 = \sum_i w_i x^{(i)}`, :math:`w = \mathrm{softmax}_i\big(-\lVert x_t - \sqrt{\bar\alpha_t}x^{(i)}\rVert^2 / (2(1-\bar\alpha_t))\big)`.
    No nearest-neighbour truncation: every training image contributes (float64 throughout)."""
    _check_flat(x_t, train.shape[1])
    x = x_t.double()
    scale, var = math.sqrt(alpha_bar), 1 - alpha_bar

    def logits(block: torch.Tensor) -> torch.Tensor:  # (batch, n_block, 1)
        distances = torch.cdist(x, scale * block, compute_mode="donot_use_mm_for_euclid_dist")
        return -distances.pow(2)[..., None] / (2 * var)

    def combine(weights: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return weights[..., 0] @ block

    return _streaming_posterior_mean(logits, train.double(), chunk, combine).to(x_t.dtype)


def nearest_training_image(x_t: torch.Tensor, alpha_bar: float, train: torch.Tensor) -> torch.Tensor:
    r"""The training image closest to :math:`x_t/\sqrt{\bar\alpha_t}`: the zero-temperature limit of :func:`optimal_denoiser`."""
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
                      batch_size: int | None = None, chunk: int = 512) -> torch.Tensor:
    r"""The paper's analytic denoiser. For each output pixel :math:`m`, a posterior mean over training images whose
    distance counts only the masked input pixels :math:`n \in M_m`:

    .. math::
        \hat x_{0,m} = \sum_i \mathrm{softmax}_i\Big(-\frac{\sum_{n\in M_m}(x_{t,n} - \sqrt{\bar\alpha_t}x^{(i)}_n)^2}{2(1-\bar\alpha_t)}\Big)\,x^{(i)}_m .

    ``batch_size=None`` is this formula (one softmax over the whole training set). An integer reproduces the
    authors' released code instead: the softmax is taken within consecutive batches of that many training
    images and the per-batch results are averaged, which is a different estimator."""
    d = train.shape[1]
    _check_flat(x_t, d)
    if masks.shape != (d, d):
        raise ValueError(f"expected masks of shape ({d}, {d}), got {tuple(masks.shape)}")
    x, data = x_t.double(), train.double()
    scale, var = math.sqrt(alpha_bar), 1 - alpha_bar
    M = masks.double()
    sparse = M.mean().item() < 0.05  # low noise: local masks, a sparse product is cheaper than a dense one
    M_sparse_t = M.t().to_sparse_csr() if sparse else None  # (d_out, d_in)
    x_sq = (x**2) @ M  # (batch, d_out): sum over masked n of x_n^2

    def masked_logits(block: torch.Tensor) -> torch.Tensor:  # (batch, n_block, d_out)
        # cross[b, i, m] = sum_n M[n, m] x[b, n] block[i, n]
        if sparse:
            cross = torch.stack([(M_sparse_t @ (block * xb).t()).t() for xb in x])
            block_sq = (M_sparse_t @ (block**2).t()).t()
        else:
            cross = (block[None] * x[:, None, :]) @ M
            block_sq = (block**2) @ M
        return -(x_sq[:, None, :] - 2 * scale * cross + scale**2 * block_sq[None]) / (2 * var)

    def posterior(pool: torch.Tensor) -> torch.Tensor:
        return _streaming_posterior_mean(masked_logits, pool, chunk, lambda weights, block: (weights * block[None]).sum(1))

    if batch_size is None:
        out = posterior(data)
    else:
        parts = [posterior(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]
        out = torch.stack(parts).mean(0)
    return out.to(x_t.dtype)


def sensitivity_field(denoiser: Denoiser, x_t: torch.Tensor, alpha_bar: float, pixel: int) -> torch.Tensor:
    r""":math:`\mathbb E\,\lvert\partial\hat x_{0,\text{pixel}}/\partial x_t\rvert` over the batch ``x_t`` (d,): one
    vector-Jacobian product per sample (autograd through ``denoiser``)."""
    x = x_t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = denoiser(x, alpha_bar)
        (grad,) = torch.autograd.grad(out[:, pixel].sum(), x)
    return grad.abs().mean(0).detach()


def field_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two non-negative sensitivity fields (1 = same shape, scale ignored)."""
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


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


def add_pattern(images: torch.Tensor, pattern: torch.Tensor, seed: int, amplitude: float = 0.5) -> torch.Tensor:
    r"""``images`` (n, 1, H, W) in [-1, 1] plus :math:`a_i P` with :math:`a_i \sim U(-\text{amplitude}, \text{amplitude})`
    per image, clipped to [-1, 1]: the data of the manipulation experiment."""
    a = (torch.rand(len(images), generator=torch.Generator().manual_seed(seed)) * 2 - 1) * amplitude
    return (images + a[:, None, None, None] * pattern.to(images.dtype)).clamp(-1, 1)


PAPER_TIMESTEPS = tuple(range(900, -1, -100))
"""The paper's DDIM protocol: 10 steps at 0-indexed times t = 900, 800, ..., 0 ("leading" spacing). In this
book's schedule, whose index 0 is clean data, 0-indexed time t is step k = t + 1."""

ImageDenoiser = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t images, step k) -> x0_hat images


def unet_denoiser(net: nn.Module, schedule: NoiseSchedule) -> ImageDenoiser:
    r"""A DDPM ε-network as an :math:`\hat x_0` denoiser at step k: :math:`(x_t - \sqrt{1-\bar\alpha_k}\,\hat\varepsilon)/\sqrt{\bar\alpha_k}`."""
    def denoise(x: torch.Tensor, k: int) -> torch.Tensor:
        eps = net(x.float(), torch.full((len(x),), float(k), device=x.device)).to(x.dtype)
        return (x - schedule.noise[k].item() * eps) / schedule.signal[k].item()
    return denoise


def flat_denoiser(fn: Denoiser, schedule: NoiseSchedule) -> ImageDenoiser:
    """Wrap a denoiser on flattened vectors (``fn(x_t, alpha_bar)``) as an image denoiser at step k."""
    def denoise(x: torch.Tensor, k: int) -> torch.Tensor:
        return fn(x.flatten(1), schedule.alpha_bar[k].item()).reshape(x.shape).to(x.dtype)
    return denoise


@dataclass
class DDIMTrace:
    r"""A DDIM run: the final sample, the state before each step and the clipped :math:`\hat x_0` of each step."""

    final: torch.Tensor
    states: list[torch.Tensor]
    x0_hats: list[torch.Tensor]


@torch.no_grad()
def ddim_protocol(denoise: ImageDenoiser, x_T: torch.Tensor, schedule: NoiseSchedule,
                  timesteps: tuple[int, ...] = PAPER_TIMESTEPS, states: list[torch.Tensor] | None = None) -> DDIMTrace:
    r"""Deterministic DDIM (η = 0) on 0-indexed ``timesteps`` with :math:`\hat x_0` clipped to [-1, 1] at every step;
    the step after the last time goes to clean data. With ``states`` (another run's states), each step starts
    from those instead of from this run's own trajectory: the per-step ("score-matching") comparison."""
    x, seen, x0_hats = x_T, [], []
    for i, t in enumerate(timesteps):
        k = t + 1
        if states is not None:
            x = states[i]
        seen.append(x)
        x0 = denoise(x, k).clamp(-1, 1)
        x0_hats.append(x0)
        eps = (x - schedule.signal[k].item() * x0) / schedule.noise[k].item()
        k_prev = timesteps[i + 1] + 1 if i + 1 < len(timesteps) else 0
        x = schedule.signal[k_prev].item() * x0 + schedule.noise[k_prev].item() * eps
    return DDIMTrace(x, seen, x0_hats)
