"""Sharded evaluation: N processes (GPUs, machines, torchrun ranks) split one evaluation.

How the work is split, and why:
- Every shard lays out each attack's batches exactly as the unsharded evaluation does (the
  clean pass over all samples, each attack over the samples still robust after the earlier
  ones) and runs the batches whose index is K-1 modulo N. A batch's random starts come from its
  own seed, so every sample meets the same batch, seed and start as in the unsharded run: a
  sharded evaluation equals the unsharded one sample by sample, and no shard runs half-empty
  batches.
- The batches of an attack depend on which samples earlier attacks broke, on every shard. So
  shards advance in step: before laying out an attack, a shard waits (polling the store) until
  the earlier attacks have an outcome row for every sample. Shards do equal shares, so the wait
  is the imbalance of one attack's last batches.
- The store is the only channel between shards (SQLite on one machine, PostgreSQL across many);
  outcomes are keyed by (evaluation, attack, sample), so a restarted or repeated shard rewrites
  rows instead of adding any. Shard 1 runs the sanity checks once every attack is complete.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from advdef.errors import UserError
from advdef.progress import Reporter
from advdef.store import Store

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
POLL_SECONDS = (0.5, 10.0)  # first and longest pause between store polls while waiting


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (1-based, as the command line writes it: --shard 2/4)."""

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise UserError(f"--shard must be K/N with 1 <= K <= N, got {self.index}/{self.count}")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def leader(self) -> bool:
        """Shard 1 runs what is done once per evaluation (the sanity checks)."""
        return self.index == 1

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL = Shard()


def parse_shard(text: str) -> Shard:
    match = _SHARD.match(text)
    if match is None:
        raise UserError(f"--shard must be K/N (e.g. 1/4: the first of four shards), got '{text}'")
    return Shard(int(match[1]), int(match[2]))


def from_environment(environ: dict[str, str] | None = None) -> Shard | None:
    """The shard of a torchrun rank (RANK/WORLD_SIZE), or None outside a multi-process launch.

    On a CUDA machine the rank also takes its own GPU (LOCAL_RANK), so `--device auto` on
    every rank does not pile the ranks onto GPU 0.
    """
    environ = dict(os.environ) if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(environ.get("RANK", "0") or 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
    return Shard(rank + 1, world)


def host_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def wait_until_complete(
    store: Store,
    eval_id: int,
    attacks: list[str],
    n: int,
    shard: Shard,
    reporter: Reporter,
    timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Block until every attack in `attacks` has an outcome for all `n` samples.

    Only sharded evaluations wait: an unsharded one has done all the work itself. Raises a
    UserError naming what is missing once `timeout` seconds pass (None waits for ever).
    """
    if not shard.sharded or not attacks:
        return
    started, pause, told = clock(), POLL_SECONDS[0], False
    while True:
        counts = store.outcome_counts(eval_id)
        missing = {a: n - counts.get(a, 0) for a in attacks if counts.get(a, 0) < n}
        if not missing:
            return
        waited = clock() - started
        summary = ", ".join(f"{a.split(':')[0]} lacks {m} of {n}" for a, m in missing.items())
        if timeout is not None and waited >= timeout:
            raise UserError(
                f"shard {shard} of evaluation {eval_id} gave up after {waited:.0f}s waiting for the other shards "
                f"({summary}); start the missing shards (advdef report names them) and rerun this one to continue"
            )
        if not told:
            reporter.message(f"shard {shard}: waiting for the other shards of evaluation {eval_id} ({summary})")
            told = True
        sleep(pause if timeout is None else min(pause, timeout - waited))
        pause = min(pause * 2, POLL_SECONDS[1])


def missing_shards(store: Store, eval_id: int) -> list[str]:
    """Shards of a sharded evaluation that have not finished their part ('2/4'), in order.

    An evaluation whose shards were never registered (unsharded) has none. A shard that never
    started is missing too: N comes from whichever shards did register.
    """
    rows = store.shards(eval_id)
    if not rows:
        return []
    count = max(r["shards"] for r in rows)
    done = {r["shard"] for r in rows if r["shards"] == count and r["status"] == "done"}
    return [f"{k}/{count}" for k in range(1, count + 1) if k not in done]


def refusal(store: Store, evaluation: dict) -> str | None:
    """Why a report must not show this evaluation yet, or None.

    A sharded evaluation is refused while an attack lacks outcomes and some shard has not
    finished: its numbers would cover only the finished shards' samples, a subset that is
    neither the protocol's sample set nor class-balanced. (An unsharded evaluation that was
    interrupted is shown, marked incomplete, as before.)
    """
    missing = missing_shards(store, evaluation["eval_id"])
    if not missing:
        return None
    counts = store.outcome_counts(evaluation["eval_id"])
    attacks = store.eval_attacks(evaluation["eval_id"])
    if attacks and all(a["status"] == "done" and counts.get(a["attack"], 0) >= evaluation["n"] for a in attacks):
        return None  # every sample is in: finished by other means (e.g. an unsharded rerun)
    run_id = evaluation["run_id"]
    count = missing[0].split("/")[1]
    return (f"evaluation {evaluation['eval_id']} of run {run_id} is missing shard(s) {', '.join(missing)}: "
            f"run `advdef evaluate --run {run_id} --shard K/{count}` with the same options for each")
