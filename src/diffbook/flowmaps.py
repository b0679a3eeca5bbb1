r"""Flow maps: the probability-flow ODE's solution operator :math:`\Psi_{t\to s}`, the object few-step generators learn.

On a path :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` the probability-flow ODE :math:`dx/dt = u_t(x)` carries a state at
time :math:`t` to time :math:`s`; its flow map :math:`\Psi_{t\to s}` satisfies :math:`\Psi_{t\to t} = \mathrm{id}` and the
semigroup property :math:`\Psi_{r\to s}\circ\Psi_{t\to r} = \Psi_{t\to s}` (Lai et al. 2025, ch. 10). Its special cases:

- the **consistency function** :math:`f(x, t) = \Psi_{t\to 0}(x)` (Song et al. 2023), a :class:`~diffbook.predictors.Predictor`
  of kind ``x0``;
- the **average velocity** :math:`\bar u(x, t, s) = (\Psi_{t\to s}(x) - x)/(s - t)` (MeanFlow, Geng et al. 2025), which
  :class:`FlowMap` stores, so that :math:`\Psi_{t\to s}(x) = x + (s - t)\,\bar u(x, t, s)` and :math:`\bar u(x, t, t) = u_t(x)`
  (Kim et al. 2024's CTM writes the same map as :math:`G(x, t, s)`).

:func:`gaussian_flow_map` is the closed form for Gaussian data (the tests' oracle); :func:`ode_flow_map` solves the ODE
of any :class:`~diffbook.predictors.Predictor` with an adaptive solver (for an exact toy model, the true flow map);
:func:`euler_flow_map` is a velocity model's one Euler step, the map a student starts from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.integrate
import torch

from .paths import LinearPath, NoisePath, as_time, broadcast
from .predictors import Predictor

AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(x, t, s)``: the average velocity from time ``t`` to time ``s`` for states ``x`` (batch, ...); ``t`` and ``s``
have shape (batch,), float64 on the CPU."""


def _times(value: torch.Tensor | float, n: int) -> torch.Tensor:
    value = as_time(value)
    value = value.expand(n) if value.ndim == 0 else value
    if value.shape != (n,):
        raise ValueError(f"a time must be one number or one per sample ({n}), got shape {tuple(value.shape)}")
    return value


@dataclass
class FlowMap:
    r""":math:`\Psi_{t\to s}(x) = x + (s - t)\,\bar u(x, t, s)` on ``path``, from the average velocity ``fn(x, t, s)``.

    ``flow_map(x, t, s)`` evaluates the map (``t``, ``s`` one number or one per sample); ``flow_map.average_velocity``
    the average velocity. At :math:`s = t` the map is the identity whatever ``fn`` returns, and
    :math:`\bar u(x, t, t)` is the ODE's instantaneous velocity :math:`u_t(x)`."""

    fn: AverageVelocity
    path: NoisePath

    def average_velocity(self, x: torch.Tensor, t: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
        return self.fn(x, _times(t, x.shape[0]), _times(s, x.shape[0])).to(x.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
        t, s = _times(t, x.shape[0]), _times(s, x.shape[0])
        return x + broadcast(s - t, x).to(x.dtype) * self.average_velocity(x, t, s)

    def consistency(self) -> Predictor:
        r"""The consistency function :math:`f(x, t) = \Psi_{t\to 0}(x)` as an ``x0`` :class:`Predictor`."""
        return Predictor(lambda x, t: self(x, t, torch.zeros_like(t)), "x0", self.path)


def flow_map_from_trained(model) -> FlowMap:
    """A trained two-time network (objective ``semigroup`` or ``meanflow``, a :class:`~diffbook.checkpoints.TrainedModel`)
    as the :class:`FlowMap` it was trained to be: on the linear path, seeing both times scaled by ``T``. Works for
    :class:`~diffbook.nets.FlowMapMLP` and :class:`~diffbook.nets.FlowMapUNet` alike."""
    if model.config.objective not in ("semigroup", "meanflow"):
        raise ValueError(f"{model.config.name} is not a flow map (objective {model.config.objective!r}); a one-time "
                         "network is a Predictor: diffbook.predictors.predictor_from_trained")
    scale, net = float(model.config.T), model.net

    def fn(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return net(x.float(), (scale * t).float().to(x.device), (scale * s).float().to(x.device))

    return FlowMap(fn, LinearPath())


def euler_flow_map(model: Predictor) -> FlowMap:
    r"""One Euler step of ``model``'s ODE as a flow map: :math:`\bar u(x, t, s) = u_t(x)`. Exact only as :math:`s \to t`;
    it is what a student initialised from a flow-matching network starts from."""
    return FlowMap(lambda x, t, s: model(x, t, "velocity"), model.path)


def gaussian_flow_map(mean: torch.Tensor | float, var: float, path: NoisePath = LinearPath()) -> FlowMap:
    r"""The exact flow map for data :math:`N(\mu, v I)`: the marginal at :math:`t` is :math:`N(\alpha_t\mu, m_t^2 I)`,
    :math:`m_t^2 = \alpha_t^2 v + \sigma_t^2`, and the probability-flow ODE keeps the standardised state
    :math:`(x - \alpha_t\mu)/m_t` fixed, so :math:`\Psi_{t\to s}(x) = \alpha_s\mu + \tfrac{m_s}{m_t}(x - \alpha_t\mu)`
    (chapter 9 derives it with sympy). At :math:`s = t` the average velocity is the ODE's velocity,
    :math:`\dot\alpha_t\mu + \tfrac{\dot m_t}{m_t}(x - \alpha_t\mu)`."""
    mean = torch.as_tensor(mean, dtype=torch.float64)

    def m(t: torch.Tensor) -> torch.Tensor:
        return (path.alpha(t) ** 2 * var + path.sigma(t) ** 2).sqrt()

    def fn(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        xd = x.double().cpu()  # float64 on the CPU (MPS has none); the result returns to x's device and dtype
        a_t, a_s = broadcast(path.alpha(t), xd), broadcast(path.alpha(s), xd)
        m_t = m(t)
        d_m = (path.alpha(t) * path.d_alpha(t) * var + path.sigma(t) * path.d_sigma(t)) / m_t
        velocity = broadcast(path.d_alpha(t), xd) * mean + broadcast(d_m / m_t, xd) * (xd - a_t * mean)
        same = (s == t).reshape(-1, *[1] * (xd.ndim - 1))
        step = torch.where(s == t, torch.ones_like(s - t), s - t)
        target = a_s * mean + broadcast(m(s) / m_t, xd) * (xd - a_t * mean)
        return torch.where(same, velocity, (target - xd) / broadcast(step, xd)).to(x.device, x.dtype)

    return FlowMap(fn, path)


def ode_flow_map(model: Predictor, rtol: float = 1e-9, atol: float = 1e-9) -> FlowMap:
    r"""The flow map of ``model``'s probability-flow ODE, solved with an adaptive Runge–Kutta method (scipy's DOP853) to
    the given tolerances, all samples of a batch as one system. For an exact toy model
    (:func:`diffbook.toy.exact_predictor`) this is the true flow map up to the tolerance. Needs one ``t`` and one ``s``
    for the whole batch."""
    def fn(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if len(t.unique()) != 1 or len(s.unique()) != 1:
            raise ValueError("ode_flow_map solves one (t, s) per call: pass the same t and s for the whole batch")
        t0, s0 = t[0].item(), s[0].item()
        if t0 == s0:
            return model(x, t0, "velocity")
        shape = x.shape

        def rhs(time: float, flat: np.ndarray) -> np.ndarray:  # the state in x's dtype on x's device
            state = torch.from_numpy(flat).reshape(shape).to(x.device, x.dtype)
            return model(state, time, "velocity").reshape(-1).double().cpu().numpy()

        solution = scipy.integrate.solve_ivp(rhs, (t0, s0), x.double().reshape(-1).cpu().numpy(), method="DOP853",
                                             rtol=rtol, atol=atol)
        if not solution.success:
            raise RuntimeError(f"the ODE solve from t={t0} to s={s0} failed: {solution.message}")
        end = torch.from_numpy(solution.y[:, -1]).reshape(shape)
        return ((end - x.double().cpu()) / (s0 - t0)).to(x.device, x.dtype)

    return FlowMap(fn, model.path)
