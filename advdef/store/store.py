"""The store of runs, checkpoints, evaluations, per-sample outcomes and sanity checks.

One class, its SQL written once, on SQLite (a file: the default) or PostgreSQL (a URL: many
writers on many machines); advdef.store.backend says what differs. Each batch of outcomes is one
transaction, so a killed process loses at most the batch it was writing and a restart resumes
from what is stored. All SQL takes parameters; nothing user-given is formatted into a statement.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from advdef.errors import UserError, suggest
from advdef.store.backend import Backend, Row
from advdef.store.location import default_location, is_server_url

_JSON_COLUMNS = {"config", "versions", "metrics", "protocol", "details", "sample_ids", "detail"}
VERDICTS = ("pass", "fail", "skipped")
# Exportable tables and the order of their rows (the same on every backend).
_TABLES = {
    "runs": "created_at, run_id",
    "checkpoints": "run_id, epoch",
    "evaluations": "eval_id",
    "eval_attacks": "eval_id, position",
    "outcomes": "eval_id, attack, sample_id",
    "checks": "eval_id, position, name",
    "eval_shards": "eval_id, shards, shard",
}
_RUN_FIELDS = {"status", "epochs_done", "best_epoch", "train_seconds", "config"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_backend(location: str | Path | None = None, *, memory: bool = False) -> Backend:
    """The backend a location names: a postgresql:// (or postgres://) URL, else a SQLite file."""
    if memory:
        from advdef.store.sqlite import MEMORY, SQLiteBackend

        return SQLiteBackend(MEMORY)
    location = default_location() if location is None or location == "" else location
    if is_server_url(location):
        from advdef.store.postgres import PostgresBackend

        return PostgresBackend(str(location).strip())
    from advdef.store.sqlite import SQLiteBackend

    return SQLiteBackend(location)


class Store:
    """A connection to one advdef store: a SQLite file (or in-memory database), or a PostgreSQL URL."""

    def __init__(self, location: str | Path | None = None, *, memory: bool = False) -> None:
        self.backend = open_backend(location, memory=memory)
        self._depth = 0
        try:
            self._migrate()
        except BaseException:
            self.backend.close()
            raise

    @property
    def path(self) -> str:
        """Where the store is: the SQLite file (or ':memory:'), or the URL without its password."""
        return self.backend.location

    @property
    def conn(self) -> Any:
        """The driver's connection (sqlite3 or psycopg): for diagnostics and tests, not for store data."""
        return self.backend.conn

    @property
    def is_server(self) -> bool:
        """Whether the store is a database server's (no file to put runs beside)."""
        return self.backend.dialect != "sqlite"

    def default_runs_dir(self) -> Path:
        """Where checkpoints go unless told: runs/ beside a SQLite file, ./runs for a server store."""
        if self.path == ":memory:":
            raise ValueError("an in-memory store needs an explicit runs_dir")
        if self.is_server:
            return Path.cwd() / "runs"
        return Path(self.path).expanduser().resolve().parent / "runs"

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator[Any]:
        """One transaction (a savepoint when nested); rolled back on any exception."""
        if self._depth == 0:
            begin, commit, rollback = [self.backend.begin], ["COMMIT"], ["ROLLBACK"]
        else:
            name = f"sp{self._depth}"
            begin, commit, rollback = [f"SAVEPOINT {name}"], [f"RELEASE {name}"], [f"ROLLBACK TO {name}", f"RELEASE {name}"]
        for statement in begin:
            self.backend.query(statement)
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self._depth -= 1
            for statement in rollback:
                self.backend.query(statement)
            raise
        self._depth -= 1
        for statement in commit:
            self.backend.query(statement)

    def _migrate(self) -> None:
        """Apply the schema's missing migrations, each once, in its own transaction.

        The backend's migration lock makes processes opening a fresh database together take
        turns; whoever comes second re-reads what is applied and skips it.
        """
        migrations = self.backend.migrations()
        names = {name for name, _ in migrations}
        if self.backend.has_table("_migrations") and self._applied() >= names:
            return  # up to date: opening takes no lock and writes nothing (a read-only role may report)
        with self.atomic():
            self.backend.lock_migrations()
            self._query("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        for name, script in migrations:
            with self.atomic():
                self.backend.lock_migrations()
                if name in self._applied():
                    continue
                for statement in self.backend.ddl(script):
                    self._query(statement)
                self._query("INSERT INTO _migrations VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, now()))

    def _applied(self) -> set[str]:
        return {row["name"] for row in self._query("SELECT name FROM _migrations")}

    # -- helpers -----------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self.backend.query(sql, params)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    @staticmethod
    def _row(row: Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        data = dict(row)
        for key in _JSON_COLUMNS & data.keys():
            if data[key] is not None:
                data[key] = json.loads(data[key])
        return data

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return [self._row(r) for r in self._query(sql, tuple(params))]  # type: ignore[misc]

    def _lock_evaluation(self, eval_id: int) -> None:
        """Inside a transaction: writers that read an evaluation's rows and then add to them take turns."""
        self._query(f"SELECT eval_id FROM evaluations WHERE eval_id = ?{self.backend.lock_rows}", (eval_id,))

    # -- runs --------------------------------------------------------------------------
    def insert_run(self, run: dict[str, Any]) -> None:
        row = {**run, "created_at": run.get("created_at", now())}
        for key in ("config", "versions"):
            row[key] = json.dumps(row[key], sort_keys=True)
        columns = ", ".join(row)
        with self.atomic():
            self._query(f"INSERT INTO runs ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def update_run(self, run_id: str, **fields: Any) -> None:
        unknown = set(fields) - _RUN_FIELDS
        if unknown:
            raise ValueError(f"cannot update run fields {sorted(unknown)}")
        values = [json.dumps(v, sort_keys=True) if k == "config" else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)  # keys checked against _RUN_FIELDS
        with self.atomic():
            self._query(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*values, run_id))

    def get_run(self, run_id: str) -> dict[str, Any]:
        row = self._row(self._one("SELECT * FROM runs WHERE run_id = ?", (run_id,)))
        if row is None:
            raise suggest(run_id, self.run_ids(), "run id", f"in store {self.path}")
        return row

    def run_ids(self) -> list[str]:
        return [r["run_id"] for r in self._query("SELECT run_id FROM runs ORDER BY created_at, run_id")]

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is None:
            return self._rows("SELECT * FROM runs ORDER BY created_at, run_id")
        return self._rows("SELECT * FROM runs WHERE status = ? ORDER BY created_at, run_id", (status,))

    # -- checkpoints -------------------------------------------------------------------
    def record_checkpoint(self, run_id: str, epoch: int, path: str, metrics: dict, seconds: float) -> None:
        with self.atomic():
            self._query(
                "INSERT INTO checkpoints (run_id, epoch, path, metrics, seconds, created_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, epoch) DO UPDATE SET path = excluded.path, metrics = excluded.metrics,"
                " seconds = excluded.seconds, created_at = excluded.created_at",
                (run_id, epoch, path, json.dumps(metrics, sort_keys=True), float(seconds), now()),
            )

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY epoch", (run_id,))

    # -- evaluations -------------------------------------------------------------------
    def get_or_create_evaluation(self, run_id: str, protocol_key: str, protocol: dict, sample_ids: list[int]) -> int:
        """The evaluation of a run under a protocol, created on first use (once, whoever races to it)."""
        find = "SELECT eval_id FROM evaluations WHERE run_id = ? AND protocol_key = ?"
        with self.atomic():
            row = self._one(find, (run_id, protocol_key))
            if row is not None:
                return int(row["eval_id"])
            # A concurrent creator's row makes this insert do nothing (after waiting for its commit).
            row = self._one(
                "INSERT INTO evaluations (run_id, protocol_key, protocol, eps, norm, n, sample_hash, sample_ids, seed, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, protocol_key) DO NOTHING RETURNING eval_id",
                (
                    run_id, protocol_key, json.dumps(protocol, sort_keys=True), protocol["eps"], protocol["norm"],
                    protocol["n"], protocol["sample_hash"], json.dumps(sample_ids), protocol["seed"], now(),
                ),
            ) or self._one(find, (run_id, protocol_key))
            return int(row["eval_id"])  # type: ignore[index]

    def evaluations(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return self._rows("SELECT * FROM evaluations ORDER BY eval_id")
        return self._rows("SELECT * FROM evaluations WHERE run_id = ? ORDER BY eval_id", (run_id,))

    def get_evaluation(self, eval_id: int) -> dict[str, Any]:
        row = self._row(self._one("SELECT * FROM evaluations WHERE eval_id = ?", (eval_id,)))
        if row is None:
            raise UserError(f"no evaluation {eval_id} in store {self.path}")
        return row

    def eval_attacks(self, eval_id: int) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM eval_attacks WHERE eval_id = ? ORDER BY position", (eval_id,))

    def start_attack(self, eval_id: int, attack: str, details: dict) -> None:
        """Register an attack of an evaluation (idempotent: a resumed attack keeps its position)."""
        with self.atomic():
            self._lock_evaluation(eval_id)  # two new attacks must not take the same position
            if self._one("SELECT 1 AS found FROM eval_attacks WHERE eval_id = ? AND attack = ?", (eval_id, attack)):
                return
            self._query(
                "INSERT INTO eval_attacks (eval_id, attack, position, status, seconds, details)"
                " VALUES (?, ?, (SELECT COALESCE(MAX(position), -1) + 1 FROM eval_attacks WHERE eval_id = ?),"
                " 'running', 0, ?)",
                (eval_id, attack, eval_id, json.dumps(details, sort_keys=True)),
            )

    def finish_attack(self, eval_id: int, attack: str, details: dict) -> bool:
        """Store an attack's details and mark it done once every sample has its outcome row.

        Shards of one evaluation each finish their part: the attack becomes 'done' only when the
        last part lands, and the warnings every shard saw are kept together. Returns whether the
        attack is complete.
        """
        with self.atomic():
            # Locked: shards finishing together each see the other's warnings and outcomes.
            row = self._one(
                f"SELECT details FROM eval_attacks WHERE eval_id = ? AND attack = ?{self.backend.lock_rows}",
                (eval_id, attack),
            )
            earlier = json.loads(row["details"]).get("warnings", []) if row is not None else []
            if "warnings" in details or earlier:
                details = {**details, "warnings": sorted(set(earlier) | set(details.get("warnings", [])))}
            counts = self._one(
                "SELECT (SELECT COUNT(*) FROM outcomes WHERE eval_id = ? AND attack = ?) AS stored,"
                " (SELECT n FROM evaluations WHERE eval_id = ?) AS expected",
                (eval_id, attack, eval_id),
            )
            complete = counts["stored"] >= counts["expected"]  # type: ignore[index]
            self._query(
                "UPDATE eval_attacks SET status = ?, details = ? WHERE eval_id = ? AND attack = ?",
                ("done" if complete else "running", json.dumps(details, sort_keys=True), eval_id, attack),
            )
            return complete

    def outcome_counts(self, eval_id: int) -> dict[str, int]:
        """Outcome rows stored per attack of an evaluation (an attack is complete at the evaluation's n)."""
        return {
            row["attack"]: int(row["stored"])
            for row in self._query(
                "SELECT attack, COUNT(*) AS stored FROM outcomes WHERE eval_id = ? GROUP BY attack", (eval_id,)
            )
        }

    def record_outcomes(
        self,
        eval_id: int,
        attack: str,
        rows: Iterable[tuple[int, int, int | None, int | None]],
        seconds: float,
        forwards: int = 0,
        backwards: int = 0,
    ) -> None:
        """Store (sample_id, label, robust, prediction) rows of one batch and its cost, atomically.

        The cost (seconds, forward and backward sample-passes) is added in the same transaction
        as the rows, so a killed and resumed evaluation counts every stored batch exactly once.
        A sample written twice (a retried batch, two shards overlapping) stays one row, the
        last written. Rows go in sample order so writers of overlapping batches lock them in
        the same order and cannot deadlock.
        """
        batch = sorted(((eval_id, attack, *row) for row in rows), key=lambda r: r[2])
        with self.atomic():
            self.backend.execute_many(
                "INSERT INTO outcomes (eval_id, attack, sample_id, label, robust, prediction) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (eval_id, attack, sample_id) DO UPDATE SET label = excluded.label,"
                " robust = excluded.robust, prediction = excluded.prediction",
                batch,
            )
            self._query(
                "UPDATE eval_attacks SET seconds = seconds + ?, forwards = forwards + ?, backwards = backwards + ?"
                " WHERE eval_id = ? AND attack = ?",
                (float(seconds), int(forwards), int(backwards), eval_id, attack),
            )

    def outcomes(self, eval_id: int, attack: str | None = None) -> list[dict[str, Any]]:
        if attack is None:
            return self._rows("SELECT * FROM outcomes WHERE eval_id = ? ORDER BY attack, sample_id", (eval_id,))
        return self._rows(
            "SELECT * FROM outcomes WHERE eval_id = ? AND attack = ? ORDER BY sample_id", (eval_id, attack)
        )

    # -- sanity checks -----------------------------------------------------------------
    def record_check(
        self, eval_id: int, name: str, verdict: str, figure: float | None, threshold: float | None, detail: dict
    ) -> None:
        """Store one sanity check's verdict for an evaluation, replacing an earlier one of the same name."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        with self.atomic():
            self._lock_evaluation(eval_id)  # positions stay distinct
            self._query(
                "INSERT INTO checks (eval_id, name, verdict, figure, threshold, detail, created_at, position)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(position), 0) + 1 FROM checks WHERE eval_id = ?))"
                " ON CONFLICT (eval_id, name) DO UPDATE SET verdict = excluded.verdict, figure = excluded.figure,"
                " threshold = excluded.threshold, detail = excluded.detail, created_at = excluded.created_at",
                (eval_id, name, verdict, _real(figure), _real(threshold), json.dumps(detail, sort_keys=True), now(),
                 eval_id),
            )

    def checks(self, eval_id: int) -> list[dict[str, Any]]:
        """An evaluation's sanity checks, in the order they were first recorded."""
        return self._rows("SELECT * FROM checks WHERE eval_id = ? ORDER BY position, name", (eval_id,))

    # -- shards of an evaluation -------------------------------------------------------
    def register_shard(self, eval_id: int, shard: int, shards: int, host: str) -> None:
        """Record that shard K/N of an evaluation is running here (again, after a restart).

        Shards split each attack's batches by their count N, so processes with different N would
        leave batches to nobody: a second N is refused while a shard of another N is unfinished.
        """
        with self.atomic():
            self._lock_evaluation(eval_id)  # two processes with different N cannot both pass the check
            other = self._one(
                "SELECT shard, shards FROM eval_shards WHERE eval_id = ? AND shards != ? AND status = 'running'"
                " ORDER BY shard",
                (eval_id, shards),
            )
            if other is not None:
                raise UserError(
                    f"evaluation {eval_id} is being sharded as {other['shard']}/{other['shards']}, which is unfinished; "
                    f"use --shard K/{other['shards']} (K in 1..{other['shards']}) until every shard is done"
                )
            self._query(
                "INSERT INTO eval_shards (eval_id, shard, shards, status, host, updated_at)"
                " VALUES (?, ?, ?, 'running', ?, ?)"
                " ON CONFLICT (eval_id, shard, shards) DO UPDATE SET status = excluded.status,"
                " host = excluded.host, updated_at = excluded.updated_at",
                (eval_id, shard, shards, host, now()),
            )

    def finish_shard(self, eval_id: int, shard: int, shards: int) -> None:
        with self.atomic():
            self._query(
                "UPDATE eval_shards SET status = 'done', updated_at = ? WHERE eval_id = ? AND shard = ? AND shards = ?",
                (now(), eval_id, shard, shards),
            )

    def shards(self, eval_id: int) -> list[dict[str, Any]]:
        """The shards registered for an evaluation, by N then K."""
        return self._rows("SELECT * FROM eval_shards WHERE eval_id = ? ORDER BY shards, shard", (eval_id,))

    def table(self, name: str) -> list[dict[str, Any]]:
        """All rows of one table (for CSV/JSON export), in key order on every backend."""
        if name not in _TABLES:
            raise UserError(f"unknown table '{name}'; valid: {', '.join(_TABLES)}")
        return self._query(f"SELECT * FROM {name} ORDER BY {_TABLES[name]}")  # name checked above


def open_store(location: str | Path | None = None) -> Store:
    """The store at a location: a postgresql:// URL, a SQLite path, or None for $ADVDEF_STORE / ./advdef.sqlite."""
    return Store(location)


def _real(value: float | None) -> float | None:
    """A float for a REAL column; None (NULL) for a missing or non-finite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
