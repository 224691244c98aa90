"""PGD-20 evaluation throughput of advdef vs torchattacks' PGD vs the hardware bound.

Same process, model, inputs and device for every candidate, timed interleaved (medians):

  bound        21 x one forward+input-gradient pass of the raw eval-mode model over the batch
               (20 attack iterations plus one scoring pass)
  advdef       ATTACKS.create("pgd20") through eval_mode's LogitsView, active-set shrinking OFF
               (attack._shrink = False: every sample runs all 20 iterations), + the re-scoring
               forward the evaluation engine does
  advdef+skip  the same with shrinking ON (the default): samples found misclassified leave the batch
  torchattacks torchattacks.PGD(eps=8/255, alpha=2/255, steps=20, random_start=True) on the raw
               eval-mode model, + one scoring forward

The model is an untrained advdef architecture with its BatchNorms calibrated on the inputs and the
logit bias of one class raised until about --robust-target of the inputs survive advdef's PGD-20
(common.partly_robust_model), and the labels are the model's own clean predictions, so samples
break at various iterations and the skipping comparison means something.

    python benchmarks/pgd_throughput.py --quick
    python benchmarks/pgd_throughput.py [--archs smallcnn,resnet18] [--batch 128] [--repeats 3]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository on sys.path)
import torch  # noqa: E402

BOUND_PASSES = 21


def measure(arch: str, batch: int, repeats: int, device: torch.device, robust_target: float | None) -> dict:
    from advdef.attacks import eval_mode
    from advdef.evaluation.cost import PassCounter
    from advdef.registry import ATTACKS

    x = common.random_batch(batch, device)
    prepared = common.partly_robust_model(arch, x, device, target=robust_target)
    model, y = prepared["model"], prepared["labels"]
    model.eval()

    advdef_plain = ATTACKS.create("pgd20", eps=common.EPS)
    advdef_plain._shrink = False
    advdef_skip = ATTACKS.create("pgd20", eps=common.EPS)
    advdef_skip._shrink = True
    assert float(advdef_plain.alpha) == float(common.ALPHA) and advdef_plain.steps == 20 and advdef_plain.random_start

    try:
        import torchattacks
    except ImportError:
        torchattacks = None
        print("torchattacks is not installed (pip install -e '.[bench]'): its row is skipped", file=sys.stderr)

    robust: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with eval_mode(model) as view:
        def one_pass() -> None:
            z = x.detach().clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(z), y)
            torch.autograd.grad(loss, z)

        def bound() -> None:
            for _ in range(BOUND_PASSES):
                one_pass()

        def advdef_run(attack, key: str):
            def run() -> None:
                x_adv = attack(view, x, y, seed=0)
                with torch.no_grad():  # the engine's re-scoring of the returned points
                    robust[key] = float((view(x_adv).argmax(1) == y).float().mean())
                outputs[key] = x_adv
            return run

        candidates = {"bound": bound, "advdef": advdef_run(advdef_plain, "advdef"),
                      "advdef+skip": advdef_run(advdef_skip, "advdef+skip")}
        if torchattacks is not None:
            ta_attack = torchattacks.PGD(model, eps=float(common.EPS), alpha=float(common.ALPHA), steps=20,
                                         random_start=True)

            def ta_run() -> None:
                torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
                x_adv = ta_attack(x, y)
                with torch.no_grad():
                    robust["torchattacks"] = float((model(x_adv).argmax(1) == y).float().mean())
            candidates["torchattacks"] = ta_run

        def score_only() -> None:
            with torch.no_grad():
                view(x).argmax(1)
        candidates["score"] = score_only

        # Sample-passes through the model per image (untimed), from advdef's own counter.
        passes = {}
        for name, fn in candidates.items():
            with PassCounter(model) as counter:
                fn()
            passes[name] = (counter.forwards / batch, counter.backwards / batch)

        times = common.interleaved_times(list(candidates.values()), repeats, device=device)
    medians = dict(zip(candidates, (statistics.median(t) for t in times)))
    spreads = dict(zip(candidates, (common.spread(t) for t in times)))

    identical = bool(torch.equal(outputs["advdef"], outputs["advdef+skip"]))
    rows = []
    for name in candidates:
        if name == "score":
            continue
        seconds = medians[name]
        rows.append({
            "arch": arch, "candidate": name, "seconds": seconds, "images_per_s": batch / seconds,
            "of_bound": medians["bound"] / seconds,
            "attack_only_of_bound": (medians["bound"] / (seconds - medians["score"])) if name != "bound" else None,
            "robust_acc": robust.get(name), "fwd_per_image": passes[name][0], "bwd_per_image": passes[name][1],
            "spread": spreads[name],
        })
    return {
        "arch": arch, "batch": batch, "rows": rows, "score_forward_seconds": medians["score"],
        "robust_target": robust_target, "bias_offset": prepared["offset"], "boosted_class": prepared["boosted_class"],
        "classes_predicted": prepared["classes_predicted"],
        "broken_fraction": 1 - robust["advdef"], "skip_outputs_identical": identical,
        "skip_robust_equal": robust["advdef"] == robust["advdef+skip"],
    }


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--archs", default=None, help="comma-separated advdef arch specs "
                        "(default: smallcnn,resnet18; --quick: smallcnn,resnet18:width=16)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; --quick 64)")
    parser.add_argument("--robust-target", type=float, default=0.5,
                        help="fraction of inputs that should survive PGD-20 (negative: plain untrained model)")
    args = parser.parse_args()
    device = common.setup(args)
    archs = (args.archs or ("smallcnn,resnet18:width=16" if args.quick else "smallcnn,resnet18")).split(",")
    batch = args.batch or (64 if args.quick else 128)
    robust_target = args.robust_target if args.robust_target >= 0 else None
    env = common.environment(device)

    with common.Stopwatch() as total:
        results = [measure(arch, batch, args.repeats, device, robust_target) for arch in archs]

    rows = [row for result in results for row in result["rows"]]
    print(f"PGD-20, eps 8/255, step 2/255, batch {batch}, device {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds")
    common.print_table(rows, [
        ("arch", "arch", "s"), ("candidate", "candidate", "s"), ("seconds", "s/batch", ".3f"),
        ("images_per_s", "img/s", ".1f"), ("of_bound", "of bound", ".3f"),
        ("attack_only_of_bound", "attack-only of bound", ".3f"), ("robust_acc", "robust acc", ".3f"),
        ("fwd_per_image", "fwd/img", ".1f"), ("bwd_per_image", "bwd/img", ".1f"), ("spread", "spread", ".2f"),
    ])
    print("of bound = bound time / candidate time (1.0 = at the bound); attack-only leaves out the scoring forward;"
          " spread = (max-min)/median of the rounds")
    for result in results:
        print(f"{result['arch']}: PGD-20 broke {result['broken_fraction']:.0%} of the inputs (labels = clean predictions, "
              f"{result['classes_predicted']} class(es) predicted, bias offset {result['bias_offset']:+.3g} on class "
              f"{result['boosted_class']}); skipping returned identical points: {result['skip_outputs_identical']}")

    targets = []
    for result in results:
        by = {row["candidate"]: row for row in result["rows"]}
        arch = result["arch"]
        targets.append(common.target_row(f"{arch}: advdef (no skipping) / bound", by["advdef"]["of_bound"],
                                         ">= 0.95", by["advdef"]["of_bound"] >= 0.95))
        if "torchattacks" in by:
            ratio = by["torchattacks"]["seconds"] / by["advdef"]["seconds"]
            targets.append(common.target_row(f"{arch}: torchattacks time / advdef (no skipping)", ratio, "> 1.0",
                                             ratio > 1.0))
            ratio_skip = by["torchattacks"]["seconds"] / by["advdef+skip"]["seconds"]
            targets.append(common.target_row(f"{arch}: torchattacks time / advdef+skip", ratio_skip, "> 1.0",
                                             ratio_skip > 1.0))
        targets.append(common.target_row(f"{arch}: skipping speed-up (advdef / advdef+skip)",
                                         by["advdef"]["seconds"] / by["advdef+skip"]["seconds"], "-", None))
    common.print_targets(targets, "Robust accuracies differ by design: advdef keeps the first misclassified iterate "
                         "(best), torchattacks returns the last one.")
    print(f"runtime {total.seconds:.0f} s")
    common.write_results("pgd_throughput", args, device, {
        "settings": {"eps": "8/255", "alpha": "2/255", "steps": 20, "random_start": True, "batch": batch,
                     "bound_passes": BOUND_PASSES, "repeats": args.repeats},
        "results": results, "targets": targets, "runtime_seconds": total.seconds,
    }, environment_record=env)


if __name__ == "__main__":
    main()
