"""Training configuration: one validated dataclass the CLI fills and the store records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from advdef.errors import UserError
from advdef.registry import ATTACKS, DATASETS, DEFENSES, MODELS, TRAINING

SELECTION_RULES = ("auto", "val_robust", "val_clean", "last")


@dataclass
class TrainConfig:
    """Everything a training run was asked to do; stored as the run's config."""

    data: str = "digits"
    arch: str = "smallcnn"
    defense: str = "none"
    at: str = "pgd_at"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Step schedule of the seed papers (x0.1 at 50% and 75% of training, e.g. epochs 100/150 of 200).
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
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
            (self.lr > 0, "--lr must be positive"),
            (0 < self.val_fraction < 1, "--val-fraction must be in (0, 1)"),
            (self.limit_train is None or self.limit_train >= 2, "--limit-train must be at least 2"),
            (self.val_n >= 1, "val_n must be at least 1"),
            (all(0 < m <= 1 for m in self.milestones), "milestones are fractions of the epochs in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.select not in SELECTION_RULES:
            raise UserError(f"unknown selection rule '{self.select}'; valid: {', '.join(SELECTION_RULES)}")
        return self

    @property
    def selection(self) -> str:
        if self.select != "auto":
            return self.select
        return "val_clean" if TRAINING.parse(self.at)[0].name == "standard" else "val_robust"

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based `epoch` under the step schedule."""
        passed = sum(1 for m in self.milestones if epoch > round(m * self.epochs))
        return self.lr * self.lr_decay**passed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
