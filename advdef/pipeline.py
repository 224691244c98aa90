"""The CLI's verbs as plain functions (tests call these directly).

train -> evaluate -> report, plus crafting adversarial examples to a file and the presets that
chain them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import torch
from safetensors.torch import save_file

from advdef.attacks.base import eval_mode
from advdef.device import prepare
from advdef.errors import UserError
from advdef.evaluation.engine import CLEAN, EvalConfig, batch_seed, evaluate_run, load_target, protocol_key
from advdef.evaluation.precision import precision_name
from advdef.evaluation.suites import is_keyword
from advdef.progress import Reporter, SilentReporter
from advdef.registry import ATTACKS
from advdef.specs import format_value
from advdef.store import Store
from advdef.training.config import TrainConfig
from advdef.training.trainer import open_dataset, start_run


def runs_dir_for(store: Store, runs_dir: str | Path | None) -> Path:
    """Checkpoints go beside an SQLite store (./runs for a server store) unless told otherwise."""
    return Path(runs_dir) if runs_dir is not None else store.default_runs_dir()


def pending_runs(store: Store, config: EvalConfig) -> list[str]:
    """Trained runs lacking a finished outcome for any requested attack under this protocol."""
    keywords = any(is_keyword(item) for item in config.attacks)
    pending = []
    for run in store.runs(status="trained"):
        context = config.suite_context(store, run, run_defense(run)) if keywords else None
        wanted = set(config.canonical_attacks(context)) | {CLEAN}
        finished: set[str] = set()
        for evaluation in store.evaluations(run["run_id"]):
            protocol = evaluation["protocol"]
            same = (
                protocol["eps"] == format_value(Fraction(config.eps))
                and protocol["seed"] == config.seed
                and protocol.get("n_requested") == config.n
                and protocol.get("limit_test") == config.limit_test
                and (config.epoch is None or protocol["epoch"] == config.epoch)
                and protocol.get("precision", "fp32") == precision_name(config.amp)  # --amp is its own evaluation
            )
            if same:
                finished |= {a["attack"] for a in store.eval_attacks(evaluation["eval_id"]) if a["status"] == "done"}
        if not wanted <= finished:
            pending.append(run["run_id"])
    return pending


def run_defense(run: dict):
    """The run's defense plugin attached to its (untrained) architecture: what suite keywords need
    to know (declared heads, surrogates, stochasticity) without loading any weights."""
    from advdef.models import build_model

    train_config = TrainConfig.from_json(run["config"])
    info = open_dataset(train_config.data, train_config.data_dir).info
    factory = (run["config"].get("imported") or {}).get("model")
    if factory:  # `advdef import --model`: the user's factory in advdef's wrapper
        from dataclasses import replace

        from advdef.importing.models import build_factory_model

        declared = run["config"]["imported"]["input"]
        info = replace(info, mean=tuple(declared["mean"]), std=tuple(declared["std"]))
        return build_factory_model(factory, info, train_config.defense).defense
    return build_model(train_config.arch, info, train_config.defense, train_config.dual_bn_setting).defense


def evaluate(store: Store, config: EvalConfig, run_ids: list[str] | None = None, reporter: Reporter | None = None) -> list[int]:
    """Evaluate the given runs, or every trained run that lacks the requested attacks."""
    config.canonical_attacks()  # fail on bad specs before loading anything
    targets = run_ids if run_ids else pending_runs(store, config)
    for run_id in targets:
        store.get_run(run_id)  # a missing id fails before any work
    return [evaluate_run(store, run_id, config, reporter) for run_id in targets]


@dataclass
class CraftResult:
    path: Path
    attacked: int
    succeeded: int
    clean_correct: int

    @property
    def success_rate(self) -> float:
        """Attack success rate: broken / clean-correct (never mixed with robust accuracy)."""
        return self.succeeded / self.clean_correct if self.clean_correct else 0.0


def craft(store: Store, run_id: str, attack_spec: str, out: Path, config: EvalConfig) -> CraftResult:
    """Attack every sample of the run's test subset and save the adversarial examples.

    The file (safetensors) holds x_adv (float32 in [0,1]), labels, sample ids, the clean and the
    adversarial predictions; its metadata holds the run, attack spec, eps and sample hash.
    """
    if "eps" in ATTACKS.parse(attack_spec)[1].params:
        raise UserError(f"attack '{attack_spec}' sets eps; use --eps")
    attack = ATTACKS.create(attack_spec, eps=Fraction(config.eps))
    target = load_target(store, run_id, config)
    samples = target.samples
    outputs: dict[str, list[torch.Tensor]] = {"x_adv": [], "clean_prediction": [], "adv_prediction": []}
    with eval_mode(target.model) as view:
        for start in range(0, len(samples), config.batch_size):
            positions = torch.arange(start, min(start + config.batch_size, len(samples)))
            x = prepare(samples.float_images(positions), target.device, True)
            y = samples.labels[positions].to(target.device)
            x_adv = attack(view, x, y, seed=batch_seed(config.seed, attack.spec(), int(samples.ids[start])))
            with torch.no_grad():
                outputs["clean_prediction"].append(view(x).argmax(1).cpu())
                outputs["adv_prediction"].append(view(x_adv).argmax(1).cpu())
            outputs["x_adv"].append(x_adv.cpu().float().contiguous())
    tensors = {k: torch.cat(v) for k, v in outputs.items()}
    tensors["labels"] = samples.labels.clone()
    tensors["sample_ids"] = samples.ids.clone()
    clean_correct = tensors["clean_prediction"] == tensors["labels"]
    succeeded = clean_correct & (tensors["adv_prediction"] != tensors["labels"])
    metadata = {
        "run_id": run_id,
        "attack": attack.spec(),
        "implementation": attack.implementation,
        "eps": target.protocol["eps"],
        "norm": "Linf",
        "dataset": target.protocol["dataset"],
        "sample_hash": target.protocol["sample_hash"],
        "protocol_key": protocol_key(target.protocol),
        "seed": str(config.seed),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    return CraftResult(out, len(samples), int(succeeded.sum()), int(clean_correct.sum()))


@dataclass
class Preset:
    """A named recipe: the training runs to make and the evaluation to run on them."""

    description: str
    trainings: list[TrainConfig]
    evaluation: EvalConfig
    notes: list[str] = field(default_factory=list)


QUICK_EPS = Fraction(16, 255)


def _quick() -> Preset:
    # Digits are high-contrast 16x16 images: at 8/255 even an undefended model keeps ~75% under
    # PGD-20, so the demo uses a budget at which the two models differ (as MNIST work uses 0.3).
    base = TrainConfig(data="digits", arch="smallcnn:width=16", defense="none", batch_size=64, lr=0.05)
    return Preset(
        description="undefended vs PGD-AT SmallCNN on the embedded digits at eps 16/255; fgsm, pgd20, cw, aa (n=200)",
        trainings=[replace(base, at="standard", epochs=10), replace(base, at=f"pgd_at:eps={format_value(QUICK_EPS)}", epochs=15)],
        evaluation=EvalConfig(attacks=["fgsm", "pgd20", "cw", "aa"], eps=QUICK_EPS, n=200, batch_size=100),
    )


PRESETS = {"quick": _quick}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        from advdef.errors import suggest

        raise suggest(name, PRESETS, "preset")
    return PRESETS[name]()


def run_preset(name: str, store: Store, runs_dir: Path, reporter: Reporter | None = None, device: str = "auto") -> list[str]:
    """Train every run of the preset, evaluate them all; returns the run ids."""
    reporter = reporter or SilentReporter()
    preset = get_preset(name)
    run_ids = []
    for config in preset.trainings:
        config = replace(config, device=device)
        reporter.message(f"training {config.arch} / {config.defense} / {config.at} on {config.data} ({config.epochs} epochs)")
        run_ids.append(start_run(config, store, runs_dir, reporter))
    evaluation = replace(preset.evaluation, device=device)
    reporter.message(f"evaluating {', '.join(evaluation.attacks)} at eps {format_value(evaluation.eps)} on n={evaluation.n}")
    evaluate(store, evaluation, run_ids, reporter)
    return run_ids
