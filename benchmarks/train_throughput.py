"""Training and sampling throughput of the default U-Net on the current device, printed as JSON.

    python benchmarks/train_throughput.py [--batch 128] [--steps 20] [--device cpu]
    python benchmarks/train_throughput.py --precision-by-config [--out benchmarks/results/precision_cpu.json]
    python benchmarks/train_throughput.py --config cifar10_ddpm_full [--steps 20] [--device cuda]

The second form trains every named U-Net config's network (smoke, default, full sizes) for a few steps in fp32 and in
bf16 autocast and reports which is faster: the measurement behind each config's ``precision`` setting. The third
trains one named config's network at its own batch size and precision and estimates the hours its ``steps`` take on
this device (one process; with N GPUs under torchrun, about N times fewer when the batch splits well).

Training: AdamW steps on random batches of the network's image shape (28x28, or 32x32x3 for CIFAR-10) with the precision the training loop would pick
(bf16 autocast on CPUs with native bf16 units and on CUDA); reported with fp32 beside it.
Sampling: network evaluations of one reverse step at batch ``--sample-batch``, as images per second
per step (divide by the number of steps for whole samples).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from diffbook.device import autocast, autocast_dtype, describe_hardware, pick_device
from diffbook.nets import UNet, UNetConfig, count_parameters


IMAGE_NETS = ("unet", "classifier", "noisy_classifier")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _image_shape(net: UNet) -> tuple[int, int, int]:
    return net.config.in_channels, net.config.image_size, net.config.image_size


def train_images_per_second(net: UNet, device: torch.device, dtype, batch: int, steps: int, warmup: int = 3) -> float:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, *_image_shape(net), device=device)
    t = torch.randint(1, 1001, (batch,), device=device).float()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            started = time.perf_counter()
        with autocast(device, dtype):
            loss = net(x, t).float().pow(2).mean()  # any output shape: a U-Net's image, a classifier's logits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - started)


@torch.no_grad()
def sample_step_images_per_second(net: UNet, device: torch.device, dtype, batch: int, steps: int, warmup: int = 3) -> float:
    net.eval()
    x = torch.randn(batch, *_image_shape(net), device=device)
    t = torch.full((batch,), 500.0, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            started = time.perf_counter()
        with autocast(device, dtype):
            x = x - 1e-3 * net(x, t).float()
    _sync(device)
    net.train()
    return batch * steps / (time.perf_counter() - started)


def precision_by_config(device: torch.device, steps: int) -> dict:
    """fp32 vs bf16 training images/s for each distinct U-Net size among the named configs, at its own batch size."""
    from diffbook.configs import CONFIGS

    sizes: dict[str, list[str]] = {}
    for name, config in CONFIGS.items():
        if config.net == "unet":
            sizes.setdefault(json.dumps(config.net_config, sort_keys=True), []).append(name)
    rows = []
    for key, names in sizes.items():
        config = CONFIGS[names[0]]
        torch.manual_seed(0)
        net = config.build_net().to(device)
        speeds = {label: round(train_images_per_second(net, device, dtype, config.batch_size, steps), 1)
                  for label, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
        rows.append({"configs": names, "parameters": count_parameters(net), "batch": config.batch_size,
                     "train_images_per_s": speeds, "bf16_speedup": round(speeds["bf16"] / speeds["fp32"], 2),
                     "precision_set": sorted({CONFIGS[n].precision for n in names})})
    return {"device": device.type, "hardware": describe_hardware(device), "torch": torch.__version__,
            "steps": steps, "networks": rows}


def config_cost(name: str, device: torch.device, steps: int) -> dict:
    """Training images/s of a named config's network at its batch size and precision, and the hours its steps take."""
    from diffbook.configs import CONFIGS

    config = CONFIGS[name]
    if config.net not in IMAGE_NETS:
        raise SystemExit(f"--config {name}: its network is a {config.net!r}; this measures image networks "
                         f"({', '.join(IMAGE_NETS)})")
    torch.manual_seed(0)
    net = config.build_net().to(device)
    rate = train_images_per_second(net, device, autocast_dtype(device, config.precision), config.batch_size, steps)
    return {"config": name, "device": device.type, "hardware": describe_hardware(device), "torch": torch.__version__,
            "parameters": count_parameters(net), "batch": config.batch_size, "precision": config.precision,
            "train_images_per_s": round(rate, 1), "config_steps": config.steps,
            "hours_for_config_steps": round(config.steps * config.batch_size / rate / 3600, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision-by-config", action="store_true",
                        help="fp32 vs bf16 training speed for every named U-Net config's network")
    parser.add_argument("--config", default=None, help="a named config: its network's cost at its own batch size")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = parser.parse_args()
    device = pick_device(args.device)
    if args.config:
        print(json.dumps(config_cost(args.config, device, args.steps), indent=2))
        return
    if args.precision_by_config:
        text = json.dumps(precision_by_config(device, args.steps), indent=2)
        print(text)
        if args.out:
            from diffbook.storage import atomic_write_text
            atomic_write_text(args.out, text + "\n")
        return
    torch.manual_seed(0)
    net = UNet(UNetConfig()).to(device)
    auto = autocast_dtype(device, "auto")
    report = {"device": device.type, "hardware": describe_hardware(device), "torch": torch.__version__,
              "parameters": count_parameters(net), "batch": args.batch, "sample_batch": args.sample_batch,
              "auto_precision": str(auto or torch.float32).replace("torch.", "")}
    for label, dtype in [("fp32", None)] + ([("auto", auto)] if auto is not None else []):
        report[f"train_images_per_s_{label}"] = round(train_images_per_second(net, device, dtype, args.batch, args.steps), 1)
        report[f"sample_step_images_per_s_{label}"] = round(
            sample_step_images_per_second(net, device, dtype, args.sample_batch, args.steps), 1)
    report["ddpm_1000_step_samples_per_s_auto"] = round(report[f"sample_step_images_per_s_{'auto' if auto else 'fp32'}"] / 1000, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
