"""PGD-10 adversarial-training step throughput: advdef vs a minimal hand-written loop, and the
overhead of each seed defense.

Same process, architecture, data and device for every candidate, timed interleaved (medians);
one timed call = one training epoch of --batches batches of --batch images (random 32x32 images,
random labels, no augmentation):

  minimal        a hand-written PGD-AT loop on the undefended model: per batch, PGD-10 (eps 8/255,
                 step 2/255, uniform random start, CE, BatchNorm in train mode, as advdef's
                 pgd_at), then CE on the adversarial batch and an SGD step (same lr, momentum,
                 weight decay; on CUDA under the same fp16 autocast + GradScaler as advdef)
  advdef:none    advdef.training.trainer.train_epoch on a session built by trainer._session, as
                 `advdef train --at pgd_at` builds it (the same code per batch: prepare, autocast,
                 model.phase("update"), method.loss, finite check, GradScaler step, loss.item)
  advdef:DEF     the same with each seed defense attached (cas, cifs, fsr, ewas, denoise, smooth):
                 DEF / none is that defense's training overhead

Per-epoch validation is not part of a step and is not timed. A second table lists each defense's
parameter and FLOP overhead on a full CIFAR ResNet-18 (1 image, eval-mode forward), next to what
the plugins and docs/defenses.md claim (FSR carries its paper's Table 7 as `published_cost`).

    python benchmarks/training_throughput.py --quick
    python benchmarks/training_throughput.py [--arch resnet18] [--batch 128] [--batches 1]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFENSES = ("cas", "cifs", "fsr", "ewas", "denoise", "smooth")
DATASET = "bench_random"

# Parameter overheads on CIFAR ResNet-18 (10 classes) as documented in docs/defenses.md; FSR's
# paper figure (Table 7, 12.43 M - 11.17 M) is read from the plugin's `published_cost` below.
DOCUMENTED_PARAMS = {
    "cas": (10_260, "docs/defenses.md: 2 x Linear(512, 10), the code's two modules"),
    "cifs": (72_084, "docs/defenses.md: MLP 512-128-10 + linear 512-10"),
    "fsr": (1_259_018, "docs/defenses.md / FSR docstring: the official code's R (Table 7: 12.43 M)"),
    "ewas": (81_930, "docs/defenses.md: ALC Linear(8192, 10)"),
    "denoise": (350_080, "docs/defenses.md: 4 blocks, C^2 + 2C each"),
    "smooth": (0, "docs/defenses.md: activation swap, no parameters"),
}


def register_dataset() -> None:
    """A synthetic CIFAR-shaped dataset plugin, so sessions are built by advdef's own `_session`."""
    from advdef.data.base import DatasetPlugin, Split
    from advdef.registry import DATASETS

    if DATASETS.knows(DATASET):
        return

    @DATASETS.register(DATASET, source="benchmark")
    class BenchRandom(DatasetPlugin):
        """Random 3x32x32 uint8 images with random labels (benchmarks only)."""

        def __init__(self) -> None:
            self.info = common.random_info(DATASET)

        def load(self, split: str, *, limit: int | None = None, seed: int = 0) -> Split:
            n = limit or 256
            generator = torch.Generator().manual_seed(1000 + seed + (0 if split == "train" else 1))
            images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
            labels = torch.randint(0, 10, (n,), generator=generator)
            return Split(images, labels)


def make_config(arch: str, defense: str, batch: int, batches: int, device: str, lr: float):
    from advdef.training.config import TrainConfig

    # limit_train = batches * batch + 1 with the smallest validation fraction: carving leaves
    # exactly `batches` full batches to train on (one validation image, never used).
    return TrainConfig(data=DATASET, arch=arch, defense=defense, at="pgd_at", epochs=1, batch_size=batch,
                       limit_train=batches * batch + 1, val_fraction=0.001, lr=lr, device=device).validate()


def advdef_epoch(session):
    from advdef.progress import SilentReporter
    from advdef.training.trainer import train_epoch

    reporter = SilentReporter()
    return lambda: train_epoch(session, 1, reporter)


def minimal_loop(session_none, device: torch.device):
    """The hand-written baseline over the same images and labels as the advdef sessions."""
    from advdef.models import build_model

    config = session_none.config
    train = session_none.data.train
    torch.manual_seed(config.seed)
    model = build_model(config.arch, session_none.data.info, "none").model
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    eps, alpha, steps = float(common.EPS), float(common.ALPHA), 10
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), config.batch_size):
            index = order[start:start + config.batch_size]
            x = train.images[index].float().div_(255).to(device).contiguous(memory_format=torch.channels_last)
            y = train.labels[index].to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                noise = torch.rand(x.shape, generator=generator).to(device)
                x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
                for _ in range(steps):
                    x_adv.requires_grad_(True)
                    loss = F.cross_entropy(model(x_adv), y)
                    (gradient,) = torch.autograd.grad(loss, x_adv)
                    x_adv = torch.min(torch.max(x_adv.detach() + alpha * gradient.sign(), x - eps), x + eps).clamp(0, 1)
                loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss.item()
    return epoch


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs (2 x multiply-adds, torch's flop registry) of one forward, counted per dispatched op
    (also inside defenses that differentiate during their forward, such as CIFS's probe)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    def shape(t):
        return t.shape if isinstance(t, torch.Tensor) else t

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            rule = flop_registry.get(func._overloadpacket)
            if rule is not None:
                Counter.total += rule(*tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out))
            return out

    with Counter():
        model(x)
    return Counter.total


def overhead_claims() -> tuple[list[dict], int, float]:
    """Parameter and FLOP overhead of each defense on a full CIFAR ResNet-18, with the claims."""
    from advdef.models import build_model
    from advdef.registry import DEFENSES as REGISTRY

    info = common.random_info("cifar10")
    x = torch.rand(1, 3, 32, 32)
    base = build_model("resnet18", info, "none")
    base_flops = count_flops(base.model.eval(), x)
    rows = []
    for name in DEFENSES:
        built = build_model("resnet18", info, name)
        flops = count_flops(built.model.eval(), x)
        documented, source = DOCUMENTED_PARAMS[name]
        row = {"defense": name, "params_added": built.params_added, "params_pct": 100 * built.params_added / base.params_total,
               "documented_params": documented, "documented_source": source,
               "gflops": flops / 1e9, "gflops_added_pct": 100 * (flops - base_flops) / base_flops,
               "paper_params_m": None, "paper_gflops_added_pct": None}
        published = getattr(REGISTRY.get(name).factory, "published_cost", None) or {}
        claim = published.get("resnet18")
        if claim:
            with_key = next((k for k in claim if k.startswith("params_m_")), None)
            gflops_key = next((k for k in claim if k.startswith("gflops_")), None)
            if with_key:
                row["paper_params_m"] = f"{claim['params_m']} -> {claim[with_key]}"
                row["paper_params_added"] = round((claim[with_key] - claim["params_m"]) * 1e6)
            if gflops_key:
                row["paper_gflops_added_pct"] = 100 * (claim[gflops_key] - claim["gflops"]) / claim["gflops"]
        rows.append(row)
    return rows, base.params_total, base_flops / 1e9


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--arch", default=None, help="advdef arch spec (default resnet18; --quick smallcnn)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; --quick 32)")
    parser.add_argument("--batches", type=int, default=None, help="batches per timed epoch (default 1; --quick 2)")
    parser.add_argument("--defenses", default=",".join(DEFENSES), help="comma-separated defenses to time")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of every candidate")
    args = parser.parse_args()
    device = common.setup(args)
    arch = args.arch or ("smallcnn" if args.quick else "resnet18")
    batch = args.batch or (32 if args.quick else 128)
    batches = args.batches or (2 if args.quick else 1)
    defenses = [d for d in args.defenses.split(",") if d]
    env = common.environment(device)

    from advdef.training.trainer import _session

    register_dataset()
    with common.Stopwatch() as total:
        sessions = {}
        for defense in ["none", *defenses]:
            sessions[defense] = _session(make_config(arch, defense, batch, batches, str(device), args.lr))
        assert len(sessions["none"].data.train) == batch * batches
        candidates = {"minimal": minimal_loop(sessions["none"], device)}
        candidates.update({f"advdef:{d}": advdef_epoch(s) for d, s in sessions.items()})
        times = common.interleaved_times(list(candidates.values()), args.repeats, device=device)
        claims, base_params, base_gflops = overhead_claims()
    medians = dict(zip(candidates, (statistics.median(t) for t in times)))
    none_time = medians["advdef:none"]

    rows = []
    for (name, seconds), samples in zip(medians.items(), times):
        defense = name.split(":")[1] if ":" in name else "none"
        session = sessions.get(defense)
        rows.append({
            "candidate": name, "step_seconds": seconds / batches, "images_per_s": batch * batches / seconds,
            "vs_advdef_none": seconds / none_time,
            "params_added": sessions[defense].built.params_added if name != "minimal" else 0,
            "spread": common.spread(samples), "spec": session.built.defense_spec if name != "minimal" else "-",
        })
    print(f"PGD-10 AT (eps 8/255, step 2/255), {arch}, batch {batch}, {batches} batch(es) per timed epoch, "
          f"device {device}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    common.print_table(rows, [("candidate", "candidate", "s"), ("step_seconds", "s/step", ".3f"),
                              ("images_per_s", "img/s", ".1f"), ("vs_advdef_none", "time vs advdef:none", ".3f"),
                              ("params_added", f"params added ({arch})", ",d"), ("spread", "spread", ".2f")])
    print()
    print(f"Overhead on a full CIFAR ResNet-18 ({base_params:,} parameters, {base_gflops:.4f} GFLOPs per image forward)")
    common.print_table(claims, [
        ("defense", "defense", "s"), ("params_added", "params added", ",d"), ("params_pct", "%", ".2f"),
        ("documented_params", "documented", ",d"), ("paper_params_m", "paper params (M)", "s"),
        ("gflops", "GFLOPs", ".4f"), ("gflops_added_pct", "FLOPs +%", ".2f"),
        ("paper_gflops_added_pct", "paper FLOPs +%", ".2f"),
    ])
    print("No plugin carries a training-time claim; FSR's FLOP claim is for inference (one forward), while the "
          "time ratios above include its training losses and PGD-10 crafting.")

    ratio = medians["minimal"] / none_time
    targets = [common.target_row("minimal time / advdef:none time", ratio, ">= 0.95", ratio >= 0.95)]
    for claim in claims:
        targets.append(common.target_row(f"{claim['defense']}: params added == documented",
                                         float(claim["params_added"] - claim["documented_params"]), "== 0",
                                         claim["params_added"] == claim["documented_params"]))
    fsr = next((c for c in claims if c["defense"] == "fsr"), None)
    if fsr and fsr["paper_gflops_added_pct"] is not None:
        difference = fsr["gflops_added_pct"] - fsr["paper_gflops_added_pct"]
        targets.append(common.target_row("fsr: FLOPs +% minus paper's +%", difference, "|x| <= 0.1",
                                         abs(difference) <= 0.1))
    if "advdef:fsr" in medians:
        targets.append(common.target_row(f"fsr: training time +% ({arch})", 100 * (medians["advdef:fsr"] / none_time - 1),
                                         "- (paper: FLOPs only)", None))
    common.print_targets(targets)
    print(f"runtime {total.seconds:.0f} s")
    common.write_results("training_throughput", args, device, {
        "settings": {"arch": arch, "batch": batch, "batches_per_epoch": batches, "method": "pgd_at (PGD-10, 8/255, 2/255)",
                     "lr": args.lr, "repeats": args.repeats},
        "rows": rows, "overhead_resnet18": claims, "resnet18_params": base_params, "resnet18_gflops": base_gflops,
        "targets": targets, "runtime_seconds": total.seconds,
    }, environment_record=env)


if __name__ == "__main__":
    main()
