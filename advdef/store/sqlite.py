"""SQLite store for runs, checkpoints, evaluations, per-sample outcomes and sanity checks.

WAL mode and short IMMEDIATE transactions make it safe for several processes to write (a
training run and an evaluation side by side); each batch of outcomes is one transaction, so a
killed process loses at most the batch it was writing and a restart resumes from what is stored.
All SQL takes parameters; nothing user-given is formatted into a statement.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from advdef.errors import UserError, suggest
from advdef.store.schema import MIGRATIONS

DEFAULT_STORE = "advdef.sqlite"
_JSON_COLUMNS = {"config", "versions", "metrics", "protocol", "details", "sample_ids", "detail"}
VERDICTS = ("pass", "fail", "skipped")
_TABLES = ("runs", "checkpoints", "evaluations", "eval_attacks", "outcomes", "checks", "eval_shards")
_RUN_FIELDS = {"status", "epochs_done", "best_epoch", "train_seconds", "config"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_store_path() -> Path:
    return Path(os.environ.get("ADVDEF_STORE") or DEFAULT_STORE)


class Store:
    """A connection to one advdef SQLite file (or an in-memory database for tests)."""

    def __init__(self, path: str | Path | None = None, *, memory: bool = False) -> None:
        self.path = ":memory:" if memory else str(path or default_store_path())
        if not memory:
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        if not memory:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
        self._depth = 0
        self._migrate()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One transaction (a savepoint when nested); rolled back on any exception."""
        if self._depth == 0:
            begin, commit, rollback = ["BEGIN IMMEDIATE"], ["COMMIT"], ["ROLLBACK"]
        else:
            name = f"sp{self._depth}"
            begin, commit, rollback = [f"SAVEPOINT {name}"], [f"RELEASE {name}"], [f"ROLLBACK TO {name}", f"RELEASE {name}"]
        for statement in begin:
            self.conn.execute(statement)
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self._depth -= 1
            for statement in rollback:
                self.conn.execute(statement)
            raise
        self._depth -= 1
        for statement in commit:
            self.conn.execute(statement)

    def _migrate(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        applied = {row[0] for row in self.conn.execute("SELECT name FROM _migrations")}
        for name, script in MIGRATIONS:
            if name in applied:
                continue
            with self.atomic():
                for statement in (s.strip() for s in script.split(";")):
                    if statement:
                        self.conn.execute(statement)
                self.conn.execute("INSERT OR IGNORE INTO _migrations VALUES (?, ?)", (name, now()))

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        data = dict(row)
        for key in _JSON_COLUMNS & data.keys():
            if data[key] is not None:
                data[key] = json.loads(data[key])
        return data

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return [self._row(r) for r in self.conn.execute(sql, tuple(params))]  # type: ignore[misc]

    # -- runs --------------------------------------------------------------------------
    def insert_run(self, run: dict[str, Any]) -> None:
        row = {**run, "created_at": run.get("created_at", now())}
        for key in ("config", "versions"):
            row[key] = json.dumps(row[key], sort_keys=True)
        columns = ", ".join(row)
        with self.atomic():
            self.conn.execute(
                f"INSERT INTO runs ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        unknown = set(fields) - _RUN_FIELDS
        if unknown:
            raise ValueError(f"cannot update run fields {sorted(unknown)}")
        values = [json.dumps(v, sort_keys=True) if k == "config" else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)  # keys checked against _RUN_FIELDS
        with self.atomic():
            self.conn.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*values, run_id))

    def get_run(self, run_id: str) -> dict[str, Any]:
        row = self._row(self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone())
        if row is None:
            raise suggest(run_id, self.run_ids(), "run id", f"in store {self.path}")
        return row

    def run_ids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT run_id FROM runs ORDER BY created_at, run_id")]

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is None:
            return self._rows("SELECT * FROM runs ORDER BY created_at, run_id")
        return self._rows("SELECT * FROM runs WHERE status = ? ORDER BY created_at, run_id", (status,))

    # -- checkpoints -------------------------------------------------------------------
    def record_checkpoint(self, run_id: str, epoch: int, path: str, metrics: dict, seconds: float) -> None:
        with self.atomic():
            self.conn.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, epoch, path, json.dumps(metrics, sort_keys=True), seconds, now()),
            )

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY epoch", (run_id,))

    # -- evaluations -------------------------------------------------------------------
    def get_or_create_evaluation(self, run_id: str, protocol_key: str, protocol: dict, sample_ids: list[int]) -> int:
        with self.atomic():
            row = self.conn.execute(
                "SELECT eval_id FROM evaluations WHERE run_id = ? AND protocol_key = ?", (run_id, protocol_key)
            ).fetchone()
            if row is not None:
                return int(row[0])
            cursor = self.conn.execute(
                "INSERT INTO evaluations (run_id, protocol_key, protocol, eps, norm, n, sample_hash, sample_ids, seed, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, protocol_key, json.dumps(protocol, sort_keys=True), protocol["eps"], protocol["norm"],
                    protocol["n"], protocol["sample_hash"], json.dumps(sample_ids), protocol["seed"], now(),
                ),
            )
            return int(cursor.lastrowid)

    def evaluations(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return self._rows("SELECT * FROM evaluations ORDER BY eval_id")
        return self._rows("SELECT * FROM evaluations WHERE run_id = ? ORDER BY eval_id", (run_id,))

    def eval_attacks(self, eval_id: int) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM eval_attacks WHERE eval_id = ? ORDER BY position", (eval_id,))

    def start_attack(self, eval_id: int, attack: str, details: dict) -> None:
        """Register an attack of an evaluation (idempotent: a resumed attack keeps its position)."""
        with self.atomic():
            exists = self.conn.execute(
                "SELECT 1 FROM eval_attacks WHERE eval_id = ? AND attack = ?", (eval_id, attack)
            ).fetchone()
            if exists is None:
                position = self.conn.execute(
                    "SELECT COALESCE(MAX(position), -1) + 1 FROM eval_attacks WHERE eval_id = ?", (eval_id,)
                ).fetchone()[0]
                self.conn.execute(
                    "INSERT INTO eval_attacks (eval_id, attack, position, status, seconds, details)"
                    " VALUES (?, ?, ?, 'running', 0, ?)",
                    (eval_id, attack, position, json.dumps(details, sort_keys=True)),
                )

    def finish_attack(self, eval_id: int, attack: str, details: dict) -> bool:
        """Store an attack's details and mark it done once every sample has its outcome row.

        Shards of one evaluation each finish their part: the attack becomes 'done' only when the
        last part lands, and the warnings every shard saw are kept together. Returns whether the
        attack is complete.
        """
        with self.atomic():
            row = self.conn.execute(
                "SELECT details FROM eval_attacks WHERE eval_id = ? AND attack = ?", (eval_id, attack)
            ).fetchone()
            earlier = json.loads(row[0]).get("warnings", []) if row is not None else []
            if "warnings" in details or earlier:
                details = {**details, "warnings": sorted(set(earlier) | set(details.get("warnings", [])))}
            stored, expected = self.conn.execute(
                "SELECT (SELECT COUNT(*) FROM outcomes WHERE eval_id = ? AND attack = ?),"
                " (SELECT n FROM evaluations WHERE eval_id = ?)",
                (eval_id, attack, eval_id),
            ).fetchone()
            complete = stored >= expected
            self.conn.execute(
                "UPDATE eval_attacks SET status = ?, details = ? WHERE eval_id = ? AND attack = ?",
                ("done" if complete else "running", json.dumps(details, sort_keys=True), eval_id, attack),
            )
            return complete

    def outcome_counts(self, eval_id: int) -> dict[str, int]:
        """Outcome rows stored per attack of an evaluation (an attack is complete at the evaluation's n)."""
        return {
            row[0]: int(row[1])
            for row in self.conn.execute(
                "SELECT attack, COUNT(*) FROM outcomes WHERE eval_id = ? GROUP BY attack", (eval_id,)
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
        """
        with self.atomic():
            self.conn.executemany(
                "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?)",
                [(eval_id, attack, *row) for row in rows],
            )
            self.conn.execute(
                "UPDATE eval_attacks SET seconds = seconds + ?, forwards = forwards + ?, backwards = backwards + ?"
                " WHERE eval_id = ? AND attack = ?",
                (seconds, int(forwards), int(backwards), eval_id, attack),
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
            self.conn.execute(
                "INSERT INTO checks (eval_id, name, verdict, figure, threshold, detail, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (eval_id, name) DO UPDATE SET verdict = excluded.verdict, figure = excluded.figure,"
                " threshold = excluded.threshold, detail = excluded.detail, created_at = excluded.created_at",
                (eval_id, name, verdict, _real(figure), _real(threshold), json.dumps(detail, sort_keys=True), now()),
            )

    def checks(self, eval_id: int) -> list[dict[str, Any]]:
        """An evaluation's sanity checks, in the order they were first recorded."""
        return self._rows("SELECT * FROM checks WHERE eval_id = ? ORDER BY rowid", (eval_id,))

    # -- shards of an evaluation -------------------------------------------------------
    def register_shard(self, eval_id: int, shard: int, shards: int, host: str) -> None:
        """Record that shard K/N of an evaluation is running here (again, after a restart).

        Shards split each attack's batches by their count N, so processes with different N would
        leave batches to nobody: a second N is refused while a shard of another N is unfinished.
        """
        with self.atomic():
            other = self.conn.execute(
                "SELECT shard, shards FROM eval_shards WHERE eval_id = ? AND shards != ? AND status = 'running'"
                " ORDER BY shard",
                (eval_id, shards),
            ).fetchone()
            if other is not None:
                raise UserError(
                    f"evaluation {eval_id} is being sharded as {other[0]}/{other[1]}, which is unfinished; "
                    f"use --shard K/{other[1]} (K in 1..{other[1]}) until every shard is done"
                )
            self.conn.execute(
                "INSERT INTO eval_shards (eval_id, shard, shards, status, host, updated_at)"
                " VALUES (?, ?, ?, 'running', ?, ?)"
                " ON CONFLICT (eval_id, shard, shards) DO UPDATE SET status = excluded.status,"
                " host = excluded.host, updated_at = excluded.updated_at",
                (eval_id, shard, shards, host, now()),
            )

    def finish_shard(self, eval_id: int, shard: int, shards: int) -> None:
        with self.atomic():
            self.conn.execute(
                "UPDATE eval_shards SET status = 'done', updated_at = ? WHERE eval_id = ? AND shard = ? AND shards = ?",
                (now(), eval_id, shard, shards),
            )

    def shards(self, eval_id: int) -> list[dict[str, Any]]:
        """The shards registered for an evaluation, by N then K."""
        return self._rows("SELECT * FROM eval_shards WHERE eval_id = ? ORDER BY shards, shard", (eval_id,))

    def table(self, name: str) -> list[dict[str, Any]]:
        """All rows of one table (for CSV/JSON export)."""
        if name not in _TABLES:
            raise UserError(f"unknown table '{name}'; valid: {', '.join(_TABLES)}")
        return [dict(r) for r in self.conn.execute(f"SELECT * FROM {name}")]  # name checked above


def _real(value: float | None) -> float | None:
    """A float for a REAL column; None (NULL) for a missing or non-finite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
