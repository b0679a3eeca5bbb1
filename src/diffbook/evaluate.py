"""Sample quality of a trained image model on its own data, from the command line: the ``full`` profile's path to
CIFAR-10 numbers.

    python -m diffbook.evaluate cifar10_ddpm_full --classifier cifar10_classifier_full --samples 10000
    python -m diffbook.evaluate cifar10_ddpm_full --classifier cifar10_classifier_full --samples 50000 \\
        --sampler ancestral --nfe 1000 --inception-weights weights-inception-2015-12-05-6726825d.pth

Draws ``--samples`` images with one of chapter 6's samplers (:data:`diffbook.sweeps.SWEEP_SAMPLERS`, or chapter 1's
``ancestral`` chain on the schedule's own steps, the DDPM paper's sampler), scores them by the classifier Fréchet
distance of :mod:`diffbook.metrics` against the training set, beside its floor (real test images of the same number,
or of all the test set when fewer), and, where torch-fidelity is installed, by the standard FID against the training
set (:func:`diffbook.metrics.standard_fid`). Ho et al. (2020) report FID 3.17 with 50,000 ancestral samples of 1000
steps against CIFAR-10's 50,000 training images; a smaller ``--samples`` gives a larger (biased) FID.

Both networks must have been trained (``python -m diffbook.train NAME``, or ``torchrun`` on several GPUs). The
report is printed and written, atomically, beside the generative model's checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoints import TrainedModel, find_checkpoint, load_checkpoint
from .configs import CIFAR10_CLASSIFIER_FULL, CIFAR10_DDPM_FULL, CONFIGS, TrainConfig
from .data import load_dataset
from .device import autocast, autocast_dtype, describe_hardware, pick_device
from .metrics import STANDARD_FID_LIBRARY, QualityReference, standard_fid
from .predictors import Predictor, predictor_from_trained
from .samplers import karras_times, sample_ancestral, step_times
from .storage import atomic_write_text, sha256_file
from .sweeps import SWEEP_SAMPLERS, nfe_spent, steps_for_nfe

SAMPLER_CHOICES = ("ancestral", *SWEEP_SAMPLERS)
CIFAR10_NETWORKS = (CIFAR10_DDPM_FULL, CIFAR10_CLASSIFIER_FULL)
"""What chapters 1 and 6 evaluate on CIFAR-10 in the ``full`` profile: the DDPM paper's network and its feature
classifier."""


def trained(config: TrainConfig, device: torch.device) -> tuple[TrainedModel, Path]:
    """The released checkpoint of ``config`` (shipped or in the run cache), or an error naming the command that
    trains it: evaluation never starts an hours-long training run by itself."""
    path = find_checkpoint(config)
    if path is None:
        raise FileNotFoundError(f"no checkpoint of {config.name} (config {config.identity()}): train it first with "
                                f"`python -m diffbook.train {config.name}` (or `torchrun --nproc_per_node=N -m "
                                f"diffbook.train {config.name}` on N GPUs)")
    return load_checkpoint(path, device), path


def missing_checkpoints(*configs: TrainConfig) -> list[str]:
    """The names, among ``configs``, of those with no released checkpoint: what must be trained before a chapter
    can show their numbers."""
    return [config.name for config in configs if find_checkpoint(config) is None]


def not_evaluated_because(profile: str, *configs: TrainConfig) -> str | None:
    """Why a chapter's evaluation of ``configs`` does not run in ``profile`` (only the ``full`` profile runs it, on
    trained checkpoints), or None when it runs."""
    if profile != "full":
        return f"only the full profile evaluates {', '.join(c.name for c in configs)} (this run: {profile})"
    missing = missing_checkpoints(*configs)
    if missing:
        return "no checkpoint of " + ", ".join(missing) + ": train " + " and ".join(
            f"`python -m diffbook.train {name}`" for name in missing) + " first (README: several GPUs)"
    return None


def describe(report: dict[str, Any]) -> str:
    """One line of a report, for chapters and the command line."""
    line = (f"{report['model']}, {report['sampler']} {report['nfe']} NFE, {report['samples']} samples: classifier FD "
            f"{report['classifier_fd']:.2f} (floor {report['classifier_fd_floor']:.2f} ± "
            f"{report['classifier_fd_floor_std']:.2f} at {report['floor_samples']})")
    standard = (f"FID {report['standard_fid']:.2f} ({STANDARD_FID_LIBRARY})" if report["standard_fid"] is not None
                else "no standard FID")
    return f"{line}; {standard}"


def draw_samples(predictor: Predictor, sampler: str, nfe: int, n: int, shape: tuple[int, ...], device: torch.device,
                 *, seed: int = 0, batch_size: int = 250, progress: bool = True) -> torch.Tensor:
    """``n`` samples in [-1, 1] (float32, CPU), ``batch_size`` at a time, under the device's autocast. The noise and
    every stochastic step come from one CPU generator seeded with ``seed``, so a run is reproducible batch for batch.
    ``ancestral`` runs ``nfe`` of the schedule's steps (x̂₀ clipped, σ² = β); the others spend at most ``nfe``
    evaluations on Karras times (:func:`diffbook.sweeps.steps_for_nfe`)."""
    if sampler not in SAMPLER_CHOICES:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLER_CHOICES)}")
    if n < 1 or nfe < 1 or batch_size < 1:
        raise ValueError(f"need n, nfe and batch_size >= 1, got {n}, {nfe}, {batch_size}")
    generator, chunks = torch.Generator().manual_seed(seed), []
    times = (step_times(predictor.path.T, nfe) if sampler == "ancestral"
             else karras_times(predictor.path, steps_for_nfe(sampler, nfe)))
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"{sampler}, {nfe} NFE"):
        x_T = torch.randn((min(batch_size, n - start), *shape), generator=generator).to(device)
        with torch.no_grad(), autocast(device, autocast_dtype(device)):
            if sampler == "ancestral":
                images = sample_ancestral(predictor, x_T, times, generator=generator, clip_x0=True)
            else:
                images = SWEEP_SAMPLERS[sampler](predictor, x_T, times, generator=generator)
        chunks.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(chunks)


def evaluate_sample_quality(config: TrainConfig, classifier_config: TrainConfig, n_samples: int, *,
                            sampler: str = "dpm++2m", nfe: int = 50, seed: int = 0, standard: bool = True,
                            inception_weights: str | Path | None = None, device: torch.device | None = None,
                            batch_size: int = 250, progress: bool = True) -> dict[str, Any]:
    """Draw ``n_samples`` from ``config``'s checkpoint and score them (module docstring). Returns the report: the
    classifier FD and its floor, the standard FID (None, with the reason, where it cannot be computed), and what
    produced them (checkpoints' sha256, sampler, NFE, seed, hardware, seconds)."""
    if classifier_config.objective != "classification":
        raise ValueError(f"{classifier_config.name} is not a feature classifier (objective "
                         f"{classifier_config.objective!r}); pass e.g. cifar10_classifier_full")
    if classifier_config.dataset != config.dataset:
        raise ValueError(f"{classifier_config.name} was trained on {classifier_config.dataset}, "
                         f"{config.name} on {config.dataset}: the classifier must know the model's data")
    device = device or pick_device()
    model, model_path = trained(config, device)
    classifier, classifier_path = trained(classifier_config, device)
    train_set, test_set = load_dataset(config.dataset, "train"), load_dataset(config.dataset, "test")
    train_images, test_images = train_set.tensor(), test_set.tensor()
    started = time.perf_counter()
    predictor = predictor_from_trained(model)
    samples = draw_samples(predictor, sampler, nfe, n_samples, tuple(train_images.shape[1:]), device, seed=seed,
                           batch_size=batch_size, progress=progress)
    sampling_seconds = time.perf_counter() - started
    quality = QualityReference(classifier.net.eval(), train_images, test_images)
    floor_n = min(n_samples, len(test_images))
    floor = quality.floor(floor_n)
    report: dict[str, Any] = {
        "model": config.name, "model_sha256": sha256_file(model_path),
        "classifier": classifier_config.name, "classifier_sha256": sha256_file(classifier_path),
        "dataset": config.dataset, "samples": n_samples, "sampler": sampler,
        "nfe": nfe if sampler == "ancestral" else nfe_spent(sampler, steps_for_nfe(sampler, nfe)), "seed": seed,
        "classifier_fd": quality.fd(samples), "classifier_fd_floor": floor.mean, "classifier_fd_floor_std": floor.std,
        "floor_samples": floor_n, "standard_fid": None, "standard_fid_note": None,
        "sampling_seconds": round(sampling_seconds, 1), "hardware": describe_hardware(device),
    }
    if not standard:
        report["standard_fid_note"] = "not asked for"
    else:
        try:
            report["standard_fid"] = standard_fid(samples, train_images, weights_path=inception_weights, device=device)
            report["standard_fid_note"] = (f"Inception-v3 (TensorFlow weights) by {STANDARD_FID_LIBRARY}, against the "
                                           f"{len(train_images)} training images")
        except ImportError as error:
            report["standard_fid_note"] = str(error)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffbook.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(CONFIGS), metavar="NAME", help="the generative model's config")
    parser.add_argument("--classifier", required=True, choices=sorted(CONFIGS), metavar="CLASSIFIER",
                        help="the feature classifier's config, e.g. cifar10_classifier_full")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--sampler", default="dpm++2m", choices=SAMPLER_CHOICES)
    parser.add_argument("--nfe", type=int, default=50, help="network evaluations per sample (steps for ancestral)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's Inception weights file, for machines without internet")
    parser.add_argument("--no-standard-fid", action="store_true", help="the classifier FD only")
    parser.add_argument("--out", default=None, help="the report's path (default: beside the model's checkpoint)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: $DIFFBOOK_DEVICE, else the best)")
    args = parser.parse_args(argv)
    config = CONFIGS[args.name]
    report = evaluate_sample_quality(config, CONFIGS[args.classifier], args.samples, sampler=args.sampler,
                                     nfe=args.nfe, seed=args.seed, standard=not args.no_standard_fid,
                                     inception_weights=args.inception_weights, batch_size=args.batch_size,
                                     device=pick_device(args.device))
    text = json.dumps(report, indent=1)
    out = Path(args.out) if args.out else find_checkpoint(config).with_name(
        f"{config.name}.quality-{args.sampler}-{args.nfe}nfe-{args.samples}.json")
    atomic_write_text(out, text + "\n")
    print(text)
    print(f"{describe(report)}\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
