import numpy as np
import pytest

from diffbook.data import ImageDataset


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the package's cache and checkpoint directories at a fresh temporary folder."""
    monkeypatch.setenv("DIFFBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFFBOOK_CHECKPOINTS", str(tmp_path / "checkpoints"))
    return tmp_path


def use_tiny_images(monkeypatch) -> ImageDataset:
    """Replace the training data with 64 synthetic 'images' (no files, no network): 1x28x28, or 3x32x32 for CIFAR-10."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=64).astype(np.int64)
    names = tuple(str(i) for i in range(10))
    datasets = {shape: ImageDataset("synthetic", "train", rng.integers(0, 256, size=(64, *shape), dtype=np.uint8),
                                    labels, names) for shape in ((1, 28, 28), (3, 32, 32))}
    monkeypatch.setattr("diffbook.training_data.load_dataset",
                        lambda name, split="train": datasets[(3, 32, 32) if name == "cifar10" else (1, 28, 28)])
    return datasets[(1, 28, 28)]


@pytest.fixture
def tiny_images(monkeypatch):
    """The training data replaced by 64 synthetic images (:func:`use_tiny_images`)."""
    return use_tiny_images(monkeypatch)


@pytest.fixture(scope="session")
def tiny_images_into():
    """:func:`use_tiny_images` itself, for fixtures of a wider scope than a test's (they bring their own patcher)."""
    return use_tiny_images


def pytest_addoption(parser):
    parser.addoption("--book-html", default=None,
                     help="a built book's html folder: test every page in headless Chromium (tests/test_rendered_pages.py)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--book-html"):
        return
    skip = pytest.mark.skip(reason="needs a built book: make test runs it with --book-html _build/smoke/_build/html")
    for item in items:
        if item.path.name == "test_rendered_pages.py":
            item.add_marker(skip)
