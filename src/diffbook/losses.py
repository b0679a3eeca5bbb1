r"""Training objectives. Each maps ``(net, x0, schedule, generator, y)`` to a scalar loss.

Later chapters register more objectives in :data:`OBJECTIVES`; the training loop looks them up by name. An objective
may take more keyword arguments: the config's ``objective_options``, ``teacher`` (the :class:`~diffbook.predictors.Predictor`
of the config's ``init_from`` network) and ``progress`` (the share of training done, in [0, 1)), each passed only to an
objective that declares it.

The few-step objectives of chapter 9 train on the linear path :math:`x_t = (1-t)x_0 + t\varepsilon`: a one-time network
:math:`F(x, t)` read as a velocity (its consistency function is :math:`x - tF`, exact at :math:`t = 0`), or a two-time
network :math:`\bar u(x, t, s)`, the average velocity of a :class:`~diffbook.flowmaps.FlowMap`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .paths import LinearPath, NoisePath, broadcast
from .predictors import Predictor
from .schedules import NoiseSchedule

Objective = Callable[[nn.Module, torch.Tensor, NoiseSchedule, torch.Generator, "torch.Tensor | None"], torch.Tensor]


def ddpm_eps_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                  y: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`L_\text{simple} = \mathbb{E}_{t\sim U\{1..T\},\,\varepsilon}\,\lVert\varepsilon - \varepsilon_\theta(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon, t)\rVert^2`
    (Ho et al. 2020, eq. 14), averaged over pixels. ``t`` and ε are drawn from ``generator`` on the CPU,
    so a run is reproducible whatever the device."""
    t = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = schedule.q_sample(x0, t, noise)
    return (net(x_t, t.float().to(x0.device), y).float() - noise).pow(2).mean()


def denoising_score_matching_loss(score: Callable[[torch.Tensor, float], torch.Tensor], x0: torch.Tensor, sigma: float,
                                  generator: torch.Generator) -> torch.Tensor:
    r"""Vincent (2011) at one noise level, weighted by :math:`\sigma^2`:
    :math:`\mathbb{E}\,\lVert \sigma\,s(x_0 + \sigma\varepsilon, \sigma) + \varepsilon\rVert^2`
    :math:`= \sigma^2\,\mathbb{E}\,\lVert s(\tilde x) - \nabla_{\tilde x}\log q_\sigma(\tilde x\mid x_0)\rVert^2`.
    Its minimiser over all functions is :math:`\nabla\log p_\sigma`, the score of the noised data."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return (sigma * score(x0 + sigma * noise, sigma) + noise).pow(2).sum(dim=tuple(range(1, x0.ndim))).mean()


TimeSampler = Callable[[int, torch.Generator], torch.Tensor]
"""``sampler(n, generator)``: ``n`` training times in (0, 1), float64 on the CPU."""


def uniform_times(n: int, generator: torch.Generator) -> torch.Tensor:
    r""":math:`t \sim U(0, 1)`, flow matching's default (Lipman et al. 2023)."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def logit_normal_times(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    r""":math:`t = \operatorname{sigmoid}(m + s\,n)`, :math:`n\sim\mathcal N(0,1)`: more training times near the middle
    of the path (Esser et al. 2024, eq. 19, used by Stable Diffusion 3)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))


def flow_matching_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                       y: torch.Tensor | None = None, *, path: NoisePath = LinearPath(),
                       noise: torch.Tensor | None = None, time_sampler: TimeSampler | None = None) -> torch.Tensor:
    r"""Conditional flow matching (Lipman et al. 2023):
    :math:`\mathbb{E}_{t\sim U(0,1),\,x_0,\,\varepsilon}\lVert v_\theta(x_t, t) - (\dot\alpha_t x_0 + \dot\sigma_t\varepsilon)\rVert^2`,
    averaged over pixels; on the linear path the target is :math:`\varepsilon - x_0`. The network sees time
    :math:`T t` (``schedule.T``), the scale DDPM networks see. ``noise`` pairs each ``x0`` with a given
    endpoint instead of fresh Gaussian noise (reflow). ``time_sampler`` replaces :math:`t\sim U(0,1)` (e.g.
    :func:`logit_normal_times`); the minimiser is unchanged wherever its density is positive, the weighting is not."""
    t = (time_sampler or uniform_times)(x0.shape[0], generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    noise = noise.to(x0.device)  # t stays a float64 CPU tensor: MPS has no float64; the path casts before moving
    x_t = path.sample(x0, noise, t)
    target = path.conditional_velocity(x0, noise, t)
    return (net(x_t, (schedule.T * t).float().to(x0.device), y).float() - target).pow(2).mean()


def reflow_loss(net: nn.Module, pairs: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                y: torch.Tensor | None = None) -> torch.Tensor:
    r"""Flow matching on a fixed coupling (Liu et al. 2023): ``pairs[:, 0]`` is data, ``pairs[:, 1]`` the noise the
    previous flow mapped to it. Straight lines between coupled points make the next flow straighter."""
    if pairs.ndim < 3 or pairs.shape[1] != 2:
        raise ValueError(f"reflow expects pairs of shape (batch, 2, ...), got {tuple(pairs.shape)}")
    return flow_matching_loss(net, pairs[:, 0], schedule, generator, y, noise=pairs[:, 1])


def classification_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                        y: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of a classifier on clean images (the feature network of :mod:`diffbook.metrics`).
    Needs labels: train it with ``class_conditional=True``."""
    if y is None:
        raise ValueError("the classification objective needs labels: set class_conditional=True in the config")
    return nn.functional.cross_entropy(net(x0).float(), y)


def noisy_classification_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                              y: torch.Tensor | None = None) -> torch.Tensor:
    r"""Cross-entropy of a classifier of noisy images, :math:`\mathbb{E}_{k\sim U\{1..T\},\,\varepsilon}
    [-\log p_\phi(y \mid \sqrt{\bar\alpha_k}x_0 + \sqrt{1-\bar\alpha_k}\varepsilon, k)]`: the noise-conditioned
    classifier of classifier guidance (Dhariwal & Nichol 2021, who draw the step uniformly, as here)."""
    if y is None:
        raise ValueError("the noisy_classification objective needs labels: set class_conditional=True in the config")
    k = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return nn.functional.cross_entropy(net(schedule.q_sample(x0, k, noise), k.float().to(x0.device)).float(), y)


def _linear_times(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample times (float64, CPU) shaped to multiply ``like``, in its dtype and on its device."""
    return broadcast(values, like).to(like.device, like.dtype)


def _consistency_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                      y: torch.Tensor | None, teacher: Predictor | None, progress: float, stages: int, q: float,
                      k: float, b: float, log_rho_mean: float, log_rho_std: float, sigma_data: float) -> torch.Tensor:
    n = x0.shape[0]
    rho_t = torch.exp(log_rho_mean + log_rho_std * torch.randn(n, generator=generator, dtype=torch.float64))
    stage = min(int(progress * stages), stages - 1)
    rho_r = (rho_t * (1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * rho_t)))).clamp(min=0)
    t, r = rho_t / (1 + rho_t), rho_r / (1 + rho_r)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    path, scale = LinearPath(), schedule.T
    x_t = path.sample(x0, noise, t)
    gap = _linear_times(r - t, x_t)
    with torch.no_grad():
        # consistency training: x_r on the same noise; distillation: one Euler step of the teacher's ODE from x_t
        x_r = path.sample(x0, noise, r) if teacher is None else x_t + gap * teacher(x_t, t, "velocity").to(x_t.dtype)
    # the same dropout mask in both evaluations (ECT's "shared dropout"): replay the RNG state for the second one
    devices = [x0.device] if x0.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.no_grad():
            f_r = x_r - _linear_times(r, x_r) * net(x_r, (scale * r).float().to(x0.device), y).float()
            f_r = torch.where(_linear_times(r, x_r) > 0, f_r, x_r)  # f(x, 0) = x
    f_t = x_t - _linear_times(t, x_t) * net(x_t, (scale * t).float().to(x0.device), y).float()
    distance = ((f_t - f_r).flatten(1).pow(2).mean(1) + 1e-12).sqrt()
    weight = (1 / rho_t**2 + 1 / sigma_data**2).float().to(x0.device)
    return (weight * distance).mean()


def ect_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
             y: torch.Tensor | None = None, *, progress: float = 0.0, stages: int = 4, q: float = 2.0, k: float = 8.0,
             b: float = 1.0, log_rho_mean: float = -1.1, log_rho_std: float = 2.0, sigma_data: float = 0.5
             ) -> torch.Tensor:
    r"""Easy consistency tuning (ECT; Geng et al., ICLR 2025), on the linear path with :math:`\rho = t/(1-t)` in the role
    of EDM's :math:`\sigma`. The consistency function is :math:`f(x, t) = x - tF_\theta(x, t)` (so a flow-matching
    network is its starting point: :math:`f` is then the denoiser). With :math:`\log\rho_t\sim N(-1.1, 2^2)` and
    :math:`\rho_r = \rho_t\,(1 - q^{-(j+1)}(1 + k\,\mathrm{sigmoid}(-b\rho_t)))` clipped at 0, the same noise at both times,

    .. math:: \mathcal L = \Big(\tfrac{1}{\rho_t^2} + \tfrac{1}{\sigma_\text{data}^2}\Big)\,
              \big\lVert f_\theta(x_t, t) - \operatorname{sg} f_\theta(x_r, r)\big\rVert_2,

    with :math:`f(x_r, 0) = x_r = x_0`. The weight is the official code's ``snrpk`` weighting (its EDM2 setting; its
    CIFAR-10 setting weights by :math:`1/(t - r)` instead); q = 2 as in its CIFAR-10 runs. The stage :math:`j` runs
    from 0 to ``stages - 1`` over training (``progress``), so the gap :math:`t - r` shrinks from "denoise to the data" towards the consistency condition between neighbours. The
    norm is the root mean square over pixels (ECT's L2 norm divided by :math:`\sqrt d`), averaged over the batch."""
    return _consistency_loss(net, x0, schedule, generator, y, None, progress, stages, q, k, b, log_rho_mean,
                             log_rho_std, sigma_data)


def consistency_distillation_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule,
                                  generator: torch.Generator, y: torch.Tensor | None = None, *, teacher: Predictor,
                                  progress: float = 0.0, stages: int = 4, q: float = 2.0, k: float = 8.0,
                                  b: float = 1.0, log_rho_mean: float = -1.1, log_rho_std: float = 2.0,
                                  sigma_data: float = 0.5) -> torch.Tensor:
    r"""Consistency distillation (Song et al. 2023, eq. 7) with :func:`ect_loss`'s times, weights and norm: the
    earlier point is one Euler step of the teacher's probability-flow ODE from :math:`x_t`,
    :math:`x_r = x_t + (r - t)\,u_t(x_t)` (Song et al. take a Heun step), instead of the same noise at time :math:`r`.
    For the exact consistency function and an exact teacher the loss divided by the gap vanishes with the gap."""
    return _consistency_loss(net, x0, schedule, generator, y, teacher, progress, stages, q, k, b, log_rho_mean,
                             log_rho_std, sigma_data)


def progressive_distillation_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule,
                                  generator: torch.Generator, y: torch.Tensor | None = None, *, teacher: Predictor,
                                  student_steps: int) -> torch.Tensor:
    r"""Progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2) of a sampler of evenly spaced steps on the
    linear path, where DDIM's step is Euler's: one student step from :math:`t_i = 1 - i/N` to :math:`t_{i+1}` (``N =
    student_steps``) must land where two teacher steps of half the size land. For a velocity student the target is
    then the average of the teacher's two velocities, :math:`\tfrac12\big(u_{t_i}(x) + u_{t_{i+1/2}}(x + (t_{i+1/2} -
    t_i)\,u_{t_i}(x))\big)`, regressed with the mean squared error over pixels: the student learns its teacher's
    *sampler* on a coarser grid, not the ODE's flow map, so the chain's ceiling is its first teacher's sampler. The
    student starts from the teacher's weights (``init_from``)."""
    if student_steps < 1:
        raise ValueError(f"student_steps must be >= 1, got {student_steps}")
    n = x0.shape[0]
    i = torch.randint(0, student_steps, (n,), generator=generator).double()
    t, t_mid = 1 - i / student_steps, 1 - (i + 0.5) / student_steps
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = LinearPath().sample(x0, noise, t)
    with torch.no_grad():
        first = teacher(x_t, t, "velocity")
        second = teacher(x_t + _linear_times(t_mid - t, x_t) * first, t_mid, "velocity")
        target = 0.5 * (first + second).float()
    return (net(x_t, (schedule.T * t).float().to(x0.device), y).float() - target).pow(2).mean()


def _no_labels(y: torch.Tensor | None, objective: str) -> None:
    if y is not None:
        raise ValueError(f"the {objective} objective trains an unconditional flow map: set class_conditional=False")


def _two_times(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) with t >= s, both uniform on (0, 1) before sorting: a start and an end of a jump towards the data."""
    a, b = torch.rand(n, generator=generator, dtype=torch.float64), torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.maximum(a, b), torch.minimum(a, b)


def meanflow_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                  y: torch.Tensor | None = None, *, flow_matching_share: float = 0.75,
                  adaptive_power: float = 0.0, teacher: Predictor | None = None) -> torch.Tensor:
    r"""MeanFlow (Geng et al. 2025, eqs. 6–10) for a two-time network :math:`\bar u_\theta(x, t, s)` on the linear path:
    the MeanFlow identity :math:`\bar u(x_t, t, s) = u_t(x_t) - (t - s)\,\tfrac{d}{dt}\bar u(x_t, t, s)` with the
    conditional velocity :math:`\varepsilon - x_0` for :math:`u_t` and the total derivative
    :math:`\tfrac{d}{dt}\bar u = \partial_x\bar u\,u_t + \partial_t\bar u` (one Jacobian-vector product, tangent
    :math:`(u_t, 1, 0)`), regressed with a stop-gradient on the target. A ``flow_matching_share`` of the batch has
    :math:`s = t` (plain flow matching; 0.75 in the official ImageNet config). With a ``teacher``, its velocity (the
    marginal one) replaces the conditional velocity: MeanFlow distillation, whose loss the exact map makes zero.
    ``adaptive_power`` :math:`p > 0` divides each sample's squared error :math:`e` by
    :math:`\operatorname{sg}(e + 10^{-2})^p` (their adaptive loss weighting, :math:`p = 1` in the paper, there with
    :math:`10^{-3}` on the summed rather than the mean squared error). Times are uniform here, where the paper draws
    them logit-normal."""
    _no_labels(y, "meanflow")
    n = x0.shape[0]
    t, s = _two_times(n, generator)
    s = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < flow_matching_share, t, s)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    path = LinearPath()
    x_t = path.sample(x0, noise, t)
    if teacher is None:
        velocity = path.conditional_velocity(x0, noise, t)
    else:
        with torch.no_grad():
            velocity = teacher(x_t, t, "velocity").float()
    scale = float(schedule.T)  # the network sees T t: d/dt = T d/d(T t), so the time tangent is T
    t_in, s_in = (scale * t).float().to(x0.device), (scale * s).float().to(x0.device)

    def average_velocity(x: torch.Tensor, t_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        return net(x, t_, s_).float()

    u, du_dt = torch.func.jvp(average_velocity, (x_t, t_in, s_in),
                              (velocity, torch.full_like(t_in, scale), torch.zeros_like(s_in)))
    target = velocity - _linear_times(t - s, x_t) * du_dt
    error = (u - target.detach()).pow(2).flatten(1).mean(1)
    if adaptive_power:
        error = error / (error.detach() + 1e-2) ** adaptive_power
    return error.mean()


def semigroup_loss(net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                   y: torch.Tensor | None = None, *, flow_matching_weight: float = 1.0) -> torch.Tensor:
    r"""The semigroup property as a loss, for a two-time network :math:`\bar u_\theta(x, t, s)` on the linear path:
    the jump :math:`t\to s` must equal, through a uniform intermediate time :math:`m \in (s, t)`, the jump
    :math:`t \to m` followed by :math:`m \to s`, both taken by the stop-gradient network (the discrete semigroup form of
    the consistency-trajectory idea, Kim et al., ICLR 2024, and the two-halves form of shortcut models, Frans et al.
    2024, with :math:`m` anywhere in between), compared as average velocities; plus ``flow_matching_weight`` times flow
    matching on :math:`\bar u_\theta(x, t, t)`, which anchors the short jumps to the ODE."""
    _no_labels(y, "semigroup")
    n = x0.shape[0]
    t, s = _two_times(n, generator)
    m = s + (t - s) * torch.rand(n, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    path, scale = LinearPath(), schedule.T
    x_t = path.sample(x0, noise, t)

    def jump(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        u = net(x, (scale * start).float().to(x.device), (scale * end).float().to(x.device)).float()
        return x + _linear_times(end - start, x) * u

    with torch.no_grad():
        target = (jump(jump(x_t, t, m), m, s) - x_t) / _linear_times(s - t, x_t)
    u = net(x_t, (scale * t).float().to(x0.device), (scale * s).float().to(x0.device)).float()
    on_path = net(x_t, (scale * t).float().to(x0.device), (scale * t).float().to(x0.device)).float()
    flow_matching = (on_path - path.conditional_velocity(x0, noise, t)).pow(2).mean()
    return (u - target).pow(2).mean() + flow_matching_weight * flow_matching


OBJECTIVES: dict[str, Objective] = {"ddpm_eps": ddpm_eps_loss, "flow_matching": flow_matching_loss,
                                    "reflow": reflow_loss, "classification": classification_loss,
                                    "noisy_classification": noisy_classification_loss, "ect": ect_loss,
                                    "consistency_distillation": consistency_distillation_loss,
                                    "progressive_distillation": progressive_distillation_loss,
                                    "meanflow": meanflow_loss, "semigroup": semigroup_loss}
