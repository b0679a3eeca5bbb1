import pytest
import torch

from diffbook.device import autocast_dtype, pick_device, seed_everything
from diffbook.profiles import by_profile, current_profile


def test_seed_everything_reproduces_bit_for_bit_on_cpu():
    g = seed_everything(123)
    a = (torch.randn(5), torch.randn(3, generator=g), torch.nn.Linear(4, 4).weight.detach().clone())
    g = seed_everything(123)
    b = (torch.randn(5), torch.randn(3, generator=g), torch.nn.Linear(4, 4).weight.detach().clone())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_device_override_and_precision_rules(monkeypatch):
    monkeypatch.setenv("DIFFBOOK_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    assert autocast_dtype(torch.device("mps")) is None  # float32 on Apple silicon
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be"):
        autocast_dtype(torch.device("cpu"), "fp8")


def test_profiles_come_from_the_environment_and_are_validated(monkeypatch):
    monkeypatch.delenv("DIFFBOOK_PROFILE", raising=False)
    assert current_profile() == "default"
    monkeypatch.setenv("DIFFBOOK_PROFILE", "smoke")
    assert current_profile() == "smoke" and current_profile("full") == "full"
    assert by_profile(None, smoke=1, default=2, full=3) == 1
    monkeypatch.setenv("DIFFBOOK_PROFILE", "fast")
    with pytest.raises(ValueError, match="expected one of smoke, default, full"):
        current_profile()
