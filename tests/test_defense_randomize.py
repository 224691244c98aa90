"""randomize (Xie et al. 2018): geometry of the random resize + pad, its randomness, defaults that
scale with the input, and training through it."""

import pytest
import torch

from advdef.defenses.randomize import RandomResizePad, Randomize, default_range
from advdef.errors import UserError
from advdef.models import build_model
from advdef.registry import DATASETS, DEFENSES
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import start_run

DIGITS = DATASETS.create("digits").info  # 1 x 16 x 16


def _module(low=4, high=7, pad_value=0.5, interpolation="nearest", resize_back=None, at_train=True):
    return RandomResizePad(low, high, pad_value=pad_value, interpolation=interpolation,
                           resize_back=resize_back, at_train=at_train)


def _attached(model) -> RandomResizePad:
    (module,) = [m for m in model.input_tap.attached if isinstance(m, RandomResizePad)]
    return module


def test_output_is_the_canvas_and_the_image_sits_inside_a_pad_border():
    torch.manual_seed(0)
    module = _module(low=4, high=7, pad_value=0.25).eval()
    x = torch.ones(8, 3, 4, 4)  # resized white blocks on a 0.25 canvas: the block is easy to find
    out = module(x)
    assert out.shape == (8, 3, 7, 7)
    for image in out:
        white = image[0] == 1
        rows, cols = torch.nonzero(white, as_tuple=True)
        side = int(rows.max() - rows.min() + 1)
        assert 4 <= side < 7 and int(cols.max() - cols.min() + 1) == side
        assert int(white.sum()) == side * side, "the pasted block is one solid square"
        assert torch.all(image[:, ~white] == 0.25), "everything else is pad_value"
        assert torch.equal(image[0], image[2]), "all channels share one placement"


def test_nearest_resize_of_a_hand_made_image():
    module = _module(low=4, high=5, pad_value=0.0)  # rnd is always 4: the canvas is exactly the resize
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    expected = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    out = module(x)
    assert out.shape == (1, 1, 5, 5)
    placed = [out[0, 0, t:t + 4, l:l + 4] for t in (0, 1) for l in (0, 1)]
    assert any(torch.equal(p, expected) for p in placed)


def test_drawn_sizes_stay_in_range_and_every_size_occurs():
    torch.manual_seed(1)
    module = _module(low=5, high=9)
    sizes, tops, lefts = module.draw(4000)
    assert set(sizes.tolist()) == {5, 6, 7, 8}
    assert torch.all(tops >= 0) and torch.all(tops + sizes <= 9)
    assert torch.all(lefts >= 0) and torch.all(lefts + sizes <= 9)
    # Offsets cover every position the slack allows (including the last).
    assert set(tops[sizes == 5].tolist()) == set(range(0, 5))


def test_each_image_of_a_batch_draws_independently():
    torch.manual_seed(2)
    module = _module(low=3, high=8, pad_value=0.0)
    x = torch.ones(1, 1, 3, 3).expand(64, 1, 3, 3)  # identical images
    out = module(x)
    sides = {int((img[0] > 0).sum().sqrt()) for img in out}
    corners = {tuple(torch.nonzero(img[0] > 0)[0].tolist()) for img in out}
    assert len(sides) > 1 and len(corners) > 1


def test_gradients_reach_the_input_and_not_the_border():
    torch.manual_seed(3)
    x = torch.rand(5, 3, 6, 6, requires_grad=True)
    _module(low=6, high=8)(x).sum().backward()
    assert x.grad is not None and torch.all(x.grad > 0)


def test_same_input_gives_different_outputs_in_eval_mode_and_is_declared_stochastic():
    torch.manual_seed(0)
    model = build_model("smallcnn:width=4", DIGITS, "randomize").model.eval()
    x = torch.rand(6, *DIGITS.input_shape)
    assert not torch.equal(model(x), model(x))
    assert DEFENSES.create("randomize").stochastic
    declaration = DEFENSES.create("randomize").adaptive()
    assert declaration.stochastic and "eot=30" in declaration.notes


def test_reproducible_under_a_seed():
    model = build_model("smallcnn:width=4", DIGITS, "randomize").model.eval()
    x = torch.rand(4, *DIGITS.input_shape)
    torch.manual_seed(5)
    first = model(x)
    torch.manual_seed(5)
    assert torch.equal(first, model(x))


@pytest.mark.parametrize("side,expected", [(32, (32, 35)), (16, (16, 18)), (299, (299, 331))])
def test_defaults_scale_the_paper_range_to_the_input_side(side, expected):
    assert default_range(side) == expected


def test_attached_module_uses_the_scaled_defaults_and_feeds_the_canvas():
    model = build_model("smallcnn:width=4", DIGITS, "randomize").model
    module = _attached(model)
    assert (module.low, module.high, module.pad_value, module.interpolation) == (16, 18, 0.5, "nearest")
    assert model.input_tap(torch.rand(2, *DIGITS.input_shape)).shape == (2, 1, 18, 18)


def test_resize_back_returns_the_native_size():
    model = build_model("smallcnn:width=4", DIGITS, "randomize:resize_back=true,interpolation=bilinear").model
    assert model.input_tap(torch.rand(2, *DIGITS.input_shape)).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("spec,message", [
    ("randomize:low=5,high=5", "low <= high - 1"),
    ("randomize:low=0", "positive"),
    ("randomize:high=2.5", "positive"),
    ("randomize:interpolation=bicubic", "interpolation"),
    ("randomize:pad_value=2", "pad_value"),
    ("randomize:resize_back=1", "true or false"),
])
def test_bad_parameters_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        DEFENSES.create(spec)


def test_a_range_that_does_not_fit_the_input_is_refused_at_attach():
    # low 20 alone is valid, but the default high for 16x16 inputs is 18.
    with pytest.raises(UserError, match="low <= high - 1"):
        build_model("smallcnn:width=4", DIGITS, "randomize:low=20")


def test_at_train_false_leaves_training_inputs_untouched():
    model = build_model("smallcnn:width=4", DIGITS, "randomize:at_train=false").model
    x = torch.rand(3, *DIGITS.input_shape)
    model.train()
    assert torch.equal(model.input_tap(x), x)
    model.eval()
    assert model.input_tap(x).shape[-1] == 18
    model.train()
    assert DEFENSES.create("randomize").at_train  # default: randomize in training too
    assert _attached(build_model("smallcnn:width=4", DIGITS, "randomize").model.train()).at_train


def test_citation_and_published_numbers_are_the_digests():
    defense = Randomize()
    assert "1711.01991" in defense.citation and "Obfuscated Gradients" in defense.citation
    imagenet = defense.published["imagenet"]
    assert imagenet["nips17_competition"]["normalized_score"] == 0.924
    assert imagenet["athalye2018_eot"] == {"eps": 0.031, "accuracy": 0.0}
    assert set(defense.published["protocol"]) >= set(imagenet)


def test_trains_a_few_steps_on_digits_without_nan(tmp_path):
    store = Store(memory=True)
    config = TrainConfig(data="digits", arch="smallcnn:width=4", defense="randomize", at="pgd_at:steps=2", epochs=1,
                         limit_train=96, batch_size=32, val_n=16, lr=0.01, device="cpu")
    run_id = start_run(config, store, tmp_path)
    assert store.get_run(run_id)["status"] == "trained"
    metrics = store.checkpoints(run_id)[0]["metrics"]
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
