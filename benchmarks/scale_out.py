"""Scale-out figures (issue 10): DDP training, sharded evaluation and the stores' write rates.

What it runs, all through the real command line (`python -m advdef ...`) as a user would:

  training     `advdef train` in one process with T threads vs `advdef train --nproc 2` with T/2
               threads per rank (the same cores), PGD-AT with --sync-bn; per-epoch training
               images/s read from the store (validation excluded), and how far the final weights
               are apart — next to the same single process with another thread count, whose
               float summation order alone moves the weights that far (AT amplifies rounding)
  evaluation   `advdef evaluate` of one trained run: one process with T threads vs `--nproc 2`
               with T/2 each; wall time, and whether the per-sample outcomes are identical (they
               must be: shards run the unsharded batch layout)
  store        record_outcomes rate (rows/s, 256-row transactions) into SQLite and, when a server
               is given (--postgres URL or $ADVDEF_TEST_POSTGRES), PostgreSQL: one writer, then
               two writer processes at once (total rate, and the row count checked exactly)

On a CPU host the two ranks share the cores one process would use, so the speed-up measured here
is what splitting the work costs or gains at equal hardware, not the N-GPU speed-up.

    python benchmarks/scale_out.py --quick
    python benchmarks/scale_out.py [--epochs 2] [--n 360] [--threads 2] [--postgres postgresql://...]
    python benchmarks/scale_out.py --data cifar10 --data-dir ../shared/data/cifar10-jpeg --limit-train 2560 --n 500
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def advdef(arguments: list[str], threads: int, timeout: float = 3600) -> float:
    """Run `python -m advdef ARGS` with `threads` OpenMP threads per process; returns wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.REPO_DIR)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "advdef", *arguments], capture_output=True, text=True,
                            env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"advdef {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def only_run(store_path: Path) -> dict:
    from advdef.store import Store

    with Store(store_path) as store:
        (run,) = store.runs()
        run["checkpoints"] = store.checkpoints(run["run_id"])
        return run


def final_weights(run: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from advdef.training import checkpoint

    last = run["checkpoints"][-1]["epoch"]
    return load_file(str(checkpoint.paths(Path(run["run_dir"]), last)["weights"]))


def training(args, folder: Path) -> list[dict]:
    base = ["train", "--data", args.data, "--arch", args.arch, "--at", "pgd_at", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch), "--device", "cpu", "--no-amp", "--sync-bn", "--no-channels-last"]
    if args.limit_train:
        base += ["--limit-train", str(args.limit_train)]
    if args.data_dir:
        base += ["--data-dir", args.data_dir]
    # The third case is the yardstick for the weight check: the same single process with another
    # thread count sums in another order, and adversarial training amplifies such rounding.
    cases = (("1 process", [], args.threads), ("--nproc 2", ["--nproc", "2"], max(1, args.threads // 2)),
             ("1 process, other threads", [], max(1, args.threads // 2) if args.threads > 1 else 2))
    rows, weights = [], []
    for index, (name, extra, threads) in enumerate(cases):
        store_path = folder / f"train-{index}.sqlite"
        wall = advdef([*base, *extra, "--store", str(store_path)], threads)
        run = only_run(store_path)
        rates = [c["metrics"]["train_images_per_s"] for c in run["checkpoints"]]
        weights.append(final_weights(run))
        rows.append({"case": f"train {name}", "threads": threads, "wall_s": wall,
                     "rate": sum(rates) / len(rates), "unit": "train img/s", "run": run["run_id"]})
    for index in (1, 2):
        difference = max(float((weights[0][k].float() - weights[index][k].float()).abs().max()) for k in weights[0])
        rows[index]["note"] = f"max |w - w(1 process)| after {args.epochs} epoch(s): {difference:.2e}"
    return rows


def outcomes(store_path: Path) -> list[tuple]:
    from advdef.store import Store

    with Store(store_path) as store:
        (evaluation,) = store.evaluations()
        return [(r["attack"], r["sample_id"], r["robust"], r["prediction"]) for r in store.outcomes(evaluation["eval_id"])]


def evaluation(args, folder: Path, trained: Path) -> list[dict]:
    import shutil

    base = ["evaluate", "--attacks", args.attacks, "--n", str(args.n), "--batch-size", str(args.eval_batch),
            "--device", "cpu", "--no-checks"]
    rows, results = [], {}
    for name, extra, threads in (("1 process", [], args.threads), ("--nproc 2", ["--nproc", "2"], max(1, args.threads // 2))):
        store_path = folder / f"eval-{len(results)}.sqlite"
        shutil.copy(trained, store_path)
        wall = advdef([*base, *extra, "--store", str(store_path)], threads)
        results[name] = outcomes(store_path)
        rows.append({"case": f"evaluate {name}", "threads": threads, "wall_s": wall,
                     "rate": args.n / wall, "unit": "samples/s (wall)"})
    same = results["1 process"] == results["--nproc 2"]
    rows[1]["note"] = f"outcomes {'identical' if same else 'DIFFERENT'} ({len(results['1 process'])} rows)"
    return rows


def _write(location: str, eval_id: int, first: int, batches: int, queue) -> None:
    from advdef.store import Store

    with Store(location) as store:
        started = time.perf_counter()
        for b in range(batches):
            rows = [(first + b * 256 + i, 0, 1, 0) for i in range(256)]
            store.record_outcomes(eval_id, "clean", rows, 0.0)
        queue.put(time.perf_counter() - started)


def store_rates(args, folder: Path) -> list[dict]:
    from advdef.store import Store

    locations = [("sqlite", str(folder / "rates.sqlite"))]
    server = args.postgres or os.environ.get("ADVDEF_TEST_POSTGRES")
    if server:
        locations.append(("postgresql", server))
    rows = []
    for backend, location in locations:
        try:
            store = Store(location)
        except Exception as error:  # an unreachable server: report it, measure the rest
            rows.append({"case": f"store {backend}", "note": f"skipped: {error}"})
            continue
        with store:
            run_id = f"bench-{os.getpid()}-{time.time_ns()}"
            store.insert_run({"run_id": run_id, "status": "trained", "dataset": "d", "arch": "a", "defense": "none",
                              "at_method": "standard", "seed": 0, "run_dir": "/x", "config": {}, "versions": {}})
            n = 2 * args.store_batches * 256
            eval_id = store.get_or_create_evaluation(run_id, "k", {"eps": "8/255", "norm": "Linf", "n": n,
                                                                   "sample_hash": "h", "seed": 0}, list(range(n)))
            store.start_attack(eval_id, "clean", {})
        context = multiprocessing.get_context("spawn")
        for writers in (1, 2):
            queue = context.Queue()
            offset = 0 if writers == 1 else n  # the two-writer case writes fresh ids (inserts, not updates)
            processes = [context.Process(target=_write, args=(location, eval_id, offset + w * args.store_batches * 256,
                                                              args.store_batches, queue)) for w in range(writers)]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            seconds = [queue.get() for _ in processes]  # each writer's own time, process start-up excluded
            rows.append({"case": f"store {backend}, {writers} writer(s)", "threads": 1, "wall_s": max(seconds),
                         "rate": writers * args.store_batches * 256 / max(seconds), "unit": "outcome rows/s"})
        with Store(location) as store:
            stored = store.outcome_counts(eval_id).get("clean", 0)
        expected = 3 * args.store_batches * 256  # one writer's rows, then two writers' fresh ones
        rows[-1]["note"] = f"rows stored {stored} of {expected} written ({'exact' if stored == expected else 'MISMATCH'})"
    return rows


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--arch", default="smallcnn")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="e.g. the CIFAR-10 ImageFolder export for --data cifar10")
    parser.add_argument("--attacks", default="fgsm,pgd20")
    parser.add_argument("--n", type=int, default=360)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--store-batches", type=int, default=40)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL for the store rates (default $ADVDEF_TEST_POSTGRES)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.n, args.store_batches = 1, 200, 20
    args.threads = args.threads or 2
    device = torch.device("cpu")
    environment = common.environment(device)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        train_rows = training(args, folder)
        trained = folder / "train-0.sqlite"
        rows = train_rows + evaluation(args, folder, trained) + store_rates(args, folder)
    columns = [("case", "case", "s"), ("threads", "threads/proc", "d"), ("wall_s", "wall s", ".1f"),
               ("rate", "rate", ".0f"), ("unit", "unit", "s"), ("note", "check", "s")]
    common.print_table(rows, columns)
    for a, b in ((0, 1), (3, 4)):
        print(f"{rows[b]['case']} / {rows[a]['case']}: {rows[b]['rate'] / rows[a]['rate']:.2f}x rate")
    common.write_results("scale_out", args, device, {"rows": rows}, environment_record=environment)


if __name__ == "__main__":
    main()
