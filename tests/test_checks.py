"""The chapters' statistical assertions (diffbook.checks): each passes inside its allowance and fails just outside
it, says the standard error it allowed, and refuses broken samples."""
import math

import pytest
import torch

from diffbook.checks import Z_CHECK, assert_above, assert_below, assert_close, binomial_sem, mean_and_sem


def test_mean_and_sem_is_the_hand_computation():
    values = [1.0, 2.0, 4.0, 7.0]  # mean 3.5; squared deviations 6.25 + 2.25 + 0.25 + 12.25 = 21; s^2 = 21 / 3 = 7
    mean, sem = mean_and_sem(values)
    assert mean == 3.5 and sem == pytest.approx(math.sqrt(7 / 4), rel=1e-15)  # s / sqrt(n), Bessel-corrected
    # any shape is one sample of its elements; the tensor's dtype does not matter
    assert mean_and_sem(torch.tensor([[1.0, 2.0], [4.0, 7.0]], dtype=torch.float32)) == (mean, sem)
    assert mean_and_sem([5.0, 5.0, 5.0]) == (5.0, 0.0)


@pytest.mark.parametrize("values", [[1.0, float("nan"), 2.0], [1.0, float("inf")], torch.tensor([0.0, -math.inf])])
def test_mean_and_sem_refuses_nan_and_infinity(values):
    with pytest.raises(ValueError, match="NaN or infinity"):
        mean_and_sem(values)


@pytest.mark.parametrize("values", [[], [1.0]])
def test_mean_and_sem_needs_two_values(values):
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_and_sem(values)


def test_assert_close_allows_z_standard_errors_plus_atol_and_no_more():
    assert Z_CHECK == 4
    assert_close(1.39, 1.0, sem=0.1)  # 3.9 SE
    assert_close(0.61, 1.0, sem=0.1)  # on either side
    assert_close(1.0, 1.0, sem=0.0)  # a deterministic value may equal its expectation exactly
    assert_close(1.44, 1.0, sem=0.1, atol=0.05)  # 0.4 + 0.05 allowed
    assert_close(1.29, 1.0, sem=0.1, z=3)
    with pytest.raises(AssertionError) as info:
        assert_close(1.41, 1.0, sem=0.1, what="bits/dim")
    message = str(info.value)
    assert message.startswith("bits/dim: 1.41 differs from 1 by 0.41") and "standard errors (0.1)" in message
    assert "= 0.4" in message  # the allowance it applied
    with pytest.raises(AssertionError, match="0.03"):  # the SE is named whatever it is
        assert_close(0.61, 0.4, sem=0.03, atol=0.05)  # 0.21 > 4 * 0.03 + 0.05 = 0.17
    with pytest.raises(AssertionError):
        assert_close(1.31, 1.0, sem=0.1, z=3)
    with pytest.raises(AssertionError):
        assert_close(1e-9, 0.0, sem=0.0)
    with pytest.raises(AssertionError):  # NaN compares false with everything: it must fail, never pass
        assert_close(float("nan"), 1.0, sem=0.1)


def test_assert_below_and_above_are_one_sided_with_the_se_named():
    assert_below(1.39, 1.0, sem=0.1)  # the claim "true value < 1" is not refuted by 1.39 with SE 0.1
    assert_below(-5.0, 1.0, sem=0.1)
    assert_above(0.61, 1.0, sem=0.1)
    assert_above(7.0, 1.0, sem=0.1)
    with pytest.raises(AssertionError, match=r"FD: 1.41 is not below 1 within 4 standard errors \(0.1\)"):
        assert_below(1.41, 1.0, sem=0.1, what="FD")
    with pytest.raises(AssertionError, match=r"TV: 0.59 is not above 1 within 4 standard errors \(0.1\)"):
        assert_above(0.59, 1.0, sem=0.1, what="TV")
    with pytest.raises(AssertionError, match=r"within 2 standard errors \(0.05\)"):
        assert_below(1.11, 1.0, sem=0.05, z=2)
    with pytest.raises(AssertionError):
        assert_above(0.89, 1.0, sem=0.05, z=2)
    with pytest.raises(AssertionError):  # at zero SE the bound itself is excluded
        assert_below(1.0, 1.0, sem=0.0)
    with pytest.raises(AssertionError):
        assert_above(1.0, 1.0, sem=0.0)
    for check in (assert_below, assert_above):
        with pytest.raises(AssertionError):
            check(float("nan"), 1.0, sem=0.1)


def test_binomial_sem_is_the_proportions_standard_error_floored_at_one_over_n():
    assert binomial_sem(0.5, 100) == pytest.approx(0.05, rel=1e-15)  # sqrt(0.25 / 100)
    assert binomial_sem(0.1, 400) == pytest.approx(0.015, rel=1e-12)  # sqrt(0.09 / 400)
    assert binomial_sem(0.0, 50) == binomial_sem(1.0, 50) == 1 / 50  # no zero SE from an all-or-nothing sample
    assert binomial_sem(0.999, 10) == 0.1  # sqrt(0.000999 / 10) = 0.01 < 1/n
    with pytest.raises(ValueError, match="n must be >= 1"):
        binomial_sem(0.5, 0)


def test_assert_exceeds_resolves_or_only_checks_the_sign():
    from diffbook.checks import assert_exceeds
    assert_exceeds(5.0, sem=1.0)  # 5 SE: resolved
    with pytest.raises(AssertionError, match="not resolved"):
        assert_exceeds(3.0, sem=1.0)  # 3 SE: positive, not resolved
    assert_exceeds(3.0, sem=1.0, resolve=False)  # the quick profile: only not refuted
    assert_exceeds(-3.0, sem=1.0, resolve=False)
    with pytest.raises(AssertionError):
        assert_exceeds(-5.0, sem=1.0, resolve=False)  # refuted
