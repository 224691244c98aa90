"""Evaluation: run attacks over a fixed test subset and store every (sample, attack) outcome.

Rules that keep numbers honest:
- the model is seen only through the eval-mode, label-free `LogitsView`;
- every attack starts from the original image, and a sample counts as robust only if it is
  clean-correct and survives every attack (the per-sample worst case);
- samples already broken by an earlier attack are not attacked again (their outcome is NULL),
  which saves time and cannot change the worst case;
- each attack's output is re-scored through the view and checked against the eps budget;
- attacks run over fixed batches of the eligible samples with a per-batch seed, and each batch is
  one transaction, so a killed evaluation resumes where it stopped with the same results; the
  global RNG, which stochastic defenses draw from, is seeded per batch too;
- the protocol records whether the defense is stochastic and each attack its EOT sample count,
  so the summary can flag a stochastic defense that no EOT attack evaluated;
- each batch's cost is stored with its outcomes: wall time and forward/backward sample-passes
  through the model (advdef.evaluation.cost), the re-scoring forward included; skipped samples
  cost nothing, and the sanity checks are not counted.

Sharding (`shard`, advdef.evaluation.sharding): N processes run each attack's batches K-1 mod N
of the unsharded layout, in step through the store, so the outcomes equal the unsharded ones.

Speed options that never change results (docs/evaluation.md, "Speed without weakening"):
`batch_size="auto"` and out-of-memory retries (advdef.evaluation.batching), `amp` with its fp32
cross-check (advdef.evaluation.precision), `compile` (advdef.device.compile_model).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction

from typing import Any

import torch

from advdef.attacks.base import AttackContext, check_budget, eval_mode, preserved_rng
from advdef.attacks.pgd import EIGHT_255
from advdef.data.base import Split, limit_split
from advdef.device import compile_model, prepare, select_device
from advdef.errors import UserError
from advdef.evaluation import batching, precision
from advdef.evaluation.cost import PassCounter
from advdef.evaluation.sharding import ALL, Shard, host_label, wait_until_complete
from advdef.evaluation.suites import SuiteContext, expand, is_keyword
from advdef.progress import Reporter, SilentReporter
from advdef.registry import ATTACKS
from advdef.specs import format_value
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import load_run_model, open_dataset
from advdef.versions import library_versions

CLEAN = "clean"


@dataclass
class EvalConfig:
    """What to measure: attacks, threat model and sample set."""

    attacks: list[str] = field(default_factory=lambda: ["fgsm", "pgd20", "cw", "aa"])
    eps: Fraction = EIGHT_255
    n: int | None = 1000
    seed: int = 0
    batch_size: int | str = 256  # or "auto": the largest of 256, 128, ... that fits (CUDA); 256 on CPU
    limit_test: int | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    epoch: int | None = None  # default: the run's selected (best) epoch
    # Gradient samples per step for attacks that take `eot`; None = 20 for a stochastic defense.
    eot: int | None = None
    # Sanity checks (advdef.evaluation.checks) after the attacks, on up to n_check samples.
    checks: bool = True
    n_check: int = 100
    # Mixed precision ("off", "bf16", "fp16"), checked against fp32 on amp_check_n samples.
    amp: str = "off"
    amp_check_n: int = precision.DEFAULT_CHECK_N
    compile: bool = False  # torch.compile the model's forward (eager fallback if compiling fails)
    # This process's share of the batches (--shard K/N, or the torchrun rank) and how long it
    # waits for the other shards before giving up (None: for ever).
    shard: Shard = ALL
    shard_wait: float | None = None

    def canonical_attacks(self, context: SuiteContext | None = None) -> list[str]:
        """Canonical attack specs with every parameter resolved (eps excluded: it is the protocol's).

        Suite keywords (`standard`, `adaptive`, `full`, ...) depend on the evaluated run, so they
        expand only with its `context`; without one they are checked by name and left out.
        """
        if self.eot is not None and (isinstance(self.eot, bool) or not isinstance(self.eot, int) or self.eot < 1):
            raise UserError(f"--eot must be a whole number >= 1, got {self.eot!r}")
        items = expand(self.attacks, context) if context is not None else [a for a in self.attacks if not is_keyword(a)]
        specs = []
        for text in items:
            if "eps" in ATTACKS.parse(text)[1].params:
                raise UserError(f"attack '{text}' sets eps; set the threat model with --eps for all attacks")
            specs.append(ATTACKS.create(text, eps=Fraction(self.eps)).spec())
            if context is not None and text in context.origins:
                context.origins[specs[-1]] = context.origins[text]
        if len(set(specs)) != len(specs):
            raise UserError("the same attack is listed twice")
        return specs

    def suite_context(self, store: Store, run: dict, defense: object) -> SuiteContext:
        return SuiteContext(defense=defense, run=run, store=store, eot=self.eot)


def batch_seed(seed: int, attack: str, first_sample_id: int) -> int:
    digest = hashlib.sha256(f"{seed}|{attack}|{first_sample_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@contextmanager
def seeded_model_rng(seed: int, attack: str, first_sample_id: int) -> Iterator[None]:
    """Seed the global RNG for one batch, restoring the caller's state afterwards.

    Stochastic defenses (e.g. `randomize`) draw from the global RNG; seeding it per batch makes
    their draws, and so a resumed evaluation, reproducible. The seed is derived apart from the
    attack's own generator seed so the model's draws do not replay the attack's random start.
    """
    with preserved_rng():
        torch.manual_seed(batch_seed(seed, f"{attack}|model-rng", first_sample_id))
        yield


def protocol_key(protocol: dict) -> str:
    """Evaluations with equal keys measured the same model on the same samples and threat model."""
    keyed = {k: protocol[k] for k in ("dataset", "split", "sample_hash", "eps", "norm", "seed", "epoch")}
    if protocol.get("precision", "fp32") != "fp32":  # low-precision outcomes never join fp32 ones
        keyed["precision"] = protocol["precision"]
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def select_samples(test: Split, n: int | None, seed: int) -> Split:
    """The evaluation's fixed sample set: a seeded, class-balanced subset of the test split."""
    if n is not None and n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    return limit_split(test, n, seed)


@dataclass
class EvaluationTarget:
    """A loaded run ready to attack; `view` is set while the model is held in eval mode."""

    run: dict
    model: torch.nn.Module
    samples: Split
    protocol: dict
    device: torch.device
    view: torch.nn.Module | None = None
    defense: Any = None  # the defense plugin attached to `model` (adaptive attacks read its declarations)


def load_target(store: Store, run_id: str, config: EvalConfig) -> EvaluationTarget:
    """Load a run's selected checkpoint and the seeded, class-balanced test subset."""
    run = store.get_run(run_id)
    train_config = TrainConfig.from_json(run["config"])
    device = select_device(config.device)
    built, card = load_run_model(run, device, config.epoch, train_config.channels_last)
    compile_model(built.model, config.compile)
    dataset = open_dataset(train_config.data, config.data_dir or train_config.data_dir, config.download)
    test = dataset.load("test", limit=config.limit_test, seed=config.seed)
    samples = select_samples(test, config.n, config.seed)
    protocol = {
        "dataset": dataset.info.name,
        "split": "test",
        "n": len(samples),
        "n_requested": config.n,
        "sample_hash": samples.ids_hash(),
        "eps": format_value(Fraction(config.eps)),
        "norm": "Linf",
        "seed": config.seed,
        "epoch": card["epoch"],
        "checkpoint_rule": train_config.selection if config.epoch is None else "explicit epoch",
        "model_mode": "eval",
        "wrapper": "LogitsView (label-free, float32 logits)",
        "precision": precision.precision_name(config.amp),
        "compile": bool(config.compile),
        "device": str(device),
        "batch_size": config.batch_size,
        "limit_test": config.limit_test,
        # One forward is one random draw of a stochastic model: its attacks need EOT (summary warns).
        "stochastic_defense": bool(built.defense.stochastic),
        "versions": library_versions(),
    }
    return EvaluationTarget(run, built.model, samples, protocol, device, defense=built.defense)


def evaluate_run(store: Store, run_id: str, config: EvalConfig, reporter: Reporter | None = None) -> int:
    """Evaluate one run with every attack of `config`; returns the evaluation id."""
    reporter = reporter or SilentReporter()
    config.canonical_attacks()  # bad specs fail before the model is loaded
    config = replace(config, batch_size=batching.check_batch_size(config.batch_size),
                     amp=precision.check_amp(config.amp, config.amp_check_n, select_device(config.device)))
    target = load_target(store, run_id, config)
    asked_auto = config.batch_size == batching.AUTO
    config = replace(config, batch_size=batching.resolve_batch_size(store, target, config))
    target.protocol["batch_size"] = config.batch_size
    context = config.suite_context(store, target.run, target.defense)
    attacks = config.canonical_attacks(context)
    for note in context.notes:
        reporter.message(f"{run_id}: {note}")
    eval_id = store.get_or_create_evaluation(
        run_id, protocol_key(target.protocol), target.protocol, target.samples.ids.tolist()
    )
    shard = config.shard
    if shard.sharded:
        config = replace(config, batch_size=shared_batch_size(store, eval_id, config.batch_size, asked_auto, shard))
        target.protocol["batch_size"] = config.batch_size
        store.register_shard(eval_id, shard.index, shard.count, host_label())
    with eval_mode(target.model) as view:
        target.view = view
        run_clean(store, eval_id, target, config, reporter)
        for index, spec in enumerate(attacks):
            if shard.sharded:
                check_same_order(store, eval_id, [CLEAN, *attacks[:index]], spec, shard)
            run_attack(store, eval_id, target, spec, config, reporter, suite=context.origins.get(spec))
        if shard.leader:  # once per evaluation, on the complete outcomes
            wait_until_complete(store, eval_id, [CLEAN, *attacks], len(target.samples), shard, reporter,
                                config.shard_wait)
            precision.cross_check(store, eval_id, target, config, reporter)  # --amp only; raises if it fails
            if config.checks:
                from advdef.evaluation.checks import run_checks

                run_checks(store, eval_id, target, config, reporter, n_check=config.n_check)
    if shard.sharded:
        store.finish_shard(eval_id, shard.index, shard.count)
    return eval_id


def shared_batch_size(store: Store, eval_id: int, batch_size: int, asked_auto: bool, shard: Shard) -> int:
    """The batch size every shard of an evaluation must use: the one its first process recorded.

    Shards split the batches of one layout, and the batch size draws that layout: a shard with
    another size would leave batches to nobody. `--batch-size auto` adopts the recorded size (two
    GPUs of different memory may probe different ones); a different explicit size is refused.
    """
    recorded = store.get_evaluation(eval_id)["protocol"].get("batch_size")
    if not isinstance(recorded, int) or recorded == batch_size:
        return batch_size
    if asked_auto:
        return recorded
    raise UserError(f"shard {shard} asks for --batch-size {batch_size}, but evaluation {eval_id} runs with batch size "
                    f"{recorded}; every shard must use the same: --batch-size {recorded} (or auto)")


def check_same_order(store: Store, eval_id: int, ran_before: list[str], spec: str, shard: Shard) -> None:
    """Refuse a shard whose attack order differs from the evaluation's: it would wait for an attack
    it has not run yet, while the others wait for it."""
    order = [a["attack"] for a in store.eval_attacks(eval_id)]
    if spec in order and any(a in order and order.index(a) > order.index(spec) for a in ran_before):
        raise UserError(f"shard {shard} runs the attacks in another order than evaluation {eval_id} "
                        f"({', '.join(a.split(':')[0] for a in order)}); start every shard with the same --attacks")


def _batches(positions: torch.Tensor, batch_size: int, shard: Shard = ALL):
    """The batches of `positions` this shard runs: the unsharded layout's, index K-1 mod N."""
    for index, start in enumerate(range(0, len(positions), batch_size)):
        if shard.owns(index):
            yield positions[start : start + batch_size]


def _owned_count(total: int, batch_size: int, shard: Shard) -> int:
    """How many of `total` positions fall in this shard's batches (for progress bars)."""
    return sum(min(batch_size, total - start) for index, start in enumerate(range(0, total, batch_size))
               if shard.owns(index))


def run_clean(store: Store, eval_id: int, target: EvaluationTarget, config: EvalConfig, reporter: Reporter) -> None:
    done = {row["sample_id"] for row in store.outcomes(eval_id, CLEAN)}
    store.start_attack(eval_id, CLEAN, {"implementation": "advdef"})
    samples = target.samples
    # Fixed batches over every sample (a stored batch is skipped), so shards and resumed runs
    # meet the same batches — and a stochastic model the same per-batch seeds — as one whole run.
    everything = torch.arange(len(samples))
    with reporter.task(f"{target.run['run_id']}: clean{_shard_label(config.shard)}",
                       _owned_count(len(samples), config.batch_size, config.shard)) as task:
        for positions in _batches(everything, config.batch_size, config.shard):
            if all(int(sid) in done for sid in samples.ids[positions]):
                task.advance(len(positions))
                continue
            started = time.perf_counter()
            x = prepare(samples.float_images(positions), target.device, True)

            def predict():
                with PassCounter(target.model) as passes, torch.no_grad(), precision.autocast(config.amp, target.device), \
                        seeded_model_rng(config.seed, CLEAN, int(samples.ids[positions[0]])):
                    return target.view(x).argmax(1).cpu(), passes

            predictions, passes = batching.retry_out_of_memory(predict, target.device, config.batch_size, "the clean pass")
            labels = samples.labels[positions]
            rows = [
                (int(sid), int(label), int(pred == label), int(pred))
                for sid, label, pred in zip(samples.ids[positions], labels, predictions)
            ]
            store.record_outcomes(eval_id, CLEAN, rows, time.perf_counter() - started,
                                  forwards=passes.forwards, backwards=passes.backwards)
            task.advance(len(positions))
    store.finish_attack(eval_id, CLEAN, {"implementation": "advdef"})


def _shard_label(shard: Shard) -> str:
    return f" [shard {shard}]" if shard.sharded else ""


def earlier_attacks(store: Store, eval_id: int, spec: str) -> list[str]:
    """The attacks (the clean pass included) that ran before `spec` in this evaluation's order."""
    attacks = store.eval_attacks(eval_id)
    this = next((a for a in attacks if a["attack"] == spec), None)
    return [a["attack"] for a in attacks if a["attack"] != spec and (this is None or a["position"] < this["position"])]


def eligible_positions(store: Store, eval_id: int, target: EvaluationTarget, earlier: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions to attack, positions skipped): skipped = clean-wrong or broken by an `earlier` attack."""
    positions_of = {int(sid): i for i, sid in enumerate(target.samples.ids.tolist())}
    alive = torch.zeros(len(target.samples), dtype=torch.bool)
    for row in store.outcomes(eval_id, CLEAN):
        if row["robust"] == 1 and row["sample_id"] in positions_of:
            alive[positions_of[row["sample_id"]]] = True
    for attack in earlier:
        if attack == CLEAN:
            continue
        for row in store.outcomes(eval_id, attack):
            if row["robust"] == 0 and row["sample_id"] in positions_of:
                alive[positions_of[row["sample_id"]]] = False
    return torch.nonzero(alive).flatten(), torch.nonzero(~alive).flatten()


def run_attack(
    store: Store, eval_id: int, target: EvaluationTarget, spec: str, config: EvalConfig, reporter: Reporter,
    suite: str | None = None,
) -> None:
    """Run one attack on the samples still robust; `suite` names the suite it came from (e.g.
    "paper": the report labels the paper's own protocol as such)."""
    attack = ATTACKS.create(spec, eps=Fraction(config.eps))
    # Gradient samples per step (Expectation over Transformation); 1 for attacks without EOT.
    details = {"implementation": attack.implementation, "eps": target.protocol["eps"], "eot": getattr(attack, "eot", 1),
               "batch_size": config.batch_size}
    if suite is not None:
        details["suite"] = suite
    store.start_attack(eval_id, spec, details)
    if any(a["attack"] == spec and a["status"] == "done" for a in store.eval_attacks(eval_id)):
        return
    # Which samples are still robust depends on every shard's outcomes of the earlier attacks.
    earlier = earlier_attacks(store, eval_id, spec)
    wait_until_complete(store, eval_id, earlier, len(target.samples), config.shard, reporter, config.shard_wait)
    attack_positions, skipped = eligible_positions(store, eval_id, target, earlier)
    samples = target.samples
    done = {row["sample_id"] for row in store.outcomes(eval_id, spec)}
    skipped_rows = [
        (int(samples.ids[p]), int(samples.labels[p]), None, None) for p in skipped.tolist()
        if int(samples.ids[p]) not in done
    ]
    if skipped_rows:
        store.record_outcomes(eval_id, spec, skipped_rows, 0.0)
    if len(attack_positions):
        attack.bind(AttackContext(model=target.model, defense=target.defense, run=target.run,
                                  device=target.device, store=store))
    warnings: list[str] = []
    label = f"{target.run['run_id']}: {spec.split(':')[0]}{_shard_label(config.shard)}"
    with reporter.task(label, _owned_count(len(attack_positions), config.batch_size, config.shard)) as task:
        broken_total = 0
        for positions in _batches(attack_positions, config.batch_size, config.shard):
            ids = samples.ids[positions]
            if int(ids[0]) in done:  # this batch was stored before an interruption
                task.advance(len(positions))
                continue
            started = time.perf_counter()
            x = prepare(samples.float_images(positions), target.device, True)
            y = samples.labels[positions].to(target.device)

            def craft():  # the whole batch from its seeds, so an out-of-memory retry redoes it exactly
                # The batch's cost: the attack's passes and the re-scoring forward of its output.
                with PassCounter(target.model) as passes, seeded_model_rng(config.seed, spec, int(ids[0])), \
                        precision.autocast(config.amp, target.device):
                    x_adv = attack(target.view, x, y, seed=batch_seed(config.seed, spec, int(ids[0])))
                    check_budget(x, x_adv, float(config.eps))
                    with torch.no_grad():
                        return target.view(x_adv).argmax(1), passes

            predictions, passes = batching.retry_out_of_memory(craft, target.device, config.batch_size, f"attack {spec}")
            robust = (predictions == y).cpu()
            warnings.extend(getattr(attack, "warnings", []))
            rows = [
                (int(sid), int(label), int(ok), int(pred))
                for sid, label, ok, pred in zip(ids, y.cpu(), robust, predictions.cpu())
            ]
            store.record_outcomes(eval_id, spec, rows, time.perf_counter() - started,
                                  forwards=passes.forwards, backwards=passes.backwards)
            broken_total += int((~robust).sum())
            task.advance(len(positions), status=f"broken {broken_total}")
    details["warnings"] = sorted(set(warnings))
    store.finish_attack(eval_id, spec, details)

