"""Result store: SQLite by default (a path), or PostgreSQL shared by many machines (a postgresql:// URL)."""

from advdef.store.location import DEFAULT_STORE, default_location, default_store_path, is_server_url
from advdef.store.store import Store, open_store

__all__ = ["DEFAULT_STORE", "Store", "default_location", "default_store_path", "is_server_url", "open_store"]
