"""Analyses of trained models beyond accuracy: the CAS paper's channel-activation statistics.

The names are imported lazily so `advdef.analysis.cli` (loaded with the command line) does not
pull in torch before a command runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ChannelStats", "analyze_run_channels", "channel_statistics"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from advdef.analysis import channels

        return getattr(channels, name)
    raise AttributeError(f"module 'advdef.analysis' has no attribute {name!r}")
