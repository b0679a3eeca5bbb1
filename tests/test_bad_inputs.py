"""Bad input gets an error that names what to fix (networks, schedules, devices)."""
import pytest
import torch

from diffbook.device import pick_device
from diffbook.nets import MLPConfig, TimeMLP, UNet, UNetConfig
from diffbook.schedules import NoiseSchedule

TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=())


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(TINY_UNET).eval()


@pytest.fixture(scope="module")
def conditional_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), num_classes=10)).eval()


def test_unet_refuses_integer_and_float64_images(unet):
    t = torch.zeros(2)
    with pytest.raises(TypeError, match="floating-point.*ImageDataset.tensor"):
        unet(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), t)
    with pytest.raises(TypeError, match=r"float64 but the weights are torch.float32: pass x.to\(torch.float32\)"):
        unet(torch.zeros(2, 1, 28, 28, dtype=torch.float64), t)


def test_unet_time_must_match_the_batch_and_numbers_broadcast(unet):
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"t must be a number or have shape \(3,\).*got shape \(2,\)"):
        unet(x, torch.zeros(2))
    with torch.no_grad():
        expected = unet(x, torch.full((3,), 250.0))
        assert torch.equal(unet(x, 250), expected)  # a Python number means the same time for every image
        assert torch.equal(unet(x, torch.tensor(250.0)), expected)
    with pytest.raises(TypeError, match="t must be a number or a tensor"):
        unet(x, "250")


def test_labels_are_checked_and_refused_by_unconditional_networks(unet, conditional_unet):
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="unconditional.*drop y"):
        unet(x, torch.zeros(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in 0..9 .*got 0..11"):
        conditional_unet(x, torch.zeros(2), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        conditional_unet(x, torch.zeros(2), torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer labels"):
        conditional_unet(x, torch.zeros(2), torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        conditional_unet(x, torch.zeros(2), torch.tensor([0, 10]))  # 10 = "no class" is valid
    mlp = TimeMLP(MLPConfig(hidden=8, layers=1))
    with pytest.raises(ValueError, match="TimeMLP is unconditional"):
        mlp(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4, dtype=torch.long))


def test_schedule_steps_outside_0_to_T_are_refused_not_wrapped():
    schedule = NoiseSchedule.linear(T=10)
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(schedule.q_sample(x0, torch.tensor([0, 10]), noise)[:, 0],
                       schedule.signal[[0, 10]].float())
    with pytest.raises(IndexError, match=r"t must lie in 0..10 .*got 0..11"):
        schedule.q_sample(x0, torch.tensor([0, 11]), noise)
    with pytest.raises(IndexError, match=r"got -1..3"):  # would silently have meant t = 10
        schedule.q_sample(x0, torch.tensor([-1, 3]), noise)
    with pytest.raises(TypeError, match=r"integer steps 0..10.*path\(\)"):
        schedule.q_sample(x0, torch.tensor([0.5, 0.2]), noise)


def test_unavailable_devices_are_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DIFFBOOK_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="DIFFBOOK_DEVICE is 'cuda' but this torch .* sees no CUDA GPU"):
        pick_device()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="Apple MPS is not available"):
        pick_device("mps")
    monkeypatch.setenv("DIFFBOOK_DEVICE", "gpu")
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or mps"):
        pick_device()
    monkeypatch.setenv("DIFFBOOK_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_sampler_grids_outside_the_path_are_refused_and_lists_accepted():
    from diffbook.paths import LinearPath
    from diffbook.predictors import Predictor
    from diffbook.samplers import sample_ddim, sample_euler

    model = Predictor(lambda x, t: -x, "eps", LinearPath())
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    grid = [0.9, 0.5, 0.0]
    assert torch.equal(sample_euler(model, x, grid), sample_euler(model, x, torch.tensor(grid, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"times must lie in \[0, 1\].*got 0..1000.*step_times"):
        sample_euler(model, x, torch.tensor([1000.0, 500.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got -0.5..0.9"):
        sample_euler(model, x, [0.9, -0.5])
    with pytest.raises(ValueError, match="eta must lie in"):
        sample_ddim(model, x, grid, eta=-0.1)
