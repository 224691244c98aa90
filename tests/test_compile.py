"""`--compile`: a compiled forward with the module's own weights, keys and an eager fallback."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import advdef.device as device_module
from advdef.device import compile_model
from advdef.models import build_model
from advdef.registry import DATASETS
from advdef.training import checkpoint
from advdef.training.config import TrainConfig

from conftest import quick_config


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("smallcnn:width=4", DATASETS.create("digits").info, "none").model.eval()


def _inputs() -> torch.Tensor:
    return torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_disabled_compile_leaves_the_model_alone():
    model = _tiny()
    assert compile_model(model, False) is model and "forward" not in vars(model)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no working C++ compiler (simulated)")

    monkeypatch.setattr(device_module, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    eager, compiled = _tiny(), compile_model(_tiny(), True)
    x = _inputs()
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*running Classifier eagerly"):
        out = compiled(x)
    assert torch.equal(out, eager(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; eager from then on
        assert torch.equal(compiled(x), eager(x))


def test_the_models_own_errors_are_not_taken_for_compiler_failures(monkeypatch):
    monkeypatch.setattr(device_module, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    compiled = compile_model(_tiny(), True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError):
            compiled(torch.rand(2, 5, 16, 16))  # wrong channel count: eager raises too
        compiled(_inputs())


def test_compiled_training_keeps_the_checkpoint_keys_and_evaluates(monkeypatch, tmp_path):
    # The cheap "eager" backend exercises the plumbing (dynamo tracing of training, validation and
    # evaluation forwards and their gradients); the inductor test below checks the numbers.
    from advdef.evaluation.engine import EvalConfig, evaluate_run
    from advdef.store import Store
    from advdef.training.trainer import start_run

    monkeypatch.setattr(device_module, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    config = quick_config(arch="smallcnn:width=4", epochs=1, limit_train=64, batch_size=32, val_n=16, compile=True)
    assert TrainConfig.from_json(config.to_json()).compile is True
    with Store(tmp_path / "advdef.sqlite") as store:
        run_id = start_run(config, store, tmp_path / "runs")
        run = store.get_run(run_id)
        [saved] = store.checkpoints(run_id)
        keys = set(checkpoint.load_weights(checkpoint.paths(Path(run["run_dir"]), 1)["card"]))
        assert run["config"]["compile"] is True and saved["epoch"] == 1
        assert keys == set(_tiny().state_dict()) and not any("_orig_mod" in k for k in keys)
        eval_id = evaluate_run(store, run_id, EvalConfig(attacks=["fgsm"], n=16, device="cpu", checks=False,
                                                         compile=True))
        assert store.evaluations(run_id)[0]["protocol"]["compile"] is True
        assert len(store.outcomes(eval_id)) == 2 * 16


def test_compile_rejects_non_flags():
    from advdef.errors import UserError

    with pytest.raises(UserError, match="--compile is a flag"):
        TrainConfig(compile="yes").validate()


def _inductor_works() -> bool:
    return importlib.util.find_spec("torch._inductor") is not None


@pytest.mark.skipif(not _inductor_works(), reason="torch inductor backend unavailable")
def test_inductor_compiled_logits_match_eager_with_the_same_state_dict(tmp_path):
    torch._dynamo.reset()
    eager, compiled = _tiny(), compile_model(_tiny(), True)
    x = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = compiled(x)
    if any("torch.compile failed" in str(w.message) for w in caught):
        pytest.skip("inductor cannot compile here (no working C++ compiler)")
    assert torch.allclose(out, eager(x), rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (name, a), (_, b) in zip(compiled.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name
