"""Peak memory of advdef's evaluation as the sample count grows: n = 1,000 vs 10,000.

Trains a throwaway run (smallcnn, standard training, 1 epoch on 500 CIFAR-10 training images)
into a temporary store, then measures each case in a fresh subprocess, so peaks never carry over:

  load          advdef.evaluation.engine.load_target only (model, the decoded test split, the
                seeded sample subset): the floor every evaluation pays
  n=N, b=B      evaluate_run(store, run, EvalConfig(attacks=[--attacks], n=N, batch_size=B,
                checks=False)) on its own copy of the store

Attacks run in batches over the clean-correct samples only, and an attack's working memory
(activations kept for the backward pass) is set by the batch: FGSM on 256 smallcnn images needs
several hundred MB. A barely trained model gets ~10-20% of n=1,000 right, fewer than one batch of
advdef's default 256, so n=1,000 vs 10,000 at batch 256 would compare a partial batch with full
ones. The flatness comparison therefore runs both n at --batch-size (default 64, which both fill);
a further case gives the peak of n=10,000 at advdef's default batch size 256.

Peak memory is the process's peak resident set (VmHWM of /proc/self/status; getrusage's
ru_maxrss elsewhere), plus torch.cuda.max_memory_allocated on CUDA. With --python-heap, a second
run of each flatness case under tracemalloc gives the peak of Python-level allocations (tensor
storage is not traced), which tells a growing list of outcome rows from growing tensors.
Memory is "flat" when the n=10,000 peak is within --flat-mb (default 50 MB) of the n=1,000 peak.

Data: CIFAR-10 from --data-dir (default /work/shared/data/cifar10-jpeg, the ImageFolder export
advdef's cifar10 reads; test split = 10,000 images); when it is absent, a synthetic ImageFolder
tree of random images with the same sizes is written to the temporary folder instead.
advdef's decoded-image cache is pointed into the temporary folder (ADVDEF_CACHE) and warmed by the
`load` case, so every measured case reads the split the same way.

    python benchmarks/eval_memory.py --quick
    python benchmarks/eval_memory.py [--ns 1000,10000] [--attacks fgsm] [--python-heap]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/cifar10-jpeg")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def peak_rss_mb() -> float:
    """This process's peak resident set in MB: VmHWM from /proc/self/status where there is one.

    Not getrusage's ru_maxrss on Linux: it survives execve, so a child started by a large parent
    (through vfork) reports the parent's peak. VmHWM belongs to the process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


# -- child ------------------------------------------------------------------------------------

def child(args) -> None:
    """One measured case; prints one JSON line."""
    import tracemalloc

    import torch

    from advdef.evaluation.engine import EvalConfig, evaluate_run, load_target
    from advdef.store import Store

    if args.python_heap:
        tracemalloc.start()
    record = {"case": args.child, "n": args.n, "batch_size": args.batch_size, "rss_after_imports_mb": peak_rss_mb()}
    device = common.choose_device(args.device)
    store = Store(args.store)
    config = EvalConfig(attacks=args.attacks.split(","), n=args.n, device=str(device), data_dir=args.data_dir,
                        checks=False, batch_size=args.batch_size)
    before = tracemalloc.take_snapshot() if args.python_heap else None
    started = time.perf_counter()
    if args.child == "load":
        target = load_target(store, args.run, config)
        record["samples"] = len(target.samples)
    else:
        eval_id = evaluate_run(store, args.run, config)
        record["outcome_rows"] = len(store.outcomes(eval_id))
        record["clean_correct"] = sum(1 for row in store.outcomes(eval_id, "clean") if row["robust"] == 1)
        record["attack_batches"] = -(-record["clean_correct"] // args.batch_size)
    record["seconds"] = time.perf_counter() - started
    record["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        record["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if args.python_heap:
        current, peak = tracemalloc.get_traced_memory()
        record["python_heap_peak_mb"] = peak / 2**20
        record["python_heap_end_mb"] = current / 2**20
        growth = tracemalloc.take_snapshot().compare_to(before, "lineno")
        record["python_heap_top"] = [
            {"where": str(stat.traceback[0]), "mb": stat.size_diff / 2**20} for stat in growth[:5]
        ]
    store.close()
    print("RESULT " + json.dumps(record))


# -- parent -----------------------------------------------------------------------------------

def synthetic_imagefolder(root: Path, train: int, test: int) -> Path:
    """A CIFAR-sized ImageFolder tree of random PNGs (stand-in when the shared data is absent)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            folder = root / split / CLASSES[index % 10]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")
    return root


def train_run(work: Path, data: str, data_dir: str | None, device: str) -> tuple[Path, str]:
    from advdef.store import Store
    from advdef.training.config import TrainConfig
    from advdef.training.trainer import start_run

    store_path = work / "train.sqlite"
    store = Store(store_path)
    config = TrainConfig(data=data, data_dir=data_dir, arch="smallcnn", defense="none", at="standard", epochs=1,
                         limit_train=500, device=device)
    run_id = start_run(config, store, work / "runs")
    store.close()
    return store_path, run_id


def run_case(case: str, n: int, batch_size: int, store_path: Path, run_id: str, args, data_dir: str | None,
             env: dict, python_heap: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--store", str(store_path),
               "--run", run_id, "--n", str(n), "--batch-size", str(batch_size), "--attacks", args.attacks,
               "--device", args.device]
    if data_dir:
        command += ["--data-dir", data_dir]
    if python_heap:
        command.append("--python-heap")
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {case} n={n} failed:\n{done.stderr[-3000:]}")
    line = next(text for text in reversed(done.stdout.splitlines()) if text.startswith("RESULT "))
    record = json.loads(line[len("RESULT "):])
    record["wall_seconds"] = time.perf_counter() - started
    return record


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--ns", default="1000,10000", help="sample counts to compare")
    parser.add_argument("--attacks", default="fgsm", help="attacks of the evaluation")
    parser.add_argument("--data-dir", default=None, help=f"CIFAR-10 ImageFolder export (default {DEFAULT_DATA})")
    parser.add_argument("--python-heap", action="store_true", default=None,
                        help="also run each case under tracemalloc (default: on, off with --quick)")
    parser.add_argument("--flat-mb", type=float, default=50.0, help="tolerance for 'flat' (MB)")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size of the flatness cases")
    parser.add_argument("--default-batch", type=int, default=256,
                        help="batch size of the extra largest-n case (advdef's default; 0 skips it)")
    # child mode (internal)
    parser.add_argument("--child", default=None, help=argparse_suppress())
    parser.add_argument("--store", default=None, help=argparse_suppress())
    parser.add_argument("--run", default=None, help=argparse_suppress())
    parser.add_argument("--n", type=int, default=None, help=argparse_suppress())
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        child(args)
        return
    device = common.setup(args)
    python_heap = (not args.quick) if args.python_heap is None else args.python_heap
    ns = [int(n) for n in args.ns.split(",")]
    env_record = common.environment(device)

    with common.Stopwatch() as total, tempfile.TemporaryDirectory(prefix="advdef-bench-mem-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "ADVDEF_CACHE": str(work / "cache")}
        os.environ["ADVDEF_CACHE"] = env["ADVDEF_CACHE"]
        data_dir = args.data_dir or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
        if data_dir and Path(data_dir).is_dir():
            data, source = "cifar10", f"CIFAR-10 JPEG export at {data_dir}"
        else:
            print(f"CIFAR-10 export not found ({args.data_dir or DEFAULT_DATA}): writing a synthetic ImageFolder "
                  "(500 train, 10,000 test random 32x32 PNGs)")
            root = synthetic_imagefolder(work / "synthetic", 500, max(ns))
            data, data_dir, source = f"imagefolder:{root}", None, "synthetic random PNGs (shared data absent)"
        with common.Stopwatch() as training:
            store_path, run_id = train_run(work, data, data_dir, str(device))
        print(f"trained run {run_id} in {training.seconds:.0f} s ({source})")

        def fresh_store(name: str) -> Path:
            copy = work / f"{name}.sqlite"
            shutil.copyfile(store_path, copy)
            return copy

        b = args.batch_size
        records = [run_case("load", max(ns), b, fresh_store("load"), run_id, args, data_dir, env, False)]
        for n in ns:
            records.append(run_case("eval", n, b, fresh_store(f"eval-{n}"), run_id, args, data_dir, env, False))
        if python_heap:
            for n in ns:
                heap = run_case("eval", n, b, fresh_store(f"heap-{n}"), run_id, args, data_dir, env, True)
                by_n = next(r for r in records if r["case"] == "eval" and r["n"] == n)
                by_n.update({k: v for k, v in heap.items() if k.startswith("python_heap")})
        if args.default_batch and args.default_batch != b:
            records.append(run_case("eval", max(ns), args.default_batch, fresh_store("default-batch"), run_id, args,
                                    data_dir, env, False))

    rows = [{**r, "case": "load only" if r["case"] == "load" else f"eval n={r['n']:,} b={r['batch_size']}"}
            for r in records]
    print(f"advdef evaluation ({args.attacks}), smallcnn, device {device}, {source}; fresh process per case")
    common.print_table(rows, [
        ("case", "case", "s"), ("rss_after_imports_mb", "RSS after imports (MB)", ".0f"),
        ("peak_rss_mb", "peak RSS (MB)", ".0f"), ("cuda_peak_mb", "CUDA peak (MB)", ".0f"),
        ("python_heap_peak_mb", "Python heap peak (MB)", ".1f"), ("python_heap_end_mb", "Python heap end (MB)", ".1f"),
        ("outcome_rows", "outcome rows", ",d"), ("clean_correct", "attacked", ",d"),
        ("attack_batches", "attack batches", ",d"), ("seconds", "seconds", ".1f"),
    ])
    evals = sorted((r for r in records if r["case"] == "eval" and r["batch_size"] == args.batch_size),
                   key=lambda r: r["n"])
    load = records[0]
    targets = []
    if len(evals) >= 2:
        small, large = evals[0], evals[-1]
        growth = large["peak_rss_mb"] - small["peak_rss_mb"]
        per_sample_kb = 1024 * growth / (large["n"] - small["n"])
        print(f"\npeak RSS n={large['n']:,} - n={small['n']:,}: {growth:+.0f} MB ({per_sample_kb:+.1f} KB per extra sample); "
              f"over the load-only floor: n={small['n']:,} {small['peak_rss_mb'] - load['peak_rss_mb']:+.0f} MB, "
              f"n={large['n']:,} {large['peak_rss_mb'] - load['peak_rss_mb']:+.0f} MB")
        if "python_heap_peak_mb" in large:
            heap_growth = large["python_heap_peak_mb"] - small["python_heap_peak_mb"]
            print(f"Python-heap peak grows {heap_growth:+.1f} MB ({1024 * heap_growth / (large['n'] - small['n']):+.2f} "
                  f"KB per extra sample); largest Python allocations still held after evaluate_run (n={large['n']:,}):")
            for item in large.get("python_heap_top", []):
                print(f"  {item['mb']:7.1f} MB  {item['where']}")
        targets.append(common.target_row(f"peak RSS growth n={small['n']:,} -> {large['n']:,}, batch {args.batch_size} (MB)",
                                         growth, f"<= {args.flat_mb:.0f} (flat)", growth <= args.flat_mb))
        default = next((r for r in records if r["case"] == "eval" and r["batch_size"] == args.default_batch), None)
        if default is not None:
            targets.append(common.target_row(
                f"peak RSS n={default['n']:,} at batch {args.default_batch} minus batch {args.batch_size} (MB)",
                default["peak_rss_mb"] - large["peak_rss_mb"], "- (per-batch working set)", None))
        common.print_targets(targets, "load_target reads the whole test split (limit_test, not n, limits it) and then "
                             "selects n samples, so the load-only floor already holds the whole decoded test split.")
    print(f"runtime {total.seconds:.0f} s")
    common.write_results("eval_memory", args, device, {
        "settings": {"attacks": args.attacks, "ns": ns, "arch": "smallcnn", "data": source, "python_heap": python_heap,
                     "batch_size": args.batch_size, "default_batch": args.default_batch},
        "cases": records, "targets": targets, "runtime_seconds": total.seconds,
    }, environment_record=env_record)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
