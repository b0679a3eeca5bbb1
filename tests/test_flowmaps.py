"""Flow maps and the few-step objectives (chapter 9), against the closed form for Gaussian data and the ODE solver."""
import pytest
import torch

from diffbook.configs import CONFIGS, TrainConfig
from diffbook.flowmaps import FlowMap, euler_flow_map, gaussian_flow_map, ode_flow_map
from diffbook.losses import (consistency_distillation_loss, meanflow_loss, progressive_distillation_loss,
                             semigroup_loss)
from diffbook.paths import LinearPath, VPPath
from diffbook.predictors import Predictor
from diffbook.samplers import sample_consistency, sample_euler, sample_flow_map, time_grid
from diffbook.schedules import NoiseSchedule
from diffbook.toy import GaussianMixture, exact_predictor, ring_mixture

MEAN, VAR, T = torch.tensor([1.0, -0.5]), 0.3, 1000
SCHEDULE = NoiseSchedule.named("linear", T)


def _gaussian():
    return GaussianMixture.isotropic(MEAN[None], VAR**0.5)


def _points(n=64, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _as_two_time_net(flow_map: FlowMap):
    """The map's average velocity as a network seeing the times scaled by T, as the losses call it."""
    return lambda x, t, s: flow_map.average_velocity(x.double(), t.double() / T, s.double() / T).float()


def _data(n=4096, seed=1):
    return _gaussian().sample(n, torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("path", [LinearPath(), VPPath()], ids=["linear", "vp"])
def test_gaussian_flow_map_solves_the_probability_flow_ode(path):
    # independent: an adaptive ODE solve of the exact velocity of the same Gaussian (a one-component mixture)
    exact, solved = gaussian_flow_map(MEAN, VAR, path), ode_flow_map(exact_predictor(_gaussian(), path))
    x = _points()
    for t, s in ((0.9, 0.2), (0.5, 0.01), (0.1, 0.7)):  # the VP velocity is stiff at t = 0
        assert torch.allclose(exact(x, t, s), solved(x, t, s), atol=1e-7)


def test_gaussian_flow_map_is_a_semigroup_with_the_identity_at_equal_times():
    psi, x = gaussian_flow_map(MEAN, VAR), _points()
    assert torch.allclose(psi(psi(x, 0.9, 0.4), 0.4, 0.05), psi(x, 0.9, 0.05), atol=1e-12)
    assert torch.equal(psi(x, 0.3, 0.3), x)
    # at equal times the stored average velocity is the ODE's velocity
    velocity = exact_predictor(_gaussian(), LinearPath())(x, 0.3, "velocity")
    assert torch.allclose(psi.average_velocity(x, 0.3, 0.3), velocity, atol=1e-10)
    # and it pushes N(0, I) at t = 1 to the data's law N(mu, v I) at t = 0, exactly: x -> mu + sqrt(v) x
    assert torch.allclose(psi(x, 1.0, 0.0), MEAN.double() + VAR**0.5 * x, atol=1e-12)


def test_ode_flow_map_of_the_ring_is_a_semigroup_within_its_tolerance():
    psi, x = ode_flow_map(exact_predictor(ring_mixture(), LinearPath())), _points(32) * 1.0
    assert torch.allclose(psi(psi(x, 1.0, 0.5), 0.5, 0.0), psi(x, 1.0, 0.0), atol=1e-6)
    with pytest.raises(ValueError, match="one \\(t, s\\) per call"):
        psi(x, torch.linspace(0.5, 1, 32, dtype=torch.float64), 0.0)


def test_sample_flow_map_lands_on_the_same_point_from_any_grid_with_the_exact_map():
    psi, x = gaussian_flow_map(MEAN, VAR), _points()
    one = sample_flow_map(psi, x, time_grid(1))
    assert torch.allclose(one, sample_flow_map(psi, x, time_grid(4)), atol=1e-12)
    assert torch.allclose(one, sample_flow_map(psi, x, torch.tensor([1.0, 0.97, 0.3, 0.0], dtype=torch.float64)),
                          atol=1e-12)
    # Euler's map is not a semigroup: one jump and eight differ
    euler = euler_flow_map(exact_predictor(_gaussian(), LinearPath()))
    assert (sample_flow_map(euler, x, time_grid(1)) - sample_flow_map(euler, x, time_grid(8))).abs().max() > 1e-2
    with pytest.raises(TypeError, match="FlowMap"):
        sample_flow_map(exact_predictor(_gaussian(), LinearPath()), x, time_grid(2))


def test_sample_consistency_with_the_exact_consistency_function_samples_the_data():
    f = gaussian_flow_map(MEAN, VAR).consistency()
    x = _points(1)
    assert torch.allclose(sample_consistency(f, x, time_grid(1)), MEAN.double() + VAR**0.5 * x, atol=1e-12)
    n = 20_000  # four steps, fresh noise between them: still N(mu, v I); mean and variance within 5 SE
    out = sample_consistency(f, _points(n, seed=3), torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0], dtype=torch.float64),
                             generator=torch.Generator().manual_seed(4))
    assert ((out.mean(0) - MEAN.double()).abs() < 5 * (VAR / n) ** 0.5).all()
    assert ((out.var(0) - VAR).abs() < 5 * VAR * (2 / n) ** 0.5).all()


def _perturbed(flow_map: FlowMap, amount=0.1) -> FlowMap:
    """The map plus a term that grows with the jump's length: no longer a semigroup, nor an ODE's flow."""
    return FlowMap(lambda x, t, s: flow_map.fn(x, t, s) + amount * (t - s)[:, None] * x.double(), flow_map.path)


def test_semigroup_loss_is_zero_for_the_exact_map_only():
    exact, generator = gaussian_flow_map(MEAN, VAR), lambda: torch.Generator().manual_seed(5)
    zero = semigroup_loss(_as_two_time_net(exact), _data(), SCHEDULE, generator(), flow_matching_weight=0.0)
    wrong = semigroup_loss(_as_two_time_net(_perturbed(exact)), _data(), SCHEDULE, generator(), flow_matching_weight=0.0)
    assert zero < 1e-10 and wrong > 1e-4


def test_meanflow_loss_with_the_true_velocity_is_zero_for_the_exact_map_only():
    exact, teacher = gaussian_flow_map(MEAN, VAR), exact_predictor(_gaussian(), LinearPath())
    losses = [meanflow_loss(_as_two_time_net(m), _data(), SCHEDULE, torch.Generator().manual_seed(6), teacher=teacher,
                            flow_matching_share=0.25).item() for m in (exact, _perturbed(exact))]
    assert losses[0] < 1e-9 and losses[1] > 1e-4


def test_meanflow_loss_without_a_teacher_is_minimised_by_the_exact_map():
    # the conditional velocity is an unbiased target: the exact map scores the irreducible variance, a perturbed one more
    exact = gaussian_flow_map(MEAN, VAR)
    losses = [meanflow_loss(_as_two_time_net(m), _data(20_000), SCHEDULE, torch.Generator().manual_seed(7)).item()
              for m in (exact, _perturbed(exact, 0.5))]
    assert losses[1] > 1.02 * losses[0]


def _as_velocity_net(predictor: Predictor):
    return lambda x, t, y=None: predictor(x.double(), t.double() / T, "velocity").float()


def test_consistency_distillation_loss_vanishes_with_the_gap_for_the_exact_consistency_function():
    # the exact consistency function f = x - t F, i.e. F = (x - Psi_{t->0}(x)) / t, with the exact teacher: the loss
    # is the error of one Euler step of the teacher, O(gap^2), against O(gap) for a function that is not consistent
    exact = gaussian_flow_map(MEAN, VAR)
    student = Predictor(lambda x, t: exact.average_velocity(x, t, torch.zeros_like(t)), "velocity", LinearPath())
    wrong = Predictor(lambda x, t: _perturbed(exact, 1.0).average_velocity(x, t, torch.zeros_like(t)), "velocity",
                      LinearPath())
    teacher = exact_predictor(_gaussian(), LinearPath())
    ratios = []
    for stages in (4, 7):  # the last stage's gap q^-stages (times 1 + k sigmoid(-b rho)) shrinks 8-fold
        pair = [consistency_distillation_loss(_as_velocity_net(net), _data().double(), SCHEDULE,
                                              torch.Generator().manual_seed(8), teacher=teacher, progress=0.999,
                                              stages=stages, log_rho_mean=0.0, log_rho_std=0.5).item()
                for net in (student, wrong)]
        ratios.append(pair[0] / pair[1])
    assert ratios[0] < 0.2 and ratios[1] < ratios[0] / 4  # measured: 0.10, then 0.010


def test_progressive_distillation_target_is_two_teacher_steps_on_the_student_grid():
    teacher, steps = exact_predictor(_gaussian(), LinearPath()), 4

    def two_teacher_steps(x, t_scaled, y=None):  # independent: sample_euler on the teacher's grid, per student step
        t = t_scaled.double() / T
        out = torch.empty_like(x, dtype=torch.float64)
        for value in t.unique():
            rows = t == value
            grid = torch.tensor([value, value - 0.5 / steps, value - 1 / steps], dtype=torch.float64)
            out[rows] = (sample_euler(teacher, x[rows].double(), grid) - x[rows].double()) / (-1 / steps)
        return out.float()

    exact_student = progressive_distillation_loss(two_teacher_steps, _data(), SCHEDULE,
                                                  torch.Generator().manual_seed(9), teacher=teacher,
                                                  student_steps=steps)
    teacher_as_student = progressive_distillation_loss(_as_velocity_net(teacher), _data(), SCHEDULE,
                                                       torch.Generator().manual_seed(9), teacher=teacher,
                                                       student_steps=steps)
    assert exact_student < 1e-10 and teacher_as_student > 1e-5


def test_distillation_configs_check_their_teacher_and_options():
    base = CONFIGS["mnist_fm_smoke"]
    with pytest.raises(ValueError, match="init_from"):
        base.replace(name="x", objective="progressive_distillation", objective_options={"student_steps": 2})
    with pytest.raises(ValueError, match="no option steps"):
        base.replace(name="x", objective="ect", objective_options={"steps": 2})
    with pytest.raises(ValueError, match="no option"):
        base.replace(name="x", objective="progressive_distillation", init_from="mnist_fm_smoke",
                     objective_options={"student_steps": 2, "teacher": None})
    chain = [CONFIGS[f"mnist_pd{n}"] for n in (8, 4, 2, 1)]
    assert [c.init_from for c in chain] == ["mnist_fm", "mnist_pd8", "mnist_pd4", "mnist_pd2"]
    assert [c.objective_options["student_steps"] for c in chain] == [8, 4, 2, 1]
    assert CONFIGS["mnist_ect"].init_from == "mnist_fm" and isinstance(CONFIGS["mnist_ect"], TrainConfig)


def test_a_student_starts_from_its_teacher_and_learns(isolated_cache, tiny_images):
    from diffbook.train import train
    teacher = train(CONFIGS["mnist_fm_smoke"], progress=False)
    start = train(CONFIGS["mnist_pd8_smoke"].replace(steps=1), progress=False)  # one step away from the teacher
    # AdamW's first step moves each weight by at most its learning rate (here lr / warmup_steps): the student is the
    # teacher one step on, not a fresh network
    moved = max((a - b).abs().max().item() for a, b in zip(start.net.parameters(), teacher.net.parameters()))
    config = CONFIGS["mnist_pd8_smoke"]
    assert 0 < moved <= 1.001 * config.lr / config.warmup_steps
    with pytest.raises(ValueError, match="architecture"):
        train(CONFIGS["mnist_pd8_smoke"].replace(name="odd", net_config={**CONFIGS["mnist_pd8_smoke"].net_config,
                                                                        "base_channels": 16}), progress=False)


@pytest.mark.parametrize("name, tolerance", [("ring_semigroup", 0.25), ("ring_meanflow", 0.25)])
def test_the_shipped_ring_maps_are_semigroups_within_a_stated_tolerance(name, tolerance):
    # one jump 1 -> 0 against two (1 -> 1/2 -> 0) and four, mean distance over 1000 noise points; the ring's radius is
    # 4 (measured in chapter 9: 0.17 for the semigroup map, 0.21 for MeanFlow)
    from diffbook.checkpoints import find_checkpoint, load_checkpoint
    from diffbook.flowmaps import flow_map_from_trained
    path = find_checkpoint(CONFIGS[name])
    assert path is not None, f"{name} ships with the book (checkpoints/{name}.pt)"
    flow_map, x = flow_map_from_trained(load_checkpoint(path, torch.device("cpu"))), _points(1000, seed=11)
    one = sample_flow_map(flow_map, x, time_grid(1))
    for jumps in (2, 4):
        defect = (sample_flow_map(flow_map, x, time_grid(jumps)) - one).norm(dim=1).mean().item()
        assert defect < tolerance, f"{name}: one jump and {jumps} differ by {defect:.3f} on average"
    # and not a trivially self-consistent map (one that sends everything to one point): close to the true flow map
    truth = ode_flow_map(exact_predictor(ring_mixture(), LinearPath()), rtol=1e-8, atol=1e-8)(x, 1.0, 0.0)
    error = (one - truth).norm(dim=1).mean().item()
    assert error < 0.35, f"{name}: one jump lands {error:.3f} from the true flow map on average"


def test_a_student_is_stale_once_its_teacher_is_retrained(isolated_cache, tiny_images, capsys):
    from diffbook.checkpoints import find_checkpoint, read_manifest, release, run_dir
    from diffbook.train import train
    teacher_config, student_config = CONFIGS["mnist_fm_smoke"], CONFIGS["mnist_pd8_smoke"]
    teacher = train(teacher_config, progress=False, device=torch.device("cpu"))
    student = train(student_config, progress=False, device=torch.device("cpu"))
    assert student.manifest["init_from_sha256"] == teacher.manifest["sha256"]
    assert find_checkpoint(student_config) is not None
    # a teacher trained again to other weights (as on another machine): its checkpoint and manifest are replaced
    for p in teacher.net.parameters():
        p.data.add_(0.01)
    release(teacher.net, teacher_config, teacher.manifest, teacher.loss_history, run_dir(teacher_config))
    assert read_manifest(run_dir(teacher_config) / f"{teacher_config.name}.json")["sha256"] != teacher.manifest["sha256"]
    assert find_checkpoint(student_config) is None
    assert "trained from another checkpoint of mnist_fm_smoke" in capsys.readouterr().err
