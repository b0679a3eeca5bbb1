"""Guidance and inpainting (diffbook.guidance, diffbook.inpainting) against the closed forms of a labelled 2-D mixture."""
import json
from pathlib import Path

import pytest
import torch

from diffbook.configs import CONFIGS, MNIST_CFG, TrainConfig
from diffbook.guidance import classifier_guided, guided, noisy_classifier_log_likelihood, null_labels, tweedie_guided
from diffbook.inpainting import projected, repaint_nfe, repaint_schedule, replacing, sample_repaint
from diffbook.nets import NoisyClassifier, NoisyClassifierConfig
from diffbook.paths import VPPath
from diffbook.predictors import Predictor
from diffbook.samplers import sample_ancestral, sample_ddim, sample_heun, time_grid
from diffbook.toy import GaussianMixture, LabelledMixture, exact_class_log_likelihood, exact_predictor

PATH = VPPath()
LABELLED = LabelledMixture(GaussianMixture.isotropic([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [1.0, -2.0]], 0.6,
                                                     [0.3, 0.2, 0.4, 0.1]),
                           torch.tensor([0, 1, 1, 0]))
POINTS = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2


def _parts(c: int):
    return (exact_predictor(LABELLED.conditional(c), PATH, "eps"), exact_predictor(LABELLED.mixture, PATH, "eps"),
            exact_class_log_likelihood(LABELLED, c, PATH))


def _tilted_score(x: torch.Tensor, t: float, c: int, w: float) -> torch.Tensor:
    """grad of (1 + w) log p_t(x | c) - w log p_t(x), by autograd of the noised mixtures' log densities."""
    alpha, sigma = PATH.alpha(torch.tensor(t, dtype=torch.float64)).item(), PATH.sigma(torch.tensor(t, dtype=torch.float64)).item()
    x = x.clone().requires_grad_(True)
    log_tilted = ((1 + w) * LABELLED.conditional(c).noised(alpha, sigma).log_prob(x)
                  - w * LABELLED.mixture.noised(alpha, sigma).log_prob(x))
    return torch.autograd.grad(log_tilted.sum(), x)[0]


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_cfg_and_classifier_guidance_equal_the_tilted_score(w, t):
    conditional, unconditional, log_likelihood = _parts(1)
    cfg = guided(conditional, unconditional, w)(POINTS, t, "score")
    tilted = _tilted_score(POINTS, t, 1, w)
    torch.testing.assert_close(cfg, tilted, rtol=1e-9, atol=1e-9)
    # classifier guidance: scale w on the conditional model, or 1 + w on the unconditional one
    torch.testing.assert_close(classifier_guided(conditional, log_likelihood, w)(POINTS, t, "score"), tilted,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(classifier_guided(unconditional, log_likelihood, 1 + w)(POINTS, t, "score"), tilted,
                               rtol=1e-9, atol=1e-9)


def test_cfg_with_w_zero_is_the_conditional_model_in_every_kind():
    conditional, unconditional, _ = _parts(0)
    for kind in ("eps", "x0", "score", "v", "velocity"):
        torch.testing.assert_close(guided(conditional, unconditional, 0.0)(POINTS, 0.4, kind),
                                   conditional(POINTS, 0.4, kind), rtol=0, atol=0)


def test_cfg_is_the_same_combination_in_every_kind():
    conditional, unconditional, _ = _parts(1)
    w = 2.0
    for kind in ("x0", "score", "v", "velocity"):
        combined = (1 + w) * conditional(POINTS, 0.3, kind) - w * unconditional(POINTS, 0.3, kind)
        torch.testing.assert_close(guided(conditional, unconditional, w)(POINTS, 0.3, kind), combined)


def test_guidance_refuses_two_paths():
    conditional, _, _ = _parts(0)
    other = exact_predictor(LABELLED.mixture, VPPath(beta_min=0.5, beta_max=10.0), "eps")
    with pytest.raises(ValueError, match="one path"):
        guided(conditional, other, 1.0)


def test_exact_class_posterior_sums_to_one_and_matches_bayes():
    alpha, sigma = 0.8, 0.6
    probs = torch.stack([LABELLED.class_log_prob(POINTS, c, alpha, sigma).exp() for c in LABELLED.classes], 1)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(POINTS), dtype=torch.float64))
    c = 1  # Bayes: p(c | x) = p(x | c) p(c) / p(x), each density of a noised mixture
    bayes = (LABELLED.conditional(c).noised(alpha, sigma).log_prob(POINTS) + torch.log(torch.tensor(LABELLED.class_prior(c)))
             - LABELLED.mixture.noised(alpha, sigma).log_prob(POINTS))
    torch.testing.assert_close(LABELLED.class_log_prob(POINTS, c, alpha, sigma), bayes)


def test_tweedie_guidance_adds_the_gradient_through_the_denoiser():
    """The guidance term equals a central finite difference of log p(c | x0_hat(x)) in x."""
    torch.manual_seed(0)
    classifier = torch.nn.Linear(2, 3).double()
    _, unconditional, _ = _parts(0)
    labels = torch.tensor([2] * 4)
    x, t, w = POINTS[:4], 0.5, 1.5
    term = (tweedie_guided(unconditional, classifier, labels, w)(x, t, "score") - unconditional(x, t, "score")) / w

    def log_p(points):
        return torch.log_softmax(classifier(unconditional(points, t, "x0")), 1)[:, 2]

    h = 1e-5
    numeric = torch.stack([(log_p(x + h * e) - log_p(x - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)], 1)
    torch.testing.assert_close(term, numeric, rtol=1e-5, atol=1e-7)


def test_noisy_classifier_log_likelihood_is_a_log_probability():
    net = NoisyClassifier(NoisyClassifierConfig(channels=(4, 8), features=8, time_dim=8)).eval()
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t = torch.full((5,), 0.3, dtype=torch.float64)
    total = sum(noisy_classifier_log_likelihood(net, torch.full((5,), c), 1000)(x, t).exp() for c in range(10))
    torch.testing.assert_close(total, torch.ones(5))


def _square_mask(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    known = torch.linspace(-1, 1, size * size).reshape(1, size, size)
    mask = torch.zeros(1, size, size)
    mask[:, :, : size // 2] = 1
    return known, mask


def _image_model() -> Predictor:
    """An exact model of 6x6 'images' from a 2-component mixture in 36 dimensions."""
    means = torch.stack([torch.full((36,), 0.5), torch.linspace(-1, 1, 36)]).double()
    mixture = GaussianMixture.isotropic(means, 0.3)
    flat = exact_predictor(mixture, PATH, "eps")
    return Predictor(lambda x, t: flat(x.flatten(1), t).reshape(x.shape), "eps", PATH)


@pytest.mark.parametrize("sampler", [sample_ancestral, sample_ddim, sample_heun])
def test_replacement_keeps_the_known_pixels_exactly(sampler):
    known, mask = _square_mask()
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = replacing(sampler, known, mask)(_image_model(), x, time_grid(12, 0.999), generator=torch.Generator().manual_seed(3))
    assert torch.equal(out[:, mask.bool()], known[mask.bool()].expand(3, -1))
    assert torch.isfinite(out).all() and not torch.equal(out[:, ~mask.bool()], x[:, ~mask.bool()])


def test_repaint_and_ddnm_keep_the_known_pixels():
    known, mask = _square_mask()
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = _image_model()
    repainted = sample_repaint(model, x, time_grid(12, 0.999), generator=torch.Generator().manual_seed(5), known=known,
                               mask=mask, jump_length=3, resamples=3)
    assert torch.equal(repainted[:, mask.bool()], known[mask.bool()].expand(3, -1))
    ddnm = sample_ddim(projected(model, known, mask), x, time_grid(12, 0.999))
    torch.testing.assert_close(ddnm[:, mask.bool()], known[mask.bool()].expand(3, -1).double(), rtol=0, atol=1e-12)


def test_repaint_schedule_counts_the_papers_evaluations():
    # RePaint's face config (t_T 250, jump_length 10, jump_n_sample 10): 2410 reverse steps in its own scheduler
    assert repaint_nfe(250, 10, 10) == 2410
    assert repaint_nfe(50, 10, 1) == 50 and repaint_schedule(3, 1, 1) == [0, 1, 2, 3]
    walk = repaint_schedule(6, 2, 2)
    assert walk[0] == 0 and walk[-1] == 6 and all(abs(b - a) in (1, 2) for a, b in zip(walk[:-1], walk[1:]))
    with pytest.raises(ValueError, match="jump_length"):
        repaint_schedule(10, 0, 2)


def test_inpainting_refuses_a_bad_mask():
    known, mask = _square_mask()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="only 0"):
        replacing(sample_ddim, known, mask * 0.5)(_image_model(), x, time_grid(4, 0.999))
    with pytest.raises(ValueError, match="shape"):
        sample_repaint(_image_model(), x, time_grid(4, 0.999), known=known[:, :3], mask=mask)


def test_label_drop_needs_labels_and_keeps_old_identities():
    with pytest.raises(ValueError, match="class_conditional"):
        TrainConfig(name="x", label_drop=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MNIST_CFG.replace(label_drop=1.0)
    shipped = Path(__file__).parents[1] / "checkpoints"
    for name in ("mnist_ddpm", "mnist_classifier", "ring_eps"):  # a new field at its default changes no identity
        assert json.loads((shipped / f"{name}.json").read_text())["config_identity"] == CONFIGS[name].identity()
    assert MNIST_CFG.identity() != MNIST_CFG.replace(label_drop=0.2).identity()


def test_null_labels():
    assert null_labels(3, 10).tolist() == [10, 10, 10]


def test_guidance_accepts_two_builds_of_one_schedules_path():
    from diffbook.schedules import NoiseSchedule
    schedule = NoiseSchedule.named("linear", 50)
    net = lambda x, t: x * 0.1
    a, b = Predictor(net, "eps", schedule.path()), Predictor(net, "eps", schedule.path())
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(guided(a, b, 2.0)(x, 0.5, "eps"), x * 0.1)


def test_forward_jump_keeps_the_marginals():
    """x_t ~ q(x_t | x0) jumped to t' must be distributed as q(x_t' | x0) = N(alpha' x0, sigma'^2)."""
    from diffbook.inpainting import forward_jump
    n, x0 = 200_000, 0.7
    gen = torch.Generator().manual_seed(6)
    t, t_next = 0.3, 0.6
    alpha = lambda s: PATH.alpha(torch.tensor(s, dtype=torch.float64)).item()
    sigma = lambda s: PATH.sigma(torch.tensor(s, dtype=torch.float64)).item()
    x_t = alpha(t) * x0 + sigma(t) * torch.randn(n, generator=gen, dtype=torch.float64)
    jumped = forward_jump(PATH, x_t, t, t_next, gen)
    mean_se, var_se = sigma(t_next) / n**0.5, sigma(t_next) ** 2 * (2 / n) ** 0.5
    assert abs(jumped.mean().item() - alpha(t_next) * x0) < 4 * mean_se
    assert abs(jumped.var().item() - sigma(t_next) ** 2) < 4 * var_se
    with pytest.raises(ValueError, match="later"):
        forward_jump(PATH, x_t, 0.6, 0.3, gen)


def test_label_drop_replaces_the_requested_share_of_labels(isolated_cache, tiny_images, monkeypatch):
    """The training loop hands the objective 'no class' (label 10) for about label_drop of the labels."""
    import diffbook.train as train_module
    from diffbook.configs import MNIST_CFG_SMOKE
    from diffbook.losses import OBJECTIVES
    seen = []
    original = OBJECTIVES["ddpm_eps"]

    def recording(net, x0, schedule, generator, y=None):
        seen.append(y.clone())
        return original(net, x0, schedule, generator, y)

    monkeypatch.setitem(OBJECTIVES, "ddpm_eps", recording)
    config = MNIST_CFG_SMOKE.replace(steps=40, batch_size=50, label_drop=0.3, checkpoint_every=40, train_subset=64)
    train_module.train(config, device=torch.device("cpu"), progress=False)
    labels = torch.cat(seen)
    share = (labels == 10).double().mean().item()
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(labels)) ** 0.5 and labels.max() <= 10


def test_replacement_with_the_ancestral_sampler_adds_its_noise_at_every_step():
    """Run one step at a time, the ancestral chain must equal the whole chain (same noise draws, in the same order)."""
    known, mask = _square_mask()
    model = _image_model()
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = time_grid(6, 0.999)
    whole = sample_ancestral(model, x, grid, generator=torch.Generator().manual_seed(8))
    stepwise = x
    gen = torch.Generator().manual_seed(8)
    for i in range(len(grid) - 1):
        stepwise = sample_ancestral(model, stepwise, grid[i:i + 2], generator=gen, partial=True)
    torch.testing.assert_close(stepwise, whole)
    out = replacing(sample_ancestral, known, mask)(model, x, grid, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out[:, mask.bool()], known[mask.bool()].expand(3, -1).double())
