"""What a database must provide for the store: the few things SQLite and PostgreSQL do differently.

The store's SQL is written once (advdef.store.store), with `?` placeholders and the SQL both
databases share (ON CONFLICT, RETURNING, subqueries). A backend connects, runs statements and
returns rows as dicts, opens write transactions its way, says how to lock rows that are read
and then written, and turns the schema's migrations into its DDL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

Row = dict[str, Any]
Script = str | dict[str, str]  # portable DDL, or one variant per dialect


class Backend(Protocol):
    """One connection to one store database."""

    dialect: str
    """'sqlite' or 'postgresql': picks a migration's variant where the two differ."""
    location: str
    """Where the store is, for messages (a path, or a URL without its password)."""
    begin: str
    """The statement opening a write transaction."""
    lock_rows: str
    """Appended to a SELECT whose rows the transaction will write after reading them: it holds
    them until commit. Empty where `begin` already makes writers take turns."""
    conn: Any
    """The driver's connection (sqlite3 or psycopg), for diagnostics."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement (`?` placeholders); its rows, if it returns any."""

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each parameter row, as fast as the driver can."""

    def ddl(self, script: Script) -> list[str]:
        """A migration's statements in this database's dialect."""

    def has_table(self, name: str) -> bool:
        """Whether the store's database has this table (where the connection looks for tables)."""

    def migrations(self) -> list[tuple[str, Script]]:
        """The schema's migrations, in order (advdef.store.schema)."""

    def lock_migrations(self) -> None:
        """Inside a transaction: make any other process migrating the same database wait."""

    def close(self) -> None: ...


def dialect_script(script: Script, dialect: str) -> str:
    """A migration's text for one dialect (most migrations are one portable text)."""
    return script if isinstance(script, str) else script[dialect]


def split_statements(script: str) -> list[str]:
    """The statements of a migration script: `--` comments dropped (they may say anything), split on ';'."""
    code = re.sub(r"--[^\n]*", "", script)
    return [statement.strip() for statement in code.split(";") if statement.strip()]
