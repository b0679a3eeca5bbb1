import numpy as np
import pytest

from diffbook.data import ImageDataset


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the package's cache and checkpoint directories at a fresh temporary folder."""
    monkeypatch.setenv("DIFFBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFFBOOK_CHECKPOINTS", str(tmp_path / "checkpoints"))
    return tmp_path


@pytest.fixture
def tiny_images(monkeypatch):
    """Replace the training data with 64 synthetic 28x28 'images' (no files, no network)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 1, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=64).astype(np.int64)
    dataset = ImageDataset("synthetic", "train", images, labels, tuple(str(i) for i in range(10)))
    monkeypatch.setattr("diffbook.training_data.load_dataset", lambda name, split="train": dataset)
    return dataset


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
