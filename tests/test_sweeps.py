"""Chapter 6's sweep (diffbook.sweeps): budgets of network evaluations spent exactly, reproducible stochastic samplers,
and the ancestral reference on a DDPM network's own steps."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffbook.paths import VPPath
from diffbook.predictors import Predictor, predictor_from_trained
from diffbook.samplers import FAST_SAMPLERS, karras_times, sample_ancestral, sample_ddim, step_times
from diffbook.schedules import NoiseSchedule
from diffbook.sweeps import ancestral_reference, nfe_spent, nfe_sweep, ode_errors, rms_distance, steps_for_nfe
from diffbook.toy import GaussianMixture, exact_predictor

GAUSSIAN = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1.0, -2.0]], dtype=torch.float64),
                           torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64))


def exact_eps(mixture, path):
    return exact_predictor(mixture, path, "eps")


def test_steps_for_nfe_counts_heuns_skipped_last_correction():
    assert steps_for_nfe("heun", 10) == 5 and steps_for_nfe("heun", 5) == 3 and steps_for_nfe("ddim", 5) == 5
    assert steps_for_nfe("edm", 7) == 4 and nfe_spent("edm", 4) == 7 and nfe_spent("dpm++2m", 4) == 4
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        steps_for_nfe("ddim", 0)


def test_nfe_sweep_spends_exactly_the_requested_evaluations():
    calls = []
    inner = exact_eps(GAUSSIAN, VPPath())
    counting = Predictor(lambda x, t: calls.append(1) or inner(x, t, "eps"), "eps", VPPath())
    noise = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    samplers = {k: v for k, v in FAST_SAMPLERS.items() if k != "ddim, eta=1"}
    rows, kept = nfe_sweep(counting, noise, (1, 4, 5), lambda x: float(x.mean()), samplers=samplers,
                           keep=lambda name, nfe: nfe == 4, progress=False)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("ddim", 1), ("ddim", 4), ("ddim", 5), ("heun", 1), ("heun", 3),
                                                        ("heun", 5), ("dpm++2m", 1), ("dpm++2m", 4), ("dpm++2m", 5)]
    assert len(calls) == sum(r["nfe"] for r in rows)
    assert set(kept) == {("ddim", 4), ("dpm++2m", 4)}


def test_stochastic_ddim_in_the_sweep_is_reproducible():
    predictor = exact_eps(GAUSSIAN, VPPath())
    noise = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    run = lambda seed: nfe_sweep(predictor, noise, (3,), lambda x: float(x.sum()), progress=False, seed=seed,
                                 samplers={"eta": FAST_SAMPLERS["ddim, eta=1"]}, keep=lambda name, nfe: True)
    (row,), kept = run(0)
    # the sampler run by hand: DDIM with eta = 1 on 3 Karras steps, noise from a generator seeded with the sweep's seed
    expected = sample_ddim(predictor, noise, karras_times(VPPath(), 3), eta=1.0,
                           generator=torch.Generator().manual_seed(0)).float().clamp(-1, 1)
    assert torch.equal(kept[("eta", 3)], expected) and row["score"] == float(expected.sum())
    assert run(0)[0][0]["score"] == row["score"]  # reproducible ...
    assert not torch.equal(run(1)[1][("eta", 3)], expected)  # ... and the seed is what it depends on


class Shrink(nn.Module):
    def forward(self, x, t, y=None):
        return 0.5 * x + 1e-3 * t.reshape(-1, *([1] * (x.ndim - 1)))


def test_ancestral_reference_runs_ddpms_clipped_chain_on_its_own_steps():
    schedule = NoiseSchedule.linear(100)
    model = predictor_from_trained(SimpleNamespace(net=Shrink(), schedule=schedule,
                                                   config=SimpleNamespace(objective="ddpm_eps", T=100)))
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(6))
    row, images = ancestral_reference(model, x_T, 10, lambda x: float(x.abs().mean()), torch.Generator().manual_seed(7))
    expected = sample_ancestral(model, x_T, step_times(100, 10), generator=torch.Generator().manual_seed(7),
                                clip_x0=True).clamp(-1, 1)
    assert torch.equal(images, expected)
    assert row["sampler"] == "ancestral" and row["nfe"] == row["steps"] == 10
    assert row["score"] == float(expected.abs().mean()) and row["seconds_per_sample"] > 0
    with pytest.raises(ValueError, match="DiscretePath"):
        ancestral_reference(exact_eps(GAUSSIAN, VPPath()), torch.zeros(2, 2), 10, float, torch.Generator().manual_seed(8))


def test_rms_distance_is_per_sample_and_checks_shapes():
    a = torch.zeros(3, 1, 2, 2)
    b = torch.tensor([0.0, 1.0, 2.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    assert torch.equal(rms_distance(a, b), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        rms_distance(a, torch.zeros(3, 4))


def test_ode_errors_shrink_at_each_samplers_order_against_a_fine_solution():
    predictor = exact_eps(GAUSSIAN, VPPath())
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    fine = FAST_SAMPLERS["heun"](predictor, noise, karras_times(predictor.path, 400))
    samplers = {"ddim": FAST_SAMPLERS["ddim"], "heun": FAST_SAMPLERS["heun"], "dpm++2m": FAST_SAMPLERS["dpm++2m"]}
    errors = ode_errors(predictor, noise, (20, 40), fine, samplers)
    assert set(errors) == set(samplers) and all(set(e) == {20, 40} and e[20].shape == (64,) for e in errors.values())
    for name, order in (("ddim", 1), ("heun", 2), ("dpm++2m", 2)):  # doubling the budget doubles the steps
        ratio = errors[name][20].mean() / errors[name][40].mean()
        assert 2 ** (order - 0.5) < ratio < 2 ** (order + 0.7), (name, ratio.item())
    # the reference itself has no error against itself: the function compares, it does not re-solve
    assert torch.equal(ode_errors(predictor, noise, (400 * 2 - 1,), fine, {"heun": FAST_SAMPLERS["heun"]})["heun"][799],
                       torch.zeros(64, dtype=torch.float64))
