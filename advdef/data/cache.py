"""A cache of decoded ImageFolder splits, so image files are decoded once, not on every load.

One safetensors file per (source root, split, decoded shape and mode) holds the split's uint8
images, int64 labels and the positions they are at in the split, with metadata naming the
source. It is valid while its fingerprint matches: a hash of the file list in ImageFolder order
(relative path, label, size, mtime), the classes, the decoded shape and mode, and the Pillow and
torchvision versions that decode and resize. Anything else (a file added, touched or replaced,
an upgraded decoder, an unreadable cache file) makes the next full load rebuild it.

The cache lives in `$ADVDEF_CACHE`, else `$XDG_CACHE_HOME/advdef`, else `~/.cache/advdef`
(`ADVDEF_CACHE=off` turns it off), never inside the data folder, which may be read-only. Writes
go to a temporary file renamed into place, so concurrent loads never read half a file; a cache
that cannot be written is a warning, not an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "ADVDEF_CACHE"
FORMAT = "advdef-decoded-images/1"
# Splits with fewer files decode in well under a second: caching them would only litter the cache.
MIN_CACHED_FILES = 1000
_OFF = {"off", "none", "no", "0", "false"}


def cache_dir() -> Path | None:
    """The cache directory, or None when caching is off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "advdef"


@dataclass(frozen=True)
class CacheEntry:
    """Where a split's decoded images are cached and the fingerprint they must carry."""

    path: Path
    fingerprint: str
    metadata: dict[str, str]


def entry_for(root: Path, split: str, samples: list[tuple[str, int]], classes: list[str],
              shape: tuple[int, int, int], mode: str) -> CacheEntry | None:
    """The cache entry of ImageFolder split `root/split` decoded to `shape` in PIL `mode`, or
    None when caching is off or the cache directory lies inside the data folder."""
    directory = cache_dir()
    if directory is None:
        return None
    root = root.resolve()
    if directory.resolve().is_relative_to(root):
        warnings.warn(f"advdef: not caching decoded images inside the data folder {root} "
                      f"(${CACHE_ENV} points there); set it to another directory", stacklevel=3)
        return None
    shape_text = "x".join(str(v) for v in shape)
    key = hashlib.sha256(f"{root}\n{split}\n{shape_text}\n{mode}".encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name) or "root"
    metadata = {
        "format": FORMAT,
        "source_root": str(root),
        "split": split,
        "file_count": str(len(samples)),
        "shape": shape_text,
        "mode": mode,
        "classes": json.dumps(classes),
    }
    fingerprint = _fingerprint(root / split, samples, metadata)
    return CacheEntry(directory / f"imagefolder-{name}-{split}-{key}.safetensors", fingerprint,
                      {**metadata, "fingerprint": fingerprint})


def _fingerprint(folder: Path, samples: list[tuple[str, int]], metadata: dict[str, str]) -> str:
    import PIL
    import torchvision

    digest = hashlib.sha256()
    header = {**metadata, "pillow": PIL.__version__, "torchvision": torchvision.__version__}
    digest.update(json.dumps(header, sort_keys=True).encode())
    prefix = os.path.join(str(folder), "")
    lines = []
    for path, label in samples:
        stat = os.stat(path)
        relative = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, folder)
        lines.append(f"\n{relative}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}")
    digest.update("".join(lines).encode())
    return digest.hexdigest()


def read(entry: CacheEntry, count: int, shape: tuple[int, int, int],
         positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (images, labels) of the whole split, or of its samples at `positions`; None
    when the file is absent, stale or unreadable (safetensors maps the file: a subset touches
    only its own images)."""
    from safetensors import safe_open

    if not entry.path.is_file():
        return None
    try:
        with safe_open(str(entry.path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("fingerprint") != entry.fingerprint:
                return None
            images, labels = handle.get_tensor("images"), handle.get_tensor("labels")
            stored = handle.get_tensor("positions")
    except Exception:  # a truncated or foreign file is rebuilt, never trusted
        return None
    if (images.dtype != torch.uint8 or tuple(images.shape) != (count, *shape) or labels.dtype != torch.int64
            or labels.shape != (count,) or not torch.equal(stored, torch.arange(count))):
        return None
    # safetensors may map the file rather than read it: copy what is asked for into memory.
    return (images.clone(), labels.clone()) if positions is None else (images[positions], labels[positions])


def write(entry: CacheEntry, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Store a whole split's decoded images atomically; a failure only warns."""
    from safetensors.torch import save_file

    temporary = entry.path.with_name(f"{entry.path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        entry.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"images": images.contiguous(), "labels": labels.contiguous(),
                   "positions": torch.arange(len(labels))}
        save_file(tensors, str(temporary), metadata=entry.metadata)
        os.replace(temporary, entry.path)
    except Exception as error:  # OSError, or safetensors' own I/O error: a load never fails for it
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        warnings.warn(f"advdef: could not cache decoded images at {entry.path} ({error}); "
                      f"set ${CACHE_ENV} to a writable directory or to 'off'", stacklevel=3)
