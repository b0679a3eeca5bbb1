"""CIFAR-10's sample-quality path (``python -m diffbook.evaluate``), end to end on synthetic 3x32x32 images, and the
standard FID's hand-over to torch-fidelity (which cannot run here: it needs torchvision)."""
import importlib.util
import json
import sys
import types

import pytest
import torch

import diffbook.training_data as training_data
from diffbook import evaluate
from diffbook.configs import (CIFAR10_CLASSIFIER_SMOKE, CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE, MNIST_FM_SMOKE)
from diffbook.metrics import STANDARD_FID_LIBRARY, QualityReference, classifier_accuracy, standard_fid
from diffbook.predictors import predictor_from_trained
from diffbook.samplers import karras_times, sample_ancestral, sample_ddim, step_times
from diffbook.storage import sha256_file
from diffbook.train import run_dir, train

CPU = torch.device("cpu")
SHAPE = (3, 32, 32)


def _isolate(patch: pytest.MonkeyPatch, root, use_tiny_images) -> None:
    patch.setenv("DIFFBOOK_CACHE", str(root / "cache"))
    patch.setenv("DIFFBOOK_CHECKPOINTS", str(root / "checkpoints"))
    use_tiny_images(patch)
    patch.setattr(evaluate, "load_dataset", training_data.load_dataset)  # the same synthetic data


@pytest.fixture(scope="module")
def _trained_root(tmp_path_factory, tiny_images_into):
    """The smoke CIFAR-10 DDPM and feature classifier, trained once for this module on 64 synthetic images."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch, root, tiny_images_into)
        train(CIFAR10_DDPM_SMOKE, device=CPU, progress=False)
        train(CIFAR10_CLASSIFIER_SMOKE, device=CPU, progress=False)
    return root


@pytest.fixture
def trained_cifar_smoke(_trained_root, tiny_images_into, monkeypatch):
    """Those two networks, with the synthetic images as the evaluation's train and test splits."""
    _isolate(monkeypatch, _trained_root, tiny_images_into)
    return evaluate.trained(CIFAR10_DDPM_SMOKE, CPU)[0], evaluate.trained(CIFAR10_CLASSIFIER_SMOKE, CPU)[0]


def test_the_command_line_scores_a_trained_cifar_model_and_writes_its_report(trained_cifar_smoke, capsys):
    ddpm, classifier = trained_cifar_smoke
    assert evaluate.missing_checkpoints(CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE) == ["mnist_classifier_smoke"]
    assert evaluate.not_evaluated_because("full", CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE) is None
    assert "only the full profile" in evaluate.not_evaluated_because("default", CIFAR10_DDPM_SMOKE)
    assert "`python -m diffbook.train mnist_classifier_smoke`" in evaluate.not_evaluated_because(
        "full", CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE)
    evaluate.main(["cifar10_ddpm_smoke", "--classifier", "cifar10_classifier_smoke", "--samples", "12",
                   "--sampler", "heun", "--nfe", "4", "--batch-size", "5", "--no-standard-fid", "--device", "cpu"])
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert evaluate.describe(report) in printed.err and "heun 3 NFE, 12 samples: classifier FD" in printed.err
    written = run_dir(CIFAR10_DDPM_SMOKE) / "quality-heun-4nfe-12samples-seed0-fp32-cifar10_classifier_smoke-nofid.json"
    assert json.loads(written.read_text()) == report
    assert report["model_sha256"] == sha256_file(run_dir(CIFAR10_DDPM_SMOKE) / "cifar10_ddpm_smoke.pt")
    assert report["nfe"] == 3  # Heun: 2 steps on a grid ending at t = 0 spend 3 of the 4 evaluations allowed
    assert report["samples"] == report["floor_samples"] == 12 and report["dataset"] == "cifar10"
    assert report["classifier_fd_at_floor_samples"] is None  # the floor has as many images as the samples
    assert report["standard_fid"] is None and report["standard_fid_note"] == "not asked for"
    assert report["precision"] == "fp32" and report["torch"] == torch.__version__
    # the FD is that of these samples: drawn again independently and scored against the same real images
    images = training_data.load_dataset("cifar10").tensor()
    samples = evaluate.draw_samples(predictor_from_trained(ddpm), "heun", 4, 12, SHAPE, CPU, batch_size=5,
                                    progress=False)
    quality = QualityReference(classifier.net, images, images)
    assert report["classifier_fd"] == pytest.approx(quality.fd(samples), rel=1e-9)
    assert report["classifier_fd_floor"] == pytest.approx(quality.floor(12).mean, rel=1e-9)
    labels = torch.from_numpy(training_data.load_dataset("cifar10").labels)
    assert report["classifier_test_accuracy"] == classifier_accuracy(classifier.net, images, labels)


def test_more_samples_than_test_images_are_also_scored_at_the_floors_size(trained_cifar_smoke):
    ddpm, classifier = trained_cifar_smoke
    report = evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 70, sampler="ddim", nfe=2,
                                              device=CPU, standard=False, progress=False)
    assert report["floor_samples"] == 64 and report["samples"] == 70  # the synthetic test split has 64 images
    images = training_data.load_dataset("cifar10").tensor()
    quality = QualityReference(classifier.net, images, images)
    samples = evaluate.draw_samples(predictor_from_trained(ddpm), "ddim", 2, 70, SHAPE, CPU, progress=False)
    subset = torch.randperm(70, generator=torch.Generator().manual_seed(2))[:64]
    assert report["classifier_fd_at_floor_samples"] == pytest.approx(quality.fd(samples[subset]), rel=1e-9)
    assert report["classifier_fd_at_floor_samples"] != report["classifier_fd"]
    # every test image is in the floor's one draw: no spread is claimed for it
    assert report["classifier_fd_floor_std"] is None and report["classifier_fd_floor"] == quality.floor(64, 1).mean
    assert "from one draw, every test image, at 64; the samples' FD at that number" in evaluate.describe(report)


def test_samples_are_reproducible_and_start_from_the_same_noise_for_every_sampler(trained_cifar_smoke):
    predictor = predictor_from_trained(trained_cifar_smoke[0])
    for sampler in evaluate.SAMPLER_CHOICES:
        first = evaluate.draw_samples(predictor, sampler, 3, 7, SHAPE, CPU, seed=4, batch_size=3, progress=False)
        again = evaluate.draw_samples(predictor, sampler, 3, 7, SHAPE, CPU, seed=4, batch_size=3, progress=False)
        assert first.shape == (7, *SHAPE) and torch.equal(first, again), sampler
    # ancestral: the noise from the seed, every step's noise from seed + 1, batch by batch
    starts, steps_noise, chunks = torch.Generator().manual_seed(4), torch.Generator().manual_seed(5), []
    for size in (3, 3, 1):
        x_T = torch.randn((size, *SHAPE), generator=starts)
        with torch.no_grad():
            chunks.append(sample_ancestral(predictor, x_T, step_times(predictor.path.T, 3), generator=steps_noise,
                                           clip_x0=True).clamp(-1, 1))
    drawn = evaluate.draw_samples(predictor, "ancestral", 3, 7, SHAPE, CPU, seed=4, batch_size=3, progress=False)
    assert torch.equal(drawn, torch.cat(chunks))
    # a deterministic sampler from the same starting noise (the same seed): DDIM on its Karras times
    starts = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ddim = [sample_ddim(predictor, torch.randn((size, *SHAPE), generator=starts), karras_times(predictor.path, 3))
                for size in (3, 3, 1)]
    assert torch.equal(evaluate.draw_samples(predictor, "ddim", 3, 7, SHAPE, CPU, seed=4, batch_size=3,
                                             progress=False), torch.cat(ddim).clamp(-1, 1))
    other_seed = evaluate.draw_samples(predictor, "ddim", 3, 7, SHAPE, CPU, seed=5, progress=False)
    assert not torch.equal(other_seed, evaluate.draw_samples(predictor, "ddim", 3, 7, SHAPE, CPU, seed=4,
                                                             progress=False))
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        evaluate.draw_samples(predictor, "euler", 3, 7, SHAPE, CPU)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_without_torch_fidelity_the_report_says_what_to_install(trained_cifar_smoke):
    report = evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 6, sampler="ddim", nfe=2,
                                              device=CPU, progress=False)
    assert report["standard_fid"] is None and f"pip install {STANDARD_FID_LIBRARY}" in report["standard_fid_note"]
    assert report[STANDARD_FID_LIBRARY] == "not installed"
    assert evaluate.describe(report).endswith("no standard FID")
    assert evaluate.describe({**report, "standard_fid": 3.456}).endswith(f"FID 3.46 ({STANDARD_FID_LIBRARY})")


def test_the_standard_fid_gets_the_samples_and_the_training_images_and_its_failure_keeps_the_rest(
        trained_cifar_smoke, monkeypatch, tmp_path):
    seen = {}

    def recording(samples, reference, weights_path=None, device=None):
        seen.update(samples=samples, reference=reference, weights_path=weights_path)
        return 7.5

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in")
    monkeypatch.setattr(evaluate, "_fidelity_installed", lambda: True)
    monkeypatch.setattr(evaluate, "standard_fid", recording)
    report = evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 6, sampler="ddim", nfe=2,
                                              inception_weights=weights, device=CPU, progress=False)
    assert report["standard_fid"] == 7.5 and "against the 64 training images" in report["standard_fid_note"]
    predictor = predictor_from_trained(trained_cifar_smoke[0])
    assert torch.equal(seen["samples"], evaluate.draw_samples(predictor, "ddim", 2, 6, SHAPE, CPU, progress=False))
    assert torch.equal(seen["reference"], training_data.load_dataset("cifar10").tensor())
    assert seen["weights_path"] == weights

    def no_weights(*args, **kwargs):
        raise ValueError("could not read the Inception weights")

    monkeypatch.setattr(evaluate, "standard_fid", no_weights)
    report = evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 6, sampler="ddim", nfe=2,
                                              device=CPU, progress=False)
    assert report["standard_fid"] is None and "ValueError: could not read" in report["standard_fid_note"]
    assert report["classifier_fd"] > 0


def test_bad_requests_name_what_to_fix_before_any_work(isolated_cache, tmp_path):
    request = dict(device=CPU, progress=False)
    with pytest.raises(FileNotFoundError, match="python -m diffbook.train cifar10_ddpm_smoke"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 4, **request)
    with pytest.raises(ValueError, match="trained on mnist"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE, 4, **request)
    with pytest.raises(ValueError, match="not a feature classifier"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_DDPM_SMOKE, 4, **request)
    with pytest.raises(ValueError, match="not a DDPM image model"):
        evaluate.evaluate_sample_quality(MNIST_FM_SMOKE, MNIST_CLASSIFIER_SMOKE, 4, **request)
    with pytest.raises(ValueError, match="--samples must be at least 2"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 1, **request)
    with pytest.raises(ValueError, match="at most the schedule's 1000 steps"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 4, sampler="ancestral",
                                         nfe=1001, **request)
    with pytest.raises(FileNotFoundError, match="no Inception weights at"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 4,
                                         inception_weights=tmp_path / "missing.pth", **request)


# torch-fidelity's calculate_metrics keywords (its defaults.DEFAULTS) that standard_fid passes
_FIDELITY_KEYWORDS = {"input1", "input2", "fid", "cuda", "batch_size", "feature_extractor_weights_path", "cache",
                      "input2_cache_name", "cache_root", "verbose"}


def test_standard_fid_hands_8_bit_rgb_images_and_the_weights_to_torch_fidelity(isolated_cache, tmp_path, monkeypatch):
    seen = {}

    def calculate_metrics(**kwargs):
        seen.update(kwargs)
        return {"frechet_inception_distance": 12.5}

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics))
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in")
    grey = torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).repeat(4, 1, 5, 1)  # 3.0: clipped to 255
    colour = torch.zeros(6, 3, 5, 5)
    assert standard_fid(grey, colour, weights_path=weights, device=CPU) == 12.5
    assert set(seen) <= _FIDELITY_KEYWORDS  # a misspelt keyword would be ignored by the library: caught here
    assert seen["fid"] and seen["cuda"] is False and seen["feature_extractor_weights_path"] == str(weights)
    assert seen["verbose"] is False and seen["cache"] is True and seen["input2_cache_name"].startswith("diffbook-")
    assert len(seen["input1"]) == 4 and len(seen["input2"]) == 6
    item = seen["input1"][2]
    assert item.dtype == torch.uint8 and item.shape == (3, 5, 5)
    assert item[:, 0].tolist() == [[0, 64, 128, 255, 255]] * 3  # (x + 1) * 127.5, rounded; grey repeated to RGB
    assert torch.equal(seen["input2"][0], torch.full((3, 5, 5), 128, dtype=torch.uint8))
    first_name = seen["input2_cache_name"]  # the reference's statistics are cached under a name for its images
    standard_fid(grey, colour.clone(), device=CPU)
    assert seen["input2_cache_name"] == first_name
    standard_fid(grey, colour + 0.5, device=CPU)
    assert seen["input2_cache_name"] != first_name
    with pytest.raises(FileNotFoundError, match="no Inception weights at"):
        standard_fid(grey, colour, weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="expected images of shape"):
        standard_fid(torch.zeros(2, 2, 5, 5), colour)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # not installed: the import fails
    with pytest.raises(ImportError, match=f"pip install {STANDARD_FID_LIBRARY}"):
        standard_fid(grey, colour)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity is not installed")
def test_the_installed_torch_fidelity_knows_every_keyword_we_pass():
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_fid import KEY_METRIC_FID
    assert _FIDELITY_KEYWORDS <= set(DEFAULTS) and KEY_METRIC_FID == "frechet_inception_distance"
