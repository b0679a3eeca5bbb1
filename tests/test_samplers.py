"""Fast samplers against a closed form: on Gaussian-mixture data the exact eps is known."""
import pytest
import torch

from diffbook.conversions import Predictor
from diffbook.interpolants import LinearInterpolant, VPInterpolant
from diffbook.ode import time_grid
from diffbook.samplers import (SAMPLERS, karras_times, nfe_sweep, sample_ddim, sample_dpm_solver_pp_2m, sample_heun,
                               steps_for_nfe)
from diffbook.toy import GaussianMixture, exact_predictor, ring_mixture

GAUSSIAN = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1.0, -2.0]], dtype=torch.float64),
                           torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64))


def exact_eps(mixture, interpolant):
    return exact_predictor(mixture, interpolant, "eps")


def test_karras_times_are_decreasing_and_hit_the_ends():
    times = karras_times(VPInterpolant(), 10)
    assert len(times) == 11 and times[0] == 1.0 and times[-2] == 1e-3 and times[-1] == 0
    assert bool((times[1:] < times[:-1]).all())
    assert torch.equal(karras_times(VPInterpolant(), 1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert karras_times(VPInterpolant(), 10, to_zero=False)[-1] == 1e-3
    with pytest.raises(ValueError, match="decreasing"):
        sample_ddim(exact_eps(GAUSSIAN, VPInterpolant()), torch.zeros(2, 2), torch.tensor([0.1, 0.5]))


@pytest.mark.parametrize("sampler,order", [(sample_ddim, 1), (sample_heun, 2), (sample_dpm_solver_pp_2m, 2)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    mixture, path = ring_mixture(), VPInterpolant()
    predictor = exact_eps(mixture, path)
    noise = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = sample_heun(predictor, noise, karras_times(path, 1000))
    error = lambda n: (sampler(predictor, noise, karras_times(path, n)) - reference).norm(dim=1).mean().item()
    slope = torch.log2(torch.tensor(error(40) / error(80))).item()
    assert abs(slope - order) < 0.35, slope


@pytest.mark.parametrize("path", [VPInterpolant(), LinearInterpolant()])
def test_samplers_reach_the_gaussian(path):
    predictor = exact_eps(GAUSSIAN, path)
    t_start = 1.0 if isinstance(path, VPInterpolant) else 0.999
    noise = torch.randn(20_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noise = noise * path.sigma(torch.tensor(t_start, dtype=torch.float64)).item()
    for sampler, kwargs in ((sample_ddim, {}), (sample_ddim, {"eta": 1.0, "generator": torch.Generator().manual_seed(2)}),
                            (sample_heun, {}), (sample_dpm_solver_pp_2m, {})):
        x = sampler(predictor, noise, time_grid(200, t_start, 1e-3), **kwargs)
        assert (x.mean(0) - GAUSSIAN.mean).abs().max() < 0.04, sampler
        assert (torch.cov(x.T) - GAUSSIAN.covariance).abs().max() < 0.1, sampler  # sampling noise alone ~0.03


def test_ddim_is_dpm_solver_first_order_and_linear_path_endpoint():
    predictor = exact_eps(GAUSSIAN, VPInterpolant())
    noise = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    times = time_grid(1, 1.0, 1e-3)  # one step: DPM-Solver++ uses its first-order update, which is DDIM's
    torch.testing.assert_close(sample_dpm_solver_pp_2m(predictor, noise, times), sample_ddim(predictor, noise, times))
    assert steps_for_nfe("heun", 10) == 5 and steps_for_nfe("heun", 5) == 3 and steps_for_nfe("ddim", 5) == 5


def test_nfe_sweep_spends_exactly_the_requested_evaluations():
    calls = []
    inner = exact_eps(GAUSSIAN, VPInterpolant())
    counting = Predictor(lambda x, t: calls.append(1) or inner(x, t, "eps"), "eps", VPInterpolant())
    noise = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    samplers = {k: v for k, v in SAMPLERS.items() if k != "ddim, eta=1"}
    rows, kept = nfe_sweep(counting, noise, (1, 4, 5), lambda x: float(x.mean()), samplers=samplers,
                           keep=lambda name, nfe: nfe == 4, progress=False)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("ddim", 1), ("ddim", 4), ("ddim", 5), ("heun", 1), ("heun", 3),
                                                        ("heun", 5), ("dpm++2m", 1), ("dpm++2m", 4), ("dpm++2m", 5)]
    assert len(calls) == sum(r["nfe"] for r in rows)
    assert set(kept) == {("ddim", 4), ("dpm++2m", 4)}


def test_stochastic_ddim_in_the_sweep_is_reproducible():
    predictor = exact_eps(GAUSSIAN, VPInterpolant())
    noise = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    run = lambda: nfe_sweep(predictor, noise, (3,), lambda x: float(x.sum()), samplers={"eta": SAMPLERS["ddim, eta=1"]},
                            progress=False)[0][0]["score"]
    assert run() == run()
