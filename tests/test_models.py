import pytest
import torch

from advdef.data.base import DataInfo
from advdef.models import build_model
from advdef.registry import DATASETS, MODELS

CIFAR = DATASETS.create("cifar10").info
DIGITS = DATASETS.create("digits").info


def test_cifar_resnet18_has_the_papers_parameter_count():
    built = build_model("resnet18", CIFAR)
    assert built.params_total == 11_173_962 and built.params_added == 0
    names = dict(built.model.named_modules())
    assert isinstance(names["net.conv1"], torch.nn.Conv2d) and names["net.conv1"].kernel_size == (3, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in built.model.modules())


def test_state_dict_keeps_the_standard_resnet_layout():
    keys = build_model("resnet18", CIFAR).model.state_dict().keys()
    assert "net.layer1.0.conv1.weight" in keys and "net.linear.weight" in keys
    assert not any("normalize" in k or "tap" in k for k in keys)


@pytest.mark.parametrize("arch", MODELS.names())
@pytest.mark.parametrize("info", [CIFAR, DIGITS], ids=["cifar10", "digits"])
def test_every_model_maps_images_to_logits(arch, info):
    model = build_model(f"{arch}:width=8", info).model.eval()
    x = torch.rand(2, *info.input_shape)
    out = model(x)
    assert out.shape == (2, info.num_classes)
    assert model.insertion_points(), "every architecture exposes named insertion points"


def test_normalization_lives_inside_the_model():
    info = DataInfo("toy", (3, 4, 4), 2, ("a", "b"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = build_model("smallcnn:width=4", info).model
    x = torch.full((1, 3, 4, 4), 0.75)
    assert torch.allclose(model.normalize(x), torch.ones_like(x))


def test_labels_reach_defenses_only_in_training_mode():
    model = build_model("smallcnn:width=4", DIGITS).model
    model.train()
    with model.labels(torch.tensor([1])):
        assert model.context.labels is not None
    assert model.context.labels is None
    model.eval()
    with pytest.raises(RuntimeError, match="training mode"):
        with model.labels(torch.tensor([1])):
            pass


def test_every_relu_of_the_resnets_is_a_module_a_defense_can_swap():
    """`smooth` replaces nn.ReLU modules; a functional F.relu would silently stay a ReLU."""
    for arch in ("resnet18", "preact_resnet18", "wrn34_10:depth=10,widen_factor=1"):
        model = build_model(arch, DIGITS).model.eval()
        calls = []
        handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
                   if isinstance(m, torch.nn.ReLU)]
        x = torch.rand(1, *DIGITS.input_shape)
        expected = model(x)
        for handle in handles:
            handle.remove()
        relus = len(handles)
        assert relus and len(calls) == relus, arch
        # Replacing every ReLU module by the identity must change the function: none is bypassed.
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.ReLU):
                    setattr(module, child_name, torch.nn.Identity())
        assert not torch.allclose(model(x), expected)


def test_phase_marks_forwards_and_training_attacks_run_in_the_attack_phase():
    from advdef.training.inner import crafting

    model = build_model("smallcnn:width=4", DIGITS).model
    assert model.context.phase is None
    with model.phase("update"):
        assert model.context.phase == "update"
        with crafting(model, "eval"):
            assert model.context.phase == "attack"
        assert model.context.phase == "update"
    assert model.context.phase is None
    with pytest.raises(ValueError, match="phase must be one of"):
        with model.phase("inference"):
            pass
