import sympy as sp

from diffbook.symbolic import fokker_planck_residual, gaussian_log_density

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
