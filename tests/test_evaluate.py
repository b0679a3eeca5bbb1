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
from diffbook.configs import CIFAR10_CLASSIFIER_SMOKE, CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE
from diffbook.metrics import STANDARD_FID_LIBRARY, standard_fid
from diffbook.storage import sha256_file
from diffbook.train import run_dir, train

CPU = torch.device("cpu")


@pytest.fixture
def trained_cifar_smoke(isolated_cache, tiny_images, monkeypatch):
    """The smoke CIFAR-10 DDPM and feature classifier, trained on 64 synthetic images, which also serve as the
    evaluation's train and test splits."""
    monkeypatch.setattr(evaluate, "load_dataset", training_data.load_dataset)  # the fixture's synthetic data
    return train(CIFAR10_DDPM_SMOKE, device=CPU, progress=False), train(CIFAR10_CLASSIFIER_SMOKE, device=CPU,
                                                                         progress=False)


def test_the_command_line_scores_a_trained_cifar_model_and_writes_its_report(trained_cifar_smoke, capsys):
    assert evaluate.missing_checkpoints(CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE) == ["mnist_classifier_smoke"]
    assert evaluate.not_evaluated_because("full", CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE) is None
    assert "only the full profile" in evaluate.not_evaluated_because("default", CIFAR10_DDPM_SMOKE)
    assert "`python -m diffbook.train mnist_classifier_smoke`" in evaluate.not_evaluated_because(
        "full", CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE)
    evaluate.main(["cifar10_ddpm_smoke", "--classifier", "cifar10_classifier_smoke", "--samples", "12",
                   "--sampler", "heun", "--nfe", "4", "--batch-size", "5", "--no-standard-fid"])
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert evaluate.describe(report) in printed.err and "heun 3 NFE, 12 samples: classifier FD" in printed.err
    written = run_dir(CIFAR10_DDPM_SMOKE) / "cifar10_ddpm_smoke.quality-heun-4nfe-12.json"
    assert json.loads(written.read_text()) == report
    assert report["model_sha256"] == sha256_file(run_dir(CIFAR10_DDPM_SMOKE) / "cifar10_ddpm_smoke.pt")
    assert report["nfe"] == 3  # Heun: 2 steps on a grid ending at t = 0 spend 3 of the 4 evaluations allowed
    assert report["samples"] == report["floor_samples"] == 12 and report["dataset"] == "cifar10"
    assert report["classifier_fd"] > 0 and report["classifier_fd_floor"] > 0 and report["classifier_fd_floor_std"] > 0
    assert report["standard_fid"] is None and report["standard_fid_note"] == "not asked for"


def test_samples_are_reproducible_and_cover_every_sampler(trained_cifar_smoke):
    from diffbook.predictors import predictor_from_trained
    predictor = predictor_from_trained(trained_cifar_smoke[0])
    for sampler in evaluate.SAMPLER_CHOICES:
        first = evaluate.draw_samples(predictor, sampler, 3, 7, (3, 32, 32), CPU, seed=4, batch_size=3, progress=False)
        again = evaluate.draw_samples(predictor, sampler, 3, 7, (3, 32, 32), CPU, seed=4, batch_size=3, progress=False)
        assert first.shape == (7, 3, 32, 32) and torch.equal(first, again), sampler
        assert first.abs().max() <= 1
    other_seed = evaluate.draw_samples(predictor, "ddim", 3, 7, (3, 32, 32), CPU, seed=5, progress=False)
    assert not torch.equal(other_seed, evaluate.draw_samples(predictor, "ddim", 3, 7, (3, 32, 32), CPU, seed=4,
                                                             progress=False))
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        evaluate.draw_samples(predictor, "euler", 3, 7, (3, 32, 32), CPU)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_without_torch_fidelity_the_report_says_what_to_install(trained_cifar_smoke):
    report = evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 6, sampler="ddim", nfe=2,
                                              device=CPU, progress=False)
    assert report["standard_fid"] is None and f"pip install {STANDARD_FID_LIBRARY}" in report["standard_fid_note"]
    assert evaluate.describe(report).endswith("no standard FID")
    assert evaluate.describe({**report, "standard_fid": 3.456}).endswith(f"FID 3.46 ({STANDARD_FID_LIBRARY})")


def test_bad_requests_name_what_to_fix(isolated_cache):
    with pytest.raises(FileNotFoundError, match="python -m diffbook.train cifar10_ddpm_smoke"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_CLASSIFIER_SMOKE, 4, device=CPU)
    with pytest.raises(ValueError, match="trained on mnist"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, MNIST_CLASSIFIER_SMOKE, 4, device=CPU)
    with pytest.raises(ValueError, match="not a feature classifier"):
        evaluate.evaluate_sample_quality(CIFAR10_DDPM_SMOKE, CIFAR10_DDPM_SMOKE, 4, device=CPU)


def test_standard_fid_hands_8_bit_rgb_images_and_the_weights_to_torch_fidelity(tmp_path, monkeypatch):
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
    assert seen["fid"] and seen["cuda"] is False and seen["feature_extractor_weights_path"] == str(weights)
    assert len(seen["input1"]) == 4 and len(seen["input2"]) == 6
    item = seen["input1"][2]
    assert item.dtype == torch.uint8 and item.shape == (3, 5, 5)
    assert item[:, 0].tolist() == [[0, 64, 128, 255, 255]] * 3  # (x + 1) * 127.5, rounded; grey repeated to RGB
    assert torch.equal(seen["input2"][0], torch.full((3, 5, 5), 128, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="no Inception weights at"):
        standard_fid(grey, colour, weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="expected images of shape"):
        standard_fid(torch.zeros(2, 2, 5, 5), colour)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # not installed: the import fails
    with pytest.raises(ImportError, match=f"pip install {STANDARD_FID_LIBRARY}"):
        standard_fid(grey, colour)
