"""Defense plugins. Importing this package registers the built-in ones."""

from advdef.defenses.base import AdaptiveDeclaration, Defense
from advdef.registry import DEFENSES


@DEFENSES.register("none")
class NoDefense(Defense):
    """No defense: the plain backbone (the baseline every defense is compared with)."""

    def __init__(self) -> None:
        pass


__all__ = ["AdaptiveDeclaration", "Defense", "NoDefense"]
