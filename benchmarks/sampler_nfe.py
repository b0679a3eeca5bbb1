"""Sample quality against NFE for the shipped MNIST DDPM network, printed as JSON.

    python benchmarks/sampler_nfe.py [--quick] [--samples N] [--device cpu]

Every sampler of chapter 6's sweep (``diffbook.sweeps.SWEEP_SAMPLERS``: DDIM with eta = 0 and 1, Heun,
DPM-Solver++ 2M, EDM's stochastic sampler; Karras times) at NFE in {1, 2, 4, 5, 8, 10, 15, 20, 50, 100, 250,
1000}, the network read as an eps-model on its own schedule's discrete path (``predictor_from_trained``),
chapter 1's ancestral sampler at 1000 steps as the reference, and the floor (FD of as many real test images).
FD is the Fréchet distance in the features of the package's MNIST classifier (``diffbook.metrics``).
``--quick``: 64 samples, NFE up to 20, 100 ancestral steps. ``best`` is each sampler's lowest FD and its NFE;
the last field answers: the smallest NFE at which DPM-Solver++ is within 10% of the reference.
"""
from __future__ import annotations

import argparse
import json

import torch

from diffbook.configs import MNIST_CLASSIFIER, MNIST_DDPM
from diffbook.data import load_dataset
from diffbook.device import describe_hardware, pick_device, seed_everything
from diffbook.metrics import QualityReference
from diffbook.predictors import predictor_from_trained
from diffbook.sweeps import SWEEP_SAMPLERS, ancestral_reference, nfe_sweep
from diffbook.train import load_or_train

FULL_NFES = (1, 2, 4, 5, 8, 10, 15, 20, 50, 100, 250, 1000)
QUICK_NFES = (1, 2, 4, 5, 8, 10, 15, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 samples, NFE <= 20, 100-step ancestral reference")
    parser.add_argument("--samples", type=int, default=None, help="samples per point (default 1000; --quick 64)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = pick_device(args.device)
    n = args.samples or (64 if args.quick else 1000)
    nfes, ancestral_steps = (QUICK_NFES, 100) if args.quick else (FULL_NFES, 1000)

    model = load_or_train(MNIST_DDPM, device=device)
    classifier = load_or_train(MNIST_CLASSIFIER, device=device).net
    quality = QualityReference(classifier, load_dataset("mnist", "train").tensor(), load_dataset("mnist", "test").tensor())
    floor = quality.floor(n)
    x_T = torch.randn((n, 1, 28, 28), generator=seed_everything(args.seed)).to(device)

    predictor = predictor_from_trained(model)
    reference, _ = ancestral_reference(predictor, x_T, ancestral_steps, quality.fd,
                                       generator=seed_everything(args.seed + 1))
    rows, _ = nfe_sweep(predictor, x_T, nfes, quality.fd, samplers=SWEEP_SAMPLERS, seed=args.seed)
    within = sorted(r["nfe"] for r in rows if r["sampler"] == "dpm++2m" and r["score"] <= 1.1 * reference["score"])
    print(json.dumps({
        "checkpoint": model.manifest.get("sha256"), "classifier": MNIST_CLASSIFIER.name, "samples": n,
        "hardware": describe_hardware(device), "metric": "classifier Frechet distance (lower is better)",
        "floor": {"mean": floor.mean, "std": floor.std, "draws": len(floor.values)},
        "reference": reference, "rows": rows,
        "best": {name: dict(zip(("score", "nfe"), min((r["score"], r["nfe"]) for r in rows if r["sampler"] == name)))
                 for name in SWEEP_SAMPLERS},
        "dpm_solver_nfe_within_10pct_of_reference": within[0] if within else None,
    }, indent=2))


if __name__ == "__main__":
    main()
