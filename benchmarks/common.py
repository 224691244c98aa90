"""Helpers shared by the benchmark scripts in this folder (issue 8).

Every script is plain Python, run as `python benchmarks/NAME.py [--quick] [--device auto|cpu|cuda]`,
prints a table and its ratios against the targets (PASS/MISS), and writes
benchmarks/results/NAME.json with the environment it ran in. This module holds what they share:
the argparse parent, device choice, interleaved timing, the environment record, JSON writing,
table printing, and the synthetic benchmark models.

Throughput on the development host drifts over minutes, so every comparison times its candidates
interleaved (one call of each per round, medians over rounds) inside one process, on the same
model, data and device: ratios from one run are meaningful, absolute figures less so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO_DIR) not in sys.path:  # `python benchmarks/NAME.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_DIR))

EPS = Fraction(8, 255)
ALPHA = Fraction(2, 255)


# -- command line ----------------------------------------------------------------------------

def parent_parser() -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --device, --threads, --repeats, --out."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common benchmark options")
    group.add_argument("--quick", action="store_true",
                       help="small settings (every script together: under 15 minutes on an idle 2-core CPU)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto = CUDA when present, else CPU")
    group.add_argument("--threads", type=int, default=None,
                       help="torch.set_num_threads (default: torch's own choice)")
    group.add_argument("--repeats", type=int, default=None,
                       help="timing rounds per candidate (median taken; default: 3)")
    group.add_argument("--out", type=Path, default=None,
                       help="JSON output path (default: benchmarks/results/NAME.json)")
    return parser


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser: first docstring line as description, the common options included."""
    lines = (doc or "").strip().splitlines()
    return argparse.ArgumentParser(
        description=lines[0] if lines else None,
        epilog="\n".join(lines[1:]).strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[parent_parser()],
    )


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads, seed torch, and return the chosen device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3
    torch.manual_seed(0)
    return choose_device(args.device)


def choose_device(name: str) -> torch.device:
    """`auto` = CUDA when present, else CPU; `cuda` without CUDA exits with a message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


# -- timing ----------------------------------------------------------------------------------

def sync(device: torch.device | None) -> None:
    """Wait for queued CUDA work, so wall time covers it; a no-op on CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: Sequence[Callable[[], Any]], repeats: int, *, device: torch.device | None = None,
                      warmup: int = 1) -> list[list[float]]:
    """Wall times of each function over `repeats` rounds, the functions alternating within each
    round: throughput on this host drifts over minutes, so back-to-back blocks would compare
    different machine states. `warmup` untimed calls of each come first."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            samples[index].append(time.perf_counter() - started)
    return samples


def interleaved_medians(fns: Sequence[Callable[[], Any]], repeats: int, *, device: torch.device | None = None,
                        warmup: int = 1) -> list[float]:
    """Median wall time of each function over interleaved rounds (see `interleaved_times`)."""
    return [statistics.median(times) for times in interleaved_times(fns, repeats, device=device, warmup=warmup)]


def spread(times: Sequence[float]) -> float:
    """(max - min) / median of a candidate's rounds: how noisy its median is."""
    median = statistics.median(times)
    return (max(times) - min(times)) / median if median else 0.0


class Stopwatch:
    """`with Stopwatch() as w: ...; w.seconds` (whole-script runtimes)."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


# -- verdicts and tables -----------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "info" if ok is None else ("PASS" if ok else "MISS")


def target_row(name: str, value: float, target: str, ok: bool | None) -> dict[str, Any]:
    """One line of a script's target summary (also stored in the JSON); ok None = informative only."""
    return {"target": name, "value": value, "goal": target, "verdict": verdict(ok)}


def print_targets(rows: Sequence[dict[str, Any]], note: str | None = None) -> None:
    print()
    print_table(rows, [("target", "target", "s"), ("value", "measured", ".3f"), ("goal", "goal", "s"),
                       ("verdict", "", "s")])
    if note:
        print(note)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """A plain left/right-aligned table: columns are (key, header, format spec); strings are
    left-aligned, numbers right-aligned; missing values print as '-'."""
    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, str) or spec == "s":
            return str(value)
        return format(value, spec)

    cells = [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (_, header, _) in enumerate(columns)]
    numeric = [any(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
                   for row in rows) and spec != "s" for key, _, spec in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    print(line([header for _, header, _ in columns]))
    print(line(["-" * w for w in widths]))
    for values in cells:
        print(line(values))


# -- environment and JSON ----------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*command: str) -> str | None:
    try:
        return subprocess.run(["git", *command], cwd=REPO_DIR, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("advdef", "torch", "torchvision", "pyautoattack", "torchattacks", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def environment(device: torch.device) -> dict[str, Any]:
    """Where and when a figure was measured: versions, threads, device, date, host load."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "versions": _versions(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        env["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def write_results(name: str, args: argparse.Namespace, device: torch.device, payload: dict[str, Any],
                  *, environment_record: dict[str, Any] | None = None) -> Path:
    """Write benchmarks/results/NAME.json (or --out): environment, arguments and the payload."""
    out = args.out or RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "environment": environment_record or environment(device),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **payload,
    }
    try:
        record["environment"]["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return out


# -- benchmark models -------------------------------------------------------------------------

def random_info(name: str = "random"):
    """CIFAR-shaped DataInfo (3x32x32, 10 classes) for models fed synthetic inputs."""
    from advdef.data.base import DataInfo

    return DataInfo(name, (3, 32, 32), 10, tuple(map(str, range(10))), (0.5,) * 3, (0.25,) * 3)


def random_batch(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """n uniform random images in [0,1] (8-bit levels, as decoded images are), channels-last."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return images.float().div_(255).to(device).contiguous(memory_format=torch.channels_last)


def classifier_layer(model: torch.nn.Module, num_classes: int) -> torch.nn.Linear:
    """The last Linear layer with `num_classes` outputs (the logits layer of advdef's archs)."""
    found = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_classes]
    if not found:
        raise RuntimeError("no Linear logits layer found")
    return found[-1]


def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to the batch's (one train-mode pass, cumulative
    average), so an untrained model's eval-mode activations are on the data's scale."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(x)
    model.train(was_training)
    for norm in norms:
        norm.momentum = 0.1


def partly_robust_model(arch: str, x: torch.Tensor, device: torch.device, *, target: float | None = 0.5,
                        calibration: int = 32, seed: int = 0, attack_spec: str = "pgd20",
                        tolerance: float = 0.1) -> dict[str, Any]:
    """An untrained advdef model on which `attack_spec` (advdef's PGD-20 by default, eps 8/255)
    breaks about (1 - target) of `x`.

    An untrained network with its BatchNorms calibrated on x is broken by PGD-20 at 8/255 within
    one or two steps on nearly every input, which would make "skipping broken samples" a best
    case. To get a mix (some samples broken at various steps, some never), the logit bias of the
    class predicted most often is raised by an offset found by bisection on the first
    `calibration` inputs, with labels = the model's own clean predictions (clean accuracy 100%).
    The robust fraction is a steep function of the offset on random inputs, and the boosted class
    ends up predicted for (nearly) every input: the model is a stand-in for the compute of a
    partly robust model, not a realistic classifier. target None keeps the plain calibrated
    model. Returns {model, labels, offset, boosted_class, classes_predicted, probe_robust}.
    """
    from advdef.attacks import eval_mode
    from advdef.models import build_model
    from advdef.registry import ATTACKS

    torch.manual_seed(seed)
    model = build_model(arch, random_info()).model.to(device, memory_format=torch.channels_last)
    calibrate_batchnorm(model, x)
    model.eval()
    layer = classifier_layer(model, 10)
    with torch.no_grad():
        clean = model(x).argmax(1)
    chosen = int(torch.bincount(clean, minlength=10).argmax())
    base = layer.bias.detach().clone()
    attack = ATTACKS.create(attack_spec, eps=EPS)
    probe = x[:calibration]

    def robust_fraction(offset: float) -> float:
        with torch.no_grad():
            layer.bias.copy_(base)
            layer.bias[chosen] += offset
        with eval_mode(model) as view:
            with torch.no_grad():
                y = view(probe).argmax(1)
            x_adv = attack(view, probe, y, seed=seed)
            with torch.no_grad():
                return float((view(x_adv).argmax(1) == y).float().mean())

    offset, probe_robust = 0.0, None
    if target is not None:
        tried = {0.0: robust_fraction(0.0)}  # offset -> robust fraction of the probe inputs

        def close(fraction: float) -> bool:
            return abs(fraction - target) <= tolerance

        below = tried[0.0] < target
        if not close(tried[0.0]):
            # Bracket: double the offset (up if too few survive, down if too many) until it crosses.
            low, high = 0.0, 1.0 if below else -1.0
            while True:
                tried[high] = robust_fraction(high)
                if close(tried[high]) or (tried[high] < target) != below or abs(high) >= 1e4:
                    break
                low, high = high, 2 * high
            if not close(tried[high]):
                for _ in range(8):  # bisect
                    middle = (low + high) / 2
                    tried[middle] = robust_fraction(middle)
                    if close(tried[middle]):
                        break
                    if (tried[middle] < target) == below:
                        low = middle
                    else:
                        high = middle
        offset = min(tried, key=lambda o: (abs(tried[o] - target), abs(o)))
        probe_robust = tried[offset]
        with torch.no_grad():
            layer.bias.copy_(base)
            layer.bias[chosen] += offset
    with torch.no_grad():
        labels = model(x).argmax(1)
    return {"model": model, "labels": labels, "offset": offset, "boosted_class": chosen,
            "classes_predicted": int(labels.unique().numel()), "probe_robust": probe_robust}
