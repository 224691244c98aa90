"""Data-parallel training (issue 10): 2 CPU processes on gloo train what one process trains.

The processes are real: `torchrun` running the CLI, or torch.multiprocessing with a gloo group.
Every launch has a timeout, so a rank waiting in a collective fails the test instead of hanging.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from advdef.cli import app
from advdef.data.base import Split, iterate_batches, shard_bounds
from advdef.errors import UserError
from advdef.store import Store
from advdef.training import checkpoint
from advdef.training.distributed import BatchShare, DistributedContext, rank_seed, sharing
from advdef.training.inner import start_point
from advdef.training.trainer import check_world_size

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 600  # seconds for one training launch; a hang fails instead of blocking the suite
runner = CliRunner()

# The equality run: SmallCNN (BatchNorm) on digits, PGD-AT with its random start, the dataset's
# crop augmentation, 117 training images in batches of 64 (the last batch has 53: 27 + 26 per
# rank), milestones none so the schedule does not depend on --epochs (the resume test shortens it).
TRAIN_ARGS = ["train", "--data", "digits", "--arch", "smallcnn:width=8", "--at", "pgd_at:steps=2",
              "--limit-train", "130", "--batch-size", "64", "--epochs", "2", "--milestones", "none",
              "--seed", "3", "--device", "cpu", "--no-channels-last"]
N_TRAIN, N_VAL = 117, 13
# Float tolerance on the final weights (|w| ~ 0.1). Sums run in a different order on 2 ranks
# (BatchNorm statistics, gradient all-reduce): ~1e-7 per step. PGD's sign() turns an input
# gradient component within that noise of 0 into a flipped pixel (a discrete change of 2 alpha),
# measured at ~2e-5..6e-5 on these weights when it happens; a real error (e.g. BatchNorm not
# synchronised) moves them by ~1e-2.
WEIGHT_TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(args)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-6000:]}"
    return result


def run_id_of(store_path: Path) -> str:
    with Store(store_path) as store:
        (run,) = store.runs()
        return run["run_id"]


def final_weights(store_path: Path, run_id: str) -> dict[str, torch.Tensor]:
    with Store(store_path) as store:
        run = store.get_run(run_id)
        return load_file(str(checkpoint.paths(Path(run["run_dir"]), run["epochs_done"])["weights"]))


def epoch_metrics(store_path: Path, run_id: str) -> list[dict]:
    with Store(store_path) as store:
        return [c["metrics"] for c in store.checkpoints(run_id)]


@pytest.fixture(scope="module")
def equality_runs(tmp_path_factory) -> dict[str, Path]:
    """The same run trained by `python -m advdef train` and by torchrun with 2 gloo processes."""
    root = tmp_path_factory.mktemp("ddp")
    single, ddp = root / "single.sqlite", root / "ddp.sqlite"
    launch([sys.executable, "-m", "advdef", *TRAIN_ARGS, "--store", str(single)], root)
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "advdef", "--", *TRAIN_ARGS, "--sync-bn", "--store", str(ddp)], root)
    return {"single": single, "ddp": ddp, "root": root}


def test_ddp_under_torchrun_trains_the_single_process_weights(equality_runs):
    single, ddp = equality_runs["single"], equality_runs["ddp"]
    single_id, ddp_id = run_id_of(single), run_id_of(ddp)
    a, b = final_weights(single, single_id), final_weights(ddp, ddp_id)
    assert a.keys() == b.keys()  # SyncBatchNorm keeps the plain model's checkpoint keys
    difference = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"\nmax |w_single - w_ddp| over {len(a)} tensors after 2 epochs: {difference:.3e} (tolerance {WEIGHT_TOLERANCE})")
    assert difference < WEIGHT_TOLERANCE
    for key in a:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(a[key], b[key])
    with Store(ddp) as store:
        assert store.get_run(ddp_id)["config"]["sync_bn"] is True
    for one, two in zip(epoch_metrics(single, single_id), epoch_metrics(ddp, ddp_id), strict=True):
        print({k: (round(one[k], 6), round(two[k], 6)) for k in ("train_loss", "train_acc", "val_clean", "val_robust")})
        assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-4)
        assert abs(two["train_acc"] - one["train_acc"]) <= 1 / N_TRAIN + 1e-9
        assert abs(two["val_clean"] - one["val_clean"]) <= 1 / N_VAL + 1e-9
        assert abs(two["val_robust"] - one["val_robust"]) <= 1 / N_VAL + 1e-9


def test_resume_under_ddp_continues_exactly(equality_runs):
    """`advdef train --nproc 2` (re-launched under torchrun) for 1 epoch, then `--resume --nproc 2`
    to epoch 2: bit-identical to the uninterrupted 2-epoch DDP run."""
    root = equality_runs["root"]
    store_path = root / "resumed.sqlite"
    args = [arg if arg != "2" or previous != "--epochs" else "1" for previous, arg in zip([""] + TRAIN_ARGS, TRAIN_ARGS)]
    launch([sys.executable, "-m", "advdef", *args, "--sync-bn", "--nproc", "2", "--store", str(store_path)], root)
    run_id = run_id_of(store_path)
    with Store(store_path) as store:
        assert store.get_run(run_id)["epochs_done"] == 1
        config = store.get_run(run_id)["config"]
        store.update_run(run_id, config={**config, "epochs": 2})  # as if interrupted after epoch 1 of 2
    result = launch([sys.executable, "-m", "advdef", "train", "--resume", run_id, "--nproc", "2",
                     "--store", str(store_path)], root)
    assert f"resuming {run_id} after epoch 1" in result.stderr
    resumed = final_weights(store_path, run_id)
    straight = final_weights(equality_runs["ddp"], run_id_of(equality_runs["ddp"]))
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    with Store(store_path) as store:
        assert store.get_run(run_id)["status"] == "trained" and store.get_run(run_id)["epochs_done"] == 2


# -- the sampler and the batch-wide draws, without processes ---------------------------------


def test_shards_of_each_global_batch_concatenate_to_the_unsharded_batch():
    generator = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (103, 3, 8, 8), dtype=torch.uint8, generator=generator), torch.arange(103) % 10)
    whole = list(iterate_batches(split, 32, shuffle=True, seed=5, augment="crop_flip"))
    shards = [list(iterate_batches(split, 32, shuffle=True, seed=5, augment="crop_flip", shard=(r, 3))) for r in range(3)]
    assert [len(b[1]) for b in whole] == [32, 32, 32, 7]
    for index, (x, y, ids) in enumerate(whole):
        parts = [shard[index] for shard in shards]
        assert [len(p[1]) for p in parts] == [shard_bounds(len(y), r, 3)[1] - shard_bounds(len(y), r, 3)[0] for r in range(3)]
        assert max(len(p[1]) for p in parts) - min(len(p[1]) for p in parts) <= 1
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y) and torch.equal(torch.cat([p[2] for p in parts]), ids)


@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_attack_starts_of_all_ranks_are_the_single_process_draw(start):
    x = torch.rand(11, 1, 4, 4)
    single_generator = torch.Generator().manual_seed(9)
    expected = start_point(x, start, 0.1, single_generator)
    after = torch.rand(3, generator=single_generator)
    parts = []
    for rank in range(3):
        share = BatchShare.of(11, DistributedContext(rank=rank, world_size=3))
        generator = torch.Generator().manual_seed(9)
        with sharing(share):
            parts.append(start_point(x[share.offset : share.offset + share.size], start, 0.1, generator))
        assert torch.equal(torch.rand(3, generator=generator), after)  # every rank's generator stays in step
    assert torch.equal(torch.cat(parts), expected)


def test_loss_scale_and_rank_seeds():
    shares = [BatchShare.of(53, DistributedContext(rank=r, world_size=2)) for r in range(2)]
    assert [(s.offset, s.size) for s in shares] == [(0, 27), (27, 26)]
    # DDP averages the ranks' gradients: (sum_r scale_r * mean_r) / 2 must be the global mean.
    assert [s.loss_scale for s in shares] == pytest.approx([27 * 2 / 53, 26 * 2 / 53])
    assert BatchShare.of(64).loss_scale == 1.0
    assert rank_seed(123, 0) == 123 and len({rank_seed(123, r) for r in range(4)}) == 4


def test_bad_world_size_combinations_are_one_line_errors(monkeypatch):
    check_world_size(64, 117, 2)  # 64 + 53: fine
    with pytest.raises(UserError, match="smaller than the 4 processes"):
        check_world_size(2, 100, 4)
    with pytest.raises(UserError, match="last batch"):
        check_world_size(64, 129, 2)  # the last batch has 1 example for 2 processes
    result = runner.invoke(app, ["train", "--nproc", "1"])
    assert result.exit_code == 2 and "--nproc must be at least 2" in result.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["train", "--nproc", "2"])
    assert result.exit_code == 2 and "already runs under torchrun" in result.output


def test_nproc_relaunches_the_same_command_under_torchrun(monkeypatch):
    launched = []

    def fake_run(command, check):
        launched.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    result = runner.invoke(app, ["train", "--epochs", "3", "--nproc", "2", "--no-amp", "--sync-bn", "--at",
                                 "pgd_at:steps=2", "--compile"])
    assert result.exit_code == 0, result.output
    (command,) = launched
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    arguments = command[6:]
    assert arguments[:3] == ["advdef", "--", "train"] and "--nproc" not in arguments  # `--`: see launch.py
    pairs = {arguments[i]: arguments[i + 1] for i in range(3, len(arguments) - 1)}
    assert pairs["--epochs"] == "3" and pairs["--at"] == "pgd_at:steps=2"
    assert {"--no-amp", "--sync-bn", "--compile"} <= set(arguments) and "--device" not in arguments


# -- real process groups via torch.multiprocessing (gloo) ------------------------------------


def run_ranks(target, args: tuple, world_size: int = 2, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Run target(rank, *args) in `world_size` fresh processes; fail (never hang) after `timeout`."""
    import torch.multiprocessing as mp

    context = mp.spawn(target, args=args, nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {timeout} s")


def _join_group(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


SYNC_BN_ROWS = (5, 3)  # uneven shares of an 8-row batch


SYNC_BN_SHAPES = (("2d", (8, 4, 3, 3)), ("1d", (8, 6)))


def _plain_batchnorm(name: str) -> torch.nn.Module:
    """The reference BatchNorm of a SyncBN test, with the same non-trivial affine on every rank."""
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4) if name == "2d" else torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    return plain


def _global_batch(shape: tuple[int, ...], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, upstream gradient) of the global batch at `step`, the same on every rank."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(shape, generator=generator) * 3 + 2
    return x, torch.randn(shape, generator=generator)


def _sync_bn_rank(rank: int, port: int, folder: str) -> None:
    from advdef.training.sync_bn import SyncBatchNorm

    _join_group(rank, 2, port)
    results = {}
    for name, shape in SYNC_BN_SHAPES:
        layer = SyncBatchNorm.from_batchnorm(_plain_batchnorm(name))
        start = sum(SYNC_BN_ROWS[:rank])
        rows = slice(start, start + SYNC_BN_ROWS[rank])
        for step in range(2):  # two steps: running statistics and num_batches_tracked advance twice
            x_global, upstream = _global_batch(shape, step)
            x = x_global[rows].clone().requires_grad_(True)
            layer.zero_grad()
            out = layer(x)
            (out * upstream[rows]).sum().backward()
            grads = torch.stack([layer.weight.grad, layer.bias.grad])
            torch.distributed.all_reduce(grads)  # the parameter gradient of the global loss
            results[(name, step)] = {"out": out.detach(), "x_grad": x.grad, "param_grad": grads}
        results[(name, "running")] = [layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()]
        layer.eval()
        results[(name, "eval")] = layer(x_global[rows]).detach()
    torch.save(results, f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_sync_batchnorm_matches_batchnorm_on_the_concatenated_batch(tmp_path):
    run_ranks(_sync_bn_rank, (free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, shape in SYNC_BN_SHAPES:
        plain = _plain_batchnorm(name)
        for step in range(2):
            x, upstream = _global_batch(shape, step)
            x.requires_grad_(True)
            plain.zero_grad()
            out = plain(x)
            (out * upstream).sum().backward()
            got = {key: torch.cat([ranks[r][(name, step)][key] for r in range(2)]) for key in ("out", "x_grad")}
            torch.testing.assert_close(got["out"], out.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["x_grad"], x.grad, atol=1e-5, rtol=1e-5)
            for r in range(2):
                torch.testing.assert_close(ranks[r][(name, step)]["param_grad"],
                                           torch.stack([plain.weight.grad, plain.bias.grad]), atol=1e-5, rtol=1e-5)
        for r in range(2):
            mean, var, tracked = ranks[r][(name, "running")]
            torch.testing.assert_close(mean, plain.running_mean, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(var, plain.running_var, atol=1e-6, rtol=1e-6)
            assert int(tracked) == int(plain.num_batches_tracked) == 2
        plain.eval()
        with torch.no_grad():
            reference = plain(x.detach())
        eval_out = torch.cat([ranks[r][(name, "eval")] for r in range(2)])
        torch.testing.assert_close(eval_out, reference, atol=1e-6, rtol=1e-6)


# TRADES' own start (x + 0.001 N(0,1)) makes its first KL gradient float noise, whose sign differs
# with the batch size the convolutions run at (logits differ by ~1e-8 for 13 vs 7 images); its
# normal draw is checked above, and here MART takes it.
CRAFTING = ("pgd_at:steps=3,bn_mode=eval", "trades:steps=3,start=uniform", "mart:steps=3,start=normal",
            "fat:steps=6,omega=0.05")


def _crafting_case(at: str, share: BatchShare | None):
    """The training attack of `at` on this process's rows of a fixed 13-image batch (eval-mode
    crafting: no BatchNorm coupling, so every rank's rows are exactly the single-process rows)."""
    from advdef.data.base import DataInfo
    from advdef.models import build_model
    from advdef.registry import TRAINING

    info = DataInfo("digits", (1, 16, 16), 10, tuple("0123456789"), (0.5,), (0.5,), "crop")
    torch.manual_seed(0)
    built = build_model("smallcnn:width=4", info, "none", "off")
    built.model.train()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(13, 1, 16, 16, generator=generator), torch.randint(0, 10, (13,), generator=generator)
    if share is None:
        return TRAINING.create(at).craft(built.model, x, y, built.defense, generator)
    rows = slice(share.offset, share.offset + share.size)
    with sharing(share):
        return TRAINING.create(at).craft(built.model, x[rows], y[rows], built.defense, generator)


def _crafting_rank(rank: int, port: int, folder: str) -> None:
    _join_group(rank, 2, port)
    context = DistributedContext(rank=rank, world_size=2)
    torch.save({at: _crafting_case(at, BatchShare.of(13, context)) for at in CRAFTING}, f"{folder}/craft{rank}.pt")
    torch.distributed.destroy_process_group()


def test_training_attacks_of_two_ranks_are_the_single_process_attack(tmp_path):
    """Random starts (uniform and normal) and FAT's per-step noise over the examples still running
    on any rank: the ranks' rows concatenate to the single-process result, bit for bit."""
    run_ranks(_crafting_rank, (free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"craft{r}.pt", weights_only=True) for r in range(2)]
    for at in CRAFTING:
        assert torch.equal(torch.cat([ranks[0][at], ranks[1][at]]), _crafting_case(at, None)), at


def test_conversion_keeps_checkpoint_keys_and_reaches_dual_batchnorm():
    from advdef.data.base import DataInfo
    from advdef.models import build_model
    from advdef.training.sync_bn import SyncBatchNorm, convert_sync_batchnorm

    info = DataInfo("digits", (1, 16, 16), 10, tuple("0123456789"), (0.5,), (0.5,), "crop")
    plain = build_model("smallcnn:width=4", info, "fsr", "clean").model
    converted = build_model("smallcnn:width=4", info, "fsr", "clean").model
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    count = convert_sync_batchnorm(converted)
    assert count > 0 and sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == count
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in converted.modules())
    assert converted.state_dict().keys() == before.keys()
    plain.load_state_dict(converted.state_dict())  # a DDP checkpoint loads into the plain model
    x = torch.rand(4, 1, 16, 16)
    plain.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), atol=0, rtol=0)  # alone / eval: exactly nn.BatchNorm


# Every seed defense under PGD-AT and TRADES, the other methods, dual BatchNorm, without --sync-bn.
MATRIX = [(defense, at, {}) for defense in ("none", "cas", "cifs", "denoise", "ewas", "fsr", "smooth", "randomize")
          for at in ("pgd_at:steps=1", "trades:steps=1")]
MATRIX += [("cas", "mart:steps=1", {}), ("ewas", "fat:steps=3,bn_mode=train", {}), ("cifs", "fat:steps=3", {}),
           ("fsr", "advprop:steps=1", {}), ("none", "pgd_at:steps=1", {"dual_bn": "clean"}),
           ("cas", "standard", {}), ("fsr", "trades:steps=1", {"sync_bn": False})]


def _matrix_rank(rank: int, port: int, out: str) -> None:
    from advdef.training import trainer
    from advdef.training.config import TrainConfig

    _join_group(rank, 2, port)
    validate, case = trainer.validate, {}

    def validate_and_keep_weights(session, reporter):  # every rank validates after its epoch
        torch.save(session.built.model.state_dict(), f"{out}/case{case['index']}-rank{rank}.pt")
        return validate(session, reporter)

    trainer.validate = validate_and_keep_weights
    store = Store(f"{out}/matrix.sqlite") if rank == 0 else None
    for index, (defense, at, extra) in enumerate(MATRIX):
        case["index"] = index
        config = TrainConfig(data="digits", arch="smallcnn:width=4", defense=defense, at=at, epochs=1, limit_train=70,
                             batch_size=32, device="cpu", val_n=8, val_attack="pgd2", **{"sync_bn": True, **extra})
        trainer.start_run(config, store, Path(out) / "runs" if rank == 0 else None)
    torch.distributed.destroy_process_group()


def test_defenses_with_auxiliary_heads_and_every_method_train_under_ddp(tmp_path):
    """Two steps each (63 images, batches of 32: 16+16, then 16+15); no unused-parameter errors, and
    the ranks end with the same weights: every parameter's gradient was averaged."""
    run_ranks(_matrix_rank, (free_port(), str(tmp_path)))
    with Store(tmp_path / "matrix.sqlite") as store:
        runs = store.runs()
        assert len(runs) == len(MATRIX) and all(r["status"] == "trained" and r["epochs_done"] == 1 for r in runs)
    for index, case in enumerate(MATRIX):
        ours, theirs = (torch.load(tmp_path / f"case{index}-rank{r}.pt", weights_only=True) for r in range(2))
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (case, key)
