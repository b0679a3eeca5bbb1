"""Statistical assertions for the chapters' quantitative claims.

A chapter states a claim ("the bound is below 1.6 bits/dim", "Heun beats Euler at equal cost") and then checks it on
a finite sample. The tolerance must follow from that sample's size, so that the same ``assert`` runs in every profile:
loose where the quick ``smoke`` profile draws a few samples, tight where ``default`` draws many. These helpers state
the standard error they allow in their failure message.

``Z_CHECK = 4``. What each check establishes:

- :func:`assert_close` fails a true claim with probability about 6e-5 under the normal approximation of the
  sample mean; with very few values (n < 10) the Student-t tails are heavier (about 3e-2 at n = 4), so chapters
  use at least 8 values where they can and state n beside the check.
- :func:`assert_below` and :func:`assert_above` are *not-refuted* checks: they fail only when the sample
  contradicts the claim by more than ``Z_CHECK`` standard errors. They catch a claim that is clearly false, but
  with a large standard error they cannot establish it; a claim that must be *established* ("A is more than B")
  is asserted as ``difference > Z_CHECK * sem`` on paired values, which is what the chapters write out where they
  say "resolved".
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Z_CHECK = 4.0


def mean_and_sem(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """The sample mean of ``values`` and its standard error s/√n (s with Bessel's correction)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() < 2:
        raise ValueError(f"a standard error needs at least 2 values, got {x.numel()}")
    if not torch.isfinite(x).all():
        raise ValueError("values contain NaN or infinity: the claim's sample is broken, not just noisy")
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(x.numel()))


def assert_close(value: float, expected: float, *, sem: float, z: float = Z_CHECK, atol: float = 0.0,
                 what: str = "value") -> None:
    """Assert |value − expected| ≤ z·sem + atol; ``atol`` is a stated systematic allowance (not a sampling one)."""
    allowed = z * sem + atol
    if not abs(value - expected) <= allowed:
        raise AssertionError(f"{what}: {value:.6g} differs from {expected:.6g} by {abs(value - expected):.3g}, more "
                             f"than {z:g} standard errors ({sem:.3g}) + {atol:.3g} = {allowed:.3g}")


def assert_below(value: float, bound: float, *, sem: float, z: float = Z_CHECK, what: str = "value") -> None:
    """Assert that the claim ``true value < bound`` is not refuted: value < bound + z·sem."""
    if not value < bound + z * sem:
        raise AssertionError(f"{what}: {value:.6g} is not below {bound:.6g} within {z:g} standard errors "
                             f"({sem:.3g})")


def assert_above(value: float, bound: float, *, sem: float, z: float = Z_CHECK, what: str = "value") -> None:
    """Assert that the claim ``true value > bound`` is not refuted: value > bound − z·sem."""
    if not value > bound - z * sem:
        raise AssertionError(f"{what}: {value:.6g} is not above {bound:.6g} within {z:g} standard errors "
                             f"({sem:.3g})")


def assert_exceeds(difference: float, *, sem: float, resolve: bool = True, z: float = Z_CHECK,
                   what: str = "difference") -> None:
    """Assert a positive ``difference`` (A − B, with standard error ``sem``): *resolved*, ``difference > z·sem``, when
    ``resolve``; else only not refuted (``difference > −z·sem``). A chapter resolves at the sample sizes its text
    quotes and passes ``resolve=False`` for the quick profile's few samples, where the same claim is checked in sign."""
    if resolve:
        if not difference > z * sem:
            raise AssertionError(f"{what}: {difference:.6g} is not resolved: it does not exceed {z:g} standard errors "
                                 f"({sem:.3g})")
    else:
        assert_above(difference, 0.0, sem=sem, z=z, what=what)


def binomial_sem(p: float, n: int) -> float:
    """Standard error of a proportion estimated from n trials, √(p(1−p)/n), floored at 1/n for p ∈ {0, 1}."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return max(math.sqrt(max(p * (1 - p), 0.0) / n), 1.0 / n)
