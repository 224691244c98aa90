"""Training presets: the values each sets, override precedence, AT-spec merging, errors, listing, recording."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from advdef.cli import app
from advdef.errors import UserError
from advdef.registry import PRESETS
from advdef.training import trainer
from advdef.training.config import TrainConfig, parse_milestones
from advdef.training.presets import Recipe, load_preset, merge_at, resolve_train_config
from advdef.training.trainer import build_optimizer

runner = CliRunner()

SGD = {"optimizer": "sgd", "momentum": 0.9, "nesterov": False, "lr_decay": 0.1, "batch_size": 128}
PGD_EVAL = "pgd_at:alpha=2/255,bn_mode=eval,eps=8/255,steps=10"

# What docs/training.md promises, preset x dataset: every recipe value (SGD holds the shared ones).
EXPECTED = {
    ("fsr-paper", "cifar10"): dict(
        arch="resnet18", defense="fsr:lam_rec=1,lam_sep=1,tau=0.1", at=PGD_EVAL, epochs=100, lr=0.1,
        weight_decay=5e-4, milestones=[75, 90], milestone_unit="epoch", select="last"),
    ("fsr-paper", "svhn"): dict(
        arch="resnet18", defense="fsr:lam_rec=1,lam_sep=1,tau=0.1", at="pgd_at:alpha=1/255,bn_mode=eval,eps=8/255,steps=10",
        epochs=100, lr=0.01, weight_decay=5e-4, milestones=[75, 90], milestone_unit="epoch", select="last"),
    ("cas-paper", "cifar10"): dict(
        arch="resnet18", defense="cas", at=PGD_EVAL, epochs=200, lr=0.1, weight_decay=2e-4,
        milestones=[75, 90], milestone_unit="epoch", select="last"),
    ("cas-paper", "svhn"): dict(
        arch="resnet18", defense="cas", at="pgd_at:alpha=1/255,bn_mode=eval,eps=8/255,steps=10", epochs=200,
        lr=0.01, weight_decay=5e-4, milestones=[75, 90], milestone_unit="epoch", select="last"),
    ("cifs-paper", "cifar10"): dict(
        arch="resnet18", defense="cifs:beta=2", at=PGD_EVAL, epochs=120, lr=0.1, weight_decay=2e-4,
        milestones=[75, 90], milestone_unit="epoch", select="last"),
    ("cifs-paper", "svhn"): dict(
        arch="resnet18", defense="cifs:beta=2", at=PGD_EVAL, epochs=120, lr=0.01, weight_decay=5e-4,
        milestones=[75, 90], milestone_unit="epoch", select="last"),
    ("ewas-paper", "cifar10"): dict(
        arch="resnet18", defense="ewas:lam=0.01", at="pgd_at:alpha=2/255,bn_mode=train,eps=8/255,steps=10",
        epochs=120, lr=0.1, weight_decay=2e-4, milestones=[60, 90], milestone_unit="epoch", select="last"),
    ("ewas-paper", "svhn"): dict(
        arch="resnet18", defense="ewas:lam=0.05", at="pgd_at:alpha=2/255,bn_mode=train,eps=8/255,steps=10",
        epochs=120, lr=0.01, weight_decay=5e-4, milestones=[75, 90], milestone_unit="epoch", select="last"),
    ("madry-pgd-at", "cifar10"): dict(
        arch="wrn34_10", defense="none", at="pgd_at:alpha=2/255,bn_mode=train,eps=8/255,steps=10", epochs=205,
        lr=0.1, weight_decay=2e-4, milestones=[102, 154], milestone_unit="epoch", select="last"),
    ("trades-paper", "cifar10"): dict(
        arch="wrn34_10", defense="none", at="trades:alpha=0.007,beta=6,bn_mode=eval,eps=0.031,steps=10", epochs=76,
        lr=0.1, weight_decay=2e-4, milestones=[74], milestone_unit="epoch", select="auto"),
    ("mart-paper", "cifar10"): dict(
        arch="resnet18", defense="none", at="mart:alpha=0.007,bn_mode=eval,eps=0.031,lam=5,steps=10", epochs=120,
        lr=0.01, weight_decay=3.5e-3, milestones=[74, 89, 99], milestone_unit="epoch", select="auto"),
    ("rice-pgd-at", "cifar10"): dict(
        arch="preact_resnet18", defense="none", at="pgd_at:alpha=2/255,bn_mode=train,eps=8/255,steps=10", epochs=200,
        lr=0.1, weight_decay=5e-4, milestones=[0.5, 0.75], milestone_unit="fraction", select="val_robust"),
}
EXPECTED_NAMES = sorted({name for name, _ in EXPECTED})


def test_the_table_covers_every_builtin_preset_and_dataset():
    builtin = {(name, dataset) for name in PRESETS.names() for dataset in load_preset(name).recipes}
    assert builtin == set(EXPECTED)


@pytest.mark.parametrize("name, dataset", sorted(EXPECTED))
def test_a_preset_sets_the_documented_values(name, dataset):
    config = resolve_train_config(name, {"data": dataset}).validate()
    for key, value in {**SGD, **EXPECTED[(name, dataset)]}.items():
        assert getattr(config, key) == value, key
    assert config.preset == name and config.data == dataset


def test_the_default_dataset_is_cifar10():
    assert resolve_train_config("fsr-paper", {}).data == "cifar10"


def test_schedules_decay_after_the_stated_epochs():
    fsr = resolve_train_config("fsr-paper", {})
    assert [fsr.lr_at(e) for e in (75, 76, 90, 91)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    mart = resolve_train_config("mart-paper", {})
    assert [mart.lr_at(e) for e in (74, 75, 90, 100, 120)] == pytest.approx([0.01, 1e-3, 1e-4, 1e-5, 1e-5])
    assert resolve_train_config("rice-pgd-at", {}).milestone_epochs() == [100, 150]


def test_explicit_options_override_the_preset_and_the_rest_stays():
    config = resolve_train_config("cifs-paper", {"epochs": 4, "lr": 0.05, "milestones": [0.5], "milestone_unit": "fraction",
                                                 "defense": "none", "select": "val_robust"}).validate()
    assert (config.epochs, config.lr, config.milestones, config.milestone_unit) == (4, 0.05, [0.5], "fraction")
    assert config.defense == "none" and config.select == "val_robust"
    assert config.weight_decay == 2e-4 and config.at == PGD_EVAL and config.arch == "resnet18"


def test_no_preset_means_plain_defaults():
    assert resolve_train_config(None, {"epochs": 3}) == TrainConfig(epochs=3)


def test_refinements_follow_the_chosen_arch_and_method_but_not_over_explicit_options():
    assert resolve_train_config("cas-paper", {"arch": "wrn34_10"}).weight_decay == 5e-4
    assert resolve_train_config("cas-paper", {"arch": "wrn34_10", "weight_decay": 1e-3}).weight_decay == 1e-3
    wrn = resolve_train_config("cifs-paper", {"arch": "wrn28_10"})
    assert (wrn.epochs, wrn.weight_decay) == (110, 5e-4)
    trades = resolve_train_config("ewas-paper", {"at": "trades"})
    assert (trades.epochs, trades.milestones) == (85, [75])
    assert resolve_train_config("ewas-paper", {"at": "trades", "epochs": 30}).epochs == 30
    assert resolve_train_config("ewas-paper", {"data": "svhn", "at": "trades"}).epochs == 120


@pytest.mark.parametrize(
    "user, expected",
    [
        # another method: the training attack only, for the parameters it accepts
        ("trades", "trades:alpha=2/255,eps=8/255,steps=10"),
        ("fat:tau=1", "fat:alpha=2/255,eps=8/255,steps=10,tau=1"),
        ("standard", "standard"),
        # what the user wrote always wins
        ("trades:eps=16/255,beta=3", "trades:alpha=2/255,beta=3,eps=16/255,steps=10"),
        # the same method: every recipe parameter, bn_mode included
        ("pgd_at:steps=7", "pgd_at:alpha=2/255,bn_mode=eval,eps=8/255,steps=7"),
    ],
)
def test_an_explicit_at_inherits_the_recipes_attack(user, expected):
    assert resolve_train_config("fsr-paper", {"at": user}).at == expected


def test_method_weights_carry_over_only_to_the_same_method():
    assert resolve_train_config("mart-paper", {"at": "mart:steps=5"}).at == "mart:alpha=0.007,bn_mode=eval,eps=0.031,lam=5,steps=5"
    assert resolve_train_config("trades-paper", {"at": "mart"}).at == "mart:alpha=0.007,eps=0.031,steps=10"
    assert merge_at(None, "pgd_at:steps=3", {"steps": 3}) == "pgd_at:steps=3"


def test_every_preset_validates_for_every_method():
    for name, dataset in EXPECTED:
        for at in (None, "standard", "pgd_at", "trades", "mart", "fat"):
            explicit = {"data": dataset} if at is None else {"data": dataset, "at": at}
            resolve_train_config(name, explicit).validate()


def test_a_dataset_without_a_recipe_is_a_one_line_error():
    with pytest.raises(UserError, match="preset 'trades-paper' has no recipe for dataset 'svhn'; it has: cifar10"):
        resolve_train_config("trades-paper", {"data": "svhn"})


def test_a_recipe_refuses_unknown_settings():
    with pytest.raises(ValueError, match="not recipe settings: lrr"):
        Recipe(settings={"lrr": 0.1})
    with pytest.raises(ValueError, match="device"):
        Recipe(settings={"device": "cpu"})
    with pytest.raises(ValueError, match="by_method"):
        Recipe(settings={}, by_method={"trades": {"at": "trades:beta=1"}})


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "fsr-papr"], "unknown preset 'fsr-papr'; did you mean fsr-paper"),
        (["train", "--preset", "fsr-paper", "--data", "digits"], "has no recipe for dataset 'digits'; it has: cifar10, svhn"),
        (["train", "--preset", "fsr-paper", "--epochs", "50"], "LR milestones must be whole epochs before the last epoch (50)"),
        (["train", "--milestones", "0.5,90"], "--milestones '0.5,90'"),
        (["train", "--preset", "fsr-paper", "--resume", "r1"], "drop --preset"),
        (["preset", "show", "cas-papr"], "did you mean cas-paper"),
        (["preset", "show", "cas-paper", "--data", "digits"], "it has: cifar10, svhn"),
    ],
)
def test_preset_mistakes_are_one_line_exit_2(args, message, tmp_path):
    assert message in _one_error_line(runner.invoke(app, args + (["--store", str(tmp_path / "s.sqlite")] if args[0] == "train" else [])))


def test_list_presets_shows_each_with_a_summary_and_names_the_pipeline_preset():
    result = runner.invoke(app, ["list", "presets"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "presets"
    for name in EXPECTED_NAMES:
        row = next(line for line in lines if line.split()[:1] == [name])
        assert len(row.split()) > 3, row
    assert "advdef run --preset" in result.output and "quick" in result.output



def test_preset_show_lists_every_value_per_dataset():
    text = runner.invoke(app, ["preset", "show", "ewas-paper"]).output
    assert "cifar10 (the default --data)" in text and "\nsvhn" in text
    assert "ewas:lam=0.05" in text and "with --at trades: epochs=85, milestones=75" in text
    assert "paper Table 2" in text
    shown = json.loads(runner.invoke(app, ["preset", "show", "cas-paper", "--data", "svhn", "--json"]).output)
    assert list(shown["recipes"]) == ["svhn"]
    assert shown["recipes"]["svhn"]["settings"]["lr"] == 0.01
    assert shown["recipes"]["svhn"]["training_attack"] == {"alpha": "1/255", "eps": "8/255", "steps": "10"}


def test_the_cli_records_the_preset_and_explicit_flags_override(tmp_path, monkeypatch):
    captured: list[TrainConfig] = []

    def fake_start_run(config, store, runs_dir, reporter=None):
        captured.append(config)
        store.insert_run({"run_id": "r1", "status": "trained", "dataset": config.data, "arch": config.arch,
                          "defense": config.defense, "at_method": config.at, "seed": config.seed,
                          "run_dir": str(runs_dir), "config": config.to_json(), "versions": {}})
        return "r1"

    monkeypatch.setattr(trainer, "start_run", fake_start_run)
    result = runner.invoke(app, ["train", "--preset", "fsr-paper", "--data", "svhn", "--epochs", "2", "--milestones", "1",
                                 "--lr", "0.05", "--at", "pgd_at:steps=3", "--nesterov", "--store", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 0, result.output
    assert "preset fsr-paper on svhn" in result.output
    config = captured[0]
    assert (config.epochs, config.milestones, config.milestone_unit, config.lr, config.nesterov) == (2, [1], "epoch", 0.05, True)
    assert config.at == "pgd_at:alpha=1/255,bn_mode=eval,eps=8/255,steps=3"
    assert config.weight_decay == 5e-4 and config.defense.startswith("fsr:") and config.select == "last"
    from advdef.store import Store

    stored = Store(tmp_path / "s.sqlite").get_run("r1")["config"]
    assert stored["preset"] == "fsr-paper" and TrainConfig.from_json(stored) == config


def test_configs_written_before_the_new_fields_load_unchanged():
    old = {k: v for k, v in TrainConfig(epochs=200).to_json().items()
           if k not in ("optimizer", "nesterov", "milestone_unit", "preset")}
    loaded = TrainConfig.from_json({**old, "a_field_from_the_future": 1}).validate()
    assert (loaded.optimizer, loaded.nesterov, loaded.milestone_unit, loaded.preset) == ("sgd", False, "fraction", None)
    assert [loaded.lr_at(e) for e in (100, 101, 151)] == pytest.approx([0.1, 0.01, 0.001])


@pytest.mark.parametrize(
    "text, parsed",
    [("75,90", ([75, 90], "epoch")), ("0.5, 0.75", ([0.5, 0.75], "fraction")), ("none", ([], "epoch"))],
)
def test_milestones_parse_as_epochs_or_fractions(text, parsed):
    assert parse_milestones(text) == parsed


def test_milestone_validation():
    with pytest.raises(UserError, match="lie in"):
        TrainConfig(milestones=[1.5], milestone_unit="fraction").validate()
    with pytest.raises(UserError, match="whole epochs"):
        TrainConfig(epochs=10, milestones=[10], milestone_unit="epoch").validate()
    assert TrainConfig(epochs=10, milestones=[], milestone_unit="epoch").validate().lr_at(10) == pytest.approx(0.1)


def test_the_optimizer_follows_the_config():
    params = list(torch.nn.Linear(2, 2).parameters())
    sgd = build_optimizer(TrainConfig(nesterov=True, momentum=0.9, weight_decay=2e-4), params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 2e-4
    assert isinstance(build_optimizer(TrainConfig(optimizer="adam"), params), torch.optim.Adam)
    with pytest.raises(UserError, match="nesterov"):
        TrainConfig(optimizer="adam", nesterov=True).validate()
    with pytest.raises(UserError, match="unknown optimizer 'rmsprop'"):
        TrainConfig(optimizer="rmsprop").validate()
