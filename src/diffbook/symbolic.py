r"""Symbolic helpers for the chapters' derivations (sympy).

:func:`fokker_planck_residual` checks a density against the Fokker–Planck equation of a 1-D diffusion
:math:`dx = \mu(x, t)\,dt + \sqrt{D(t)}\,dW`,

.. math::
    \partial_t p = -\partial_x(\mu p) + \tfrac12 D\,\partial_x^2 p ,

in log form (divided by :math:`p`), which keeps Gaussian densities polynomial in :math:`x` and simplifies fast.
With :math:`D = 0` it is the continuity equation of the ODE :math:`dx/dt = \mu`.
"""
from __future__ import annotations

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
