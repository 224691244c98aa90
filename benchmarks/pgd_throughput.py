"""PGD-20 evaluation throughput of advdef against the hardware bound, on random 32x32 inputs.

The bound is 21 x the measured time of one forward+input-gradient pass over the batch (20 attack
iterations plus the final scoring pass). Prints a table and writes benchmarks/results/pgd_throughput.json.

    python benchmarks/pgd_throughput.py [--batch 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from fractions import Fraction
from pathlib import Path

import torch

from advdef.attacks import eval_mode
from advdef.data.base import DataInfo
from advdef.models import build_model
from advdef.registry import ATTACKS


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function over `repeats` rounds, the functions alternating within
    each round: throughput on this host drifts over minutes, so back-to-back blocks would compare
    different machine states (see the env probe)."""
    for fn in fns:
        fn()  # warm-up
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            samples[index].append(time.perf_counter() - started)
    return [statistics.median(times) for times in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", default="smallcnn,resnet18")
    args = parser.parse_args()
    torch.manual_seed(0)
    info = DataInfo("random", (3, 32, 32), 10, tuple(map(str, range(10))), (0.5,) * 3, (0.25,) * 3)
    x = torch.rand(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    rows = []
    for arch in args.archs.split(","):
        model = build_model(arch, info).model.to(memory_format=torch.channels_last)
        attack = ATTACKS.create("pgd20", eps=Fraction(8, 255))
        with eval_mode(model) as view:
            def one_pass():
                z = x.clone().requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(view(z), y)
                torch.autograd.grad(loss, z)

            def twenty_one_passes():
                for _ in range(21):
                    one_pass()

            bound, actual = interleaved_medians([twenty_one_passes, lambda: attack(view, x, y, seed=0)], args.repeats)
        rows.append({"arch": arch, "batch": args.batch, "pgd20_images_per_s": args.batch / actual,
                     "bound_images_per_s": args.batch / bound, "ratio_to_bound": bound / actual})
    print(f"{'arch':<10} {'batch':>5} {'pgd20 img/s':>12} {'bound img/s':>12} {'of bound':>9}")
    for r in rows:
        print(f"{r['arch']:<10} {r['batch']:>5} {r['pgd20_images_per_s']:>12.1f} {r['bound_images_per_s']:>12.1f} "
              f"{100 * r['ratio_to_bound']:>8.1f}%")
    out = Path(__file__).parent / "results" / "pgd_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
