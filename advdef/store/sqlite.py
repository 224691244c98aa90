"""SQLite backend: the default store, one file beside the runs (or in memory for tests).

WAL mode and short IMMEDIATE transactions make it safe for several processes on one machine to
write (a training run and an evaluation side by side): BEGIN IMMEDIATE takes the database's
write lock up front, so writers take turns and no read-then-write can race.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advdef.store.backend import Row, Script, dialect_script, split_statements
from advdef.store.schema import MIGRATIONS

MEMORY = ":memory:"
TIMEOUT = 60  # seconds a writer waits for another's lock


class SQLiteBackend:
    """A connection to one SQLite file (or an in-memory database)."""

    dialect = "sqlite"
    begin = "BEGIN IMMEDIATE"
    lock_rows = ""  # BEGIN IMMEDIATE already serializes writers

    def __init__(self, path: str | Path) -> None:
        self.location = str(path)
        if self.location != MEMORY:
            Path(self.location).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: a store may be handed to a helper thread; calls never overlap.
        self.conn = sqlite3.connect(self.location, timeout=TIMEOUT, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        if self.location != MEMORY:
            self._use_wal()
            self.conn.execute("PRAGMA synchronous = NORMAL")

    def _use_wal(self) -> None:
        """Switch a new file to WAL (the mode then stays with the file).

        The switch needs the file to itself and SQLite reports 'locked' at once rather than
        waiting, so processes opening a fresh file together retry until one has switched it.
        """
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [dict(row) for row in self.conn.execute(sql, tuple(params)).fetchall()]

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def ddl(self, script: Script) -> list[str]:
        return split_statements(dialect_script(script, self.dialect))

    def has_table(self, name: str) -> bool:
        return bool(self.query("SELECT 1 AS found FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    def migrations(self) -> list[tuple[str, Script]]:
        # Read at call time: tests replay an old schema by patching this module's MIGRATIONS.
        return list(MIGRATIONS)

    def lock_migrations(self) -> None:
        """Nothing to do: the migration's BEGIN IMMEDIATE holds the file's write lock."""

    def close(self) -> None:
        self.conn.close()
