"""Defense plugins. Importing this package registers the built-in ones."""

from advdef.defenses.base import AdaptiveDeclaration, Defense
from advdef.registry import DEFENSES


@DEFENSES.register("none")
class NoDefense(Defense):
    """No defense: the plain backbone (the baseline every defense is compared with)."""

    def __init__(self) -> None:
        pass


# The seed papers' defenses register themselves on import (after `none`, which they may refer to).
from advdef.defenses import cas, cifs, denoise, ewas, fsr, randomize, smooth  # noqa: E402,F401

__all__ = ["AdaptiveDeclaration", "Defense", "NoDefense"]
