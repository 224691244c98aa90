"""The seed papers' CNNs: exact sizes, shapes on CIFAR and digits, and the named-tap contract.

Forward passes use small widths (CPU-fast); only the parameter-count tests build full-width nets.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdef.data.base import DataInfo
from advdef.models import build_model
from advdef.registry import DATASETS, MODELS

CIFAR = DATASETS.create("cifar10").info
DIGITS = DATASETS.create("digits").info

NEW_ARCHS = ["preact_resnet18", "wrn34_10", "wrn28_10", "vgg16_bn"]

# Small variants that keep every structural feature (shortcut convs, all stages, all units).
SMALL = {
    "preact_resnet18": "preact_resnet18:width=4",
    "wrn34_10": "wrn34_10:width=4,widen_factor=2",
    "wrn28_10": "wrn28_10:width=4,widen_factor=2",
    "vgg16_bn": "vgg16_bn:width=4",
}

# Exact counts at 3×32×32, 10 classes, full width; 3×3 convs have no bias except in VGG.
#
# preact_resnet18 = 11,172,170:
#   stem 3·64·9 = 1,728
#   layer1: 2 × (bn 128 + conv 36,864 + bn 128 + conv 36,864) = 147,968
#   layer2: (bn 128 + 73,728 + bn 256 + 147,456 + 1×1 shortcut 8,192) + (256 + 147,456 + 256 + 147,456) = 525,184
#   layer3: (256 + 294,912 + 512 + 589,824 + 32,768) + (512 + 589,824 + 512 + 589,824) = 2,098,944
#   layer4: (512 + 1,179,648 + 1,024 + 2,359,296 + 131,072) + (1,024 + 2,359,296 + 1,024 + 2,359,296) = 8,392,192
#   final bn 1,024 + linear 512·10+10 = 5,130
# wrn34_10 = 46,160,474 (5 units/stage, widths 16 -> 160, 320, 640; no sub_block1):
#   stem 3·16·9 = 432
#   block1: (bn 32 + 16·160·9 + bn 320 + 160·160·9 + 1×1 16·160) = 256,352, + 4 × 461,440 = 2,102,112
#   block2: (320 + 460,800 + 640 + 921,600 + 51,200) = 1,434,560, + 4 × 1,844,480 = 8,812,480
#   block3: (640 + 1,843,200 + 1,280 + 3,686,400 + 204,800) = 5,736,320, + 4 × 7,375,360 = 35,237,760
#   final bn 1,280 + fc 640·10+10 = 6,410   (the EWAS/CAS digests' 46,160,474)
# wrn28_10 = 36,479,194: as above with 3 instead of 4 repeated units per stage:
#   432 + 1,640,672 + 6,968,000 + 27,862,400 + 1,280 + 6,410
# vgg16_bn = 15,253,578 (convs with bias):
#   convs 1,792 + 36,928 + 73,856 + 147,584 + 295,168 + 2·590,080 + 1,180,160 + 5·2,359,808 = 14,714,688
#   BN2d 2·(2·64 + 2·128 + 3·256 + 6·512) = 8,448
#   classifier 262,656 + 262,656 + 5,130 = 530,442   (FSR's 15.25M, Table 7)
# vgg16_bn:head_bn=true adds BatchNorm1d(512) twice: + 2·1,024 = 15,255,626.
PARAM_COUNTS = [
    ("preact_resnet18", 11_172_170),
    ("wrn34_10", 46_160_474),
    ("wrn28_10", 36_479_194),
    ("vgg16_bn", 15_253_578),
    ("vgg16_bn:head_bn=true", 15_255_626),
]

class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


def small_model(arch: str, info: DataInfo = CIFAR) -> nn.Module:
    torch.manual_seed(0)
    return build_model(SMALL[arch], info).model.eval()


def expected_taps(arch: str) -> set[str]:
    """Every documented tap name of the full-depth architecture."""
    if arch == "preact_resnet18":
        blocks = [f"layer{k}.{i}" for k in range(1, 5) for i in range(2)]
        return {"stem", *blocks, *(f"{b}.preact" for b in blocks), *(f"layer{k}" for k in range(1, 5)), "final"}
    if arch.startswith("wrn"):
        units = 5 if arch == "wrn34_10" else 4
        blocks = [f"block{k}.{i}" for k in range(1, 4) for i in range(units)]
        stages = [f"block{k}" for k in range(1, 4)]
        return {"stem", *blocks, *(f"{b}.preact" for b in blocks), *stages, *(f"{s}.last.preact" for s in stages),
                "final"}
    convs = [2, 2, 3, 3, 3]
    return {*(f"block{k}.{i}" for k in range(5) for i in range(convs[k])), *(f"block{k}" for k in range(5)), "final"}


@pytest.mark.parametrize(("arch", "count"), PARAM_COUNTS)
def test_parameter_counts_match_the_papers_architectures(arch, count):
    built = build_model(arch, CIFAR)
    assert built.params_total == count and built.params_added == 0


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_parameter_counts_do_not_depend_on_input_size(arch):
    def square(side: int) -> DataInfo:
        return DataInfo("toy", (3, side, side), 10, tuple("abcdefghij"), (0.5,) * 3, (0.5,) * 3)

    counts = {build_model(SMALL[arch], square(side)).params_total for side in (8, 16, 32, 64)}
    assert len(counts) == 1


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("info", [CIFAR, DIGITS], ids=["cifar10", "digits"])
def test_forward_gives_logits_on_cifar_and_digits(arch, info):
    model = small_model(arch, info)
    assert model(torch.rand(3, *info.input_shape)).shape == (3, info.num_classes)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_every_documented_tap_exists(arch):
    points = small_model(arch).insertion_points()
    assert set(points) == expected_taps(arch)
    last = {"preact_resnet18": "layer4.1", "wrn34_10": "block3.4", "wrn28_10": "block3.3", "vgg16_bn": "block4.2"}[arch]
    stage = last.split(".")[0]
    assert points[stage] is points[last]
    if arch.startswith("wrn"):
        assert points["block3.last.preact"] is points[f"{last}.preact"]


FEATURE_SHAPES = [
    # full width: the positions where FSR/CAS/CIFS/EWAS insert their modules
    ("preact_resnet18", CIFAR, {"final": (512, 4, 4), "layer4": (512, 4, 4), "layer4.0.preact": (256, 8, 8),
                                "layer4.1.preact": (512, 4, 4), "layer1.0": (64, 32, 32)}),
    ("preact_resnet18", DIGITS, {"final": (512, 2, 2), "layer4": (512, 2, 2)}),
    ("vgg16_bn", CIFAR, {"block3": (512, 4, 4), "block4": (512, 2, 2), "block4.0": (512, 2, 2),
                         "block0": (64, 32, 32), "final": (512, 1, 1)}),
    ("vgg16_bn", DIGITS, {"block3": (512, 2, 2), "block4": (512, 1, 1), "final": (512, 1, 1)}),  # pool4 skipped
    # WRN at full width 10 but depth 10 (one unit per stage) to keep the forward pass cheap
    # (the one unit of block3 is the downsampling one: its preact is still at the input resolution)
    ("wrn28_10:depth=10", CIFAR, {"block3": (640, 8, 8), "final": (640, 8, 8), "block3.last.preact": (320, 16, 16),
                                  "block2.0.preact": (160, 32, 32), "block1": (160, 32, 32), "block2": (320, 16, 16)}),
    ("wrn34_10:widen_factor=1", DIGITS, {"block3": (64, 4, 4), "block3.4.preact": (64, 4, 4), "final": (64, 4, 4)}),
]


@pytest.mark.parametrize(("arch", "info", "shapes"), FEATURE_SHAPES, ids=lambda v: getattr(v, "name", None))
def test_feature_shapes_at_representative_taps(arch, info, shapes):
    model = build_model(arch, info).model
    assert model.feature_shapes(list(shapes)) == shapes


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_taps_are_in_the_forward_path(arch):
    """Identity modules leave the logits unchanged; zeroing the features at any one tap changes them."""
    model = small_model(arch, DIGITS)  # 16×16 inputs: the cheapest forward that reaches every tap
    x = torch.rand(2, *DIGITS.input_shape)
    points = model.insertion_points()
    with torch.no_grad():
        baseline = model(x)
        for tap in points.values():
            tap.attached.append(nn.Identity())
        assert torch.equal(model(x), baseline)
        for name, tap in points.items():
            tap.attached.append(Zero())
            assert not torch.allclose(model(x), baseline), name
            tap.attached.pop(-1)


def run_block(model: nn.Module, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of `block` during one forward pass of `model`."""
    seen: dict[str, torch.Tensor] = {}
    handle = block.register_forward_hook(lambda _m, inputs, output: seen.update(x=inputs[0], y=output))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize(("arch", "block_path", "identity_shortcut"), [
    ("wrn34_10", "block3.layer.4", True),  # CAS/CIFS's `block3.last.preact`: x + residual(mask * preact)
    ("wrn34_10", "block2.layer.0", False),  # widening unit: convShortcut reads the unmasked preact
    ("preact_resnet18", "layer4.1", True),
    ("preact_resnet18", "layer4.0", False),  # downsampling block: 1×1 shortcut reads the unmasked preact
])
def test_preact_taps_transform_only_the_residual_branch(arch, block_path, identity_shortcut):
    model = small_model(arch)
    block = model.net.get_submodule(block_path)
    block.preact_tap.attached.append(Zero())
    # With the residual branch's input zeroed (and fresh BN stats) the branch contributes exactly
    # zero, so the block output is its shortcut alone, computed from the unmasked input.
    block_in, block_out = run_block(model, block, torch.rand(2, *CIFAR.input_shape))
    shortcut = block.shortcut if arch == "preact_resnet18" else block.convShortcut
    assert (shortcut is None) == identity_shortcut
    expected = block_in if identity_shortcut else shortcut(torch.relu(block.bn1(block_in)))
    assert torch.allclose(block_out, expected)


@pytest.mark.parametrize(("arch", "layout_keys"), [
    ("preact_resnet18", ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight", "layer2.0.shortcut.0.weight",
                         "bn.running_var", "linear.weight"]),
    ("wrn34_10", ["conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.4.bn2.running_mean",
                  "block3.layer.4.conv2.weight", "bn1.weight", "fc.bias"]),
    ("vgg16_bn", ["block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block0.3.weight", "block4.6.weight",
                  "classifier.0.weight", "classifier.2.weight", "classifier.4.bias"]),
])
def test_state_dict_follows_the_public_layout_without_tap_keys(arch, layout_keys):
    keys = small_model(arch).net.state_dict().keys()
    assert set(layout_keys) <= set(keys)
    assert not any("tap" in k or "sub_block" in k for k in keys)


def test_vgg_head_bn_uses_cas_classifier_layout():
    keys = build_model("vgg16_bn:width=4,head_bn=true", CIFAR).model.net.state_dict().keys()
    assert {"classifier.1.running_mean", "classifier.4.running_var", "classifier.6.weight"} <= set(keys)


@pytest.mark.parametrize(("arch", "options"), [
    ("wrn34_10", {"depth": 30}),
    ("wrn28_10", {"depth": 4}),
    ("wrn34_10", {"widen_factor": 0}),
    ("wrn28_10", {"width": 0}),
    ("preact_resnet18", {"width": 0}),
    ("vgg16_bn", {"width": -1}),
    ("vgg16_bn", {"head_bn": "maybe"}),
])
def test_bad_options_raise_value_error(arch, options):
    with pytest.raises(ValueError):
        MODELS.get(arch).factory(**options)


def test_wrn_depth_option_sets_units_per_stage():
    model = build_model("wrn34_10:depth=16,widen_factor=1", CIFAR).model
    assert len(model.net.block2.layer) == 2 and "block2.1.preact" in model.insertion_points()


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_registered_with_a_one_line_summary(arch):
    summary = MODELS.get(arch).summary
    assert summary and "\n" not in summary
