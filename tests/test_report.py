"""Golden tests of `advdef report`: tables hold the stored numbers, worst cases are per-sample
minima, intervals and McNemar p-values match hand computation, protocols are never mixed."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from fractions import Fraction
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from advdef.cli import app
from advdef.errors import UserError
from advdef.evaluation.engine import CLEAN, EvalConfig, evaluate_run
from advdef.evaluation.stats import mcnemar_exact, wilson_interval
from advdef.registry import ATTACKS
from advdef.report import comparison_tables, to_csv, to_json, to_latex, to_markdown
from advdef.report.filters import parse_where
from advdef.report.render import print_rich
from advdef.report.rows import ADAPTIVE_WORST, CLEAN as CLEAN_METRIC, STANDARD_WORST
from advdef.store import Store
from advdef.training.trainer import start_run
from conftest import quick_config

EPS = Fraction(8, 255)
FGSM = ATTACKS.create("fgsm", eps=EPS).spec()
PGD20 = ATTACKS.create("pgd20", eps=EPS).spec()


# == a synthetic store: outcomes chosen by hand ===================================================
def add_run(store: Store, run_id: str, *, defense: str = "none", at: str = "pgd_at", seed: int = 0,
            dataset: str = "cifar10", arch: str = "resnet18", **config) -> str:
    store.insert_run({
        "run_id": run_id, "status": "trained", "dataset": dataset, "arch": arch, "defense": defense,
        "at_method": at, "seed": seed, "run_dir": f"/runs/{run_id}", "versions": {},
        "config": {"data": dataset, "arch": arch, "defense": defense, "at": at, "seed": seed, "epochs": 10, **config},
    })
    return run_id


def add_eval(store: Store, run_id: str, outcomes: dict[str, list], *, eps: str = "8/255",
             checkpoint_rule: str = "last", sample_hash: str = "h1", seconds: float = 1.0) -> int:
    """Outcomes per attack spec (1 robust, 0 broken, None skipped), samples 0..n-1 with label i % 10."""
    n = len(outcomes[CLEAN])
    protocol = {"dataset": store.get_run(run_id)["dataset"], "split": "test", "n": n, "sample_hash": sample_hash,
                "eps": eps, "norm": "Linf", "seed": 0, "epoch": 10, "checkpoint_rule": checkpoint_rule}
    eval_id = store.get_or_create_evaluation(run_id, f"{run_id}-{eps}-{sample_hash}-{checkpoint_rule}", protocol,
                                             list(range(n)))
    for attack, robust in outcomes.items():
        details = {"implementation": "advdef test", "eot": 1}
        store.start_attack(eval_id, attack, details)
        store.record_outcomes(eval_id, attack, [(i, i % 10, r, None) for i, r in enumerate(robust)], seconds)
        store.finish_attack(eval_id, attack, {**details, "warnings": []})
    return eval_id


def chain(clean: list[int], *broken_sets: set[int]) -> dict[str, list]:
    """Outcomes as the engine stores them: each attack skips (None) samples already lost."""
    alive = {i for i, ok in enumerate(clean) if ok}
    outcomes: dict[str, list] = {CLEAN: list(clean)}
    for spec, broken in zip((FGSM, PGD20), broken_sets):
        outcomes[spec] = [None if i not in alive else (0 if i in broken else 1) for i in range(len(clean))]
        alive -= broken
    return outcomes


@pytest.fixture()
def synthetic() -> Store:
    store = Store(memory=True)
    # 20 samples; baseline: 16 clean-correct, fgsm breaks 6, pgd20 breaks 2 more -> 8 robust.
    add_run(store, "base")
    add_eval(store, "base", chain([1] * 16 + [0] * 4, {0, 1, 2, 3, 4, 5}, {6, 7}))
    # defense: 18 clean-correct, fgsm breaks 3, pgd20 breaks 2 more -> 13 robust.
    add_run(store, "def", defense="fsr")
    add_eval(store, "def", chain([1] * 18 + [0] * 2, {0, 1, 8}, {9, 10}))
    return store


def test_the_worst_case_is_the_per_sample_minimum_never_an_average():
    store = Store(memory=True)
    add_run(store, "r")
    # 10 clean-correct; fgsm breaks {0,1,2}; pgd20 breaks {3,4} of the rest: per-attack columns
    # 70% and 50%; worst case 5/10 = the samples no attack broke. The mean of the two would be 60%.
    add_eval(store, "r", chain([1] * 10, {0, 1, 2}, {3, 4}))
    (table,) = comparison_tables(store)
    (row,) = table.rows
    assert row.value("fgsm") == pytest.approx(0.7)
    assert row.value("pgd20") == pytest.approx(0.5)
    assert row.value(ADAPTIVE_WORST) == pytest.approx(0.5) == row.value(STANDARD_WORST)
    assert row.summaries[0].robust_ids[ADAPTIVE_WORST] == frozenset({5, 6, 7, 8, 9})


def test_wilson_intervals_and_mcnemar_match_hand_computation(synthetic):
    # Wilson for 8/20 at z = 1.96: centre (p + z^2/2n)/(1 + z^2/n), half-width as in Wilson (1927).
    z = 1.959963984540054
    p, n = 8 / 20, 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(8, 20) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(8, 20) == pytest.approx((0.2188, 0.6134), abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    # Exact McNemar: b = 7, c = 2 -> p = 2 * P(X <= 2), X ~ Binomial(9, 1/2) = 2 * 46 / 512.
    assert mcnemar_exact(7, 2) == pytest.approx(2 * (1 + 9 + 36) / 512)
    assert mcnemar_exact(2, 7) == mcnemar_exact(7, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0

    (table,) = comparison_tables(synthetic)
    defended = next(r for r in table.rows if r.defense == "fsr")
    # Baseline robust {8..15}; defense robust {2..7, 11..17}: b = {2..7, 16, 17} = 8, c = {8, 9, 10} = 3.
    test = defended.comparison.tests[ADAPTIVE_WORST]
    assert (test.b, test.c, test.pairs) == (8, 3, 20)
    assert test.p == pytest.approx(2 * sum(math.comb(11, i) for i in range(4)) / 2**11)
    clean = defended.comparison.tests[CLEAN_METRIC]
    assert (clean.b, clean.c) == (2, 0)
    assert defended.comparison.deltas[ADAPTIVE_WORST] == pytest.approx(13 / 20 - 8 / 20)
    assert defended.comparison.baseline_runs == ["base"]


def test_rows_with_different_protocols_are_never_ranked_together(synthetic):
    add_run(synthetic, "other-eps", defense="cas")
    add_eval(synthetic, "other-eps", chain([1] * 20, set(), set()), eps="4/255")
    add_run(synthetic, "other-samples", defense="cas", seed=3)
    add_eval(synthetic, "other-samples", chain([1] * 20, set(), set()), sample_hash="h2")
    add_run(synthetic, "other-checkpoint", defense="ewas")
    add_eval(synthetic, "other-checkpoint", chain([1] * 20, set(), set()), checkpoint_rule="val_robust")
    tables = comparison_tables(synthetic, sort="adaptive_worst")
    assert len(tables) == 4
    for table in tables:
        assert len({(t["eps"], t["sample_hash"], t["checkpoint_rule"]) for t in [table.protocol]}) == 1
        assert any("different protocols are not comparable" in note for note in table.notes)
    by_run = {run: index for index, table in enumerate(tables) for row in table.rows for run in row.runs}
    assert by_run["base"] == by_run["def"]
    assert len({by_run["other-eps"], by_run["other-samples"], by_run["other-checkpoint"], by_run["base"]}) == 4
    # A different attack list is a different protocol too.
    add_run(synthetic, "fgsm-only", defense="cas", seed=5)
    add_eval(synthetic, "fgsm-only", {CLEAN: [1] * 20, FGSM: [1] * 20})
    assert len(comparison_tables(synthetic)) == 5


def test_several_seeds_pool_into_mean_and_sd_and_pair_by_seed():
    store = Store(memory=True)
    for seed, broken in ((0, {0, 1}), (1, {0, 1, 2, 3})):
        add_run(store, f"base{seed}", seed=seed)
        add_eval(store, f"base{seed}", chain([1] * 10, broken, set()))
    for seed, broken in ((0, {0}), (1, {5})):
        add_run(store, f"def{seed}", defense="cas", seed=seed)
        add_eval(store, f"def{seed}", chain([1] * 10, broken, set()))
    (table,) = comparison_tables(store)
    assert [row.runs for row in table.rows] == [["base0", "base1"], ["def0", "def1"]]
    base, defended = table.rows
    assert base.metrics[ADAPTIVE_WORST].value == pytest.approx(statistics.mean([0.8, 0.6]))
    assert base.metrics[ADAPTIVE_WORST].sd == pytest.approx(statistics.stdev([0.8, 0.6]))
    assert base.metrics[ADAPTIVE_WORST].interval is None
    # Paired by seed: seed 0 b = {1}, c = {}; seed 1 b = {0,1,2,3}, c = {5}.
    test = defended.comparison.tests[ADAPTIVE_WORST]
    assert (test.b, test.c, test.pairs) == (5, 1, 20)
    markdown = to_markdown([table])
    assert "70.0 ± 14.1" in markdown and "90.0 ± 0.0" in markdown


def test_deltas_only_against_the_same_at_method_arch_and_data():
    store = Store(memory=True)
    add_run(store, "base-pgd")
    add_eval(store, "base-pgd", chain([1] * 10, {0}, set()))
    add_run(store, "def-trades", defense="fsr", at="trades")
    add_eval(store, "def-trades", chain([1] * 10, set(), set()))
    (table,) = comparison_tables(store)
    defended = next(r for r in table.rows if r.defense == "fsr")
    assert defended.comparison is None
    assert any("def-trades: no undefended run" in note for note in table.notes)


def test_unreliable_rows_are_marked_with_the_reason(synthetic):
    eval_id = synthetic.evaluations("def")[0]["eval_id"]
    synthetic.record_check(eval_id, "zero_gradients", "fail", 0.4, 0.05, {"reason": "gradients vanish"})
    (table,) = comparison_tables(synthetic)
    defended = next(r for r in table.rows if r.defense == "fsr")
    assert defended.reliable is False
    assert any("UNRELIABLE" in n and "zero_gradients (0.4 > 0.05): gradients vanish" in n for n in table.notes)
    assert "| FAIL |" in to_markdown([table])


def test_where_group_by_and_sort(synthetic):
    add_run(synthetic, "trades-base", at="trades:beta=6")
    add_eval(synthetic, "trades-base", chain([1] * 20, set(range(15)), set()))
    only = comparison_tables(synthetic, where=parse_where(["defense=fsr"]))
    assert [r.runs for t in only for r in t.rows] == [["base"], ["def"]], "the baseline stays for the deltas"
    assert any("base: shown as the baseline" in note for note in only[0].notes)
    either = comparison_tables(synthetic, where=parse_where(["run=base|def,at=pgd_at"]))
    assert sorted(r.runs[0] for t in either for r in t.rows) == ["base", "def"]
    trades = comparison_tables(synthetic, where=parse_where(["at=trades"]))  # plugin name matches a spec
    assert [r.runs for t in trades for r in t.rows] == [["trades-base"]]
    grouped = comparison_tables(synthetic, group_by=["at"])
    assert sorted(t.group["at"] for t in grouped) == ["pgd_at", "trades:beta=6"]
    ranked = comparison_tables(synthetic, sort="adaptive_worst")[0]
    assert [r.runs[0] for r in ranked.rows] == ["def", "base", "trades-base"]
    ascending = comparison_tables(synthetic, sort="+adaptive_worst")[0]
    assert [r.runs[0] for r in ascending.rows] == ["trades-base", "base", "def"]
    with pytest.raises(UserError, match="did you mean defense"):
        parse_where(["defence=fsr"])
    with pytest.raises(UserError, match="--sort column"):
        comparison_tables(synthetic, sort="robustness")


def test_filters_keep_spec_values_with_commas_whole():
    (condition,) = parse_where(["defense=smooth:act=softplus,beta=10"])
    assert condition.alternatives == ("smooth:act=softplus,beta=10",)
    assert condition.matches("smooth:act=softplus,beta=10") and not condition.matches("smooth:act=silu")


def test_csv_json_and_latex_hold_the_same_numbers(synthetic):
    tables = comparison_tables(synthetic)
    frame = pd.read_csv(StringIO(to_csv(tables)))
    defended = frame[frame["run"] == "def"].iloc[0]
    assert defended["adaptive_worst"] == pytest.approx(0.65) and defended["adaptive_worst_k"] == 13
    assert defended["adaptive_worst_low"] == pytest.approx(wilson_interval(13, 20)[0])
    assert defended["mcnemar_p_adaptive_worst"] == pytest.approx(mcnemar_exact(8, 3))
    assert defended["delta_clean"] == pytest.approx(0.1) and defended["baseline"] == "base"
    payload = json.loads(to_json(tables))
    row = next(r for r in payload[0]["rows"] if r["name"] == "def")
    assert row["clean_acc"] == "90.00" and row["worst_case_acc"] == "65.00" and row["autoattack_acc"] is None
    assert row["threat_model"] == "Linf" and row["eps"] == "8/255" and row["unreliable"] is False
    assert payload[0]["card"]["threat model"].startswith("Linf, eps = 8/255")
    latex = to_latex(tables)
    assert "\\toprule" in latex and "\\bottomrule" in latex and "65.0 {\\scriptsize [" in latex
    assert "adaptive worst" in latex and "sample-set hash h1" in latex


def test_the_protocol_card_is_printed_with_every_table(synthetic):
    markdown = to_markdown(comparison_tables(synthetic))
    for line in ("- dataset: cifar10 (test split)", "sample-set hash h1", "- threat model: Linf, eps = 8/255",
                 f"pgd20 = {PGD20} [advdef test]", "- checkpoint: last"):
        assert line in markdown
    from rich.console import Console

    console = Console(file=StringIO(), width=300)
    print_rich(comparison_tables(synthetic), console)
    text = console.file.getvalue()
    assert "threat model: Linf, eps = 8/255" in text and "[advdef test]" in text


def test_published_numbers_sit_beside_the_matching_rows(synthetic):
    (table,) = comparison_tables(synthetic, published=True)
    kinds = [(row.kind, row.defense) for row in table.rows]
    defended_at = kinds.index(("advdef", "fsr"))
    published = [row for row in table.rows if row.kind == "published"]
    assert published, "the FSR paper reports cifar10/resnet18/pgd_at"
    fsr_paper = next(r for r in published if r.defense == "fsr")
    assert table.rows.index(fsr_paper) > defended_at
    assert fsr_paper.published[CLEAN_METRIC] == pytest.approx(0.8146)
    assert fsr_paper.label.startswith("paper: ")
    assert any("the paper's own protocol" in note for note in table.notes)
    markdown = to_markdown([table])
    assert "| 81.46 |" in markdown


# == a store built by a short real run ===========================================================
@pytest.fixture(scope="module")
def real_store(trained_store, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The session's two trained SmallCNNs plus a CAS run, evaluated with fgsm and pgd20."""
    path, runs = trained_store
    root = tmp_path_factory.mktemp("report")
    source = Store(path)
    source.conn.execute("PRAGMA wal_checkpoint(FULL)")
    source.close()
    copy = root / "report.sqlite"
    shutil.copy(path, copy)
    runs = dict(runs)
    config = EvalConfig(attacks=["fgsm", "pgd20"], eps=Fraction(16, 255), n=40, device="cpu", checks=False)
    with Store(copy) as store:
        runs["cas"] = start_run(quick_config(at="pgd_at:eps=16/255", defense="cas", epochs=3), store, root / "runs")
        for run_id in runs.values():
            evaluate_run(store, run_id, config)
        evaluate_run(store, runs["pgd_at"], EvalConfig(attacks=["fgsm", "pgd20"], eps=Fraction(8, 255), n=40,
                                                       device="cpu", checks=False))
    return copy, runs


def _markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Parse every pipe table of a Markdown document into rows of header -> cell."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ") and "---" in lines[i + 1]:
            headers = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                rows.append(dict(zip(headers, (c.strip() for c in body.strip().strip("|").split(" | ")))))
            tables.append(rows)
    return tables


def test_markdown_of_a_real_run_parses_and_holds_the_stored_numbers(real_store):
    path, runs = real_store
    result = CliRunner().invoke(app, ["report", "--markdown", "--store", str(path)])
    assert result.exit_code == 0, result.output
    parsed = _markdown_tables(result.output)
    # eps 16/255 and 8/255 are separate protocols, and so is the standard run's checkpoint rule
    # (val_clean, where the AT runs select on val_robust).
    assert len(parsed) == 3
    assert "- checkpoint: val_clean" in result.output and "- checkpoint: val_robust" in result.output
    with Store(path) as store:
        for rows in parsed:
            for row in rows:
                run_evals = store.evaluations(row["run"])
                # Recompute clean and worst case from the raw outcome rows.
                candidates = []
                for e in run_evals:
                    outcomes = store.outcomes(e["eval_id"])
                    clean_ok = {o["sample_id"] for o in outcomes if o["attack"] == CLEAN and o["robust"] == 1}
                    broken = {o["sample_id"] for o in outcomes if o["attack"] != CLEAN and o["robust"] == 0}
                    candidates.append((f"{100 * len(clean_ok) / e['n']:.1f}",
                                       f"{100 * len(clean_ok - broken) / e['n']:.1f}"))
                shown = (row["clean"].split(" ")[0], row["adaptive worst"].split(" ")[0])
                assert shown in candidates, (row, candidates)
                assert "[" in row["clean"], "one run: a Wilson interval"
    cas_row = next(r for rows in parsed for r in rows if r["defense"] == "cas")
    assert cas_row["Δ adaptive worst"].startswith(("+", "-")) and cas_row["p"] != ""


def test_report_cli_formats_plots_and_errors(real_store, tmp_path):
    path, runs = real_store
    runner = CliRunner()
    for flag in ("--csv", "--json", "--latex"):
        result = runner.invoke(app, ["report", flag, "--store", str(path)])
        assert result.exit_code == 0 and len(result.output) > 200, (flag, result.output)
    result = runner.invoke(app, ["report", "--store", str(path), "--compact", "--sort", "adaptive_worst",
                                 "--where", "defense=cas|none", "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "accuracy_vs_eps.png" in written and any(name.startswith("per_class_") for name in written)
    for name in written:
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    bad = runner.invoke(app, ["report", "--markdown", "--csv", "--store", str(path)])
    assert bad.exit_code == 2 and "choose one output format" in bad.output
    bad = runner.invoke(app, ["report", "--where", "atk=pgd", "--store", str(path)])
    assert bad.exit_code == 2 and "--where key" in bad.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (.ci/run installs Debian's chromium)")
def test_html_page_opens_in_headless_chromium_without_errors(real_store, tmp_path):
    path, _ = real_store
    page = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", "--html", "--published", "--out", str(page), "--store", str(path)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert text.count("<table>") == 3 and "data:image/png;base64," in text and "http" not in text.split("<body>")[1]
    # A test-only copy adds a probe that records, once loaded, how many images decoded; the page
    # itself has no script.
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>window.addEventListener('load', () => {"
                                  "const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0);"
                                  "document.body.setAttribute('data-decoded', ok.length + '/' + document.images.length);"
                                  "});</script></body>"))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Table 1:" in done.stdout
    images = text.count("<img ")
    assert images >= 2 and f'data-decoded="{images}/{images}"' in done.stdout
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
