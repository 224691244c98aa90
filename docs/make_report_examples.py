"""Generate docs/report.md: one example of every `advdef report` output, from a real CPU run.

The run is the seed defenses (none, CAS, CIFS, FSR, EWAS) on ResNet-18 / CIFAR-10 with PGD-AT,
shrunk to what a 2-core CPU trains and evaluates (official AutoAttack included) in well under an
hour: ResNet-18 at a quarter of its width (`resnet18:width=16`), a 2,000-image class-balanced
training subset, 3 epochs, PGD-2 (step 4/255) in training, and n=60 test images. Those models are barely trained:
the point is the report's shape and honesty, not the numbers, which the paper rows beside them
make obvious.

    python docs/make_report_examples.py --data-dir ../shared/data/cifar10-jpeg

The CIFAR-10 data is read from `--data-dir` (torchvision's batches, or an ImageFolder export;
nothing is downloaded). Training and evaluation resume: rerunning skips what the store holds.
Writes docs/report.md and the images it shows under docs/report/.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

DOCS = Path(__file__).resolve().parent
DEFENSES = ("none", "cas", "cifs", "fsr", "ewas")
TRAIN_AT = "pgd_at:steps=2,alpha=4/255"
ARCH = "resnet18:width=16"
# Standard AutoAttack is left out here only for CPU time: on this quarter-width ResNet-18 it ran
# over 12 minutes on the 7 images still robust after CW while the machine was shared. APGD-CE
# (official, 100 iterations) stands in; on a GPU, add `aa`.
ATTACKS = ["fgsm", "pgd20", "cw", "apgd", "adaptive"]
EPS_SWEEP = (Fraction(2, 255), Fraction(4, 255))
N = 60


GUIDE = """# advdef report

`advdef report` turns the store into tables meant to be pasted into a paper or a README: which
defense is better, by how much, and measured how. This page explains what the tables contain and
then shows every output, generated from a real run by `docs/make_report_examples.py`.

## What a table holds

- **One table per protocol.** A protocol is the dataset and split, the sample set (its hash), eps
  and norm, the evaluation seed, the checkpoint rule, and the attacks: their canonical specs, order
  and implementation versions. Evaluations that differ in any of these are never ranked together;
  each table says in which fields it differs from the others. Adaptive attacks are derived from
  each defense's own declarations, so they are not part of the protocol key: they count in the
  row's adaptive worst case and are listed per row in the notes.
- **The protocol card** is printed with every table, in every format.
- **One row per training recipe** (defense x AT method x arch x data, plus every other training
  option). Runs that differ only in their seed are one row: a single run shows its accuracy with a
  95% Wilson interval, several show mean ± sd (sample standard deviation) over the seeds.
- **Columns**: clean accuracy; each attack in order (an attack's column counts samples broken by
  earlier attacks as broken); **standard worst**, the per-sample minimum over the white-box
  attacks on the final logits (what defense papers report); **adaptive worst**, the per-sample
  minimum over every attack, adaptive, black-box and transfer included. Worst cases are always
  per-sample minima from the stored outcomes, never averages of columns.
- **Deltas and significance**: each defended row is compared with the undefended row (`none`) of
  the same AT method, architecture, data and protocol (among several, the one whose training
  recipe is closest). Δ columns are differences of means in percentage points; `p` is the exact
  two-sided McNemar test on the paired per-sample outcomes of the adaptive worst case (pairs are
  the same test image under the same training seed; the CSV and JSON carry p for clean and the
  standard worst case too, with the discordant counts b and c). With n=100 a 5-point gain is
  usually not significant; with n=10,000 a 1-point gain often is.
- **Reliability**: the gradient-masking sanity checks (`advdef evaluate --checks`, on by default)
  mark a row `FAIL`, and the notes say which check failed, with its figure and threshold.
- **Cost**: evaluation wall time, and forward/backward passes through the model per evaluated
  sample (every sample-pass is counted on the model itself, whatever called it: advdef's attacks,
  the official AutoAttack, adaptive attacks reading the defense's heads). The CSV adds training time.
- **Published numbers** (`--published`): the seed papers' own numbers for the same dataset,
  architecture, defense and AT method sit below advdef's row, in italics in the terminal and HTML,
  labelled `paper: SOURCE (checkpoint)`, with the paper's protocol in the notes (its eps as
  stated, step sizes, what its "AutoAttack" was, how it chose checkpoints). Only standard
  AutoAttack is put in the `aa` column; custom subsets keep their own names and are listed in the
  notes with the other columns advdef did not run.

## Options

| option | what it does |
|---|---|
| `--markdown`, `--csv`, `--latex`, `--json`, `--html` | output format (default: terminal tables) |
| `--published` | add the papers' own numbers for the same settings |
| `--where KEY=VALUE[,KEY=VALUE]` | keep rows whose `run`, `dataset`, `arch`, `defense`, `at`, `seed`, `eps`, `n` or `checkpoint` match; `a\\|b` alternatives; a plugin name matches its specs (`defense=smooth` matches `smooth:act=silu`); baselines of kept rows stay |
| `--group-by dataset,arch,defense,at,eps` | one table per value (within a protocol) |
| `--sort COLUMN` | e.g. `adaptive_worst` (best first), `+adaptive_worst` (worst first), `delta_adaptive_worst`, `defense`, `eval_seconds` (cheapest first) |
| `--compact` | only clean and the worst cases (for narrow terminals) |
| `--plots DIR`, `--plot-format png\\|svg` | write robust accuracy vs eps per run and per-class accuracy of each evaluation |
| `--run ID`, `--out FILE`, `--store PATH` | select runs, write to a file, choose the store |

`advdef analyze channels --run ID --layer layer4` draws the CAS paper's channel analysis: per-channel
activation magnitude (each series sorted descending) and activation frequency (channels ordered by
natural frequency) on natural vs adversarial inputs (PGD-20 by default) at a named insertion point
(`advdef info --arch ... ` lists them); `--csv` writes the per-channel figures.

The JSON output gives each row RobustBench's model-card fields where they apply (`clean_acc`,
`autoattack_acc`, `eps`, `threat_model`, `architecture`, `additional_data`,
`number_forward_passes`, `unreliable`, `footnote`), plus `worst_case_acc` and every numeric field
under `advdef`. advdef's `aa` column counts samples that earlier attacks broke, so it is never above
AutoAttack alone.

"""


def train_configs(data_dir: str):
    from advdef.training.config import TrainConfig

    return [
        TrainConfig(data="cifar10", data_dir=data_dir, arch=ARCH, defense=defense, at=TRAIN_AT, epochs=3,
                    limit_train=2000, batch_size=64, lr=0.05, val_n=100, seed=0)
        for defense in DEFENSES
    ]


def build_store(store_path: Path, data_dir: str) -> dict[str, str]:
    """Train and evaluate what the store does not hold yet; returns run ids by defense."""
    from advdef.evaluation.engine import EvalConfig, evaluate_run
    from advdef.progress import RichReporter
    from advdef.store import Store
    from advdef.training.trainer import start_run

    runs: dict[str, str] = {}
    with Store(store_path) as store, RichReporter() as reporter:
        trained = {json.dumps(run["config"], sort_keys=True): run["run_id"] for run in store.runs("trained")}
        for config in train_configs(data_dir):
            key = json.dumps({**config.to_json()}, sort_keys=True)
            runs[config.defense] = trained.get(key) or start_run(config, store, store_path.parent / "runs", reporter)
        for defense, run_id in runs.items():
            evaluate_run(store, run_id, EvalConfig(attacks=ATTACKS, n=N, batch_size=N, n_check=30, data_dir=data_dir),
                         reporter)
        for run_id in (runs["none"], runs["fsr"]):
            for eps in EPS_SWEEP:
                evaluate_run(store, run_id, EvalConfig(attacks=["fgsm", "pgd20"], eps=eps, n=N, batch_size=N,
                                                       checks=False, data_dir=data_dir), reporter)
    return runs


def advdef(*args: str) -> str:
    """Run the CLI as a user would and return what it printed."""
    done = subprocess.run([sys.executable, "-m", "advdef", *args], capture_output=True, text=True, check=True)
    return done.stdout


def fence(text: str, language: str = "") -> str:
    return f"```{language}\n{text.rstrip()}\n```\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 (torchvision batches or ImageFolder export)")
    parser.add_argument("--store", default=str(DOCS.parent / "runs-docs" / "report-examples.sqlite"))
    args = parser.parse_args()
    store = Path(args.store).resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    runs = build_store(store, args.data_dir)
    images = DOCS / "report"
    images.mkdir(exist_ok=True)
    s = ["--store", str(store)]
    main_table = ["--where", "eps=8/255"]

    def command(*parts: str) -> str:
        return "advdef " + " ".join(shlex.quote(p) for p in parts)

    out = io.StringIO()
    out.write(GUIDE)
    out.write("## Examples\n\n")
    out.write("Generated by `python docs/make_report_examples.py --data-dir ../shared/data/cifar10-jpeg` from a real CPU run: "
              f"`{ARCH}` (ResNet-18 at a quarter width) on CIFAR-10 with {', '.join(DEFENSES)}, trained with "
              f"`{TRAIN_AT}` for 3 epochs on 2,000 "
              f"images (the CIFAR-10 JPEG export in shared/data), evaluated on n={N} test images with "
              f"`{','.join(ATTACKS)}` at eps 8/255 (standard AutoAttack, `aa`, is left out of this CPU example only "
              "for time: it ran over 12 minutes on 7 images; the papers' `aa` numbers therefore appear in the notes). "
              "These models are barely trained: the examples show the report, "
              "and the paper rows beside advdef's show how far a 2-epoch CPU run is from a 100-epoch GPU run. "
              "Every command below was run by the script; the output is pasted unedited.\n\n")
    sections = [
        ("Markdown with the papers' numbers", ["report", "--markdown", "--published", *main_table], "markdown", None),
        ("Terminal (compact)", ["report", "--compact", *main_table], "text", None),
        ("CSV (first lines)", ["report", "--csv", *main_table], "csv", 6),
        ("LaTeX", ["report", "--latex", "--where", "eps=8/255,defense=fsr"], "latex", None),
        ("JSON with RobustBench-style fields (first row)", ["report", "--json", "--where", "eps=8/255,defense=fsr"],
         "json", None),
        ("Filters, grouping and sorting", ["report", "--markdown", "--compact", "--where", "defense=fsr|cas",
                                           "--sort", "adaptive_worst", "--group-by", "eps"], "markdown", None),
    ]
    for title, arguments, language, head in sections:
        text = advdef(*arguments, *s)
        if language == "json":
            payload = json.loads(text)
            text = json.dumps({k: v for k, v in payload[0]["rows"][-1].items() if k != "advdef"}, indent=2)
        if head:
            text = "\n".join(text.splitlines()[:head]) + "\n..."
        out.write(f"## {title}\n\n{fence(command(*arguments), 'console')}\n")
        out.write(text if language == "markdown" else fence(text, language))
        out.write("\n")
    advdef("report", "--plots", str(images), "--run", runs["none"], "--run", runs["fsr"], *s)
    out.write("## Plots\n\n" + fence(command("report", "--plots", "docs/report", "--run", runs["none"], "--run",
                                             runs["fsr"]), "console"))
    out.write("\n![robust accuracy vs eps](report/accuracy_vs_eps.png)\n\n")
    for path in sorted(images.glob("per_class_*.png"))[:2]:
        out.write(f"![per-class accuracy]({path.relative_to(DOCS)})\n\n")
    channels = ["analyze", "channels", "--run", runs["none"], "--layer", "layer4", "--n", str(N),
                "--out", str(images / "channels_none.png")]
    printed = advdef(*channels, *s)
    out.write("## Channel analysis (CAS paper, Figs. 1-2)\n\n" + fence(command(*channels[:-2], "--out",
                                                                              "docs/report/channels_none.png"), "console"))
    out.write(fence(printed.replace(str(images), "docs/report"), "text"))
    out.write("\n![channel analysis](report/channels_none.png)\n\n")
    out.write("## HTML\n\n" + fence(command("report", "--html", "--published", "--out", "report.html"), "console"))
    html = advdef("report", "--html", "--published", *s)
    out.write(f"\nOne self-contained page ({len(html) // 1024} KiB here): the tables, protocol cards, notes and the "
              "plots inlined as data URIs; it loads nothing from the network.\n")
    (DOCS / "report.md").write_text(out.getvalue())
    print(f"wrote {DOCS / 'report.md'}")


if __name__ == "__main__":
    main()
