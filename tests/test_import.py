"""`advdef import`: weights from other code bases, safely loaded, evaluated like trained runs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from advdef.cli import app
from advdef.errors import UserError
from advdef.importing.runs import import_run
from advdef.models import build_model
from advdef.store import Store
from advdef.training.trainer import load_run_model, open_dataset

ARCH = "resnet18:width=4"  # same topology and key names as ResNet-18, CPU-sized
runner = CliRunner()


def invoke(*args, store):
    result = runner.invoke(app, [*args, "--store", str(store)])
    return result


@pytest.fixture(scope="module")
def source_net():
    """A ResNet-18 (width 4) for digits with non-trivial BatchNorm statistics, as 'another repo' saved it."""
    torch.manual_seed(0)
    built = build_model(ARCH, open_dataset("digits").info)
    net = built.model.net
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return built.model.eval()


def _write(layout: str, state: dict, path):
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "bare":
        torch.save(state, path)
    elif layout == "module_prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:  # nested under a training script's key, with other entries beside it
        torch.save({layout: state, "epoch": 90, "best_acc": 0.93, "optimizer": {"lr": 0.1}}, path)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "net", "module_prefix", "safetensors"])
def test_layouts_import_and_reproduce_logits(layout, source_net, tmp_path):
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    _write(layout, source_net.net.state_dict(), path)
    with Store(tmp_path / "s.sqlite") as store:
        run_id = import_run(store, tmp_path / "runs", arch=ARCH, weights=path, data="digits", name=f"r-{layout}")
        run = store.get_run(run_id)
        assert (run["status"], run["at_method"], run["defense"], run["arch"]) == ("trained", "imported", "none", ARCH)
        assert run["config"]["imported"]["source"]["format"] == ("safetensors" if layout == "safetensors" else "torch")
        built, card = load_run_model(run, torch.device("cpu"), channels_last=False)
    x = torch.rand(8, *source_net.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(built.model(x), source_net(x))
    assert card["data"]["mean"] == [0.3] and card["imported"]["input"]["range"] == "[0,1]"


def test_declared_normalization_is_applied_inside_the_wrapper(source_net, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(source_net.net.state_dict(), path)
    with Store(tmp_path / "s.sqlite") as store:
        run_id = import_run(store, tmp_path / "runs", arch=ARCH, weights=path, data="digits", normalize="none", name="n")
        built, card = load_run_model(store.get_run(run_id), torch.device("cpu"), channels_last=False)
    assert card["data"]["mean"] == [0.0] and card["data"]["std"] == [1.0]
    x = torch.rand(4, *source_net.input_shape)
    with torch.no_grad():
        assert torch.equal(built.model(x), source_net.net(x))  # no normalisation before the net


def test_pickle_with_code_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, path)
    with Store(tmp_path / "s.sqlite") as store:
        with pytest.raises(UserError, match="refuses") as error:
            import_run(store, tmp_path / "runs", arch=ARCH, weights=path, data="digits")
        assert "\n" not in str(error.value)
        assert store.run_ids() == []
    assert not marker.exists()
    # Control: the payload is real — an unrestricted unpickle would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_errors_are_one_line(source_net, tmp_path):
    store = tmp_path / "s.sqlite"
    path = tmp_path / "w.pt"
    torch.save(source_net.net.state_dict(), path)
    cases = {
        "did you mean resnet18": ["--arch", "resnt18", "--weights", str(path), "--data", "digits"],
        "shape mismatch": ["--arch", "resnet18:width=8", "--weights", str(path), "--data", "digits"],
        "missing keys": ["--arch", "smallcnn:width=4", "--weights", str(path), "--data", "digits"],
        "does not exist": ["--arch", ARCH, "--weights", str(tmp_path / "nope.pt"), "--data", "digits"],
        "channel": ["--arch", ARCH, "--weights", str(path), "--data", "digits", "--normalize", "0.1,0.2/0.3,0.4"],
    }
    for expected, argv in cases.items():
        result = invoke("import", *argv, store=store)
        assert result.exit_code == 2, (expected, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, result.stderr)
    torch.save({"conv1.weight": torch.zeros(1), "linear.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    result = invoke("import", "--arch", ARCH, "--weights", str(tmp_path / "partial.pt"), "--data", "digits", store=store)
    assert result.exit_code == 2 and "missing keys" in result.stderr and "shape mismatch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


FACTORY = '''
import torch
from torch import nn


class TupleNet(nn.Module):
    """Returns (logits, features), like many research models."""

    def __init__(self, num_classes=10, width=8, as_dict=False):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(width * 4, num_classes)
        self.as_dict = as_dict

    def forward(self, x):
        features = self.pool(torch.relu(self.conv(x))).view(x.shape[0], -1)
        logits = self.fc(features)
        return {"out": logits, "feat": features} if self.as_dict else (logits, features)


def make(**kwargs):
    torch.manual_seed(0)
    return TupleNet(**kwargs)
'''


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "byom_factory_mod.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "byom_factory_mod:make"


def test_factory_errors_and_dict_outputs(factory_module, tmp_path):
    store = tmp_path / "s.sqlite"
    bad = {
        "expected (10,) logits": ["--kwargs", '{"num_classes": 7}'],
        "--logits-key": ["--kwargs", '{"as_dict": true}'],
        "no attribute": ["--model", "byom_factory_mod:nope"],
        "valid JSON": ["--kwargs", "{num_classes: 7}"],
    }
    for expected, extra in bad.items():
        argv = ["import", "--model", factory_module, "--data", "digits", "--normalize", "none", *extra]
        if "--model" in extra:
            argv = ["import", *extra, "--data", "digits"]
        result = invoke(*argv, store=store)
        assert result.exit_code == 2 and expected in result.stderr, (expected, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
    result = invoke("import", "--model", factory_module, "--kwargs", '{"as_dict": true}', "--logits-key", "out",
                    "--data", "digits", "--name", "dictnet", store=store)
    assert result.exit_code == 0, result.output
    with Store(store) as opened:
        built, _ = load_run_model(opened.get_run("dictnet"), torch.device("cpu"))
    assert built.model(torch.rand(3, 1, 16, 16)).shape == (3, 10)
    # Imported runs are not trainable.
    result = invoke("train", "--resume", "dictnet", store=store)
    assert result.exit_code == 2 and "imported" in result.stderr


def test_two_commands_to_a_report_row(source_net, factory_module, tmp_path):
    """A .pt state_dict from another repo and a factory returning a tuple: import, evaluate, report."""
    store = tmp_path / "s.sqlite"
    path = tmp_path / "resnet18_digits.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source_net.net.state_dict().items()}}, path)
    result = invoke("import", "--arch", ARCH, "--weights", str(path), "--data", "digits", "--name", "theirs", store=store)
    assert result.exit_code == 0, result.output
    # The factory's weights come from a file too (saved from the module, tuple output).
    from byom_factory_mod import make  # noqa: PLC0415

    factory_weights = tmp_path / "tuple.safetensors"
    save_file(make(width=4).state_dict(), str(factory_weights))
    result = invoke("import", "--model", factory_module, "--kwargs", '{"width": 4}', "--weights", str(factory_weights),
                    "--data", "digits", "--at", "their_pgd", "--name", "tuplenet", store=store)
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--run", "theirs", "--run", "tuplenet", "--attacks", "fgsm", "--n", "20",
                    "--device", "cpu", "--no-checks", store=store)
    assert result.exit_code == 0, result.output
    result = invoke("report", "--markdown", store=store)
    assert result.exit_code == 0, result.output
    assert ARCH in result.stdout and "imported" in result.stdout
    assert "factory:byom_factory_mod:make" in result.stdout and "their_pgd" in result.stdout


def test_imported_copy_of_a_trained_run_evaluates_identically(eval_store, tmp_path):
    """Same weights, same outcomes, same sanity checks: evaluation does not know a run was imported."""
    from advdef.evaluation.engine import EvalConfig, evaluate_run
    from advdef.training import checkpoint

    store, runs = eval_store
    trained = store.get_run(runs["standard"])
    card = checkpoint.paths(Path(trained["run_dir"]), trained["best_epoch"])["card"]
    exported = tmp_path / "exported.safetensors"  # the Classifier's keys: `net.` prefixed
    save_file(checkpoint.load_weights(card), str(exported))
    imported = import_run(store, tmp_path / "runs", arch=trained["arch"], weights=exported, data="digits", name="copy")
    config = EvalConfig(attacks=["fgsm", "pgd10"], n=40, n_check=20, device="cpu")
    results = {}
    for run_id in (trained["run_id"], imported):
        eval_id = evaluate_run(store, run_id, config)
        outcomes = [(o["attack"], o["sample_id"], o["robust"], o["prediction"]) for o in store.outcomes(eval_id)]
        checks = [(c["name"], c["verdict"], c["figure"]) for c in store.checks(eval_id)]
        results[run_id] = (outcomes, checks)
    assert results[imported] == results[trained["run_id"]]
    assert results[imported][1]  # the sanity checks ran on the imported run
