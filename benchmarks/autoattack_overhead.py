"""AutoAttack through advdef (`aa`) vs calling the official AutoAttack (pyautoattack) directly.

Same process, model, inputs, labels, device, seed and batch size on both sides, timed
interleaved (medians); the robust accuracies must be identical (asserted):

  advdef  ATTACKS.create("aa" | "aa:version=custom,attacks=...", eps=8/255)(view, x, y, seed=S):
          advdef's Attack.__call__ (range and budget checks), AutoAttack built per call on
          PlainLogits(eval_mode's LogitsView) with the seed drawn from
          torch.Generator().manual_seed(S), inputs made contiguous, the caller's RNG preserved
          and AutoAttack's warnings collected (advdef/attacks/autoattack.py)
  direct  pyautoattack.AutoAttack(model, attacks=..., device=..., eps=8/255, norm="Linf",
          seed=<the same seed>, version=...).run_standard_evaluation(x.contiguous(), y,
          batch_size=len(x)) on the raw eval-mode model, with the arguments advdef's adapter
          passes (contiguous: the official code calls .view on input gradients and crashes on
          channels-last inputs, so a direct caller must pass them contiguous too)

Robust accuracy is scored afterwards, untimed, by one forward of each side's x_adv.

AutoAttack standard spends most of its time on the samples that survive (Square's 5000 queries),
so the model is the partly robust one of pgd_throughput.py, calibrated so that about
--robust-target of the inputs survive (the custom attacks themselves, or APGD-CE + APGD-T for
the official versions; labels = the model's clean predictions).
--quick runs the custom version with APGD-CE + APGD-DLR (100 iterations each, the second on the
survivors only) on 8 images; the full mode runs `standard` on 32.

    python benchmarks/autoattack_overhead.py --quick
    python benchmarks/autoattack_overhead.py [--n 32] [--version standard] [--arch smallcnn]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--arch", default="smallcnn")
    parser.add_argument("--n", type=int, default=None, help="images (default 32; --quick 8)")
    parser.add_argument("--version", default=None,
                        help="standard | plus | rand | custom (default standard; --quick custom)")
    parser.add_argument("--attacks", default=None,
                        help="sub-attacks for --version custom (default: apgd-ce,apgd-dlr)")
    parser.add_argument("--seed", type=int, default=0, help="advdef's attack seed (the direct call gets the derived one)")
    parser.add_argument("--robust-target", type=float, default=0.5,
                        help="fraction of inputs that should survive PGD-20 (negative: plain untrained model)")
    args = parser.parse_args()
    if args.repeats is None:  # each call is long; the interleaving matters more than the count
        args.repeats = 2
    device = common.setup(args)
    n = args.n or (8 if args.quick else 32)
    version = args.version or ("custom" if args.quick else "standard")
    sub_attacks = (args.attacks or "apgd-ce,apgd-dlr").split(",") if version == "custom" else None
    env = common.environment(device)

    from advdef.attacks import eval_mode
    from advdef.attacks.autoattack import AutoAttack as AdvdefAutoAttack
    from advdef.registry import ATTACKS
    from pyautoattack import AutoAttack as OfficialAutoAttack

    spec = "aa" if version == "standard" else f"aa:version={version}"
    if sub_attacks:
        spec += ",attacks=" + ",".join(sub_attacks)

    with common.Stopwatch() as total:
        x = common.random_batch(n, device, seed=1)
        target = args.robust_target if args.robust_target >= 0 else None
        # Calibrated so that about --robust-target of the images survive: the custom attacks
        # themselves, or standard's white-box pair APGD-CE + APGD-T (the rest then goes to FAB-T
        # and Square, standard's costly part).
        calibration_spec = spec if version == "custom" else "aa:version=custom,attacks=apgd-ce,apgd-t"
        prepared = common.partly_robust_model(args.arch, x, device, target=target, calibration=n, tolerance=0.15,
                                              attack_spec=calibration_spec)
        model, y = prepared["model"], prepared["labels"]
        model.eval()
        attack = ATTACKS.create(spec, eps=common.EPS)
        seed = AdvdefAutoAttack.seed_from(torch.Generator().manual_seed(args.seed))
        outputs: dict[str, torch.Tensor] = {}

        with eval_mode(model) as view:
            def run_advdef() -> None:
                outputs["advdef"] = attack(view, x, y, seed=args.seed)

            def run_direct() -> None:
                adversary = OfficialAutoAttack(model, attacks=sub_attacks, device=device, eps=float(common.EPS),
                                               norm="Linf", seed=seed, version=version)
                outputs["direct"], _ = adversary.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))

            times = common.interleaved_times([run_advdef, run_direct], args.repeats, device=device)
            with torch.no_grad():
                robust = {name: float((model(x_adv).argmax(1) == y).float().mean()) for name, x_adv in outputs.items()}
    medians = [statistics.median(t) for t in times]
    identical_points = bool(torch.equal(outputs["advdef"], outputs["direct"].to(outputs["advdef"].device)))

    rows = [
        {"candidate": "advdef aa", "seconds": medians[0], "images_per_s": n / medians[0], "robust_acc": robust["advdef"],
         "spread": common.spread(times[0])},
        {"candidate": "pyautoattack direct", "seconds": medians[1], "images_per_s": n / medians[1],
         "robust_acc": robust["direct"], "spread": common.spread(times[1])},
    ]
    print(f"AutoAttack {version}{' (' + ', '.join(sub_attacks) + ')' if sub_attacks else ''}, eps 8/255, "
          f"{args.arch}, n {n}, batch {n}, seed {seed}, device {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds")
    common.print_table(rows, [("candidate", "candidate", "s"), ("seconds", "seconds", ".2f"),
                              ("images_per_s", "img/s", ".2f"), ("robust_acc", "robust acc", ".3f"),
                              ("spread", "spread", ".2f")])
    print(f"identical robust accuracy: {robust['advdef'] == robust['direct']}; identical adversarial points: "
          f"{identical_points}; clean accuracy 1.000 by construction (labels = clean predictions)")
    ratio = medians[0] / medians[1]
    targets = [common.target_row("advdef time / direct time", ratio, "<= 1.02", ratio <= 1.02),
               common.target_row("robust accuracy advdef - direct", robust["advdef"] - robust["direct"], "== 0",
                                 robust["advdef"] == robust["direct"])]
    common.print_targets(targets)
    print(f"runtime {total.seconds:.0f} s")
    common.write_results("autoattack_overhead", args, device, {
        "settings": {"spec": attack.spec(), "version": version, "attacks": sub_attacks, "eps": "8/255", "n": n,
                     "batch_size": n, "arch": args.arch, "advdef_seed": args.seed, "autoattack_seed": seed,
                     "bias_offset": prepared["offset"], "calibrated_against": calibration_spec,
                     "calibration_robust": prepared["probe_robust"],
                     "repeats": args.repeats},
        "rows": rows, "identical_points": identical_points, "targets": targets, "runtime_seconds": total.seconds,
    }, environment_record=env)
    assert robust["advdef"] == robust["direct"], f"robust accuracies differ: {robust}"


if __name__ == "__main__":
    main()
