"""Result store (SQLite)."""

from advdef.store.sqlite import DEFAULT_STORE, Store, default_store_path

__all__ = ["DEFAULT_STORE", "Store", "default_store_path"]
