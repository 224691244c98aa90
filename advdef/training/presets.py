"""Training presets: a paper's training recipe per dataset, as data (`advdef train --preset NAME`).

A preset is what a paper (or a baseline's official code) trained with: optimizer, learning rate,
weight decay, step schedule, epochs, batch size, the training attack (eps, steps, step size,
BatchNorm mode while crafting), the architecture, and the defense with its paper
hyper-parameters. Presets are plugins of the `presets` registry: each is a zero-argument factory,
whose docstring is the one-line summary `advdef list presets` shows, returning a
`TrainingPreset`. Every value lives in the data below with where it comes from; the resolution
code is one mechanism for all presets.

Precedence, lowest first (`resolve_train_config`):

1. `TrainConfig` defaults;
2. the preset's recipe for the dataset (`--data`, default the preset's `default_data`);
3. the recipe's refinements for the chosen architecture (`by_arch`) and AT method (`by_method`),
   e.g. a paper's WRN weight decay or its TRADES schedule;
4. every option given explicitly on the command line.

The AT method is merged parameter by parameter instead of replaced: an explicit `--at` keeps every
parameter the user wrote, inherits the recipe's training attack (`eps`, `alpha`, `steps`) for the
parameters its factory accepts, and inherits the recipe method's other parameters (TRADES'
`beta`, the crafting `bn_mode`, ...) only when it is the same method: another method's parameter
of the same name belongs to another codebase's recipe.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from advdef.errors import UserError
from advdef.registry import DATASETS, MODELS, PRESETS, TRAINING
from advdef.specs import POSITIONAL, Spec, format_value, parse_spec
from advdef.training.config import TrainConfig

# Parameters of a recipe's training attack that any AT method taking them inherits: the threat
# model and the attack budget. How a method crafts (start, BN mode) stays the method's own.
ATTACK_PARAMS = ("eps", "alpha", "steps")
# TrainConfig fields about the machine, the data location or the run's bookkeeping: never a recipe's.
NOT_RECIPE_FIELDS = frozenset({"data", "data_dir", "download", "device", "channels_last", "amp", "compile",
                               "limit_train", "preset"})
CONFIG_FIELDS = tuple(f.name for f in fields(TrainConfig))
RECIPE_FIELDS = frozenset(CONFIG_FIELDS) - NOT_RECIPE_FIELDS
DEFAULTS = TrainConfig()


def _check_settings(settings: Mapping[str, Any], where: str, refining: str | None = None) -> None:
    """Refuse unknown fields at definition time, so a typo in a preset is a bug, not a no-op."""
    unknown = set(settings) - RECIPE_FIELDS
    if refining is not None and refining in settings:
        unknown.add(refining)  # a refinement keyed by arch/method cannot change that key itself
    if unknown:
        raise ValueError(f"{where}: not recipe settings: {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class Recipe:
    """One dataset's recipe: TrainConfig values, their sources, and per-arch / per-method refinements."""

    settings: Mapping[str, Any]
    sources: tuple[tuple[str, str], ...] = ()  # (what, where it comes from), shown by `preset show`
    by_arch: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    by_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_settings(self.settings, "recipe")
        for arch, extra in self.by_arch.items():
            _check_settings(extra, f"by_arch[{arch}]", refining="arch")
        for method, extra in self.by_method.items():
            _check_settings(extra, f"by_method[{method}]", refining="at")

    def derive(self, *, sources: tuple[tuple[str, str], ...] = (), notes: tuple[str, ...] = (),
               by_arch: Mapping[str, Mapping[str, Any]] | None = None,
               by_method: Mapping[str, Mapping[str, Any]] | None = None, **settings: Any) -> Recipe:
        """A recipe that differs from this one in `settings`, with its own sources, notes and refinements."""
        return replace(
            self,
            settings={**self.settings, **settings},
            sources=sources,
            notes=notes,
            by_arch=self.by_arch if by_arch is None else by_arch,
            by_method=self.by_method if by_method is None else by_method,
        )

    def training_attack(self) -> dict[str, Any]:
        """The attack parameters any `--at` inherits: those of the recipe's own AT spec."""
        params = parse_spec(self.settings.get("at", DEFAULTS.at)).params
        return {k: v for k, v in params.items() if k in ATTACK_PARAMS}


@dataclass(frozen=True)
class TrainingPreset:
    """A named set of recipes, one per dataset the source trained on."""

    citation: str
    recipes: Mapping[str, Recipe]
    default_data: str = "cifar10"
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.default_data not in self.recipes:
            raise ValueError(f"default_data '{self.default_data}' has no recipe")

    def recipe(self, name: str, dataset: str) -> Recipe:
        """The recipe for a dataset name; a one-line error naming the datasets the preset has."""
        if dataset not in self.recipes:
            raise UserError(f"preset '{name}' has no recipe for dataset '{dataset}'; it has: {', '.join(self.recipes)}")
        return self.recipes[dataset]


# -- resolution ------------------------------------------------------------------------------


def load_preset(name: str) -> TrainingPreset:
    """The preset registered as `name` (an unknown name is a one-line error with close matches)."""
    preset = PRESETS.create(name)
    if not isinstance(preset, TrainingPreset):
        raise TypeError(f"preset plugin '{name}' returned {type(preset).__name__}, not a TrainingPreset")
    return preset


def resolve_train_config(preset: str | None, explicit: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig for `explicit` options (only what the user gave) on top of a preset's recipe.

    Without a preset this is `TrainConfig(**explicit)`. The config is not validated here; the
    caller validates it like any other config.
    """
    unknown = set(explicit) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"not TrainConfig fields: {', '.join(sorted(unknown))}")
    if preset is None:
        return TrainConfig(**explicit)
    chosen = load_preset(preset)
    data = explicit.get("data", chosen.default_data)
    recipe = chosen.recipe(preset, DATASETS.parse(data)[0].name)
    settings = recipe_settings(recipe, explicit.get("arch"), explicit.get("at"))
    return TrainConfig(**{**settings, **explicit, "at": settings["at"], "data": data, "preset": preset})


def recipe_settings(recipe: Recipe, arch: str | None = None, at: str | None = None) -> dict[str, Any]:
    """The recipe's settings for the chosen architecture and AT method (None = the recipe's own)."""
    settings = dict(recipe.settings)
    chosen_arch = arch if arch is not None else settings.get("arch", DEFAULTS.arch)
    settings.update(recipe.by_arch.get(MODELS.parse(chosen_arch)[0].name, {}))
    recipe_at = settings.get("at", DEFAULTS.at)
    method = TRAINING.parse(at)[0].name if at is not None else parse_spec(recipe_at).name
    settings.update(recipe.by_method.get(method, {}))
    settings["at"] = merge_at(at, recipe_at, recipe.training_attack())
    return settings


def merge_at(user_at: str | None, recipe_at: str, attack: Mapping[str, Any]) -> str:
    """The AT spec to train with: the user's, completed from the recipe where the user was silent.

    The user's explicit parameters always win. The recipe's training attack fills the parameters
    the user's method accepts; the recipe method's other parameters (beta, lam, ...) carry over
    only to the same method, since another method's weight of the same name means something else.
    """
    if user_at is None:
        return recipe_at
    plugin, spec = TRAINING.parse(user_at)
    accepted = _keyword_parameters(plugin.factory)
    given = dict(spec.params)
    if POSITIONAL in given and accepted:
        given[accepted[0]] = given.pop(POSITIONAL)
    recipe_spec = parse_spec(recipe_at)
    inherited = dict(recipe_spec.params) if recipe_spec.name == plugin.name else dict(attack)
    merged = {k: v for k, v in inherited.items() if k in accepted}
    return str(Spec(plugin.name, {**merged, **given}))


def _keyword_parameters(factory: Any) -> list[str]:
    """A plugin factory's spec parameters, in signature order (what `resolve_params` accepts)."""
    return [
        name
        for name, p in inspect.signature(factory).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
    ]


def describe(name: str, dataset: str | None = None) -> dict[str, Any]:
    """Everything a preset sets, per dataset (or for one), as JSON-ready data (`advdef preset show`)."""
    preset = load_preset(name)
    datasets = list(preset.recipes) if dataset is None else [dataset]
    return {
        "name": name,
        "summary": PRESETS.get(name).summary,
        "citation": preset.citation,
        "default_data": preset.default_data,
        "notes": list(preset.notes),
        "recipes": {d: _describe_recipe(preset.recipe(name, d)) for d in datasets},
    }


def _describe_recipe(recipe: Recipe) -> dict[str, Any]:
    def shown(settings: Mapping[str, Any]) -> dict[str, Any]:
        return {k: settings[k] for k in CONFIG_FIELDS if k in settings}

    return {
        "settings": shown(recipe.settings),
        "training_attack": {k: format_value(v) for k, v in recipe.training_attack().items()},
        "by_arch": {arch: shown(extra) for arch, extra in recipe.by_arch.items()},
        "by_method": {method: shown(extra) for method, extra in recipe.by_method.items()},
        "sources": [list(source) for source in recipe.sources],
        "notes": list(recipe.notes),
    }


# -- the data --------------------------------------------------------------------------------
# Helpers that only spell out values: every recipe names its optimizer and schedule in full, so a
# later change of TrainConfig defaults cannot silently change what a preset reproduces.


def _sgd(lr: float, weight_decay: float, momentum: float = 0.9) -> dict[str, Any]:
    return {"optimizer": "sgd", "lr": lr, "momentum": momentum, "nesterov": False, "weight_decay": weight_decay}


def _after_epochs(*epochs: int, decay: float = 0.1) -> dict[str, Any]:
    """LR x`decay` after each of these completed epochs (MultiStepLR(epochs) stepped per epoch)."""
    return {"milestones": list(epochs), "milestone_unit": "epoch", "lr_decay": decay}


def _at_fractions(*fractions: float, decay: float = 0.1) -> dict[str, Any]:
    """LR x`decay` after these fractions of the run (the schedule follows --epochs)."""
    return {"milestones": list(fractions), "milestone_unit": "fraction", "lr_decay": decay}


@PRESETS.register("fsr-paper")
def fsr_paper() -> TrainingPreset:
    """FSR (Kim et al., CVPR 2023): ResNet-18+FSR, PGD-10 AT, SGD 0.1 (SVHN 0.01), 100 ep /10 after 75, 90, wd 5e-4."""
    cifar10 = Recipe(
        settings={
            "arch": "resnet18",
            "defense": "fsr:lam_rec=1,lam_sep=1,tau=0.1",
            "at": "pgd_at:alpha=2/255,bn_mode=eval,eps=8/255,steps=10",
            "epochs": 100,
            "batch_size": 128,
            **_sgd(0.1, 5e-4),
            **_after_epochs(75, 90),
            "select": "last",
        },
        sources=(
            ("SGD momentum 0.9, lr 0.1, wd 5e-4, /10 after epochs 75 and 90 of 100", "paper §4.1 (training details)"),
            ("PGD-10, eps 8/255, step eps/4, uniform random start", "paper §4.1; code train.py --alpha 0.25"),
            ("tau 0.1, lam_sep = lam_rec = 1", "paper §4.1; code defaults"),
            ("ResNet-18, FSR after layer4", "paper Table 1; code models/resnet_fsr"),
            ("batch 128", "code train.py --bs (paper silent)"),
            ("bn_mode=eval: training attack crafted with eval-mode BN and the deterministic mask", "code train.py (paper silent)"),
            ("select last: the last epoch is evaluated", "code: checkpoint overwritten every epoch, test.py loads it"),
        ),
        notes=(
            "code decays one epoch earlier (1-indexed `epoch >= 75`, i.e. --milestones 74,89); the preset follows the paper",
            "code: no augmentation on SVHN; advdef's svhn plugin random-crops",
        ),
    )
    svhn = cifar10.derive(
        lr=0.01,
        at="pgd_at:alpha=1/255,bn_mode=eval,eps=8/255,steps=10",
        sources=(
            ("lr 0.01; otherwise the CIFAR-10 recipe", "paper §4.1; code run.sh --lr 0.01"),
            ("step eps/8 = 1/255", "paper §4.1; code run.sh --alpha 0.125"),
            ("batch 128, bn_mode=eval, select last", "code (paper silent)"),
        ),
        notes=cifar10.notes,
    )
    return TrainingPreset(
        citation="Kim, Cho, Jung, Yoon. Feature Separation and Recalibration for Adversarial Robustness. "
        "CVPR 2023, arXiv:2303.13846; code github.com/wkim97/FSR",
        recipes={"cifar10": cifar10, "svhn": svhn},
        notes=("the code implements PGD-AT only; --at trades/mart inherit the training attack, the methods keep their own weights",),
    )


@PRESETS.register("cas-paper")
def cas_paper() -> TrainingPreset:
    """CAS (Bai et al., ICLR 2021): ResNet-18+CAS, PGD-10 AT, SGD 0.1 (SVHN 0.01), 200 ep /10 after 75, 90, wd 2e-4."""
    cifar10 = Recipe(
        settings={
            "arch": "resnet18",
            "defense": "cas",
            "at": "pgd_at:alpha=2/255,bn_mode=eval,eps=8/255,steps=10",
            "epochs": 200,
            "batch_size": 128,
            **_sgd(0.1, 2e-4),
            **_after_epochs(75, 90),
            "select": "last",
        },
        by_arch={"wrn34_10": {"weight_decay": 5e-4}},
        sources=(
            ("SGD momentum 0.9, lr 0.1, /10 at epochs 75 and 90, 200 epochs, wd 2e-4", "paper §5.1"),
            ("PGD-10, eps 8/255, step 2/255, random start", "paper §5.1"),
            ("WRN-34-10: wd 5e-4", "paper App. F.1"),
            ("defense beta: the cas plugin's per-architecture default (2; 3 on VGG16)", "code scripts (2); paper App. F.2 (VGG16: 3)"),
            ("batch 128", "code (paper silent)"),
            ("bn_mode=eval: training attack crafted in eval mode (predicted masks)", "code (paper silent)"),
            ("select last: Table 5 reports the last epoch", "paper Table 5 (Table 10's 'best' is chosen on the test set)"),
        ),
        notes=(
            "code differs per method: AT wd 1e-4; TRADES 100 epochs, wd 5e-4, 1/lambda 4; MART 120 epochs, wd 2e-4, "
            "lambda 5; TRADES/MART lr /10 at 75, 90 and 100. The paper's §5.2 says both 'same as §5.1' and "
            "'default settings of their papers'; the preset keeps §5.1 for every method",
        ),
    )
    svhn = cifar10.derive(
        at="pgd_at:alpha=1/255,bn_mode=eval,eps=8/255,steps=10",
        by_arch={},
        **_sgd(0.01, 5e-4),
        sources=(
            ("SGD momentum 0.9, lr 0.01, wd 5e-4, /10 at epochs 75 and 90; step 1/255", "paper §5.1"),
            ("200 epochs", "inferred: the paper states none for SVHN; the CIFAR-10 value"),
            ("batch 128, bn_mode=eval", "code (no SVHN script; paper silent)"),
            ("select last", "paper Table 5"),
        ),
    )
    return TrainingPreset(
        citation="Bai, Zeng, Jiang, Xia, Ma, Wang. Improving Adversarial Robustness via Channel-wise Activation "
        "Suppressing. ICLR 2021, arXiv:2103.08307; code github.com/bymavis/CAS_ICLR2021",
        recipes={"cifar10": cifar10, "svhn": svhn},
    )


@PRESETS.register("cifs-paper")
def cifs_paper() -> TrainingPreset:
    """CIFS (Yan et al., ICML 2021): ResNet-18+CIFS, PGD-10 AT, SGD 0.1 (SVHN 0.01), 120 ep /10 after 75, 90, wd 2e-4."""
    cifar10 = Recipe(
        settings={
            "arch": "resnet18",
            "defense": "cifs:beta=2",
            "at": "pgd_at:alpha=2/255,bn_mode=eval,eps=8/255,steps=10",
            "epochs": 120,
            "batch_size": 128,
            **_sgd(0.1, 2e-4),
            **_after_epochs(75, 90),
            "select": "last",
        },
        by_arch={"wrn28_10": {"epochs": 110, "weight_decay": 5e-4}},
        sources=(
            ("SGD momentum 0.9, lr 0.1, /10 at epochs 75 and 90, 120 epochs, wd 2e-4", "paper App. B.1"),
            ("PGD-10, eps 8/255, step 2/255, random start, joint loss", "paper App. B.1; code --attack_loss Joint"),
            ("beta 2 (= number of CIFS layers)", "paper Eq. 3 text and App. B.1"),
            ("WRN-28-10: 110 epochs, wd 5e-4", "paper App. B.1 (its lr schedule is not restated)"),
            ("batch 128", "code default (paper silent)"),
            ("bn_mode=eval: training attack crafted in eval mode (predicted top-2)", "code (paper silent)"),
            ("select last: headline tables report the last epoch", "paper Table 1 (best-epoch tables select on the test set)"),
        ),
        notes=(
            "the released CIFS-AT run warm-starts from a clean-trained CIFS model; not reproduced (trains from scratch)",
            "loss scale: the cifs plugin's CE + (beta/|I|) sum CE_i is the code's scale (3x Eq. 3 at beta 2); "
            "paper scale = --lr 0.0333 --weight-decay 6e-4 (lr/(1+beta), wd*(1+beta))",
            "FAT (Table 3) and TRADES (Table B.4) runs state no FAT tau or TRADES beta: --at fat/trades keep the methods' defaults",
        ),
    )
    svhn = cifar10.derive(
        by_arch={},
        **_sgd(0.01, 5e-4),
        sources=(
            ("SGD momentum 0.9, lr 0.01, wd 5e-4, /10 at 75 and 90, 120 epochs; same training attack", "paper App. C"),
            ("beta 2", "inferred: the CIFAR-10 value (paper silent for SVHN)"),
            ("batch 128, bn_mode=eval", "code (paper silent)"),
            ("select last", "paper Table 2"),
        ),
        notes=cifar10.notes[:2],
    )
    return TrainingPreset(
        citation="Yan, Zhang, Niu, Feng, Tan, Sugiyama. CIFS: Improving Adversarial Robustness of CNNs via "
        "Channel-wise Importance-based Feature Selection. ICML 2021, arXiv:2102.05311; code github.com/HanshuYAN/CIFS",
        recipes={"cifar10": cifar10, "svhn": svhn},
    )


@PRESETS.register("ewas-paper")
def ewas_paper() -> TrainingPreset:
    """EWAS (Zhang et al., FGCS 2023): ResNet-18+EWAS, PGD-10 AT, SGD 0.1, 120 ep /10 after 60, 90 (TRADES/MART: Table 2)."""
    cifar10 = Recipe(
        settings={
            "arch": "resnet18",
            "defense": "ewas:lam=0.01",
            "at": "pgd_at:alpha=2/255,bn_mode=train,eps=8/255,steps=10",
            "epochs": 120,
            "batch_size": 128,
            **_sgd(0.1, 2e-4),
            **_after_epochs(60, 90),
            "select": "last",
        },
        by_method={
            "trades": {"epochs": 85, **_after_epochs(75)},
            "mart": {"epochs": 90, **_after_epochs(60)},
        },
        sources=(
            ("batch 128, SGD momentum 0.9, lr 0.1, wd 2e-4", "paper §5.1.1"),
            ("epochs and milestones: AT 120 (60, 90), TRADES 85 (75), MART 90 (60)", "paper Table 2"),
            ("PGD-10, eps 8/255, step eps/4", "paper §5.1.1"),
            ("lam 0.01", "paper §5.2.1; code README --lam 0.01"),
            ("bn_mode=train: crafted against the true-label mask", "paper Eq. 4 (training-stage mask); see notes"),
            ("select last", "paper: 'the adversarial accuracy of the last epoch is reported for each model'"),
        ),
        notes=(
            "code: eps 0.031 and step 0.007 instead of 8/255 and eps/4; TRADES decays at 60 (its default 60, 90), not 75",
            "code crafts with eval-mode BN and the true-label mask, which advdef cannot express: bn_mode=train keeps "
            "the label mask (train-mode BN), bn_mode=eval keeps eval BN with predicted masks",
            "TRADES/MART weight: code 6.0 (paper silent), the methods' defaults",
        ),
    )
    svhn = cifar10.derive(
        defense="ewas:lam=0.05",
        by_method={},
        **_sgd(0.01, 5e-4),
        **_after_epochs(75, 90),
        sources=(
            ("batch 128, SGD momentum 0.9, lr 0.01, wd 5e-4, 120 epochs /10 at 75 and 90 for every AT method", "paper §5.1.2"),
            ("PGD-10, eps 8/255, step eps/4; lam 0.05", "paper §5.1.2 and Table 7"),
            ("bn_mode=train, select last", "as for CIFAR-10"),
        ),
        notes=("the official code has no SVHN support; every value is the paper's",),
    )
    return TrainingPreset(
        citation="Zhang, Ren, He, Zhou, Liu. Improving Robustness of Convolutional Neural Networks Using Element-Wise "
        "Activation Scaling. FGCS 2023, arXiv:2202.11898; code github.com/ieslab-ynu/EWAS",
        recipes={"cifar10": cifar10, "svhn": svhn},
    )


@PRESETS.register("madry-pgd-at")
def madry_pgd_at() -> TrainingPreset:
    """PGD-AT baseline (Madry et al., ICLR 2018; cifar10_challenge code): WRN-34-10, 205 ep, /10 after 102, 154, wd 2e-4."""
    cifar10 = Recipe(
        settings={
            "arch": "wrn34_10",
            "defense": "none",
            "at": "pgd_at:alpha=2/255,bn_mode=train,eps=8/255,steps=10",
            "epochs": 205,
            "batch_size": 128,
            **_sgd(0.1, 2e-4),
            **_after_epochs(102, 154),
            "select": "last",
        },
        sources=(
            ("80,000 steps of batch 128 (204.8 epochs of 50k); lr 0.1, 0.01 from step 40k (epoch 102.4), "
             "0.001 from 60k (153.6); momentum 0.9; wd 2e-4", "github.com/MadryLab/cifar10_challenge config.json @2fbf5bb"),
            ("PGD eps 8, 10 steps of 2 (0-255 scale), random start, CE", "config.json @2fbf5bb"),
            ("bn_mode=train: the attack runs the training graph (batch statistics)", "train.py, model.py (Model(mode='train'))"),
            ("WRN with 5 residual units per stage at widths 160/320/640 (WRN-34-10 topology)", "model.py; README ('w28-10 wide' variant)"),
            ("select last: the model after the last step is the released one", "README"),
        ),
        notes=(
            "the TF model differs from wrn34_10 in details: leaky ReLU 0.1, per-image standardisation, "
            "parameter-free shortcuts; weight decay applies to conv/fc weights only (advdef decays all)",
            "the schedule is in epochs: advdef trains on 90% of train (--val-fraction), so steps per epoch are fewer",
        ),
    )
    return TrainingPreset(
        citation="Madry, Makelov, Schmidt, Tsipras, Vladu. Towards Deep Learning Models Resistant to Adversarial "
        "Attacks. ICLR 2018, arXiv:1706.06083; code github.com/MadryLab/cifar10_challenge",
        recipes={"cifar10": cifar10},
    )


@PRESETS.register("trades-paper")
def trades_paper() -> TrainingPreset:
    """TRADES baseline (Zhang et al., ICML 2019; official code): WRN-34-10, beta 6, eps 0.031, 76 ep, lr /10 from ep 75."""
    cifar10 = Recipe(
        settings={
            "arch": "wrn34_10",
            "defense": "none",
            "at": "trades:alpha=0.007,beta=6,bn_mode=eval,eps=0.031,steps=10",
            "epochs": 76,
            "batch_size": 128,
            **_sgd(0.1, 2e-4),
            **_after_epochs(74),
        },
        sources=(
            ("76 epochs, batch 128, SGD momentum 0.9, lr 0.1, wd 2e-4; lr x0.1 for (1-indexed) epoch >= 75, "
             "i.e. after 74 completed epochs (its 90/100 drops are never reached)",
             "github.com/yaodongyu/TRADES train_trades_cifar10.py @e20f7b9"),
            ("beta (1/lambda) 6, eps 0.031, step 0.007, 10 steps, start x + 0.001 N(0,1)", "train_trades_cifar10.py @e20f7b9"),
            ("bn_mode=eval: trades.py crafts after model.eval()", "trades.py (the first release crafted in train mode)"),
            ("WideResNet-34-10", "train_trades_cifar10.py (ResNet-18 is the commented alternative)"),
        ),
        notes=(
            "eps 0.031 is not 8/255 (0.0314): evaluate at --eps 31/1000 to match, or at 8/255 as a slightly larger budget",
            "checkpoint: the code saves every epoch and states no selection; select stays auto (validation PGD)",
        ),
    )
    return TrainingPreset(
        citation="Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan. Theoretically Principled Trade-off between Robustness "
        "and Accuracy. ICML 2019, arXiv:1901.08573; code github.com/yaodongyu/TRADES",
        recipes={"cifar10": cifar10},
    )


@PRESETS.register("mart-paper")
def mart_paper() -> TrainingPreset:
    """MART baseline (Wang et al., ICLR 2020; official ResNet-18 code): lam 5, lr 0.01, wd 3.5e-3, 120 ep."""
    cifar10 = Recipe(
        settings={
            "arch": "resnet18",
            "defense": "none",
            "at": "mart:alpha=0.007,bn_mode=eval,eps=0.031,lam=5,steps=10",
            "epochs": 120,
            "batch_size": 128,
            **_sgd(0.01, 3.5e-3),
            **_after_epochs(74, 89, 99),
        },
        sources=(
            ("120 epochs, batch 128, SGD momentum 0.9, lr 0.01, wd 3.5e-3; lr x0.1/x0.01/x0.001 for (1-indexed) "
             "epochs >= 75/90/100, i.e. after 74, 89, 99 completed epochs",
             "github.com/YisenWang/MART train_resnet.py @8f429e4"),
            ("KL weight (code's beta, the paper's lambda) 5; eps 0.031, step 0.007, 10 steps, start x + 0.001 N(0,1)",
             "train_resnet.py @8f429e4"),
            ("bn_mode=eval: mart.py crafts after model.eval()", "mart.py @1c2a930"),
        ),
        notes=(
            "the WRN-34-10 script exists in two versions (76 epochs, wd 2e-4 / 90 epochs, wd 7e-4; lr 0.1, weight 6); "
            "neither is encoded: give --arch wrn34_10 with --lr/--weight-decay/--epochs and --at mart:lam=6",
            "eps 0.031 is not 8/255 (see trades-paper); checkpoint selection is not stated, select stays auto",
        ),
    )
    return TrainingPreset(
        citation="Wang, Zou, Yi, Bailey, Ma, Gu. Improving Adversarial Robustness Requires Revisiting Misclassified "
        "Examples. ICLR 2020; code github.com/YisenWang/MART",
        recipes={"cifar10": cifar10},
    )


@PRESETS.register("rice-pgd-at")
def rice_pgd_at() -> TrainingPreset:
    """PGD-AT with early stopping (Rice et al., ICML 2020): PreAct ResNet-18, 200 ep, /10 at 50% and 75%, wd 5e-4."""
    cifar10 = Recipe(
        settings={
            "arch": "preact_resnet18",
            "defense": "none",
            "at": "pgd_at:alpha=2/255,bn_mode=train,eps=8/255,steps=10",
            "epochs": 200,
            "batch_size": 128,
            **_sgd(0.1, 5e-4),
            **_at_fractions(0.5, 0.75),
            "select": "val_robust",
        },
        sources=(
            ("PreAct ResNet-18, 200 epochs, batch 128, SGD momentum 0.9, wd 5e-4, lr 0.1 'piecewise' "
             "(/10 at 50% and 75% of training)", "github.com/locuslab/robust_overfitting train_cifar.py @263b826"),
            ("PGD eps 8/255, 10 steps of 2/255, 1 restart, uniform start; model in train mode while crafting",
             "train_cifar.py @263b826"),
            ("select val_robust: early stopping on held-out PGD robust accuracy", "train_cifar.py --val (the paper's remedy)"),
        ),
        notes=(
            "the code updates the LR every iteration (t = epoch + i/n), so each drop lands on the last batch of "
            "epochs 100 and 150; here it applies from epochs 101 and 151",
        ),
    )
    return TrainingPreset(
        citation="Rice, Wong, Kolter. Overfitting in Adversarially Robust Deep Learning. ICML 2020, "
        "arXiv:2002.11569; code github.com/locuslab/robust_overfitting",
        recipes={"cifar10": cifar10},
    )
