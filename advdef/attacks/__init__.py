"""Attack plugins. Importing this package registers the built-in ones."""

from advdef.attacks import adaptive, apgd, autoattack, mim, noise, pgd, square, transfer  # noqa: F401  (registration)
from advdef.attacks.base import Attack, LogitsView, check_budget, eval_mode, preserved_rng
from advdef.attacks.pgd import pgd_attack

__all__ = ["Attack", "LogitsView", "check_budget", "eval_mode", "pgd_attack", "preserved_rng"]
