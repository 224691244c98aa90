"""The CLI end to end on tiny configurations, and its one-line errors (exit code 2)."""

import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from advdef.cli import app

runner = CliRunner()


def invoke(*args, store=None):
    argv = list(args) + (["--store", str(store)] if store is not None else [])
    return runner.invoke(app, argv)


def test_entry_point_starts():
    result = subprocess.run([sys.executable, "-m", "advdef", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "evaluate" in result.stdout


@pytest.mark.parametrize("kind", ["datasets", "models", "defenses", "training", "attacks"])
def test_list_each_kind(kind):
    result = invoke("list", kind)
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == kind and len(result.output.splitlines()) > 1


def test_info_json_reports_parameters():
    result = invoke("info", "--arch", "resnet18", "--data", "cifar10", "--json")
    payload = json.loads(result.output)
    assert payload["params_total"] == 11_173_962 and payload["params_added"] == 0
    assert "layer4" in payload["insertion_points"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--arch", "resnet81"], "unknown model 'resnet81'; did you mean resnet18"),
        (["train", "--defense", "fsrr"], "unknown defense 'fsrr'"),
        (["train", "--at", "pgd_at:stepz=3"], "did you mean steps"),
        (["evaluate", "--attacks", "pgd20,bim"], "unknown attack 'bim'"),
        (["evaluate", "--attacks", "pgd:steps="], "malformed spec"),
        (["evaluate", "--eps", "0"], "outside (0, 1]"),
        (["evaluate", "--eps", "2"], "outside (0, 1]"),
        (["evaluate", "--attacks", "pgd:eps=4/255"], "set the threat model with --eps"),
        (["evaluate", "--suite", "fast"], "unknown suite 'fast'; valid: standard, adaptive, blackbox"),
        (["evaluate", "--eot", "0"], "--eot must be a whole number >= 1"),
        (["train", "--dual-bn", "main"], "valid: off, clean, adversarial"),
        (["attack", "--run", "nope"], "unknown run id 'nope'"),
        (["evaluate", "--run", "nope", "--attacks", "fgsm"], "unknown run id 'nope'"),
        (["report", "--run", "nope"], "unknown run id 'nope'"),
        (["list", "bogus"], "unknown plugin kind"),
        (["run", "--preset", "quik"], "did you mean quick"),
        (["train", "--data", "imagefolder:/definitely/missing"], "has no 'train/' folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = invoke(*args, store=tmp_path / "s.sqlite") if args[0] not in ("list",) else invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_missing_cifar_data_dir_is_one_line(tmp_path):
    result = invoke("train", "--data", "cifar10", "--data-dir", str(tmp_path / "none"), "--epochs", "1",
                    store=tmp_path / "s.sqlite")
    assert result.exit_code == 2 and "not found under" in result.output and "--download" in result.output


def test_the_whole_loop_through_the_cli(tmp_path):
    store = tmp_path / "advdef.sqlite"
    common = ["--data", "digits", "--arch", "smallcnn:width=8", "--epochs", "2", "--batch-size", "64",
              "--lr", "0.05", "--limit-train", "400", "--device", "cpu"]
    trained = [invoke("train", *common, "--at", at, store=store) for at in ("standard", "pgd_at:steps=3")]
    for result in trained:
        assert result.exit_code == 0, result.output
        assert "best epoch" in result.output
    run_ids = [next(line for line in r.output.splitlines() if line.startswith("run ")).split()[1].rstrip(":")
               for r in trained]

    evaluated = invoke("evaluate", "--attacks", "fgsm,pgd:steps=5,cw:steps=5", "--n", "40", "--device", "cpu",
                       "--eps", "16/255", store=store)
    assert evaluated.exit_code == 0, evaluated.output
    assert all(run_id in evaluated.output for run_id in run_ids)

    again = invoke("evaluate", "--attacks", "fgsm,pgd:steps=5,cw:steps=5", "--n", "40", "--device", "cpu",
                   "--eps", "16/255", store=store)
    assert again.exit_code == 0 and "nothing to evaluate" in again.output

    markdown = invoke("report", "--markdown", store=store)
    assert markdown.exit_code == 0
    table = [line for line in markdown.output.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1:-1][:5] == [" run ", " dataset ", " arch ", " defense ", " at "]
    # The standard run selects on val_clean, the PGD-AT run on val_robust: two protocols, two tables.
    assert "adaptive worst" in table[0] and "pgd5" in table[0] and len(table) == 6
    assert markdown.output.count("### Table") == 2 and "- checkpoint: val_clean" in markdown.output
    assert "eps=16/255" in markdown.output

    csv = invoke("report", "--csv", store=store)
    assert csv.exit_code == 0
    header = csv.output.splitlines()[0].split(",")
    assert {"clean", "clean_low", "clean_high", "adaptive_worst", "adaptive_worst_k", "eps"} <= set(header)

    terminal = invoke("report", store=store)
    assert terminal.exit_code == 0 and "adaptive worst" in terminal.output

    out = tmp_path / "adv.safetensors"
    crafted = invoke("attack", "--run", run_ids[0], "--attack", "pgd:steps=5", "--out", str(out), "--n", "30",
                     "--eps", "16/255", "--device", "cpu", store=store)
    assert crafted.exit_code == 0, crafted.output
    assert "success rate" in crafted.output
    with safe_open(str(out), "pt") as handle:
        assert set(handle.keys()) == {"x_adv", "labels", "sample_ids", "clean_prediction", "adv_prediction"}
        assert handle.metadata()["eps"] == "16/255" and handle.metadata()["run_id"] == run_ids[0]
        assert handle.get_tensor("x_adv").shape == (30, 1, 16, 16)

    exported = invoke("export", "outcomes", store=store)
    assert exported.exit_code == 0 and exported.output.startswith("eval_id,attack,sample_id")


def test_aa_runs_through_the_cli(eval_store):
    store, runs = eval_store
    path = store.path
    store.close()
    result = invoke("evaluate", "--attacks", "aa", "--run", runs["standard"], "--n", "12", "--eps", "16/255",
                    "--device", "cpu", store=path)
    assert result.exit_code == 0, result.output
    assert "aa" in result.output


def test_evaluate_reports_checks_and_both_worst_cases(eval_store):
    store, runs = eval_store
    result = invoke("evaluate", "--run", runs["pgd_at"], "--attacks", "fgsm,pgd:steps=5,blackbox", "--n", "30",
                    "--device", "cpu", "--eps", "16/255", "--n-check", "30", store=store.path)
    assert result.exit_code == 0, result.output
    assert "standard worst" in result.output and "adaptive worst" in result.output and "checks" in result.output
    assert "broken first by" in result.output
    exported = invoke("export", "checks", store=store.path)
    assert exported.exit_code == 0 and "zero_gradients" in exported.output
