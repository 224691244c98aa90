"""The official AutoAttack (Croce & Hein, 2020) through a thin adapter over PyPI `pyautoattack`.

`aa` is the `standard` version: APGD-CE (100 it.), APGD-T (9 targets x 100 it.), FAB-T
(9 x 100), Square (5000 queries). The adapter passes eps and device explicitly, seeds every call,
restores the caller's RNG (AutoAttack reseeds the global one), checks at run time that the
standard settings are the official ones, and keeps AutoAttack's own warnings (randomness,
softmax output, Square beating white-box, ...) so the evaluation can record them.
"""

from __future__ import annotations

import logging
from fractions import Fraction

import torch

from advdef.attacks.base import Attack, preserved_rng
from advdef.attacks.pgd import EIGHT_255
from advdef.registry import ATTACKS

VERSIONS = ("standard", "plus", "rand", "custom")
SUB_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")

RAND_EOT_SAMPLES = 20  # fra31/auto-attack set_version("rand"): apgd.eot_iter = 20
# The settings that make a result "AutoAttack standard" (fra31/auto-attack set_version).
STANDARD_SETTINGS = {
    "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "apgd.n_iter": 100,
    "apgd.n_restarts": 1,
    "apgd_targeted.n_iter": 100,
    "apgd_targeted.n_target_classes": 9,
    "fab.n_iter": 100,
    "fab.n_target_classes": 9,
    "square.n_queries": 5000,
}


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def standard_settings(adversary) -> dict:
    """Read the settings that matter for the 'standard' label off an AutoAttack object."""
    return {
        "attacks": list(adversary.attacks_to_run),
        "apgd.n_iter": adversary.apgd.n_iter,
        "apgd.n_restarts": adversary.apgd.n_restarts,
        "apgd_targeted.n_iter": adversary.apgd_targeted.n_iter,
        "apgd_targeted.n_target_classes": adversary.apgd_targeted.n_target_classes,
        "fab.n_iter": adversary.fab.n_iter,
        "fab.n_target_classes": adversary.fab.n_target_classes,
        "square.n_queries": adversary.square.n_queries,
    }


@ATTACKS.register("aa")
class AutoAttack(Attack):
    """Official AutoAttack (pyautoattack); `aa` = standard, `aa:version=plus|rand`, or `aa:version=custom,attacks=apgd-ce,square`."""

    list_values = {"attacks": SUB_ATTACKS}  # lets `attacks=apgd-ce,square` keep `square` in the list

    name = "aa"

    def __init__(
        self,
        *,
        eps: Fraction = EIGHT_255,
        version: str = "standard",
        attacks: list[str] | str | None = None,
    ) -> None:
        super().__init__(eps=eps)
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got '{version}'")
        chosen = [attacks] if isinstance(attacks, str) else attacks
        if version == "custom":
            if not chosen:
                raise ValueError("version=custom needs attacks=..., from " + ", ".join(SUB_ATTACKS))
            unknown = [a for a in chosen if a not in SUB_ATTACKS]
            if unknown:
                raise ValueError(f"unknown AutoAttack attacks {unknown}; valid: {', '.join(SUB_ATTACKS)}")
        elif chosen:
            raise ValueError("attacks=... needs version=custom (the official versions fix their attacks)")
        self.version = version
        self.attacks = chosen
        self.warnings: list[str] = []

    @property
    def params(self):
        params = super().params
        if params["attacks"] is None:
            params.pop("attacks")
        return params

    @property
    def eot(self) -> int:
        """Gradient samples per step: the official `rand` version runs APGD with EOT over 20 draws."""
        return RAND_EOT_SAMPLES if self.version == "rand" else 1

    @property
    def implementation(self) -> str:
        from advdef.versions import library_versions

        return f"pyautoattack {library_versions()['pyautoattack']} (official AutoAttack)"

    def build(self, view, device: torch.device, seed: int, dtype: torch.dtype = torch.float32):
        from pyautoattack import AutoAttack as OfficialAutoAttack

        from advdef.attacks.official import PlainLogits

        adversary = OfficialAutoAttack(
            PlainLogits(view, dtype), eps=float(self.eps), norm="Linf", device=device, seed=seed, version=self.version,
            attacks=self.attacks if self.version == "custom" else None,
        )
        if self.version == "standard":
            settings = standard_settings(adversary)
            if settings != STANDARD_SETTINGS:
                raise RuntimeError(f"AutoAttack 'standard' settings differ from the official ones: {settings}")
        return adversary

    @staticmethod
    def seed_from(generator: torch.Generator) -> int:
        """The seed handed to AutoAttack for a call, drawn from the call's generator."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))

    def perturb(self, view, x, y, generator):
        seed = self.seed_from(generator)
        adversary = self.build(view, x.device, seed, x.dtype)
        logger = logging.getLogger("auto-attack")
        collector = _WarningCollector()
        logger.addHandler(collector)
        try:
            with preserved_rng():
                # Contiguous: the official code flattens tensors with .view (see PlainLogits).
                x_adv, _ = adversary.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))
        finally:
            logger.removeHandler(collector)
        self.warnings = collector.messages
        return x_adv.to(x.device)
