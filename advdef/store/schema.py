"""The store's schema as ordered, named migrations (each applied once, in one transaction).

The schema is a contract: rows never grow it. Outcomes are one row per (evaluation, attack,
sample) so every aggregate — per-attack accuracy, worst case, per class, paired tests — is
derived from the same facts.

Migrations are written in SQLite's dialect; the PostgreSQL backend widens the types
(advdef.store.postgres.translate_ddl). A migration that cannot be said once is a dict of one
script per dialect ('sqlite', 'postgresql').
"""

MIGRATIONS: list[tuple[str, str | dict[str, str]]] = [
    (
        "0001_initial",
        """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            status TEXT NOT NULL,             -- training | trained | failed
            dataset TEXT NOT NULL,
            arch TEXT NOT NULL,
            defense TEXT NOT NULL,
            at_method TEXT NOT NULL,
            seed INTEGER NOT NULL,
            run_dir TEXT NOT NULL,
            config TEXT NOT NULL,             -- JSON: everything the run was asked to do
            versions TEXT NOT NULL,           -- JSON: library versions at creation
            epochs_done INTEGER NOT NULL DEFAULT 0,
            best_epoch INTEGER,
            train_seconds REAL NOT NULL DEFAULT 0
        );
        CREATE TABLE checkpoints (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            epoch INTEGER NOT NULL,
            path TEXT NOT NULL,
            metrics TEXT NOT NULL,            -- JSON: train loss/acc, validation clean/robust acc
            seconds REAL NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_id, epoch)
        );
        CREATE TABLE evaluations (
            eval_id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            protocol_key TEXT NOT NULL,       -- hash of the protocol card
            protocol TEXT NOT NULL,           -- JSON protocol card
            eps TEXT NOT NULL,                -- exact fraction, e.g. 8/255
            norm TEXT NOT NULL,
            n INTEGER NOT NULL,
            sample_hash TEXT NOT NULL,
            sample_ids TEXT NOT NULL,         -- JSON list of test-split ids
            seed INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (run_id, protocol_key)
        );
        CREATE TABLE eval_attacks (
            eval_id INTEGER NOT NULL REFERENCES evaluations(eval_id),
            attack TEXT NOT NULL,             -- canonical spec, or 'clean'
            position INTEGER NOT NULL,        -- order in which attacks ran
            status TEXT NOT NULL,             -- running | done
            seconds REAL NOT NULL DEFAULT 0,
            details TEXT NOT NULL,            -- JSON: implementation, versions, warnings
            PRIMARY KEY (eval_id, attack)
        );
        CREATE TABLE outcomes (
            eval_id INTEGER NOT NULL REFERENCES evaluations(eval_id),
            attack TEXT NOT NULL,
            sample_id INTEGER NOT NULL,
            label INTEGER NOT NULL,
            robust INTEGER,                   -- 1 survived, 0 broken, NULL not attacked (already broken)
            prediction INTEGER,               -- prediction on the attack's output (NULL if not attacked)
            PRIMARY KEY (eval_id, attack, sample_id)
        );
        """,
    ),
    (
        "0002_checks",
        """
        CREATE TABLE checks (
            eval_id INTEGER NOT NULL REFERENCES evaluations(eval_id),
            name TEXT NOT NULL,               -- sanity check, e.g. 'zero_gradients' (advdef.evaluation.checks)
            verdict TEXT NOT NULL CHECK (verdict IN ('pass', 'fail', 'skipped')),
            figure REAL,                      -- the measured value (a fraction unless detail says otherwise)
            threshold REAL,                   -- the limit the figure was compared with
            detail TEXT NOT NULL,             -- JSON: counts, bounds, reason for a skip or failure
            created_at TEXT NOT NULL,
            PRIMARY KEY (eval_id, name)
        );
        """,
    ),
    (
        # Cost of each attack in sample-passes through the evaluated model (advdef.evaluation.cost):
        # a forward of a batch of B images counts B, a backward through it B. Stores created
        # before this migration get zeros for what they already evaluated.
        "0003_costs",
        """
        ALTER TABLE eval_attacks ADD COLUMN forwards INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE eval_attacks ADD COLUMN backwards INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        # Sharded evaluation (`advdef evaluate --shard K/N`, or torchrun ranks): which processes
        # share an evaluation and whether each finished its part. The outcomes stay the truth
        # (an attack is complete when every sample has its row); this table names who is missing.
        "0004_shards",
        """
        CREATE TABLE eval_shards (
            eval_id INTEGER NOT NULL REFERENCES evaluations(eval_id),
            shard INTEGER NOT NULL,           -- K of K/N, 1-based
            shards INTEGER NOT NULL,          -- N of K/N
            status TEXT NOT NULL CHECK (status IN ('running', 'done')),
            host TEXT NOT NULL,               -- hostname:pid of the process that last ran it
            updated_at TEXT NOT NULL,
            PRIMARY KEY (eval_id, shard, shards)
        );
        """,
    ),
    (
        # checks() lists an evaluation's checks in the order first recorded. That was SQLite's
        # rowid, which PostgreSQL lacks: the order becomes a column (existing rows keep their
        # rowid order; a re-recorded check keeps its place).
        "0005_check_order",
        {
            "sqlite": """
                ALTER TABLE checks ADD COLUMN position INTEGER NOT NULL DEFAULT 0;
                UPDATE checks SET position = rowid;
            """,
            "postgresql": "ALTER TABLE checks ADD COLUMN position INTEGER NOT NULL DEFAULT 0",
        },
    ),
]
