"""Wall-clock speed of the real early-exit cascade against the full network, for a network of any width and a
chosen share of images answered by each exit (docs/EARLY_EXIT.md).

The time a cascade takes depends on the network and on how many images leave where, not on what the weights
learned; so a freshly initialised network with thresholds set to give the wanted exit shares measures what a
trained one with those shares would take:

    python experiments/time_cascade.py --width 64 --shares 0.65 0.02 0.05 [--data-dir D]

prints one JSON object: the thresholds used, the exit shares reached, and byot.deploy.run.time_policy's rows
(full network and cascade images/s at batch 1 and 64, wall-clock and FLOP speed-up).
"""

from __future__ import annotations

import argparse
import json

import torch

from byot.data import NORMALIZATION, DataBundle, ImageSet
from byot.data.batches import TensorBatches
from byot.data.cifar import load_cifar
from byot.deploy.calibration import calibrated_softmax
from byot.deploy.policy import NEVER, ExitPolicy, simulate
from byot.deploy.run import time_policy
from byot.models import create_model
from byot.training.evaluate import collect_logits
from byot.training.runtime import make_runtime


def thresholds_for_shares(logits: torch.Tensor, shares: list[float]) -> tuple[float, ...]:
    """Per shallow exit, the confidence quantile that lets about ``shares[k]`` of all images leave there."""
    alive = torch.ones(logits.shape[1], dtype=torch.bool)
    chosen = []
    for z, share in zip(logits[:-1], shares):
        conf = calibrated_softmax(z).max(dim=1).values
        want = share * len(alive) / max(int(alive.sum()), 1)  # share of the images still running
        if want <= 0 or not alive.any():
            chosen.append(NEVER)
            continue
        t = float(torch.quantile(conf[alive].double(), max(0.0, 1.0 - want)))
        chosen.append(t)
        alive &= conf < t
    return tuple(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="multi_resnet18_kd")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.65, 0.02, 0.05],
                        help="share of all images answered by each shallow exit (the rest: the deepest)")
    parser.add_argument("--data-dir", help="CIFAR-100 folder: time on its test images (default: random images)")
    parser.add_argument("--images", type=int, default=2048)
    args = parser.parse_args()
    if len(args.shares) != 3 or min(args.shares) < 0 or sum(args.shares) > 1:
        parser.error("--shares takes three non-negative shares (exits 1-3) that sum to at most 1")
    device = torch.device("cpu")
    torch.manual_seed(0)
    if args.data_dir:
        test = load_cifar(args.data_dir, "cifar100")[1]
    else:
        g = torch.Generator().manual_seed(0)
        test = ImageSet(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.zeros(args.images, dtype=torch.long), [str(i) for i in range(100)])
    test = test.subset(torch.arange(min(args.images, len(test))))
    model = create_model(args.arch, 100, width=args.width, image_size=32)
    runtime = make_runtime(device, *NORMALIZATION["cifar100"], "auto", True, model, training=False)
    model = runtime.place(model).eval()
    batches = TensorBatches(test, 128, False, 0, device)
    data = DataBundle(batches, batches, test.classes, 32, *NORMALIZATION["cifar100"], [])
    logits, _ = collect_logits(model, batches, runtime)
    policy = ExitPolicy(thresholds_for_shares(logits, args.shares))
    reached = torch.bincount(simulate(logits, policy).exit_position, minlength=logits.shape[0]).double()
    print(json.dumps({"arch": args.arch, "width": args.width, "amp": runtime.amp, "thresholds": policy.thresholds,
                      "exit_shares": (reached / reached.sum()).tolist(),
                      "timing": time_policy(model, policy, data, runtime)}))


if __name__ == "__main__":
    main()
