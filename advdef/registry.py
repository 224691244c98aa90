"""One generic plugin registry for every kind: datasets, models, defenses, training, attacks, presets.

Built-in plugins register with a decorator (`@DEFENSES.register("fsr")`); third-party packages
add plugins through entry-point groups (`advdef.defenses`, ...). An entry point may name a module
(importing it runs its decorators) or a class/function (registered under the entry point's name).
Entry points load lazily, the first time a registry is asked for something it does not know or
for its full list, so a broken third-party plugin never slows or breaks unrelated commands.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from advdef.errors import UserError, suggest
from advdef.specs import Spec, parse_spec, resolve_params

_SHORTHAND = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z_\-]*?)(?P<number>\d+)$")

# Modules holding the built-in plugins; importing them fills the registries.
_BUILTIN_MODULES = {
    "datasets": "advdef.data",
    "models": "advdef.models",
    "defenses": "advdef.defenses",
    "training": "advdef.training.methods",
    "attacks": "advdef.attacks",
    "presets": "advdef.training.presets",
}


@dataclass(frozen=True)
class Plugin:
    """A registered factory with what the CLI shows about it."""

    name: str
    factory: Callable[..., Any]
    summary: str
    shorthand: str | None = None  # `pgd20` sets this parameter to 20
    source: str = "builtin"


def _summary_of(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """Plugins of one kind, by name."""

    def __init__(self, kind: str, singular: str) -> None:
        self.kind = kind
        self.singular = singular
        self.group = f"advdef.{kind}"
        self._plugins: dict[str, Plugin] = {}
        self._builtins_loaded = False
        self._entry_points_loaded = False

    # -- registration -------------------------------------------------------------------
    def register(
        self, name: str, *, summary: str | None = None, shorthand: str | None = None, source: str = "builtin"
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a class or factory function under `name`."""

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._plugins and self._plugins[name].factory is not factory:
                raise ValueError(f"{self.singular} '{name}' is already registered")
            self._plugins[name] = Plugin(
                name=name,
                factory=factory,
                summary=summary or _summary_of(factory),
                shorthand=shorthand,
                source=source,
            )
            return factory

        return decorator

    # -- discovery ----------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            importlib.import_module(_BUILTIN_MODULES[self.kind])

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in importlib.metadata.entry_points(group=self.group):
            try:
                loaded = entry_point.load()
            except Exception as error:  # a broken plugin must not break the tool
                warnings.warn(f"advdef: could not load {self.singular} plugin '{entry_point.name}': {error}")
                continue
            if inspect.ismodule(loaded) or entry_point.name in self._plugins:
                continue  # a module registers itself on import
            dist = getattr(entry_point, "dist", None)
            source = f"{dist.name} {dist.version}" if dist is not None else "entry point"
            self.register(entry_point.name, source=source)(loaded)

    def _ensure(self, name: str | None = None) -> None:
        self._load_builtins()
        if name is None or name not in self._plugins:
            self._load_entry_points()

    # -- lookup -------------------------------------------------------------------------
    def names(self, pattern: str = "*") -> list[str]:
        self._ensure()
        return sorted(n for n in self._plugins if fnmatch.fnmatch(n, pattern))

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self._plugins[n] for n in self.names())

    def knows(self, name: str) -> bool:
        """True when `name` is a plugin or a shorthand of one (`pgd20`)."""
        self._ensure(name)
        return name in self._plugins or self._split_shorthand(name) is not None

    def get(self, name: str) -> Plugin:
        self._ensure(name)
        if name not in self._plugins:
            raise suggest(name, self._plugins, self.singular)
        return self._plugins[name]

    def _split_shorthand(self, name: str) -> tuple[Plugin, dict[str, int]] | None:
        match = _SHORTHAND.match(name)
        if match and match["base"] in self._plugins:
            plugin = self._plugins[match["base"]]
            if plugin.shorthand:
                return plugin, {plugin.shorthand: int(match["number"])}
        return None

    def parse(self, text: str | Spec) -> tuple[Plugin, Spec]:
        """Resolve a spec string (shorthands included) to its plugin and a normalized Spec."""
        spec = text if isinstance(text, Spec) else parse_spec(text)
        self._ensure(spec.name)
        if spec.name in self._plugins:
            return self._plugins[spec.name], spec
        split = self._split_shorthand(spec.name)
        if split is None:
            raise suggest(spec.name, self._plugins, self.singular)
        plugin, implied = split
        clash = set(implied) & set(spec.params)
        if clash:
            raise UserError(f"malformed spec '{text}': '{spec.name}' already sets {', '.join(clash)}")
        return plugin, Spec(plugin.name, {**implied, **spec.params})

    def resolve(self, text: str | Spec) -> tuple[Plugin, dict[str, Any]]:
        """The plugin and its full parameter set (defaults filled in) for a spec."""
        plugin, spec = self.parse(text)
        params = resolve_params(plugin.factory, spec, self.singular)
        return plugin, params

    def canonical(self, text: str | Spec) -> str:
        """The canonical spec string: name and every parameter, sorted.

        A plugin whose parameters depend on each other (e.g. `smooth`'s options per activation)
        may define `canonical_params(params) -> params` so that equal models get equal strings:
        aliases resolved, options that do not apply dropped, applicable defaults filled in.
        """
        plugin, params = self.resolve(text)
        normalize = getattr(plugin.factory, "canonical_params", None)
        if normalize is not None:
            try:
                params = normalize(params)
            except ValueError as error:
                raise UserError(f"invalid {self.singular} spec '{text}': {error}") from None
        return str(Spec(plugin.name, params))

    def create(self, text: str | Spec, **overrides: Any) -> Any:
        """Build a plugin instance from a spec; `None` overrides are dropped (unset CLI options)."""
        plugin, spec = self.parse(text)
        extra = {k: v for k, v in overrides.items() if v is not None}
        params = resolve_params(plugin.factory, Spec(plugin.name, {**extra, **spec.params}), self.singular)
        try:
            return plugin.factory(**params)
        except ValueError as error:  # plugins raise ValueError for bad parameter values
            raise UserError(f"invalid {self.singular} spec '{text}': {error}") from None


DATASETS = Registry("datasets", "dataset")
MODELS = Registry("models", "model")
DEFENSES = Registry("defenses", "defense")
TRAINING = Registry("training", "training method")
ATTACKS = Registry("attacks", "attack")
# Training recipes for `advdef train --preset`: factories returning advdef.training.presets.TrainingPreset.
PRESETS = Registry("presets", "preset")

REGISTRIES: dict[str, Registry] = {r.kind: r for r in (DATASETS, MODELS, DEFENSES, TRAINING, ATTACKS, PRESETS)}
