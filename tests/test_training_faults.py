"""Faults during training: divergence never reaches a file, SIGTERM stops like Ctrl-C, killed writes are cleaned."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import diffbook.train as train_module
from diffbook.checkpoints import build_manifest, release, run_dir
from diffbook.configs import TrainConfig
from diffbook.nets import MLPConfig
from diffbook.storage import atomic_write_bytes, remove_stale_parts, sha256_file
from diffbook.train import Interrupted, TrainingDiverged, UnreadableState, train

CPU = torch.device("cpu")
RING = TrainConfig(name="ring_tiny", dataset="ring", net="mlp", net_config=MLPConfig(hidden=16, layers=2).to_dict(),
                   steps=8, batch_size=32, warmup_steps=1, checkpoint_every=2, precision="fp32", train_subset=256,
                   seed=3)


def _released(out):
    return out / f"{RING.name}.pt", out / f"{RING.name}.json"


def test_huge_learning_rate_stops_with_an_error_and_keeps_the_good_checkpoint(isolated_cache):
    out = isolated_cache / "out"
    good = train(RING, device=CPU, progress=False, out_dir=out)
    pt, manifest = _released(out)
    digest = sha256_file(pt)
    # Same name, another config: a diverging retrain aimed at the same output directory.
    bad = RING.replace(lr=1e30)
    with pytest.raises(TrainingDiverged, match=r"not finite .* at step \d+.*lower `lr`"):
        train(bad, device=CPU, progress=False, out_dir=out)
    assert sha256_file(pt) == digest and json.loads(manifest.read_text())["sha256"] == digest
    state = run_dir(bad) / "state.pt"
    if state.exists():  # whatever was saved before the divergence holds finite weights only
        saved = torch.load(state, weights_only=False)
        assert all(torch.isfinite(v).all() for v in saved["net"].values() if v.is_floating_point())
    assert good.manifest["sha256"] == digest


def test_nan_data_is_caught_before_the_first_update(isolated_cache, monkeypatch):
    real = train_module.load_training_data

    def poisoned(config, load_model):
        x, y = real(config, load_model)
        x = x.clone()
        x[5] = float("nan")
        return x, y

    monkeypatch.setattr(train_module, "load_training_data", poisoned)
    with pytest.raises(TrainingDiverged, match="the loss is not finite"):
        train(RING, device=CPU, progress=False, out_dir=isolated_cache / "out")
    assert not (isolated_cache / "out").exists()
    assert not (run_dir(RING) / "state.pt").exists()  # the first batch holds the NaN: no state was written


def test_release_refuses_non_finite_weights_and_nan_manifests(isolated_cache):
    model = RING.build_net()
    out = isolated_cache / "out"
    manifest = build_manifest(RING, 1, 0.0, [0.5], CPU, model)
    release(model, RING, manifest, [0.5], out)
    pt, _ = _released(out)
    digest = sha256_file(pt)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="refusing to release ring_tiny: its weights"):
        release(model, RING, manifest, [0.5], out)
    model = RING.build_net()
    with pytest.raises(ValueError, match="loss history"):
        release(model, RING, manifest, [0.5, float("inf")], out)
    assert sha256_file(pt) == digest
    with pytest.raises(ValueError):  # a NaN anywhere in a manifest is not valid JSON: nothing is written
        release(model, RING, {**manifest, "final_loss": float("nan")}, [0.5], out)
    assert sha256_file(pt) == digest == json.loads(_released(out)[1].read_text())["sha256"]


_SIGTERM_SCRIPT = """
import os, signal
import diffbook.train as module
from diffbook.configs import TrainConfig
config = TrainConfig.from_dict({config!r})
real, calls = module._update_ema, {{"n": 0}}
def update_then_terminate(*args):
    calls["n"] += 1
    real(*args)
    if calls["n"] == 3:  # between the checkpoints at steps 2 and 4
        os.kill(os.getpid(), signal.SIGTERM)
module._update_ema = update_then_terminate
module.CONFIGS[config.name] = config
module.main([config.name, "--device", "cpu"])  # the command line: exits 128 + signum, no traceback
"""


def test_sigterm_saves_the_finished_step_and_exits_143(isolated_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = _SIGTERM_SCRIPT.format(config=RING.to_dict())
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "SIGTERM: stopped at step 3" in result.stderr and "Traceback" not in result.stderr
    state = torch.load(run_dir(RING) / "state.pt", weights_only=False)
    assert state["step"] == 3
    resumed = train(RING, device=CPU, progress=False)
    for path in run_dir(RING).iterdir():
        path.unlink()
    uninterrupted = train(RING, device=CPU, progress=False)
    assert resumed.loss_history == uninterrupted.loss_history
    assert all(torch.equal(v, uninterrupted.net.state_dict()[k]) for k, v in resumed.net.state_dict().items())


def test_interrupted_is_a_keyboard_interrupt_with_the_signal():
    stop = Interrupted(signal.SIGTERM, "x")
    assert isinstance(stop, KeyboardInterrupt) and stop.signum == signal.SIGTERM


def test_parts_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "weights.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".weights.pt.{dead_pid}.abc123.part"
    live = tmp_path / f".weights.pt.{os.getppid()}.def456.part"  # our parent is alive
    old_unnamed = tmp_path / ".weights.pt.zz_yy.part"
    other_file = tmp_path / f".other.pt.{dead_pid}.abc123.part"
    for path in (stale, live, old_unnamed, other_file):
        path.write_bytes(b"half")
    two_days_ago = time.time() - 2 * 86_400
    os.utime(old_unnamed, (two_days_ago, two_days_ago))
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists() and not old_unnamed.exists()
    assert live.exists() and other_file.exists()
    assert remove_stale_parts(target) == []


def test_a_truncated_state_names_the_file_and_how_to_start_over(isolated_cache):
    fresh = train(RING, device=CPU, progress=False)
    shutil.rmtree(run_dir(RING))
    train(RING, device=CPU, progress=False, max_steps=2)
    state = run_dir(RING) / "state.pt"
    truncated = state.read_bytes()[:1000]
    state.write_bytes(truncated)
    with pytest.raises(UnreadableState, match=r"cannot read the resumable state .*state.pt.*--start-over.*"
                                              r"mv '.*state.pt' '.*broken'"):
        train(RING, device=CPU, progress=False)
    assert state.read_bytes() == truncated  # the error touches nothing
    restarted = train(RING, device=CPU, progress=False, start_over=True)
    (kept,) = run_dir(RING).glob("state.pt.broken-*")
    assert kept.read_bytes() == truncated  # moved aside, not deleted
    assert restarted.manifest["steps"] == RING.steps
    for name, value in fresh.net.state_dict().items():  # a start over is a fresh run, bit for bit
        assert torch.equal(value, restarted.net.state_dict()[name]), name


def test_the_command_line_offers_start_over_for_an_unreadable_state(isolated_cache):
    train(RING, device=CPU, progress=False, max_steps=2)
    state = run_dir(RING) / "state.pt"
    state.write_bytes(b"not a state")
    ring_config = json.dumps(RING.to_dict())
    script = ("import json, sys; import diffbook.configs as c, diffbook.train as t; "
              f"cfg = c.TrainConfig.from_dict(json.loads({ring_config!r})); c.CONFIGS[cfg.name] = cfg; "
              "t.main(sys.argv[1:])")
    env = {**os.environ, "DIFFBOOK_DEVICE": "cpu"}
    refused = subprocess.run([sys.executable, "-c", script, RING.name], capture_output=True, text=True, env=env,
                             stdin=subprocess.DEVNULL, timeout=300)
    assert refused.returncode == 1  # no terminal to ask on: nothing moved, the error says how
    assert "--start-over" in refused.stderr and "Traceback" not in refused.stderr
    assert state.read_bytes() == b"not a state"
    done = subprocess.run([sys.executable, "-c", script, RING.name, "--start-over"], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == RING.steps
    assert len(list(run_dir(RING).glob("state.pt.broken-*"))) == 1


def test_broken_or_missing_manifests_are_explained(isolated_cache, capsys):
    from diffbook.checkpoints import find_checkpoint, load_checkpoint
    from diffbook.train import load_or_train
    out = isolated_cache / "checkpoints"  # the isolated DIFFBOOK_CHECKPOINTS: where shipped checkpoints live
    train(RING, device=CPU, progress=False, out_dir=out)
    pt, manifest = _released(out)
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"ring_tiny.json is not valid JSON .*truncated.*python -m diffbook.train"):
        load_checkpoint(pt)
    capsys.readouterr()
    assert find_checkpoint(RING) is None
    assert "not using" in capsys.readouterr().err
    manifest.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "sha256"}))
    with pytest.raises(ValueError, match="lacks sha256"):
        load_checkpoint(pt)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match="no manifest .* cannot be verified"):
        load_checkpoint(pt)
    capsys.readouterr()
    assert find_checkpoint(RING) is None
    assert f"not using {pt}: no manifest" in capsys.readouterr().err
    manifest.write_text(text)
    capsys.readouterr()
    assert find_checkpoint(RING.replace(lr=1e-3)) is None
    assert "another config (differs in lr)" in capsys.readouterr().err
    assert torch.equal(next(iter(load_or_train(RING, device=CPU).net.state_dict().values())),
                       next(iter(load_checkpoint(pt).net.state_dict().values())))
