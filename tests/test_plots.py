"""Report figures: files are valid PNG/SVG, and their data match hand-computed values."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from fractions import Fraction

import matplotlib
import numpy as np
import pytest

from advdef.analysis.channels import ChannelStats
from advdef.errors import UserError
from advdef.evaluation.engine import CLEAN
from advdef.evaluation.summary import summarize
from advdef.registry import ATTACKS
from advdef.report.plots import (
    accuracy_vs_eps,
    per_class_accuracy,
    plot_accuracy_vs_eps,
    plot_channels,
    plot_per_class,
)
from advdef.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EIGHT = Fraction(8, 255)
FGSM = ATTACKS.create("fgsm", eps=EIGHT).spec()
PGD = ATTACKS.create("pgd20", eps=EIGHT).spec()


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 100 and data.startswith(PNG_MAGIC)


def assert_svg(path):
    assert path.stat().st_size > 100
    root = ET.parse(path).getroot()
    assert root.tag in ("svg", "{http://www.w3.org/2000/svg}svg")


def _run(store: Store, run_id: str, defense: str = "none", at: str = "standard") -> None:
    store.insert_run({
        "run_id": run_id, "status": "trained", "dataset": "digits", "arch": "smallcnn", "defense": defense,
        "at_method": at, "seed": 0, "run_dir": f"/tmp/{run_id}", "config": {}, "versions": {},
    })


def _evaluation(store: Store, run_id: str, eps: str, outcomes: dict[str, list[tuple]], sample_hash: str = "h1") -> int:
    """An evaluation whose attacks ran in the dict's order; rows are (sample_id, label, robust, prediction)."""
    protocol = {"dataset": "digits", "split": "test", "eps": eps, "norm": "Linf", "n": len(outcomes[CLEAN]),
                "sample_hash": sample_hash, "seed": 0, "epoch": 3}
    ids = [row[0] for row in outcomes[CLEAN]]
    eval_id = store.get_or_create_evaluation(run_id, f"{run_id}|{eps}|{sample_hash}", protocol, ids)
    for attack, rows in outcomes.items():
        store.start_attack(eval_id, attack, {"implementation": "test"})
        store.record_outcomes(eval_id, attack, rows, 0.1)
        store.finish_attack(eval_id, attack, {"implementation": "test"})
    return eval_id


# Six samples over three classes. Sample 1 is broken by FGSM, so PGD skips it (NULL);
# sample 2 is clean-wrong, so no attack runs on it (NULL).
PER_CLASS = {
    CLEAN: [(0, 0, 1, 0), (1, 0, 1, 0), (2, 1, 0, 2), (3, 1, 1, 1), (4, 1, 1, 1), (5, 2, 1, 2)],
    FGSM: [(0, 0, 1, 0), (1, 0, 0, 3), (2, 1, None, None), (3, 1, 1, 1), (4, 1, 1, 1), (5, 2, 1, 2)],
    PGD: [(0, 0, 1, 0), (1, 0, None, None), (2, 1, None, None), (3, 1, 0, 0), (4, 1, 1, 1), (5, 2, 1, 2)],
}


@pytest.fixture()
def memory_store() -> Store:
    store = Store(memory=True)
    _run(store, "r1")
    _run(store, "r2", defense="cas", at="pgd_at")
    return store


def test_per_class_accuracy_is_the_per_sample_worst_case(memory_store):
    eval_id = _evaluation(memory_store, "r1", "8/255", PER_CLASS)
    frame = per_class_accuracy(memory_store, eval_id)
    assert list(frame.columns) == ["class", "n", "clean", "robust"]
    assert frame["class"].tolist() == [0, 1, 2]
    assert frame["n"].tolist() == [2, 3, 1]
    assert frame["clean"].tolist() == pytest.approx([1.0, 2 / 3, 1.0])
    # class 0: sample 1 was broken by FGSM and is NULL under PGD -> not robust; class 1: sample 3
    # broken by PGD, sample 2 clean-wrong -> only sample 4 robust.
    assert frame["robust"].tolist() == pytest.approx([0.5, 1 / 3, 1.0])
    summary = summarize(memory_store, eval_id)
    assert round((frame["robust"] * frame["n"]).sum()) == summary.worst.k == 3
    assert round((frame["clean"] * frame["n"]).sum()) == summary.clean.k == 5


def test_per_class_accuracy_of_an_unknown_evaluation_is_a_user_error(memory_store):
    with pytest.raises(UserError, match="unknown evaluation"):
        per_class_accuracy(memory_store, 99)


@pytest.mark.parametrize("suffix, check", [(".png", assert_png), (".svg", assert_svg)])
def test_plot_per_class_writes_a_valid_file(memory_store, tmp_path, suffix, check):
    eval_id = _evaluation(memory_store, "r1", "8/255", PER_CLASS)
    path = plot_per_class(memory_store, eval_id, tmp_path / f"sub/classes{suffix}", class_names=["zero", "one", "two"])
    assert path == tmp_path / f"sub/classes{suffix}"
    check(path)


def _eps_store(store: Store) -> None:
    """r1: 4/255 and 8/255 on sample set h1 (plus a one-point set h2 and a clean-only evaluation);
    r2: 8/255 only."""
    clean = [(0, 0, 1, 0), (1, 1, 1, 1), (2, 2, 1, 2), (3, 0, 0, 1)]
    _evaluation(store, "r1", "8/255", {CLEAN: clean, FGSM: [(0, 0, 0, 1), (1, 1, 1, 1), (2, 2, 0, 0), (3, 0, None, None)]})
    _evaluation(store, "r1", "4/255", {CLEAN: clean, FGSM: [(0, 0, 1, 0), (1, 1, 1, 1), (2, 2, 0, 1), (3, 0, None, None)]})
    _evaluation(store, "r1", "2/255", {CLEAN: clean, FGSM: [(0, 0, 1, 0), (1, 1, 1, 1), (2, 2, 1, 2), (3, 0, None, None)]},
                sample_hash="h2")
    _evaluation(store, "r1", "16/255", {CLEAN: clean}, sample_hash="h1")
    _evaluation(store, "r2", "8/255", {CLEAN: clean, FGSM: [(0, 0, 1, 0), (1, 1, 1, 1), (2, 2, 1, 2), (3, 0, None, None)]})


def test_accuracy_vs_eps_uses_the_sample_set_with_most_eps_points(memory_store):
    _eps_store(memory_store)
    data = accuracy_vs_eps(memory_store, ["r1", "r2"])
    r1 = data[data["run_id"] == "r1"]
    assert r1["eps"].tolist() == ["0", "4/255", "8/255"]  # h2's 2/255 and the clean-only 16/255 left out
    assert r1["eps_value"].tolist() == pytest.approx([0.0, 4 / 255, 8 / 255])
    assert r1["accuracy"].tolist() == pytest.approx([0.75, 0.5, 0.25])
    assert (r1["low"] <= r1["accuracy"]).all() and (r1["accuracy"] <= r1["high"]).all()
    assert r1["label"].iloc[0] == "r1 (none, standard)"
    r2 = data[data["run_id"] == "r2"]
    assert r2["eps"].tolist() == ["0", "8/255"] and r2["accuracy"].tolist() == pytest.approx([0.75, 0.75])
    assert r2["label"].iloc[0] == "r2 (cas, pgd_at)"


@pytest.mark.parametrize("suffix, check", [(".png", assert_png), (".svg", assert_svg)])
def test_plot_accuracy_vs_eps_writes_a_valid_file(memory_store, tmp_path, suffix, check):
    _eps_store(memory_store)
    backend = matplotlib.rcParams._get_backend_or_none()
    path = plot_accuracy_vs_eps(memory_store, ["r1", "r2"], tmp_path / f"eps{suffix}")
    check(path)
    assert matplotlib.rcParams._get_backend_or_none() == backend  # no global backend chosen


def test_plot_accuracy_vs_eps_without_evaluations_is_a_user_error(memory_store, tmp_path):
    with pytest.raises(UserError, match="no evaluations"):
        plot_accuracy_vs_eps(memory_store, ["r1"], tmp_path / "eps.png")
    with pytest.raises(UserError, match="r1"):
        plot_accuracy_vs_eps(memory_store, ["r3"], tmp_path / "eps.png")


def _stats(channels: int = 32) -> ChannelStats:
    rng = np.random.default_rng(0)
    return ChannelStats(
        layer="layer4", channels=channels, natural_magnitude=rng.random(channels),
        adversarial_magnitude=1.5 * rng.random(channels), natural_frequency=rng.random(channels),
        adversarial_frequency=rng.random(channels), n=100, attack=PGD, eps="8/255", tau=0.01,
        threshold="a > 0.01 max", magnitude_rule="mean",
    )


@pytest.mark.parametrize("suffix, check", [(".png", assert_png), (".svg", assert_svg), (".PNG", assert_png)])
def test_plot_channels_writes_a_valid_file(tmp_path, suffix, check):
    path = plot_channels(_stats(), tmp_path / f"channels{suffix}")
    check(path)


@pytest.mark.parametrize("suffix", [".pdf", ".jpg", ""])
def test_unknown_figure_suffix_is_a_user_error_naming_the_valid_ones(memory_store, tmp_path, suffix):
    with pytest.raises(UserError, match=r"\.png, \.svg"):
        plot_channels(_stats(), tmp_path / f"channels{suffix}")
    with pytest.raises(UserError, match=r"\.png, \.svg"):
        plot_accuracy_vs_eps(memory_store, ["r1"], tmp_path / f"eps{suffix}")
    assert not list(tmp_path.iterdir())


def test_channel_stats_frame_has_one_row_per_channel():
    frame = _stats(8).to_frame()
    assert len(frame) == 8 and frame["channel"].tolist() == list(range(8))
    assert {"natural_magnitude", "adversarial_magnitude", "natural_frequency", "adversarial_frequency",
            "layer", "attack", "eps", "n", "tau"} <= set(frame.columns)
