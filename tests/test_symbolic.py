import pytest
import sympy as sp

from diffbook.symbolic import fokker_planck_residual, gaussian_log_density, one_integral

x, t = sp.symbols("x t", real=True)


def test_ornstein_uhlenbeck_marginal_solves_fokker_planck_and_a_wrong_one_does_not():
    theta, s0 = sp.symbols("theta s_0", positive=True)
    variance = 1 + (s0**2 - 1) * sp.exp(-2 * theta * t)  # dx = -theta x dt + sqrt(2 theta) dW from N(0, s0^2)
    assert fokker_planck_residual(gaussian_log_density(x, 0, variance), -theta * x, 2 * theta, x, t) == 0
    wrong = 1 + (s0**2 - 1) * sp.exp(-theta * t)
    assert fokker_planck_residual(gaussian_log_density(x, 0, wrong), -theta * x, 2 * theta, x, t) != 0


def test_langevin_leaves_any_density_stationary():
    U = sp.Function("U")(x)
    assert fokker_planck_residual(-U, -sp.diff(U, x), 2, x, t) == 0


def test_zero_diffusion_is_the_continuity_equation_of_a_translation():
    c = sp.Symbol("c", real=True)
    assert fokker_planck_residual(gaussian_log_density(x, c * t, 1), c, 0, x, t) == 0


def test_one_integral_merges_by_linearity_and_rejects_what_is_not_linear():
    y = sp.Symbol("y", real=True)
    f = sp.Function("f")
    over_x = (x, -sp.oo, sp.oo)
    merged = one_integral(y * sp.Integral(f(x), over_x) - sp.Integral(x * f(x), over_x), over_x)
    assert sp.simplify(merged.function - (y - x) * f(x)) == 0 and merged.limits == (over_x,)
    with pytest.raises(ValueError, match="one integral"):
        one_integral(sp.Integral(f(x), over_x) + 2, over_x)  # a term without an integral
    with pytest.raises(ValueError, match="depends on the integration variable"):
        one_integral(x * sp.Integral(f(x), over_x), over_x)
    with pytest.raises(ValueError, match="one integral"):
        one_integral(sp.Integral(f(x), (x, 0, 1)), over_x)  # another range


def test_standard_normal_expectation_matches_the_density():
    import sympy as sp
    from diffbook.symbolic import standard_normal_expectation
    z, w, a = sp.symbols("z w a", real=True)
    density = sp.exp(-z**2 / 2) / sp.sqrt(2 * sp.pi)
    for k in range(6):
        assert sp.integrate(z**k * density, (z, -sp.oo, sp.oo)) == standard_normal_expectation(z**k, (z,))
    # independence: E[(a z + w)^2 z^2] = a^2 E z^4 + E w^2 E z^2 = 3 a^2 + 1
    assert sp.simplify(standard_normal_expectation((a * z + w) ** 2 * z**2, (z, w)) - (3 * a**2 + 1)) == 0
