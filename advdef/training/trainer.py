"""The training loop: any AT method x any defense x any architecture, resumable per epoch.

Every epoch's randomness (shuffling, augmentation, the training attack's random starts) comes
from a generator seeded by (run seed, epoch), so a run resumed from epoch k's checkpoint
continues exactly as the uninterrupted run would have. The best epoch is chosen on the
validation split carved from train; the test split is never looked at.

Under torchrun every rank runs this same code (a single process is rank 0 of 1): each trains on
its share of every global batch, gradients are averaged by DistributedDataParallel, and rank 0
alone writes the store and the checkpoints (`advdef.training.distributed`; docs/training.md).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from advdef.attacks.base import eval_mode
from advdef.data.base import LoadedData, Split, WaitClock, iterate_batches, load_for_training, pin_batch, prefetch
from advdef.device import autocast, compile_model, grad_scaler, memory_format, prepare, select_device
from advdef.errors import UserError
from advdef.models import BuiltModel, build_model
from advdef.progress import Reporter, SilentReporter
from advdef.registry import ATTACKS, DATASETS, TRAINING
from advdef.store import Store
from advdef.training import checkpoint
from advdef.training.config import TrainConfig
from advdef.training.distributed import (
    SINGLE,
    BatchShare,
    DistributedContext,
    GradientSync,
    current_context,
    gradient_sync,
    rank_seed,
    sharing,
)
from advdef.training.sync_bn import convert_sync_batchnorm
from advdef.versions import library_versions


# Batches prepared ahead of the model (0: on the training thread). A `prefetch` field of the
# config, when it has one, overrides it; prefetching never changes the batches.
PREFETCH_BATCHES = 2


def new_run_id(config: TrainConfig) -> str:
    parts = [spec.split(":")[0] for spec in (config.arch, config.defense, config.at)]
    return "-".join(parts + [secrets.token_hex(3)])


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


@dataclass
class TrainingSession:
    """What one training process holds: data, model, optimizer, plugins, its place in the job."""

    config: TrainConfig
    data: LoadedData
    built: BuiltModel
    method: object
    optimizer: torch.optim.Optimizer
    device: torch.device
    dist: DistributedContext = SINGLE
    # Each step's loss passes through it before backward (gradient averaging over ranks).
    sync: GradientSync = field(default=lambda loss: loss)


def start_run(config: TrainConfig, store: Store | None, runs_dir: Path | None, reporter: Reporter | None = None, *,
              dist: DistributedContext | None = None) -> str:
    """Create a run in the store and train it to the end; returns its run id.

    Under torchrun (`dist`, by default the joined process group's context) rank 0 creates the
    run and every rank trains it; other ranks may pass store and runs_dir None.
    """
    config.validate()
    dist = dist or current_context()
    run_id = dist.on_main(lambda: _insert_run(config, store, runs_dir))
    train(run_id, store, reporter, dist=dist)
    return run_id


def _insert_run(config: TrainConfig, store: Store | None, runs_dir: Path | None) -> str:
    if store is None or runs_dir is None:
        raise ValueError("rank 0 needs the store and the runs directory")
    dataset = open_dataset(config.data, config.data_dir, config.download)
    run_id = new_run_id(config)
    run_dir = Path(runs_dir) / run_id
    store.insert_run(
        {
            "run_id": run_id,
            "status": "training",
            "dataset": dataset.info.name,
            "arch": config.arch,
            "defense": config.defense,
            "at_method": config.at,
            "seed": config.seed,
            "run_dir": str(run_dir),
            "config": config.to_json(),
            "versions": library_versions(),
        }
    )
    return run_id


def open_dataset(spec: str, data_dir: str | None = None, download: bool = False):
    """Create a dataset plugin, passing --data-dir/--download only to plugins that take them."""
    accepted = set(DATASETS.resolve(spec)[1])
    options = {"data_dir": data_dir, "download": download}
    return DATASETS.create(spec, **{k: v for k, v in options.items() if k in accepted})


def _session(config: TrainConfig, dist: DistributedContext = SINGLE) -> TrainingSession:
    device = dist.device(select_device(config.device))
    dataset = open_dataset(config.data, config.data_dir, config.download)
    data = load_for_training(dataset, limit_train=config.limit_train, val_fraction=config.val_fraction, seed=config.seed)
    check_world_size(config.batch_size, len(data.train), dist.world_size)
    torch.manual_seed(config.seed)  # weight initialisation (the same on every rank; DDP copies rank 0's anyway)
    built = build_model(config.arch, data.info, config.defense, config.dual_bn_setting)
    if config.sync_bn and dist.is_distributed:
        convert_sync_batchnorm(built.model)  # same state_dict keys: checkpoints load into the plain model
    built.model.to(device, memory_format=memory_format(config.channels_last))
    compile_model(built.model, config.compile)  # in place: state_dict keys unchanged
    method = TRAINING.create(config.at)
    optimizer = build_optimizer(config, built.model.parameters())
    return TrainingSession(config, data, built, method, optimizer, device, dist)


def check_world_size(batch_size: int, n_train: int, world_size: int) -> None:
    """Every rank needs at least one example of every global batch (the last one included)."""
    if world_size <= 1:
        return
    if batch_size < world_size:
        raise UserError(f"--batch-size {batch_size} is smaller than the {world_size} processes; "
                        "each process needs at least one example per batch")
    last = n_train % batch_size
    if 0 < last < world_size:
        raise UserError(f"the last batch of each epoch ({n_train} training examples, batch {batch_size}) has {last} "
                        f"example(s) for {world_size} processes; change --batch-size or --limit-train")


def build_optimizer(config: TrainConfig, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the config names. One parameter group: the papers' code decays every weight
    (defense modules, BN and biases included). The LR set here is replaced every epoch by lr_at."""
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.nesterov)


def card_for(run: dict, session: TrainingSession) -> dict:
    """The JSON card stored beside each checkpoint: enough to rebuild the model alone."""
    config = session.config
    return {
        "run_id": run["run_id"],
        "arch": session.built.arch_spec,
        "defense": session.built.defense_spec,
        "at": TRAINING.canonical(config.at),
        "dual_bn": config.dual_bn_setting,
        "data": session.data.info.to_json(),
        "seed": config.seed,
        "config": config.to_json(),
        "versions": library_versions(),
        "params_total": session.built.params_total,
        "params_added": session.built.params_added,
    }


def train(run_id: str, store: Store | None, reporter: Reporter | None = None, *,
          dist: DistributedContext | None = None) -> None:
    """Train (or resume) run `run_id` from its last complete checkpoint to its last epoch.

    Under torchrun every rank calls this; rank 0 reads the run and picks the checkpoint to resume
    from (every rank loads it: the runs directory must be on a filesystem all nodes share), and
    alone writes checkpoints, store rows and progress (other ranks may pass store None).
    """
    dist = dist or current_context()
    reporter = (reporter or SilentReporter()) if dist.is_main else SilentReporter()
    run = dist.on_main(lambda: _trainable_run(store, run_id))
    config = TrainConfig.from_json(run["config"]).validate()
    run_dir = Path(run["run_dir"])
    session = _session(config, dist)
    start_epoch = 0
    latest = dist.broadcast_object(checkpoint.latest_complete(run_dir) if dist.is_main else None)
    if latest is not None:
        session.built.model.load_state_dict(checkpoint.load_weights(latest))
        checkpoint.load_optimizer_state(latest, session.optimizer)
        start_epoch = checkpoint.read_card(latest)["epoch"]
        reporter.message(f"resuming {run_id} after epoch {start_epoch}")
    session.sync = gradient_sync(session.built.model, dist)  # after loading: DDP starts from rank 0's state
    if dist.is_main:
        store.update_run(run_id, status="training")
        if dist.is_distributed:
            synchronised = ", synchronised BatchNorm" if config.sync_bn else ""
            reporter.message(f"data-parallel: {dist.world_size} processes ({dist.backend}), "
                             f"{config.batch_size} examples per global batch{synchronised}")
    card = card_for(run, session)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        train_metrics = train_epoch(session, epoch, reporter)
        train_seconds = time.perf_counter() - started
        val_metrics = validate(session, reporter)
        seconds = time.perf_counter() - started
        metrics = {
            **train_metrics,
            **val_metrics,
            "lr": config.lr_at(epoch),
            "train_seconds": train_seconds,
            "epoch_seconds": seconds,
            "train_images_per_s": len(session.data.train) / train_seconds,
        }
        if dist.is_main:
            _record_epoch(store, run_id, run_dir, session, card, epoch, metrics, seconds, reporter)
        dist.barrier()  # the epoch's checkpoint is complete before any rank goes on
    if dist.is_main:
        store.update_run(run_id, status="trained")


def _trainable_run(store: Store | None, run_id: str) -> dict:
    if store is None:
        raise ValueError("rank 0 needs the store")
    run = store.get_run(run_id)
    if run["config"].get("imported"):
        raise UserError(f"run '{run_id}' was imported with `advdef import`; it cannot be trained or resumed")
    return run


def _record_epoch(store: Store, run_id: str, run_dir: Path, session: TrainingSession, card: dict, epoch: int,
                  metrics: dict[str, float], seconds: float, reporter: Reporter) -> None:
    """Rank 0's bookkeeping after an epoch: checkpoint, store rows, pruning, the progress line."""
    config = session.config
    card_path = checkpoint.save_checkpoint(run_dir, epoch, session.built.model, session.optimizer, card)
    store.record_checkpoint(run_id, epoch, str(card_path), metrics, seconds)
    best = best_epoch(store.checkpoints(run_id), config.selection)
    store.update_run(run_id, epochs_done=epoch, best_epoch=best,
                     train_seconds=store.get_run(run_id)["train_seconds"] + seconds)
    prune_checkpoints(run_dir, keep={best, epoch})
    reporter.message(
        f"epoch {epoch}/{config.epochs}: loss {metrics['train_loss']:.4f} train acc {metrics['train_acc']:.3f} "
        f"val clean {metrics['val_clean']:.3f}"
        + (f" val robust {metrics['val_robust']:.3f}" if "val_robust" in metrics else "")
        + f" ({seconds:.1f}s, {metrics['train_images_per_s']:.0f} img/s)"
    )


def train_epoch(session: TrainingSession, epoch: int, reporter: Reporter) -> dict[str, float]:
    config, model, dist = session.config, session.built.model, session.dist
    for group in session.optimizer.param_groups:
        group["lr"] = config.lr_at(epoch)
    # Batch-wide randomness (the attack's starts) comes from this generator, the same on every
    # rank: each draws for the global batch and keeps its rows (advdef.training.inner.example_noise).
    generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
    # Stochastic defense modules (e.g. FSR's Gumbel noise) draw from the global RNG: seed it per
    # epoch too, so a resumed run repeats the uninterrupted run's draws (per rank: `rank_seed`).
    torch.manual_seed(rank_seed(epoch_seed(config.seed, epoch), dist.rank))
    scaler = grad_scaler(session.device, config.amp)
    train = session.data.train
    global_sizes = [min(config.batch_size, len(train) - start) for start in range(0, len(train), config.batch_size)]
    total_loss, correct, seen = 0.0, 0, 0
    model.train()
    # Batch i+1 is shuffled, augmented and assembled (and pinned, on CUDA) on a background thread
    # while the model trains on batch i; the producer draws from iterate_batches' own seeded
    # generator in the sequential order, so the batches are bit-identical to unprefetched ones.
    # Each rank draws every global batch and keeps its share (all of it when alone).
    batches = prefetch(
        iterate_batches(train, config.batch_size, shuffle=True, seed=epoch_seed(config.seed, epoch),
                        augment=session.data.info.augment, shard=(dist.rank, dist.world_size)),
        depth=getattr(config, "prefetch", PREFETCH_BATCHES),
        transform=partial(pin_batch, device=session.device) if session.device.type == "cuda" else None,
    )
    with reporter.task(f"epoch {epoch}/{config.epochs}", len(global_sizes)) as task, closing(batches):
        waiting = WaitClock(batches)
        for (x, y, _), global_size in zip(waiting, global_sizes):
            share = BatchShare.of(global_size, dist)
            x, y = prepare(x, session.device, config.channels_last), prepare(y, session.device, False)
            # Forwards feed the parameter update unless the method's crafting marks them "attack".
            with sharing(share), autocast(session.device, config.amp), model.phase("update"):
                loss, logits = session.method.loss(model, x, y, session.built.defense, generator)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training loss became {loss.item()} at epoch {epoch}; lower --lr")
            session.optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: scaling each rank's mean loss by its share of the
            # global batch makes that average the global batch mean's gradient, uneven shares included.
            update_loss = loss if share.loss_scale == 1.0 else loss * share.loss_scale
            scaler.scale(session.sync(update_loss)).backward()
            scaler.step(session.optimizer)
            scaler.update()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            task.advance(1, status=f"loss {total_loss / seen:.3f} acc {correct / seen:.3f}")
    total_loss, correct, seen = dist.all_reduce_sum([total_loss, correct, seen])
    return {"train_loss": total_loss / seen, "train_acc": correct / seen, "data_wait_seconds": waiting.waited}


def validate(session: TrainingSession, reporter: Reporter) -> dict[str, float]:
    """Clean (and, when selection needs it, PGD) accuracy on the validation split."""
    config = session.config
    val: Split = session.data.val
    if len(val) > config.val_n:
        val = val.subset(torch.arange(config.val_n))
    needs_robust = config.selection == "val_robust"
    attack = ATTACKS.create(config.val_attack, eps=_training_eps(session)) if needs_robust else None
    clean = robust = 0
    dist = session.dist
    with eval_mode(session.built.model) as view:
        for index, (x, y, _) in enumerate(iterate_batches(val, 256)):
            if index % dist.world_size != dist.rank:  # ranks share the batches (each attack is seeded per batch)
                continue
            x, y = prepare(x, session.device, config.channels_last), y.to(session.device)
            with torch.no_grad():
                clean += int((view(x).argmax(1) == y).sum())
            if attack is not None:
                x_adv = attack(view, x, y, seed=config.seed)
                with torch.no_grad():
                    robust += int((view(x_adv).argmax(1) == y).sum())
    clean, robust = dist.all_reduce_sum([clean, robust])
    metrics = {"val_clean": clean / len(val)}
    if attack is not None:
        metrics["val_robust"] = robust / len(val)
    return metrics


def _training_eps(session: TrainingSession):
    from advdef.attacks.pgd import EIGHT_255

    return getattr(session.method, "eps", EIGHT_255)


def best_epoch(checkpoints: list[dict], rule: str) -> int:
    """The selected epoch: highest validation metric (latest on ties), or the last epoch."""
    if not checkpoints:
        raise ValueError("no checkpoints")
    if rule == "last":
        return checkpoints[-1]["epoch"]
    key = "val_robust" if rule == "val_robust" else "val_clean"
    best = max(checkpoints, key=lambda c: (c["metrics"].get(key, -1.0), c["epoch"]))
    return best["epoch"]


def prune_checkpoints(run_dir: Path, keep: set[int]) -> None:
    """Delete checkpoint files of epochs that are neither the best nor the latest (metrics stay in the store)."""
    for card in run_dir.glob("epoch-*.json"):
        epoch = int(card.stem.split("-")[1])
        if epoch not in keep:
            for path in checkpoint.paths(run_dir, epoch).values():
                path.unlink(missing_ok=True)


def load_run_model(run: dict, device: torch.device, epoch: int | None = None, channels_last: bool = True) -> tuple[BuiltModel, dict]:
    """Rebuild a run's model from the card of its best (or the given) epoch, in eval mode."""
    from advdef.data.base import DataInfo

    chosen = epoch if epoch is not None else run["best_epoch"]
    if chosen is None:
        raise UserError(f"run '{run['run_id']}' has no finished epoch yet; train or resume it first")
    card_path = checkpoint.paths(Path(run["run_dir"]), chosen)["card"]
    if not card_path.exists():
        raise UserError(f"checkpoint of epoch {chosen} of run '{run['run_id']}' is missing at {card_path}")
    card = checkpoint.read_card(card_path)
    if card.get("imported"):  # `advdef import`: possibly a user factory model (advdef.importing)
        from advdef.importing.models import build_from_card

        built = build_from_card(card)
        # A user's network may reshape with .view, which channels_last activations break.
        channels_last = channels_last and not card["imported"].get("model")
    else:
        built = build_model(card["arch"], DataInfo.from_json(card["data"]), card["defense"], card.get("dual_bn", "off"))
    built.model.load_state_dict(checkpoint.load_weights(card_path))
    built.model.to(device, memory_format=memory_format(channels_last)).eval()
    return built, card
