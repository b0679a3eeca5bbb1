"""Sample quality of a trained DDPM on its own data, from the command line: the ``full`` profile's path to CIFAR-10
numbers.

    python -m diffbook.evaluate cifar10_ddpm_full --classifier cifar10_classifier_full --samples 10000
    python -m diffbook.evaluate cifar10_ddpm_full --classifier cifar10_classifier_full --samples 50000 \\
        --sampler ancestral --nfe 1000 --inception-weights weights-inception-2015-12-05-6726825d.pth

Draws ``--samples`` images with one of chapter 6's samplers (:data:`diffbook.sweeps.SWEEP_SAMPLERS`, or chapter 1's
``ancestral`` chain on the schedule's own steps, the DDPM paper's sampler), in float32 unless ``--precision`` says
otherwise, and scores them by the classifier Fréchet distance of :mod:`diffbook.metrics` against the training set,
beside its floor (as many real test images, over 5 draws; when there are fewer test images than samples, one draw of
all of them, and the samples' FD also on a random subset of that size), and, where torch-fidelity is installed, by the standard FID against the
training set (:func:`diffbook.metrics.standard_fid`). Ho et al. (2020) report FID 3.17 with 50,000 ancestral samples
of 1000 steps against CIFAR-10's 50,000 training images; fewer samples give a larger (biased) FID.

Both networks must have been trained (``python -m diffbook.train NAME``, or ``torchrun`` on several GPUs). The
report is printed and written, atomically, to the model's run directory (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoints import TrainedModel, find_checkpoint, load_checkpoint, run_dir
from .configs import CIFAR10_CLASSIFIER_FULL, CIFAR10_DDPM_FULL, CONFIGS, TrainConfig
from .data import load_dataset
from .device import autocast, autocast_dtype, describe_hardware, pick_device
from .metrics import STANDARD_FID_LIBRARY, QualityReference, classifier_accuracy, standard_fid
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
    spread = report["classifier_fd_floor_std"]
    line = (f"{report['model']}, {report['sampler']} {report['nfe']} NFE, {report['samples']} samples: classifier FD "
            f"{report['classifier_fd']:.2f} (floor {report['classifier_fd_floor']:.2f} "
            + (f"± {spread:.2f} " if spread is not None else "from one draw, every test image, ")
            + f"at {report['floor_samples']}")
    if report["classifier_fd_at_floor_samples"] is not None:
        line += f"; the samples' FD at that number: {report['classifier_fd_at_floor_samples']:.2f}"
    standard = (f"FID {report['standard_fid']:.2f} ({STANDARD_FID_LIBRARY})" if report["standard_fid"] is not None
                else "no standard FID")
    return f"{line}); {standard}"


def _check_request(config: TrainConfig, classifier_config: TrainConfig, n_samples: int, sampler: str, nfe: int,
                   batch_size: int) -> None:
    """Refuse, before anything is loaded or drawn, what would fail later (module docstring)."""
    if config.objective != "ddpm_eps" or config.net != "unet":
        raise ValueError(f"{config.name} is not a DDPM image model (objective {config.objective!r}): this evaluates "
                         "DDPM networks, e.g. cifar10_ddpm_full or mnist_ddpm")
    if classifier_config.objective != "classification":
        raise ValueError(f"{classifier_config.name} is not a feature classifier (objective "
                         f"{classifier_config.objective!r}): pass --classifier cifar10_classifier_full, or mnist_classifier")
    if classifier_config.dataset != config.dataset:
        raise ValueError(f"{classifier_config.name} was trained on {classifier_config.dataset}, "
                         f"{config.name} on {config.dataset}: the classifier must know the model's data")
    if sampler not in SAMPLER_CHOICES:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLER_CHOICES)}")
    if n_samples < 2:
        raise ValueError(f"--samples must be at least 2 (a Fréchet distance needs a covariance), got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if nfe < 1 or (sampler == "ancestral" and nfe > config.T):
        raise ValueError(f"--nfe must be at least 1" + (f" and at most the schedule's {config.T} steps for ancestral"
                                                         if sampler == "ancestral" else "") + f", got {nfe}")


def draw_samples(predictor: Predictor, sampler: str, nfe: int, n: int, shape: tuple[int, ...], device: torch.device,
                 *, seed: int = 0, batch_size: int = 250, precision: str = "fp32",
                 progress: bool = True) -> torch.Tensor:
    """``n`` samples in [-1, 1] (float32, CPU), ``batch_size`` at a time, under ``precision`` (:func:`autocast_dtype`).
    The starting noise comes from a CPU generator seeded with ``seed`` and every stochastic step from a second one
    seeded with ``seed + 1``, so two samplers start from the same noise, and a run is reproducible for a given
    ``batch_size``. ``ancestral`` runs ``nfe`` of the schedule's steps (x̂₀ clipped, σ² = β); the others spend at most
    ``nfe`` evaluations on Karras times (:func:`diffbook.sweeps.steps_for_nfe`)."""
    if sampler not in SAMPLER_CHOICES:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLER_CHOICES)}")
    if n < 1 or nfe < 1 or batch_size < 1:
        raise ValueError(f"need n, nfe and batch_size >= 1, got {n}, {nfe}, {batch_size}")
    starts, steps_noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    times = (step_times(predictor.path.T, nfe) if sampler == "ancestral"
             else karras_times(predictor.path, steps_for_nfe(sampler, nfe)))
    chunks = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"{sampler}, {nfe} NFE"):
        x_T = torch.randn((min(batch_size, n - start), *shape), generator=starts).to(device)
        with torch.no_grad(), autocast(device, autocast_dtype(device, precision)):
            if sampler == "ancestral":
                images = sample_ancestral(predictor, x_T, times, generator=steps_noise, clip_x0=True)
            else:
                images = SWEEP_SAMPLERS[sampler](predictor, x_T, times, generator=steps_noise)
        chunks.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(chunks)


def _fidelity_installed() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(STANDARD_FID_LIBRARY)
    except PackageNotFoundError:
        return "not installed"


def evaluate_sample_quality(config: TrainConfig, classifier_config: TrainConfig, n_samples: int, *,
                            sampler: str = "dpm++2m", nfe: int = 50, seed: int = 0, standard: bool = True,
                            inception_weights: str | Path | None = None, precision: str = "fp32",
                            device: torch.device | None = None, batch_size: int = 250,
                            progress: bool = True) -> dict[str, Any]:
    """Draw ``n_samples`` from ``config``'s checkpoint and score them (module docstring). Returns the report: the
    classifier FD and its floor, the classifier's test accuracy, the standard FID (None, with the reason, where it
    cannot be computed), and what produced them (checkpoints' sha256, sampler, NFE, seed, precision, versions,
    hardware, seconds). The real images' classifier features are stored on disk after the first call
    (:func:`diffbook.metrics.stored_classifier_features`), and torch-fidelity keeps their Inception statistics."""
    _check_request(config, classifier_config, n_samples, sampler, nfe, batch_size)
    if standard and inception_weights is not None and not Path(inception_weights).is_file():
        raise FileNotFoundError(f"no Inception weights at {inception_weights}: pass torch-fidelity's weights file, or "
                                "leave --inception-weights out to let it download them")
    fid_available = standard and _fidelity_installed()
    device = device or pick_device()
    model, model_path = trained(config, device)
    classifier, classifier_path = trained(classifier_config, device)
    train_set, test_set = load_dataset(config.dataset, "train"), load_dataset(config.dataset, "test")
    train_images, test_images = train_set.tensor(), test_set.tensor()
    quality = QualityReference(classifier.net, train_images, test_images)  # before the sampling: fail early
    floor_n = min(n_samples, len(test_images))
    every_test_image = floor_n == len(test_images)  # then each of the floor's draws is the whole test set
    floor = quality.floor(floor_n, seeds=1 if every_test_image else 5)
    started = time.perf_counter()
    samples = draw_samples(predictor_from_trained(model), sampler, nfe, n_samples, tuple(train_images.shape[1:]),
                           device, seed=seed, batch_size=batch_size, precision=precision, progress=progress)
    sampling_seconds = time.perf_counter() - started
    subset = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + 2))[:floor_n]
    report: dict[str, Any] = {
        "model": config.name, "model_sha256": sha256_file(model_path),
        "classifier": classifier_config.name, "classifier_sha256": sha256_file(classifier_path),
        "classifier_test_accuracy": classifier_accuracy(classifier.net, test_images, torch.from_numpy(test_set.labels)),
        "dataset": config.dataset, "samples": n_samples, "sampler": sampler,
        "nfe": nfe if sampler == "ancestral" else nfe_spent(sampler, steps_for_nfe(sampler, nfe)), "seed": seed,
        "precision": precision, "classifier_fd": quality.fd(samples),
        "classifier_fd_floor": floor.mean, "classifier_fd_floor_std": None if every_test_image else floor.std,
        "floor_samples": floor_n,
        "classifier_fd_at_floor_samples": quality.fd(samples[subset]) if floor_n < n_samples else None,
        "standard_fid": None, "standard_fid_note": None, "torch": torch.__version__,
        STANDARD_FID_LIBRARY: _library_version(), "sampling_seconds": round(sampling_seconds, 1),
        "hardware": describe_hardware(device),
    }
    if not standard:
        report["standard_fid_note"] = "not asked for"
    elif not fid_available:
        report["standard_fid_note"] = (f"{STANDARD_FID_LIBRARY} is not installed: pip install {STANDARD_FID_LIBRARY} "
                                       "(it needs torchvision)")
    else:
        try:  # a failure here (no internet for the weights, say) must not lose the samples' other numbers
            report["standard_fid"] = standard_fid(samples, train_images, weights_path=inception_weights, device=device)
            report["standard_fid_note"] = (f"Inception-v3 (TensorFlow weights) by {STANDARD_FID_LIBRARY}, against the "
                                           f"{len(train_images)} training images")
        except Exception as error:  # no internet for the weights, a bad weights file, ...: keep the other numbers
            report["standard_fid_note"] = f"failed: {type(error).__name__}: {error}"
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffbook.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(CONFIGS), metavar="NAME", help="the DDPM's config")
    parser.add_argument("--classifier", required=True, choices=sorted(CONFIGS), metavar="CLASSIFIER",
                        help="the feature classifier's config, e.g. cifar10_classifier_full")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--sampler", default="dpm++2m", choices=SAMPLER_CHOICES)
    parser.add_argument("--nfe", type=int, default=50, help="network evaluations per sample (steps for ancestral)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                        help="sampling precision (default fp32, as the published numbers)")
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's Inception weights file, for machines without internet")
    parser.add_argument("--no-standard-fid", action="store_true", help="the classifier FD only")
    parser.add_argument("--out", default=None, help="the report's path (default: in the model's run directory)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: $DIFFBOOK_DEVICE, else the best)")
    args = parser.parse_args(argv)
    config = CONFIGS[args.name]
    report = evaluate_sample_quality(config, CONFIGS[args.classifier], args.samples, sampler=args.sampler,
                                     nfe=args.nfe, seed=args.seed, standard=not args.no_standard_fid,
                                     inception_weights=args.inception_weights, precision=args.precision,
                                     batch_size=args.batch_size, device=pick_device(args.device))
    text = json.dumps(report, indent=1)
    tag = "-".join([args.sampler.replace(", ", "-").replace("=", ""), f"{args.nfe}nfe", f"{args.samples}samples",
                    f"seed{args.seed}", args.precision, args.classifier, "fid" if report["standard_fid"] else "nofid"])
    out = Path(args.out) if args.out else run_dir(config) / f"quality-{tag}.json"
    atomic_write_text(out, text + "\n")
    print(text)
    print(f"{describe(report)}\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
