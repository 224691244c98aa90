"""Channel-activation statistics (CAS paper, Sec. 3): hand-computed values, a trained run, the CLI."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from advdef.analysis.channels import analyze_run_channels, channel_statistics
from advdef.analysis.cli import analyze_app
from advdef.errors import UserError
from advdef.evaluation.engine import EvalConfig, load_target
from advdef.models.base import Classifier, Tap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TwoChannels(nn.Module):
    """Features [x, 1 - x] of a 1x2x2 image at tap `features`; the head compares their means."""

    def __init__(self) -> None:
        super().__init__()
        self.tap = Tap()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
            self.head.bias.zero_()

    def insertion_points(self) -> dict[str, Tap]:
        return {"features": self.tap}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tap(torch.cat([x, 1 - x], dim=1)).mean((2, 3)))


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


class Brighten:
    """A deterministic 'attack': +eps on every pixel. It runs the model first, as attacks do; those
    forward passes must not be recorded."""

    eps = Fraction(1, 10)

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def spec(self) -> str:
        return "brighten"

    def __call__(self, view, x, y, *, seed=0):
        self.seeds.append(seed)
        view(x)
        view(x)
        return (x + float(self.eps)).clamp(0, 1)


def two_channel_model() -> Classifier:
    return Classifier(TwoChannels(), mean=(0.0,), std=(1.0,), input_shape=(1, 2, 2), num_classes=2)


# Uniform images with means 0.1, 0.5, 0.8: channel activations a = (m, 1 - m) =
# (0.1, 0.9), (0.5, 0.5), (0.8, 0.2); after Brighten (0.2, 0.8), (0.6, 0.4), (0.9, 0.1).
MEANS = [0.1, 0.5, 0.8]
X = torch.stack([torch.full((1, 2, 2), m) for m in MEANS])
Y = torch.tensor([1, 0, 0])  # the head's predictions on the natural images
TAU = 0.5  # activated: a > 0.5 * the image's max


def test_statistics_match_hand_computation():
    stats = channel_statistics(two_channel_model(), "features", X, Y, Brighten(), tau=TAU, batch_size=2)
    assert stats.channels == 2 and stats.n == 3 and stats.layer == "features"
    assert stats.attack == "brighten" and stats.eps == "1/10" and stats.magnitude_rule == "mean"
    # natural: ch0 activated in images 2 and 3 (0.5 > 0.25, 0.8 > 0.4), ch1 in 1 and 2.
    np.testing.assert_allclose(stats.natural_magnitude, [1.4 / 3, 1.6 / 3])
    np.testing.assert_allclose(stats.natural_frequency, [2 / 3, 2 / 3])
    # adversarial: ch0 in images 2, 3 (0.6 > 0.3, 0.9 > 0.45), ch1 in 1, 2 (0.8 > 0.4, 0.4 > 0.3).
    np.testing.assert_allclose(stats.adversarial_magnitude, [1.7 / 3, 1.3 / 3])
    np.testing.assert_allclose(stats.adversarial_frequency, [2 / 3, 2 / 3])
    assert stats.natural_accuracy == 1.0
    assert stats.mean_magnitude == pytest.approx((0.5, 0.5))


def test_magnitude_variants_match_hand_computation():
    activated = channel_statistics(two_channel_model(), "features", X, Y, Brighten(), tau=TAU,
                                   magnitude="activated", batch_size=2)
    np.testing.assert_allclose(activated.natural_magnitude, [(0.5 + 0.8) / 2, (0.9 + 0.5) / 2])
    # The official code: per batch, sum over all samples / count activated (0 when nothing is
    # activated), then m <- (m + m_batch) / 2. Batches {1, 2} and {3}:
    # ch0: 0.6 / 1 = 0.6, then 0.8 / 1 -> 0.7; ch1: 1.4 / 2 = 0.7, then 0.2 / 0 -> 0 -> 0.35.
    paper = channel_statistics(two_channel_model(), "features", X, Y, Brighten(), tau=TAU,
                               magnitude="paper", batch_size=2)
    np.testing.assert_allclose(paper.natural_magnitude, [0.7, 0.35])
    np.testing.assert_allclose(paper.natural_frequency, [2 / 3, 2 / 3])


def test_matches_a_hook_free_computation_and_class_filter():
    torch.manual_seed(0)
    x = torch.rand(7, 1, 2, 2)
    y = torch.randint(0, 2, (7,))
    stats = channel_statistics(two_channel_model(), "features", x, y, Brighten(), batch_size=3)
    for images, magnitude, frequency in ((x, stats.natural_magnitude, stats.natural_frequency),
                                         ((x + 0.1).clamp(0, 1), stats.adversarial_magnitude,
                                          stats.adversarial_frequency)):
        a = torch.cat([images, 1 - images], dim=1).abs().mean((2, 3)).double()
        on = a > 0.01 * a.max(1, keepdim=True).values
        np.testing.assert_allclose(magnitude, a.mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(frequency, on.double().mean(0).numpy())
    only = channel_statistics(two_channel_model(), "features", x, y, Brighten(), class_id=1)
    assert only.n == int((y == 1).sum()) and only.class_id == 1
    a = torch.cat([x, 1 - x], dim=1)[y == 1].mean((2, 3)).double()
    np.testing.assert_allclose(only.natural_magnitude, a.mean(0).numpy(), rtol=1e-6)


def test_capture_before_or_after_the_defense_modules_at_the_tap():
    model = two_channel_model()
    model.insertion_points()["features"].attached.append(Scale(-2.0))  # a signed, CAS-like reweighting
    before = channel_statistics(model, "features", X, Y, Brighten(), tau=TAU)
    after = channel_statistics(model, "features", X, Y, Brighten(), tau=TAU, capture="output")
    np.testing.assert_allclose(before.natural_magnitude, [1.4 / 3, 1.6 / 3])
    np.testing.assert_allclose(after.natural_magnitude, 2 * before.natural_magnitude)  # |-2 f|
    np.testing.assert_allclose(after.natural_frequency, before.natural_frequency)
    assert after.capture == "output"


def test_model_is_in_eval_mode_and_restored():
    model = two_channel_model()
    modes = []
    model.net.head.register_forward_hook(lambda module, *_: modes.append(module.training))
    model.train()
    channel_statistics(model, "features", X, Y, Brighten())
    assert modes and not any(modes)
    assert model.training


def test_unknown_layer_lists_the_valid_names():
    with pytest.raises(UserError, match="unknown layer 'nope'; valid: features"):
        channel_statistics(two_channel_model(), "nope", X, Y, Brighten())


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="magnitude"):
        channel_statistics(two_channel_model(), "features", X, Y, Brighten(), magnitude="max")
    with pytest.raises(UserError, match="capture"):
        channel_statistics(two_channel_model(), "features", X, Y, Brighten(), capture="middle")
    with pytest.raises(UserError, match="sets eps"):
        channel_statistics(two_channel_model(), "features", X, Y, "pgd:eps=8/255")


# -- a trained tiny run (tests/conftest.py) --------------------------------------------------


def test_adversarial_statistics_differ_on_a_trained_run(eval_store):
    store, runs = eval_store
    stats = analyze_run_channels(store, runs["standard"], "block2", n=30, attack="pgd:steps=5", eps="16/255",
                                 device="cpu")
    assert stats.channels == 64 and stats.n == 30 and stats.layer == "block2"  # smallcnn:width=16 -> 4 * 16
    assert stats.run_id == runs["standard"] and stats.eps == "16/255" and stats.epoch is not None
    assert stats.adversarial_accuracy < stats.natural_accuracy
    assert not np.allclose(stats.natural_magnitude, stats.adversarial_magnitude, rtol=1e-3)
    assert (stats.natural_frequency >= 0).all() and (stats.natural_frequency <= 1).all()
    # the evaluation's sample choice for the same n and seed
    target = load_target(store, runs["standard"], EvalConfig(n=30, device="cpu"))
    assert stats.extras["sample_hash"] == target.samples.ids_hash()


def test_unknown_layer_of_a_run_lists_its_insertion_points(eval_store):
    store, runs = eval_store
    with pytest.raises(UserError, match="did you mean .*valid: block1, block2"):
        analyze_run_channels(store, runs["standard"], "block3", n=4, device="cpu")


def test_class_filter_of_a_run(eval_store):
    store, runs = eval_store
    stats = analyze_run_channels(store, runs["standard"], "block1", n=5, attack="fgsm", class_id=0, device="cpu")
    assert stats.n == 5 and stats.class_id == 0 and stats.channels == 32


def test_cli_writes_the_figure_and_csv(eval_store, tmp_path):
    store, runs = eval_store
    out, csv = tmp_path / "channels.png", tmp_path / "stats.csv"
    args = ["channels", "--run", runs["pgd_at"], "--layer", "block2", "--n", "12", "--attack", "pgd:steps=3",
            "--eps", "16/255", "--out", str(out), "--csv", str(csv), "--store", str(store.path), "--device", "cpu"]
    result = CliRunner().invoke(analyze_app, args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG_MAGIC)
    frame = pd.read_csv(csv)
    assert len(frame) == 64 and (frame["n"] == 12).all() and (frame["eps"] == "16/255").all()
    line = result.output.strip()
    assert line.startswith("block2: 64 channels, n=12, mean magnitude natural") and str(out) in line


def test_cli_errors_are_one_line(eval_store, tmp_path):
    store, runs = eval_store
    base = ["channels", "--run", runs["standard"], "--store", str(store.path), "--device", "cpu", "--n", "4"]
    result = CliRunner().invoke(analyze_app, [*base, "--layer", "nope"])
    assert result.exit_code == 2 and "valid: block1, block2" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(analyze_app, [*base, "--layer", "block2", "--out", str(tmp_path / "x.pdf")])
    assert result.exit_code == 2 and ".png, .svg" in result.output
