"""Dataset plugins. Importing this package registers the built-in ones."""

from advdef.data import digits, vision  # noqa: F401  (registration)
from advdef.data.base import DataInfo, DatasetPlugin, LoadedData, Split, iterate_batches

__all__ = ["DataInfo", "DatasetPlugin", "LoadedData", "Split", "iterate_batches"]
