"""The offline quality metric: Fréchet distance, k-NN precision/recall, memorisation, the classifier."""
import numpy as np
import pytest
import torch

from diffbook.configs import MNIST_CLASSIFIER_SMOKE
from diffbook.losses import classification_loss
from diffbook.metrics import (GaussianStats, QualityReference, classifier_features, fd_floor, frechet_distance,
                              nearest_neighbour_distances, precision_recall, stored_classifier_features)
from diffbook.nets import Classifier, ClassifierConfig
from diffbook.schedules import NoiseSchedule


def test_frechet_distance_of_gaussians_with_known_parameters():
    # Commuting covariances: FD = |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a = GaussianStats(np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 9.0]))
    b = GaussianStats(np.array([1.0, 1.0, 0.0]), np.diag([4.0, 1.0, 1.0]))
    assert frechet_distance(a, b) == pytest.approx(5.0 + 1 + 1 + 4)
    # Non-commuting 2x2 case against the trace of the symmetric form (S1^1/2 S2 S1^1/2)^1/2.
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(2, 2, 2))
    s1, s2 = m1 @ m1.T + np.eye(2), m2 @ m2.T + np.eye(2)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    w2 = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(w2).sum()
    assert frechet_distance(GaussianStats(np.zeros(2), s1), GaussianStats(np.zeros(2), s2)) == pytest.approx(expected)


def test_identical_sets_are_at_distance_zero_and_samples_converge():
    feats = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet_distance(GaussianStats.of(feats), GaussianStats.of(feats))) < 1e-8
    other = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    # FD of the two fitted Gaussians -> |0.5|^2 * 8 = 2, plus a positive finite-sample bias of order d^2 / n
    assert frechet_distance(GaussianStats.of(feats), GaussianStats.of(other)) == pytest.approx(8 * 0.25, abs=0.06)


def test_precision_and_recall_see_quality_and_coverage():
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 100
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = 0.1 * torch.randn(1000, 2, generator=gen, dtype=torch.float64)  # good samples, one mode only
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.3
    with pytest.raises(ValueError, match="feature sets"):
        precision_recall(real, torch.zeros(10, 3))


def test_nearest_training_image_detects_copies():
    train = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    samples = torch.cat([train[:3], train[:3] + 0.5])
    distances = nearest_neighbour_distances(samples, train)
    assert torch.allclose(distances[:3], torch.zeros(3), atol=1e-4) and (distances[3:] > 0.1).all()


def test_floor_uses_disjoint_draws_and_reports_spread():
    gen = torch.Generator().manual_seed(4)
    train, test = torch.randn(5000, 4, generator=gen), torch.randn(1000, 4, generator=gen)
    floor = fd_floor(train, test, n=200, seeds=4)
    assert len(floor.values) == 4 and floor.std > 0 and 0 < floor.mean < 0.5
    with pytest.raises(ValueError, match="exceeds"):
        fd_floor(train, test, n=5000)


def test_classifier_shapes_and_features():
    torch.manual_seed(0)
    net = Classifier(ClassifierConfig(channels=(8, 16), features=32)).eval()
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    assert net(x).shape == (5, 10) and net.features(x).shape == (5, 32)
    # batches of 2 (the last one short) give the features of the whole batch, of the images clipped to [-1, 1]
    assert x.abs().max() > 1
    features = classifier_features(net, x, batch_size=2)
    assert features.dtype == torch.float64  # computed in float32: compared at float32's tolerances
    torch.testing.assert_close(features.float(), net.features(x.clamp(-1, 1)))
    assert (features.float() - net.features(x)).abs().max() > 1e-3  # unclipped images give other features
    with pytest.raises(ValueError, match="expected images"):
        net.features(torch.zeros(5, 1, 32, 32))
    with pytest.raises(ValueError, match="needs labels"):
        classification_loss(net, x, NoiseSchedule.linear(10), torch.Generator().manual_seed(6))


def test_stored_features_are_the_computed_ones_and_follow_weights_and_images(isolated_cache, monkeypatch):
    torch.manual_seed(0)
    net = Classifier(ClassifierConfig(channels=(8, 16), features=32)).eval()
    images = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls = []
    net.body.register_forward_hook(lambda *args: calls.append(1))
    first = stored_classifier_features(net, images)
    assert torch.equal(first, classifier_features(net, images)) and len(calls) == 2
    stored = list((isolated_cache / "cache" / "features").glob("*.pt"))
    assert len(stored) == 1
    assert torch.equal(stored_classifier_features(net, images), first) and len(calls) == 2  # read, not recomputed
    # other images, other weights, the other mode: each is its own entry, computed afresh
    assert torch.equal(stored_classifier_features(net, images[:6]), first[:6]) and len(calls) == 3
    assert torch.equal(stored_classifier_features(net, images.flip(0)), first.flip(0)) and len(calls) == 4
    bias = net.head[1].bias.detach().clone()
    with torch.no_grad():
        net.head[1].bias.add_(1.0)  # a weight that does not change the features still changes the key
    stored_classifier_features(net, images)
    with monkeypatch.context() as patch:  # so does another torch (its kernels may differ in the last bits)
        patch.setattr(torch, "__version__", "0.0.0-other")
        stored_classifier_features(net, images)
    assert len(calls) == 6 and len(list(stored[0].parent.glob("*.pt"))) == 5
    net.train()  # dropout on: random features are refused, not stored
    with pytest.raises(ValueError, match=r"training mode .* \.eval\(\)"):
        stored_classifier_features(net, images)
    with pytest.raises(ValueError, match="training mode"):
        classifier_features(net, images)
    # a damaged file is computed again and replaced
    net.eval()
    with torch.no_grad():
        net.head[1].bias.copy_(bias)
    stored[0].write_bytes(b"not a tensor")
    assert torch.equal(stored_classifier_features(net, images), first) and len(calls) == 7
    assert torch.equal(torch.load(stored[0], weights_only=True), first)
    reference = QualityReference(net, images, images[:6])
    assert torch.equal(reference.train_features, first) and len(calls) == 7


def test_classifier_trains_through_the_common_loop(isolated_cache, tiny_images):
    from diffbook.train import train
    model = train(MNIST_CLASSIFIER_SMOKE.replace(steps=20), progress=False)
    assert model.loss_history[-1] < model.loss_history[0]
