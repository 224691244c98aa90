"""Library versions recorded with every run and evaluation (part of the protocol card)."""

from __future__ import annotations

import importlib.metadata
import platform


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("advdef", "torch", "torchvision", "pyautoattack", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions
