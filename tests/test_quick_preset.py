"""The main job end to end (slow: run with `pytest -m slow`)."""

import pytest
from typer.testing import CliRunner

from advdef.cli import app
from advdef.evaluation.summary import summarize
from advdef.store import Store


@pytest.mark.slow
def test_quick_preset_trains_evaluates_and_reports(tmp_path):
    store_path = tmp_path / "advdef.sqlite"
    result = CliRunner().invoke(app, ["run", "--preset", "quick", "--store", str(store_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "adaptive worst" in result.output and "aa" in result.output
    with Store(store_path) as store:
        runs = {r["at_method"].split(":")[0]: r for r in store.runs()}
        assert set(runs) == {"standard", "pgd_at"} and all(r["status"] == "trained" for r in runs.values())
        worst = {}
        for method, run in runs.items():
            summary = summarize(store, store.evaluations(run["run_id"])[0]["eval_id"])
            assert summary.complete and [a.label for a in summary.attacks] == ["fgsm", "pgd20", "cw", "aa"]
            worst[method] = summary.worst.value
        assert worst["pgd_at"] > worst["standard"]
