r"""Symbolic helpers for the chapters' derivations (sympy).

:func:`fokker_planck_residual` checks a density against the Fokker–Planck equation of a 1-D diffusion
:math:`dx = \mu(x, t)\,dt + \sqrt{D(t)}\,dW`,

.. math::
    \partial_t p = -\partial_x(\mu p) + \tfrac12 D\,\partial_x^2 p ,

in log form (divided by :math:`p`), which keeps Gaussian densities polynomial in :math:`x` and simplifies fast.
With :math:`D = 0` it is the continuity equation of the ODE :math:`dx/dt = \mu`.

:func:`one_integral` merges a linear combination of integrals over the same range into one integral (linearity),
so that identities between integrals of unknown functions (``sp.Function``) reduce to identities between integrands.
"""
from __future__ import annotations

from collections.abc import Sequence

import sympy as sp


def fokker_planck_residual(log_p: sp.Expr, drift: sp.Expr, diffusion_sq: sp.Expr, x: sp.Symbol, t: sp.Symbol) -> sp.Expr:
    r""":math:`\big(\partial_t p + \partial_x(\mu p) - \tfrac12 D\,\partial_x^2 p\big)/p`, simplified; zero iff ``exp(log_p)``
    solves the Fokker–Planck equation with drift ``drift`` and squared diffusion ``diffusion_sq``."""
    dlog = sp.diff(log_p, x)
    residual = (sp.diff(log_p, t) + sp.diff(drift, x) + drift * dlog
                - diffusion_sq / 2 * (dlog**2 + sp.diff(log_p, x, 2)))
    return sp.simplify(sp.together(sp.expand(residual)))


def gaussian_log_density(x: sp.Symbol, mean: sp.Expr, variance: sp.Expr) -> sp.Expr:
    return -(x - mean) ** 2 / (2 * variance) - sp.log(2 * sp.pi * variance) / 2


def one_integral(expr: sp.Expr, limits: tuple) -> sp.Integral:
    r""":math:`\sum_i c_i\int f_i\,dx` as :math:`\int\sum_i c_i f_i\,dx`: ``expr`` expanded must be a sum of terms each
    holding exactly one ``sp.Integral`` over ``limits`` = ``(x, a, b)``, times a factor free of ``x`` (linearity of
    the integral; nothing else is assumed). Raises ``ValueError`` on any other term."""
    variable = limits[0]
    total = sp.Integer(0)
    for term in sp.Add.make_args(sp.expand(expr)):
        integrals = [factor for factor in sp.Mul.make_args(term) if isinstance(factor, sp.Integral)]
        if len(integrals) != 1 or integrals[0].limits != (tuple(limits),):
            raise ValueError(f"term {term} is not a factor times one integral over {limits}")
        factor = term / integrals[0]
        if factor.has(variable):
            raise ValueError(f"the factor {factor} of term {term} depends on the integration variable {variable}")
        total += factor * integrals[0].function
    return sp.Integral(total, tuple(limits))


def standard_normal_expectation(expr: sp.Expr, normals: Sequence[sp.Symbol]) -> sp.Expr:
    r"""E over independent standard normals ``normals`` of a polynomial in them, monomial by monomial, with
    :math:`\mathbb E z^k = (k-1)!!` for even k and 0 for odd k (the moments are checked against the density in
    the tests)."""
    total = sp.Integer(0)
    for powers, coeff in sp.Poly(sp.expand(expr), *normals).terms():
        total += coeff * sp.prod([sp.Integer(0) if k % 2 else sp.factorial2(k - 1) for k in powers])
    return sp.expand(total)
