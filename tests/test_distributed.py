"""Data-parallel training on the CPU with the gloo backend: two processes take the steps one process takes with the
same global batch, and an interrupted two-process run resumes to the same weights."""
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from diffbook.configs import CONFIGS
from diffbook.distributed import Group, local_slice

CONFIG = CONFIGS["ring_fm_smoke"].replace(name="ddp_ring", steps=6, checkpoint_every=3, batch_size=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cache: str, max_steps: int | None,
            terminate: tuple[int, int] | None) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "DIFFBOOK_CACHE": cache})
    torch.set_num_threads(1)
    import torch.distributed as dist

    import diffbook.train as train_module
    if terminate is not None and terminate[0] == rank:  # this rank receives SIGTERM after its n-th step
        real, updates = train_module._update_ema, [0]

        def update_then_terminate(*args):
            real(*args)
            updates[0] += 1
            if updates[0] == terminate[1]:
                os.kill(os.getpid(), signal.SIGTERM)
        train_module._update_ema = update_then_terminate
    try:
        train_module.train(CONFIG, device=torch.device("cpu"), progress=False, max_steps=max_steps)
    except train_module.Interrupted as stop:  # every rank records how it stopped
        (Path(cache) / f"stopped-{rank}").write_text(str(int(stop.signum)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(world: int, cache, max_steps: int | None = None, terminate: tuple[int, int] | None = None) -> dict:
    """Train CONFIG in ``world`` fresh processes (one: a plain single-process run) with its own cache; its state."""
    mp.start_processes(_worker, args=(world, _free_port(), str(cache), max_steps, terminate), nprocs=world,
                       start_method="spawn")
    return torch.load(next((cache / "runs").glob("ddp_ring-*/state.pt")), weights_only=False)


def _close(a: dict, b: dict) -> None:
    for key in ("net", "ema"):
        for name, value in a[key].items():
            assert torch.allclose(value, b[key][name], rtol=1e-5, atol=1e-6), f"{key}.{name}"
    # Adam's moments see the gradients' scale, which the weights (Adam normalises it) hardly do, and so do the losses
    for index, moments in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            other = b["optimizer"]["state"][index][name]
            assert torch.allclose(moments[name], other, rtol=1e-4, atol=1e-9), f"optimizer {index}.{name}"
    assert torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5)


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(tmp_path):
    single = _run(1, tmp_path / "one")
    double = _run(2, tmp_path / "two")
    assert single["step"] == double["step"] == CONFIG.steps
    _close(single, double)
    assert torch.equal(single["generator"], double["generator"])  # the same random numbers were drawn
    # and the weights did move: the comparison is not between two untouched initialisations
    assert max((single["net"][k] - v).abs().max().item() for k, v in _initial().items()) > 1e-4


def _initial() -> dict:
    torch.manual_seed(CONFIG.seed)
    return CONFIG.build_net().state_dict()


def test_an_interrupted_two_process_run_resumes_to_the_same_weights(tmp_path):
    stopped = _run(2, tmp_path / "resumed", max_steps=3)
    assert stopped["step"] == 3
    resumed = _run(2, tmp_path / "resumed")
    uninterrupted = _run(2, tmp_path / "straight")
    assert resumed["step"] == uninterrupted["step"] == CONFIG.steps
    _close(resumed, uninterrupted)


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_the_run_resumes(tmp_path):
    stopped = _run(2, tmp_path / "killed", terminate=(1, 4))  # rank 1 is sent SIGTERM after step 4 of 6
    assert stopped["step"] == 4  # rank 0 saved the step that both ranks finished (checkpoints: every 3 steps)
    assert [(tmp_path / "killed" / f"stopped-{rank}").read_text() for rank in (0, 1)] == [str(int(signal.SIGTERM))] * 2
    resumed = _run(2, tmp_path / "killed")
    uninterrupted = _run(2, tmp_path / "straight")
    assert resumed["step"] == uninterrupted["step"] == CONFIG.steps
    _close(resumed, uninterrupted)


def test_the_manifest_records_the_torchrun_command_that_started_the_run(monkeypatch, capsys):
    import diffbook.train as train_module
    from diffbook.train import command_line
    given = {}
    monkeypatch.setattr(train_module, "train", lambda config, **kwargs: given.update(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # not rank 0: it prints no manifest
    train_module.main(["ring_fm_smoke", "--device", "cpu"])
    assert given["command"] == "torchrun --nproc_per_node=2 -m diffbook.train ring_fm_smoke --device cpu"
    args = ["cifar10_ddpm_full", "--device", "cuda"]
    assert command_line(args, {}) == "python -m diffbook.train cifar10_ddpm_full --device cuda"
    assert command_line(args, {"WORLD_SIZE": "1"}) == "python -m diffbook.train cifar10_ddpm_full --device cuda"
    assert command_line(args, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}) == \
        "torchrun --nproc_per_node=4 -m diffbook.train cifar10_ddpm_full --device cuda"
    assert command_line(args, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == \
        "torchrun --nnodes=2 --nproc_per_node=8 -m diffbook.train cifar10_ddpm_full --device cuda"


def test_a_batch_must_split_evenly_over_the_processes():
    assert local_slice(64, Group(1, 2)) == slice(32, 64)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        local_slice(63, Group(0, 2))


def test_sharded_draws_give_each_sample_its_single_process_numbers_for_every_objective():
    # no processes: two simulated ranks of 4 against one batch of 8, for each objective of the registry that draws;
    # a stand-in network records what it is asked, and the generator must end where one process leaves it
    from diffbook import losses
    from diffbook.distributed import sharded_draws
    from diffbook.predictors import Predictor
    from diffbook.paths import LinearPath
    schedule = CONFIGS["ring_fm_smoke"].build_schedule()
    teacher = Predictor(lambda x, t: torch.zeros_like(x), "velocity", LinearPath())
    extra = {"progressive_distillation": {"teacher": teacher, "student_steps": 4},
             "consistency_distillation": {"teacher": teacher}}
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 3
    tested = []
    for name, objective in losses.OBJECTIVES.items():
        if name in ("classification", "reflow", "meanflow"):  # no draws; pairs; a JVP (covered by the processes test)
            continue

        def run(rows, group):
            seen, g = [], torch.Generator().manual_seed(1)

            def net(x, t, third=None):
                seen.append((x.detach().clone(), torch.as_tensor(t).detach().clone()))
                return torch.zeros(x.shape[0], 3) if name == "noisy_classification" else x * 0.0

            with sharded_draws(g, group, rows.stop - rows.start):
                objective(net, x0[rows], schedule, g, y[rows] if name == "noisy_classification" else None,
                          **extra.get(name, {}))
            return seen, g.get_state()

        whole, state = run(slice(0, 8), Group())
        for rank, rows in enumerate((slice(0, 4), slice(4, 8))):
            part, part_state = run(rows, Group(rank, 2))
            assert torch.equal(part_state, state), name
            assert len(part) == len(whole) > 0, name
            for (x_all, t_all), (x_part, t_part) in zip(whole, part):
                assert torch.equal(x_all[rows], x_part) and torch.equal(t_all[rows], t_part), name
        tested.append(name)
    assert {"ddpm_eps", "flow_matching", "ect", "consistency_distillation", "progressive_distillation", "semigroup",
            "noisy_classification"} <= set(tested)
