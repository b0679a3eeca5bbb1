import json
import os
import signal

import pytest
import torch

from diffbook.nets import UNetConfig
from diffbook.checkpoints import find_checkpoint, load_checkpoint, run_dir
from diffbook.configs import TrainConfig
from diffbook.train import load_or_train, train

TINY = TrainConfig(name="tiny", net_config=UNetConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(),
                                                      dropout=0.1).to_dict(),
                   steps=6, batch_size=8, warmup_steps=2, checkpoint_every=3, precision="fp32", seed=7)


def _weights(model):
    return {k: v.clone() for k, v in model.net.state_dict().items()}


def test_same_seed_gives_bit_identical_weights(isolated_cache, tiny_images):
    first = _weights(train(TINY, device=torch.device("cpu"), progress=False))
    for path in run_dir(TINY).iterdir():
        path.unlink()
    second = _weights(train(TINY, device=torch.device("cpu"), progress=False))
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = _weights(train(TINY.replace(seed=8), device=torch.device("cpu"), progress=False))
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_interrupted_run_resumes_to_the_same_weights(isolated_cache, tiny_images):
    cpu = torch.device("cpu")
    uninterrupted = train(TINY, device=cpu, progress=False)
    expected, expected_losses = _weights(uninterrupted), uninterrupted.loss_history
    for path in run_dir(TINY).iterdir():
        path.unlink()
    partial = train(TINY, device=cpu, progress=False, max_steps=3)  # "killed" after the step-3 checkpoint
    assert partial.manifest["steps"] == 3 and not (run_dir(TINY) / "tiny.pt").exists()
    torch.manual_seed(12345)  # whatever the global RNG did in between must not matter
    resumed = train(TINY, device=cpu, progress=False)
    assert resumed.loss_history == expected_losses
    assert all(torch.equal(expected[k], _weights(resumed)[k]) for k in expected)


def test_ctrl_c_stops_on_a_finished_step_and_resume_loses_nothing(isolated_cache, tiny_images, monkeypatch):
    cpu = torch.device("cpu")
    expected = _weights(train(TINY.replace(name="tiny_ref"), device=cpu, progress=False))
    config = TINY.replace(name="tiny_ki")
    import diffbook.train as module
    real_update, calls = module._update_ema, {"n": 0}

    def update_then_press_ctrl_c(*args):
        calls["n"] += 1
        real_update(*args)
        if calls["n"] == 4:  # mid-way between checkpoints (every 3 steps)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(module, "_update_ema", update_then_press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(config, device=cpu, progress=False)
    monkeypatch.setattr(module, "_update_ema", real_update)
    state = torch.load(run_dir(config) / "state.pt", weights_only=False)
    assert state["step"] == 4  # the step in flight finished and was saved
    resumed = train(config, device=cpu, progress=False)
    assert all(torch.equal(expected[k], _weights(resumed)[k]) for k in expected)


def test_release_writes_manifest_and_load_or_train_reuses_it(isolated_cache, tiny_images):
    out = isolated_cache / "checkpoints"
    trained = train(TINY, device=torch.device("cpu"), progress=False, out_dir=out, command="test")
    manifest = json.loads((out / "tiny.json").read_text())
    for key in ("config", "seed", "steps", "wall_time_s", "device", "hardware", "torch_version", "sha256", "command"):
        assert key in manifest
    assert manifest["steps"] == 6 and manifest["command"] == "test"
    assert find_checkpoint(TINY) == out / "tiny.pt"
    assert find_checkpoint(TINY.replace(steps=7)) is None  # another config: not this checkpoint
    assert find_checkpoint(TINY.replace(checkpoint_every=2)) == out / "tiny.pt"  # does not change the weights
    loaded = load_or_train(TINY, device=torch.device("cpu"))
    assert all(torch.equal(v, loaded.net.state_dict()[k]) for k, v in trained.net.state_dict().items())


def test_corrupt_checkpoint_is_refused_with_the_retrain_command(isolated_cache, tiny_images):
    out = isolated_cache / "checkpoints"
    train(TINY, device=torch.device("cpu"), progress=False, out_dir=out, command="python -m diffbook.train tiny")
    data = bytearray((out / "tiny.pt").read_bytes())
    data[-10] ^= 0xFF
    (out / "tiny.pt").write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="python -m diffbook.train tiny"):
        load_checkpoint(out / "tiny.pt")


def test_resume_refuses_a_state_from_another_config(isolated_cache, tiny_images):
    config = TINY.replace(steps=3)
    train(config, device=torch.device("cpu"), progress=False)
    state = torch.load(run_dir(config) / "state.pt", weights_only=False)
    state["config"]["lr"] = 1.0
    torch.save(state, run_dir(config) / "state.pt")
    with pytest.raises(RuntimeError, match="belongs to another config"):
        train(config.replace(steps=3), device=torch.device("cpu"), progress=False)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="unknown objective"):
        TINY.replace(objective="nope")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TINY.replace(steps=0)


def test_toy_data_trains_an_mlp_and_its_loss_falls(isolated_cache):
    from diffbook.nets import MLPConfig
    config = TrainConfig(name="ring_tiny", dataset="ring", net="mlp", net_config=MLPConfig(hidden=32, layers=2).to_dict(),
                         steps=150, batch_size=256, lr=3e-3, warmup_steps=10, train_subset=4096, precision="fp32")
    losses = train(config, device=torch.device("cpu"), progress=False).loss_history
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20
    from diffbook.toy import toy_samples
    with pytest.raises(ValueError, match="unknown toy dataset"):
        toy_samples("moons", 10, 0)


def test_every_shipped_checkpoint_is_found_by_its_named_config():
    from diffbook.configs import CONFIGS
    from diffbook.storage import checkpoints_dir
    shipped = sorted(path.stem for path in checkpoints_dir().glob("*.pt"))
    assert len(shipped) >= 8
    for name in shipped:
        assert find_checkpoint(CONFIGS[name]) == checkpoints_dir() / f"{name}.pt", name


def test_training_data_kinds_are_picked_by_the_dataset_name(tiny_images):
    from diffbook.checkpoints import TrainedModel
    from diffbook.configs import CONFIGS
    from diffbook.locality import add_pattern, w_pattern
    from diffbook.training_data import load_training_data

    def no_model(config):
        raise AssertionError("only reflow data needs a trained model")

    images, labels = load_training_data(TINY.replace(dataset="mnist_w", train_subset=10), no_model)
    plain = torch.from_numpy(tiny_images.images).float() / 127.5 - 1
    assert torch.equal(images, add_pattern(plain, w_pattern(28), TINY.seed)[:10]) and labels is None
    images, labels = load_training_data(TINY.replace(class_conditional=True), no_model)
    assert torch.equal(images, plain) and torch.equal(labels, torch.from_numpy(tiny_images.labels))

    # "reflow:<parent>": the parent network comes from the caller's load_model; the pairs are [ODE(noise), noise].
    parent_config = CONFIGS["ring_fm_smoke"]
    parent = TrainedModel(parent_config.build_net().eval(), parent_config, {}, [])
    asked = []
    config = CONFIGS["ring_reflow_smoke"].replace(train_subset=16)
    pairs, labels = load_training_data(config, lambda c: asked.append(c) or parent)
    assert asked == [parent_config] and pairs.shape == (16, 2, 2) and labels is None
    assert torch.equal(pairs[:, 1], torch.randn(16, 2, generator=torch.Generator().manual_seed(config.seed)))
    assert not torch.allclose(pairs[:, 0], pairs[:, 1])
    with pytest.raises(ValueError, match="unknown training data 'imagenet'"):
        load_training_data(TINY.replace(dataset="imagenet"), no_model)
    with pytest.raises(ValueError, match="unknown reflow parent"):
        load_training_data(TINY.replace(dataset="reflow:nope"), no_model)


def test_fit_trains_in_memory_reproducibly_and_refuses_a_diverging_loss():
    from diffbook.train import TrainingDiverged, fit
    target = torch.tensor([[2.0, -1.0]])

    def loss(net, generator):
        x = torch.randn(64, 2, generator=generator)
        return (net(x) - x @ target.T).pow(2).mean()

    first = fit(lambda: torch.nn.Linear(2, 1), loss, 300, lr=0.05, seed=1)
    second = fit(lambda: torch.nn.Linear(2, 1), loss, 300, lr=0.05, seed=1)
    assert torch.equal(first.weight, second.weight)  # same seed, same weights, bit for bit
    assert torch.allclose(first.weight, target, atol=1e-2) and not first.weight.requires_grad
    with pytest.raises(TrainingDiverged, match="not finite .* at step 1"):
        fit(lambda: torch.nn.Linear(2, 1), lambda net, generator: net.weight.sum() * float("nan"), 5)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        fit(lambda: torch.nn.Linear(2, 1), loss, 0)


def test_horizontal_flips_are_drawn_from_the_run_and_flip_about_half(isolated_cache, tiny_images, monkeypatch):
    import diffbook.losses as losses_module
    from diffbook.configs import CONFIGS
    from diffbook.train import train
    seen = []

    def spy(net, x0, schedule, generator, y=None):
        seen.append(x0.detach().clone())
        return losses_module.ddpm_eps_loss(net, x0, schedule, generator, y)

    monkeypatch.setitem(losses_module.OBJECTIVES, "ddpm_eps", spy)
    config = CONFIGS["cifar10_ddpm_smoke"].replace(steps=2, checkpoint_every=2)
    train(config, progress=False, device=torch.device("cpu"))
    first_run = [x.clone() for x in seen]
    from diffbook.training_data import load_training_data
    from diffbook.train import _batch_indices, load_or_train
    images, _ = load_training_data(config, load_or_train)
    originals = images[_batch_indices(0, config.batch_size, len(images), config.seed)]
    same = (first_run[0] == originals).flatten(1).all(1)
    mirrored = (first_run[0] == originals.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 4 <= mirrored.sum() <= config.batch_size - 4  # about half of 32 flipped
    seen.clear()
    train(config.replace(name="again"), progress=False, device=torch.device("cpu"))
    assert torch.equal(seen[0], first_run[0])  # the same flips from the same seed
