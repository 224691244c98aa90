import subprocess
import sys
import textwrap

import pytest

from advdef.errors import UserError
from advdef.registry import ATTACKS, DEFENSES, MODELS, REGISTRIES, Registry


def test_every_kind_has_builtin_plugins_with_summaries():
    for registry in REGISTRIES.values():
        plugins = list(registry)
        assert plugins, registry.kind
        assert all(p.summary for p in plugins), [p.name for p in plugins if not p.summary]


def test_unknown_name_lists_close_matches():
    with pytest.raises(UserError, match="did you mean pgd"):
        ATTACKS.get("pgdd")
    with pytest.raises(UserError, match="valid: "):
        MODELS.get("zzzzzz")


def test_shorthand_and_canonical_spec():
    plugin, spec = ATTACKS.parse("pgd50")
    assert plugin.name == "pgd" and spec.params == {"steps": 50}
    assert ATTACKS.canonical("pgd50") == ATTACKS.canonical("pgd:steps=50")
    with pytest.raises(UserError, match="already sets"):
        ATTACKS.parse("pgd50:steps=3")


def test_unknown_parameter_names_valid_ones():
    with pytest.raises(UserError, match="restarts"):
        ATTACKS.create("pgd:restart=2")


def test_create_drops_none_overrides_and_spec_wins():
    attack = ATTACKS.create("pgd:steps=7", steps=None, restarts=None)
    assert attack.steps == 7 and attack.restarts == 1


def test_duplicate_registration_is_refused():
    registry = Registry("defenses", "defense")

    @registry.register("twice")
    class First:
        """First."""

    with pytest.raises(ValueError, match="already registered"):

        @registry.register("twice")
        class Second:
            """Second."""


@pytest.fixture()
def plugin_distribution(tmp_path):
    """A throw-away installed distribution declaring an advdef.defenses entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "thirdparty_defense.py").write_text(textwrap.dedent('''
        from advdef.defenses.base import Defense

        class Blur(Defense):
            """A third-party defense registered through an entry point."""
            def __init__(self, *, strength: float = 1.0):
                self.strength = strength
    '''))
    info = site / "thirdparty_defense-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-defense\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[advdef.defenses]\nblur = thirdparty_defense:Blur\n")
    return site


def test_entry_point_plugin_is_discovered(plugin_distribution, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_distribution))
    registry = Registry("defenses", "defense")
    plugin = registry.get("blur")
    assert plugin.source == "thirdparty-defense 1.0"
    assert registry.create("blur:strength=2").strength == 2


def test_entry_point_plugin_shows_in_cli(plugin_distribution):
    env_path = str(plugin_distribution)
    result = subprocess.run(
        [sys.executable, "-m", "advdef", "list", "defenses"],
        capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": env_path}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "blur" in result.stdout and "third-party defense" in result.stdout
    assert DEFENSES.knows("none")
