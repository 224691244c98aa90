"""Where a store lives: a SQLite file path, or a PostgreSQL URL shared by many machines.

One string names either, so `--store` and $ADVDEF_STORE accept both; the URL scheme decides.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_STORE = "advdef.sqlite"
SERVER_SCHEMES = ("postgresql", "postgres")


def default_location() -> str:
    """$ADVDEF_STORE, else ./advdef.sqlite (a string: a URL must not pass through Path, which folds '//')."""
    return os.environ.get("ADVDEF_STORE") or DEFAULT_STORE


def default_store_path() -> Path:
    """The default SQLite file (kept for callers that predate server stores)."""
    return Path(default_location())


def is_server_url(location: str | Path | None) -> bool:
    """Whether a location names a PostgreSQL server rather than a file."""
    if not isinstance(location, str):
        return False
    return urlsplit(location.strip()).scheme.lower() in SERVER_SCHEMES


def redact(url: str) -> str:
    """The URL without its password (in the authority or as ?password=), fit for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in credentials else netloc
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
