"""Training configuration: one validated dataclass the CLI fills and the store records."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from advdef.errors import UserError
from advdef.models.dual_bn import DUAL_BN_CHOICES
from advdef.registry import ATTACKS, DATASETS, DEFENSES, MODELS, TRAINING

SELECTION_RULES = ("auto", "val_robust", "val_clean", "last")
OPTIMIZERS = ("sgd", "adam")
# How `milestones` are read: fractions of the run (they scale with --epochs; the stored default,
# so configs written before the unit existed keep their meaning) or epoch numbers as papers state them.
MILESTONE_UNITS = ("fraction", "epoch")


@dataclass
class TrainConfig:
    """Everything a training run was asked to do; stored as the run's config."""

    data: str = "digits"
    arch: str = "smallcnn"
    defense: str = "none"
    at: str = "pgd_at"
    epochs: int = 10
    batch_size: int = 128
    # SGD with momentum is what every recipe in advdef.training.presets uses; Adam is for experiments.
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 5e-4
    # Step schedule: the LR is multiplied by lr_decay after each milestone. The default is the
    # Madry/Rice shape (x0.1 at 50% and 75% of training, e.g. after epochs 100 and 150 of 200).
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    milestone_unit: str = "fraction"
    lr_decay: float = 0.1
    seed: int = 0
    val_fraction: float = 0.1
    limit_train: int | None = None
    # Checkpoint selection on the validation split: robust accuracy for AT runs, clean otherwise.
    select: str = "auto"
    val_attack: str = "pgd10"
    val_n: int = 500
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    channels_last: bool = True
    amp: bool = True
    # torch.compile the model's forward (advdef.device.compile_model): same weights and checkpoint
    # keys, eager fallback with a warning if compiling fails. Speed only: the trained model is the same.
    compile: bool = False
    # Dual BatchNorm (AdvProp / Mixture BN): None = "clean" for the advprop method, else "off";
    # "clean" / "adversarial" name the BatchNorm set the trained model uses at inference.
    dual_bn: str | None = None
    # The training preset (`advdef train --preset`) whose recipe filled the unset options, if any.
    preset: str | None = None
    # Data-parallel training (torchrun / --nproc): normalise BatchNorm with the statistics of the
    # global batch over all ranks (advdef.training.sync_bn), which makes N ranks train the
    # single-process model. No effect in a single process.
    sync_bn: bool = False

    def validate(self) -> TrainConfig:
        """Resolve every plugin spec now, so mistakes fail before any work (UserError, exit 2)."""
        DATASETS.resolve(self.data)
        MODELS.resolve(self.arch)
        DEFENSES.resolve(self.defense)
        TRAINING.resolve(self.at)
        ATTACKS.resolve(self.val_attack)
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (isinstance(self.compile, bool), "--compile is a flag: true or false"),
            (isinstance(self.sync_bn, bool), "--sync-bn is a flag: true or false"),
            (self.lr > 0, "--lr must be positive"),
            (0 < self.val_fraction < 1, "--val-fraction must be in (0, 1)"),
            (self.limit_train is None or self.limit_train >= 2, "--limit-train must be at least 2"),
            (self.val_n >= 1, "val_n must be at least 1"),
            (self.momentum >= 0, "--momentum must be at least 0"),
            (self.weight_decay >= 0, "--weight-decay must be at least 0"),
            (0 < self.lr_decay <= 1, "--lr-decay must be in (0, 1]"),
            (not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "--nesterov needs --optimizer sgd and a positive --momentum"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        for value, valid, what in [
            (self.select, SELECTION_RULES, "selection rule"),
            (self.optimizer, OPTIMIZERS, "optimizer"),
            (self.milestone_unit, MILESTONE_UNITS, "milestone unit"),
            (self.dual_bn or "off", DUAL_BN_CHOICES, "--dual-bn setting"),
        ]:
            if value not in valid:
                raise UserError(f"unknown {what} '{value}'; valid: {', '.join(valid)}")
        self._validate_milestones()
        return self

    def _validate_milestones(self) -> None:
        """Fractions must lie in (0, 1]; epochs must be whole and fall before the last epoch.

        An epoch milestone at or past the end would silently never fire (e.g. a preset's epochs
        75/90 with a shortened --epochs), so it is refused with what to pass instead.
        """
        if self.milestone_unit == "fraction":
            if not all(0 < m <= 1 for m in self.milestones):
                raise UserError("fraction milestones must lie in (0, 1], e.g. --milestones 0.5,0.75")
            return
        late = [m for m in self.milestones if not (float(m).is_integer() and 1 <= m < self.epochs)]
        if late:
            shown = ", ".join(format_milestone(m) for m in late)
            raise UserError(
                f"LR milestones must be whole epochs before the last epoch ({self.epochs}), got {shown}; "
                "give --milestones as epochs (e.g. 30,40), fractions (e.g. 0.75,0.9) or none"
            )

    @property
    def dual_bn_setting(self) -> str:
        """The dual BatchNorm setting in effect: AdvProp is defined with separate BatchNorms for
        its clean and adversarial terms, so its runs get them unless --dual-bn off asks otherwise."""
        if self.dual_bn is not None:
            return self.dual_bn
        return "clean" if TRAINING.parse(self.at)[0].name == "advprop" else "off"

    @property
    def selection(self) -> str:
        if self.select != "auto":
            return self.select
        return getattr(TRAINING.parse(self.at)[0].factory, "selects_on", "val_robust")

    def milestone_epochs(self) -> list[int]:
        """Each milestone as the number of completed epochs after which the LR decays.

        Epoch milestone m means epochs 1..m run at the higher rate and epoch m+1 at the lower one:
        PyTorch's MultiStepLR([m]) stepped once per epoch, and "divided by 10 after epoch m".
        """
        if self.milestone_unit == "epoch":
            return [int(m) for m in self.milestones]
        return [round(m * self.epochs) for m in self.milestones]

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based `epoch` under the step schedule."""
        passed = sum(1 for m in self.milestone_epochs() if epoch > m)
        return self.lr * self.lr_decay**passed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def format_milestone(value: float) -> str:
    """A milestone as written on the command line: `75` for epochs, `0.5` for fractions."""
    return str(int(value)) if float(value).is_integer() and value >= 1 else str(value)


def parse_milestones(text: str) -> tuple[list[float], str]:
    """`--milestones` text to (values, unit): `75,90` are epochs, `0.5,0.75` fractions, `none` none.

    Whole numbers mean epochs because that is how papers state schedules; decimals mean fractions
    of the run, which follow --epochs. A mix is refused rather than guessed.
    """
    text = text.strip()
    if text.lower() in ("none", ""):
        return [], "epoch"
    chunks = [c.strip() for c in text.split(",")]
    if all(re.fullmatch(r"\d+", c) for c in chunks):
        return [int(c) for c in chunks], "epoch"
    try:
        values = [float(c) for c in chunks]
    except ValueError:
        values = []
    if not values or any(re.fullmatch(r"\d+", c) for c in chunks):
        raise UserError(f"--milestones '{text}': give epochs (75,90), fractions of the run (0.5,0.75) or none")
    return values, "fraction"
