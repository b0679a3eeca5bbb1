"""The r² table of Lukoianov et al. (2025) for one dataset, printed as JSON (and saved with ``--out``).

    python benchmarks/locality_r2.py --dataset mnist [--samples 64] [--train-subset N] [--out FILE]
    python benchmarks/locality_r2.py --dataset mnist --check benchmarks/results/locality_r2_mnist.json --samples 4

The U-Net is the package's shipped DDPM checkpoint for the dataset (``mnist_ddpm``, ``fashion_ddpm``), read as an
x̂₀ predictor on its schedule's DiscretePath. Every method is sampled with the paper's DDIM protocol
(``sample_ddim(..., clip_x0=True)`` at t = 900, ..., 0, η = 0, x̂₀ clipped) from the same noise (seed 42, as the
authors' code) and scored by r² against the U-Net's sample, per image; also per step, on the U-Net's own
trajectory (this book's variant, not one of the paper's scores). Rows: optimal, Wiener, analytic (exact softmax), analytic (batch-averaged softmax, as the released
code), nearest training image (to x_t/√ᾱ; the authors' code does not divide by √ᾱ). The printed summary adds the
paired differences of the rows (image by image, mean and standard error). The analytic denoiser dominates the cost: about 90 s per step per 64 samples
against 60 000 training images on one CPU core (float32), 28 steps in all.

``--check RECORD`` recomputes the first ``--samples`` images of a stored record instead (from the record's own
noise draw and training-set size) and prints the largest r² difference from it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from diffbook import configs
from diffbook.data import load_dataset
from diffbook.device import describe_hardware, pick_device
from diffbook.locality_protocol import (PAPER_R2, PAPER_SEED, PAPER_THETA, R2Result, load_r2_record, paired_difference,
                                        paper_denoisers, protocol_noise, r2_experiment)
from diffbook.predictors import predictor_from_trained
from diffbook.storage import atomic_write_text
from diffbook.train import load_or_train

UNETS = {"mnist": configs.MNIST_DDPM, "fashion_mnist": configs.FASHION_DDPM}


def experiment(dataset: str, samples: int, seed: int = PAPER_SEED, train_subset: int | None = None,
               analytic: bool = True, progress: bool = True, draw: int | None = None) -> tuple[R2Result, dict]:
    """The whole protocol on CPU: the :class:`R2Result` and the record's metadata. ``draw``: the images are the
    first ``samples`` of a draw of that many (a stored record's count), to reproduce a record's first images."""
    device = pick_device("cpu")
    model = load_or_train(UNETS[dataset], device=device)
    model.net.eval()
    train = load_dataset(dataset, "train").tensor().flatten(1).double()
    if train_subset:
        train = train[:train_subset]
    x_T = protocol_noise(draw or samples, seed)[:samples]
    start = time.time()
    result = r2_experiment(predictor_from_trained(model),
                           paper_denoisers(train, model.schedule.path(), PAPER_THETA[dataset], analytic=analytic),
                           x_T, progress=progress)
    return result, {
        "dataset": dataset, "seed": seed, "train_images": len(train),
        "theta": PAPER_THETA[dataset], "unet": model.config.name, "unet_sha256": model.manifest.get("sha256"),
        "command": "python " + " ".join(sys.argv), "hardware": describe_hardware(device),
        "threads": torch.get_num_threads(), "wall_time_s": round(time.time() - start, 1),
        "torch": torch.__version__, "paper_r2_analytic": PAPER_R2.get(dataset),
    }


def run(dataset: str, samples: int, seed: int = PAPER_SEED, train_subset: int | None = None, analytic: bool = True,
        progress: bool = True) -> dict:
    """The whole protocol on CPU; returns the JSON-ready record (per-image values included)."""
    result, meta = experiment(dataset, samples, seed, train_subset, analytic, progress)
    return {**meta, **result.to_record()}


def check(path: str, samples: int, progress: bool = True) -> dict:
    """Recompute the first ``samples`` images of the record at ``path`` (its dataset, seed, noise draw and
    training-set size) and compare: the largest r² difference, final or per step."""
    stored = load_r2_record(path)
    if stored is None:
        raise FileNotFoundError(f"no record at {path}")
    samples = min(samples, stored["samples"])
    result, meta = experiment(stored["dataset"], samples, stored["seed"], stored["train_images"], progress=progress,
                              draw=stored["samples"])
    return {"record": str(path), "samples": samples, "unet_sha256_matches": meta["unet_sha256"] == stored["unet_sha256"],
            "max_difference": result.max_difference(stored), "wall_time_s": meta["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(UNETS), default="mnist")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=PAPER_SEED)
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--no-analytic", action="store_true", help="skip the (slow) analytic denoiser rows")
    parser.add_argument("--out", default=None, help="also write the JSON here, atomically (the chapter reads "
                        "benchmarks/results/locality_r2_DATASET.json)")
    parser.add_argument("--check", default=None, metavar="RECORD", help="recompute the first --samples images of "
                        "this stored record (its seed, noise draw and training-set size) and print the largest r² "
                        "difference instead of a new record")
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check(args.check, args.samples), indent=2))
        return
    record = run(args.dataset, args.samples, args.seed, args.train_subset, not args.no_analytic)
    text = json.dumps(record, indent=1)
    if args.out:
        atomic_write_text(args.out, text)
    summary = {key: value for key, value in record.items() if key not in ("final", "per_step")}
    rows = list(record["final"])
    summary["paired_differences"] = {f"{a} - {b}": {score: paired_difference(record, a, b, score)
                                                    for score in ("final", "per_step")}
                                     for i, a in enumerate(rows) for b in rows[i + 1:]}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
