"""The seed papers' own numbers, normalized for `advdef report --published`.

Every defense plugin carries its paper's numbers as data (`published`, plus per-plugin extras such
as FSR's `published_baselines` or EWAS's `paper_baselines`), each in the shape its tables have.
This module turns them into one flat list of `PublishedResult`s keyed like advdef runs (defense
spec, dataset, architecture, AT method, checkpoint), with advdef's column labels where the paper
measured the same thing and a descriptive name where it did not:

    clean, fgsm, pgd20, pgd100, cw   the paper's versions of these attacks (their exact settings,
                                     e.g. step, random start and attack loss, are in `protocol`)
    aa                               standard AutoAttack only (CAS and FSR; CAS's "autoattack")
    aa_custom, apgd_square           CIFS's and EWAS's APGD + Square subsets: NOT standard AA
    anything else                    the paper's own name (nattack, ensemble, pgd200, ...)

Numbers that are not accuracies of a trained model (competition scores, parameter counts, FLOPs)
are left out, as is `randomize`'s data (a competition score and an accuracy of a randomization
layer on an unnamed ImageNet model, neither of which has an advdef setting).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from advdef.errors import UserError
from advdef.registry import DEFENSES
from advdef.specs import parse_spec

CHECKPOINTS = ("last", "best")

# Architectures, datasets and training methods of the papers that advdef does not have; every other
# name in a record is a registered plugin name (the tests check both).
PAPER_ARCHS: dict[str, str] = {
    "resnet10": "CIFS's Fashion-MNIST ResNet-10",
    "resnet50": "ImageNet ResNet-50 (SAT, Xie thesis ch. 5)",
    "official_resnet152": "the Feature Denoising authors' ImageNet ResNet-152 (denoising blocks in `defense`)",
    "official_cifar_simple": "the Feature Denoising authors' unpublished 'Simple' CIFAR-10 net (GitHub issue #4)",
    "official_cifar_wide": "the Feature Denoising authors' unpublished 'Wide' CIFAR-10 net (GitHub issue #4)",
}
PAPER_DATASETS: dict[str, str] = {
    "imagenet": "ImageNet (ILSVRC 2012) validation set",
    "fashion_mnist": "Fashion-MNIST test set",
}
PAPER_AT_METHODS: dict[str, str] = {
    "pgd_at_targeted": "PGD-30 adversarial training towards a random wrong class, eps 16/255 (Feature Denoising)",
}


@dataclass(frozen=True)
class PublishedResult:
    """One paper's numbers for one setting (defense, dataset, architecture, AT method, checkpoint)."""

    defense: str  # advdef defense spec: "cas", "none" (the paper's undefended baseline), "smooth:act=silu"
    dataset: str  # advdef dataset name (else the paper's: imagenet, fashion_mnist)
    arch: str  # advdef architecture name (else the paper's: see PAPER_ARCHS)
    at: str  # advdef AT-method name (else the paper's term: see PAPER_AT_METHODS)
    checkpoint: str  # "last" or "best" (as the paper selected it; see `protocol` for the rule)
    metrics: dict[str, float] = field(hash=False)  # column label -> accuracy in percent
    source: str  # paper and table(s)
    protocol: str  # one line: how the paper measured these numbers, where it differs from advdef
    paper: str  # the defense plugin whose data this came from


# -- helpers -----------------------------------------------------------------------------------

def _numbers(raw: Mapping[str, Any], rename: Mapping[str, str] | None = None) -> dict[str, float]:
    """The numeric entries of a metrics dict as floats, keys renamed (nested dicts, strings skipped)."""
    rename = rename or {}
    return {rename.get(k, k): float(v) for k, v in raw.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _settings(published: Mapping[str, Any]) -> Iterator[tuple[str, str, str, Any]]:
    """(dataset, arch, at-key, value) of a `published[dataset][arch][at]` dict; `protocol` skipped."""
    for dataset, archs in published.items():
        if dataset == "protocol" or not isinstance(archs, Mapping):
            continue
        for arch, methods in archs.items():
            if not isinstance(methods, Mapping):
                continue
            for at, value in methods.items():
                yield dataset, arch, at, value


def _defended_and_baseline(name: str, factory: Any, baselines: str, label: str
                           ) -> Iterator[tuple[str, str, str, str, str, Mapping[str, Any]]]:
    """(defense, note, dataset, arch, at, raw metrics) of a plugin's `published` rows, then of the
    paper's undefended rows in attribute `baselines` (defense "none", noted as the baseline)."""
    for defense, data, note in ((name, getattr(factory, "published", {}), ""),
                                ("none", getattr(factory, baselines, {}), f" (the paper's baseline without {label})")):
        for dataset, arch, at, raw in _settings(data):
            if isinstance(raw, Mapping):
                yield defense, note, dataset, arch, at, raw


def _lam(value: float) -> str:
    return f"{value:g}"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _plugin_name(spec: str) -> str:
    try:
        return parse_spec(spec).name
    except UserError:
        return spec


def _has_params(spec: str) -> bool:
    try:
        return bool(parse_spec(spec).params)
    except UserError:
        return False


def _canonical(spec: str) -> str | None:
    try:
        return DEFENSES.canonical(spec)
    except (UserError, ValueError, TypeError):
        return None


# -- CAS ---------------------------------------------------------------------------------------

CAS_CITE = "CAS paper (arXiv:2103.08307)"
_CAS_EXTRA_TABLES = (  # metric prefix -> table, for ResNet-18
    ("aa", "Table 11"), ("avg_pgd100", "Table 1"), ("eot", "Table 1"), ("transfer_", "Table 6"),
    ("nattack", "Table 6"), ("md_", "Table 12"), ("table4_", "Table 4"), ("pgd20@eps=", "Table 13"),
)


def _cas_source(arch: str, at: str, checkpoint: str, metrics: Mapping[str, float], tables: str) -> str:
    if arch == "wrn34_10":
        found = ["Table 8"]
    elif arch == "vgg16_bn":
        found = ["Table 9"]
    elif at == "standard":
        found = ["App. E (text)"]
    elif arch == "resnet18":
        found = ["Table 5" if checkpoint == "last" else "Table 10"]
        for prefix, table in _CAS_EXTRA_TABLES:
            if any(m.startswith(prefix) for m in metrics) and table not in found:
                found.append(table)
    else:
        return f"{CAS_CITE}, Tables {tables}" if tables else CAS_CITE
    return f"{CAS_CITE}, " + ", ".join(found)


def _cas_protocol(arch: str, at: str, checkpoint: str, defended: bool, metrics: Mapping[str, float]) -> str:
    if at == "standard":
        attacks = "clean accuracy only (natural training)"
    else:
        beta = 3 if arch == "vgg16_bn" else 2
        target = (f"CAS models attacked on the joint loss CE(final) + {beta} x mean CE(aux heads) (the paper's "
                  "'adaptive white-box')" if defended else "attacks on CE of the final logits")
        attacks = _join(
            "Linf eps 8/255 (code: 0.031 for PGD and CW)", target,
            "fgsm = uniform random start + one eps step (FGSM-RS)",
            "pgd20 = 20 steps of eps/10, random start, last iterate, no restarts",
            "cw = PGD-20 (step eps/10, random start) on the CW margin, kappa 0",
            "aa = AutoAttack, standard per the paper (version, subset and wrapped output not stated)"
            if "aa" in metrics else "",
            "avg_pgd100 / eot = Tramer et al.'s averaged PGD-100 and EOT (settings not given)"
            if "avg_pgd100" in metrics else "",
            "transfer_* = PGD-20 / CW crafted on a naturally trained ResNet-50" if "transfer_pgd20" in metrics else "",
            "nattack = 1,000 test images, <= 20,000 queries" if "nattack" in metrics else "",
            "md_* = Margin Decomposition attack with the named loss (checkpoint not stated)"
            if any(m.startswith("md_") for m in metrics) else "",
            "pgd20@eps=E = PGD-20 at eps E, step E/10" if any(m.startswith("pgd20@") for m in metrics) else "",
            "table4_* = Table 4: only the CAS heads attacked, with the CAS loss, on another, unstated checkpoint "
            "(its clean accuracy differs)" if any(m.startswith("table4_") for m in metrics) else "",
            "TRADES 1/lambda = 4 in the code (TRADES paper: 6)" if at == "trades" else "",
        )
    rule = ("best = the epoch with the highest PGD accuracy on the TEST set" if checkpoint == "best"
            else "last epoch")
    return _join(attacks, "full test set, single run", rule)


def _cas(name: str, factory: Any) -> list[PublishedResult]:
    records = []
    for dataset, arch, at, entry in _settings(getattr(factory, "published", {})):
        if not isinstance(entry, Mapping):
            continue
        tables = str(entry.get("tables", ""))
        for defense, block in ((name, entry), ("none", entry.get("baseline", {}))):
            for checkpoint in CHECKPOINTS:
                raw = block.get(checkpoint)
                if not isinstance(raw, Mapping):
                    continue
                metrics = _numbers(raw, {"autoattack": "aa"})
                for eps, value in raw.get("pgd20_by_eps", {}).items():
                    if eps != "8/255":  # that one is the pgd20 column
                        metrics[f"pgd20@eps={eps}"] = float(value)
                if defense == name and checkpoint == "last":
                    metrics.update(_numbers(entry.get("md", {})))
                    metrics.update({f"table4_{k}" if k == "clean" else f"table4_{k}_cas_loss": v
                                    for k, v in _numbers(entry.get("aux_only", {})).items()})
                records.append(PublishedResult(
                    defense=defense, dataset=dataset, arch=arch, at=at, checkpoint=checkpoint, metrics=metrics,
                    source=_cas_source(arch, at, checkpoint, metrics, tables)
                    + ("" if defense == name else " (the paper's baseline without CAS)"),
                    protocol=_cas_protocol(arch, at, checkpoint, defense == name, metrics), paper=name,
                ))
    return records


# -- CIFS --------------------------------------------------------------------------------------

CIFS_CITE = "CIFS paper (arXiv:2102.05311)"
_CIFS_TABLES = {  # (dataset, at, checkpoint) -> table(s)
    ("cifar10", "pgd_at", "last"): "Table 1",
    ("cifar10", "pgd_at", "best"): "Table B.2",
    ("cifar10", "fat", "last"): "Table 3",
    ("cifar10", "trades", "last"): "Table B.4",
    ("svhn", "pgd_at", "last"): "Table 2",
    ("svhn", "pgd_at", "best"): "Table C.2",
    ("fashion_mnist", "pgd_at", "last"): "Table D.1",
    ("fashion_mnist", "pgd_at", "best"): "Table D.1",
}
_CIFS_AA_TABLES = {"cifar10": "Table B.1", "svhn": "Table C.1"}


def _cifs_protocol(dataset: str, checkpoint: str, metrics: Mapping[str, float]) -> str:
    if dataset == "fashion_mnist":
        threat = "Linf eps 0.3"
        steps = ("fgsm = one eps step; pgd40 (the table's header; the text says PGD-20, step 0.01) and pgd100 "
                 "(step 0.02), no random start")
    else:
        threat = "Linf eps 8/255"
        steps = ("fgsm = one eps step; pgd20 / pgd100 = steps of eps/10, no random start, last iterate; "
                 "cw = PGD-30 (step eps/10, no random start) on the CW margin with kappa 50")
    return _join(
        threat,
        "every attack maximises the joint loss of Eq. 3 over final and probe logits; each number is the worst "
        "over beta_atk in {0, 0.1, 1, 2, 10, 100, inf, single probes}",
        steps,
        "aa_custom = APGD-CE (5 restarts x 100) + Square (5000 queries, CE) on the joint loss, 2,000 images: "
        "NOT standard AutoAttack" if "aa_custom" in metrics else "",
        "full test set, seed 0, single run",
        "best = the epoch with the highest PGD-20 accuracy on the TEST set" if checkpoint == "best" else "last epoch",
    )


def _cifs(name: str, factory: Any) -> list[PublishedResult]:
    records = []
    for dataset, arch, key, raw in _settings(getattr(factory, "published", {})):
        if not isinstance(raw, Mapping):
            continue
        at, _, checkpoint = key.partition("@")
        checkpoint = checkpoint or "last"
        metrics = _numbers(raw)
        tables = [_CIFS_TABLES.get((dataset, at, checkpoint), "")]
        if "aa_custom" in metrics:
            tables.append(_CIFS_AA_TABLES.get(dataset, ""))
        tables = [t for t in tables if t]
        records.append(PublishedResult(
            defense=name, dataset=dataset, arch=arch, at=at, checkpoint=checkpoint, metrics=metrics,
            source=CIFS_CITE + (", " + ", ".join(tables) if tables else ""),
            protocol=_cifs_protocol(dataset, checkpoint, metrics), paper=name,
        ))
    return records


# -- FSR ---------------------------------------------------------------------------------------

FSR_CITE = "FSR paper (arXiv:2303.13846)"


def _fsr_protocol(dataset: str, metrics: Mapping[str, float]) -> str:
    return _join(
        "Linf eps 8/255", "attacks on the final logits only (eval mode, deterministic mask)",
        "fgsm = one eps step, no random start",
        "pgd20 / pgd100 = steps of eps/10, CE, no random start, 1 restart",
        "cw = PGD-30 (step eps/10, no random start) on the CW margin with kappa 50",
        "ensemble = per-example worst of fgsm, pgd20, pgd100, cw (the code also requires clean-correct)"
        if "ensemble" in metrics else "",
        "aa = AutoAttack, standard version inferred from the paper's description (no code)" if "aa" in metrics else "",
        "ti_fgsm / di_fgsm = transfer from a naturally trained ResNet-50 (settings unstated)"
        if "ti_fgsm" in metrics else "",
        "nattack = 1,000 test images, 40,000 queries" if "nattack" in metrics else "",
        "full test set (SVHN: 26,032)" if dataset == "svhn" else "full test set",
        "last epoch (100) of a single run",
    )


def _fsr_source(arch: str, metrics: Mapping[str, float], ablation: bool = False) -> str:
    if ablation:
        return f"{FSR_CITE}, Table 6"
    tables = ["Table 2" if arch == "vgg16_bn" else "Table 1"]
    if any(m in metrics for m in ("aa", "ti_fgsm", "di_fgsm", "nattack")):
        tables.append("Table 3")
    return f"{FSR_CITE}, " + ", ".join(tables)


def _fsr(name: str, factory: Any) -> list[PublishedResult]:
    records = []
    for defense, note, dataset, arch, at, raw in _defended_and_baseline(name, factory, "published_baselines", "FSR"):
        metrics = _numbers(raw)
        records.append(PublishedResult(
            defense=defense, dataset=dataset, arch=arch, at=at, checkpoint="last", metrics=metrics,
            source=_fsr_source(arch, metrics) + note, protocol=_fsr_protocol(dataset, metrics), paper=name,
        ))
    # Table 6: the same setting as ResNet-18 / CIFAR-10 / PGD-AT with a part of FSR removed. "full" is
    # the main record again.
    for ablation, raw in getattr(factory, "published_ablations", {}).items():
        if ablation in ("full", "none", None) or not isinstance(raw, Mapping):
            continue
        metrics = _numbers(raw)
        records.append(PublishedResult(
            defense=f"{name}:ablation={ablation}", dataset="cifar10", arch="resnet18", at="pgd_at", checkpoint="last",
            metrics=metrics, source=_fsr_source("resnet18", metrics, ablation=True),
            protocol=_fsr_protocol("cifar10", metrics), paper=name,
        ))
    return records


# -- EWAS --------------------------------------------------------------------------------------

EWAS_CITE = "EWAS paper (arXiv:2202.11898)"


def _ewas_lam(factory: Any, dataset: str) -> float:
    lam = getattr(factory, "published", {}).get("protocol", {}).get("lam", {})
    return float(lam.get(dataset, 0.01)) if isinstance(lam, Mapping) else 0.01


def _ewas_protocol(dataset: str, arch: str, defended: bool, lam: float, metrics: Mapping[str, float]) -> str:
    step = "eps/10" if dataset == "svhn" else "eps/4"
    target = (f"attacks maximise L(main) + {_lam(lam)} x L(ALC), the training lam (code; not adaptive: with "
              "attack lam >= 1 PGD-20 falls to about the AT baseline on CIFAR-10, Tables 8-9)" if defended
              else "attacks on the main logits")
    return _join(
        "Linf eps 8/255 (code: 0.031)", target,
        "fgsm = uniform random start + one eps step (code)",
        f"pgd20 = 20 steps of {step}, random start",
        f"cw = PGD-30 (step {step}, random start) on the CW margin, kappa 50 (code)",
        "apgd_square = a custom APGD + Square subset (loss, eps and queries unstated): NOT standard AutoAttack"
        if "apgd_square" in metrics else "",
        "X@attack_lam=L = the same model attacked with L(main) + L x L(ALC) (headline columns: L = "
        f"{_lam(lam)})" if any("@attack_lam=" in m for m in metrics) else "",
        "the paper's 'WRN-32-10' / 'WideResNet' is the WRN-34-10 topology in the official code"
        if arch == "wrn34_10" else "",
        "full test set, one restart, last epoch, single run (code seed 7)",
    )


def _ewas_source(dataset: str, metrics: Mapping[str, float], arch: str) -> str:
    tables = ["Table 4" if dataset == "svhn" else "Table 3"]
    if "apgd_square" in metrics:
        tables.append("Table 5")
    if any("@attack_lam=" in m for m in metrics):
        tables.append("Table 9" if arch == "wrn34_10" else "Table 8")
    return f"{EWAS_CITE}, " + ", ".join(tables)


def _ewas(name: str, factory: Any) -> list[PublishedResult]:
    records = []
    sweep = getattr(factory, "attack_lam_sweep", {})
    for defense, note, dataset, arch, at, raw in _defended_and_baseline(name, factory, "paper_baselines", "EWAS"):
        metrics = _numbers(raw)
        lam = _ewas_lam(factory, dataset)
        spec = defense
        if defense == name and lam != 0.01:  # the plugin's default lam is CIFAR-10's 0.01
            spec = f"{name}:lam={_lam(lam)}"
        tables = sweep.get(dataset, {}).get(arch) if defense == name and at == "pgd_at" else None
        if isinstance(tables, Mapping) and tables.get("clean") == raw.get("clean"):
            for attack_lam, values in tables.get("by_attack_lam", {}).items():
                if float(attack_lam) == lam:
                    continue  # the headline columns
                for attack, value in zip(("fgsm", "pgd20", "cw"), values):
                    metrics[f"{attack}@attack_lam={_lam(float(attack_lam))}"] = float(value)
        records.append(PublishedResult(
            defense=spec, dataset=dataset, arch=arch, at=at, checkpoint="last", metrics=metrics,
            source=_ewas_source(dataset, metrics, arch) + note,
            protocol=_ewas_protocol(dataset, arch, defense == name, lam, metrics), paper=name,
        ))
    return records


# -- Feature denoising -------------------------------------------------------------------------

DENOISE_CITE = "Feature Denoising (arXiv:1812.03411) / Xie thesis ch. 4"
# The plugin's row names -> (architecture, advdef defense spec). The thesis's "Gaussian" non-local
# op has theta/phi embeddings and a softmax: advdef's nonlocal_embedded_gaussian.
_DENOISE_ROWS = {
    "official_resnet152": ("official_resnet152", "none"),
    "official_resnet152_denoise4_nonlocal_gaussian": ("official_resnet152", "denoise:op=nonlocal_embedded_gaussian"),
    "official_resnet152_denoise4_nonlocal_dot": ("official_resnet152", "denoise:op=nonlocal_dot"),
    "official_resnet152_denoise4_null": ("official_resnet152", "denoise:op=null"),
    "official_resnet152_denoise_all_nonlocal_gaussian": (
        "official_resnet152", "denoise:op=nonlocal_embedded_gaussian,subsample=2"),
    "official_cifar_simple": ("official_cifar_simple", "none"),
    "official_cifar_simple_denoise": ("official_cifar_simple", "denoise"),
    "official_cifar_wide": ("official_cifar_wide", "none"),
}


def _denoise_source(dataset: str, at: str, metrics: Mapping[str, float]) -> str:
    if dataset == "cifar10":
        return ("Feature Denoising authors' 'LIMITED' CIFAR-10 results, GitHub issue #4 of "
                "facebookresearch/ImageNet-Adversarial-Training")
    if at == "standard":
        return f"{DENOISE_CITE}, Table 4.3 and Sec. 4.6"
    parts = []
    if any(m != "caad2017_blackbox" for m in metrics):
        parts.append("Sec. 4.6 text (Fig. 4.6)")
    if "caad2017_blackbox" in metrics:
        parts.append("Table 4.2")
    return f"{DENOISE_CITE}, " + ", ".join(parts)


def _denoise_protocol(dataset: str, at: str, row: str, metrics: Mapping[str, float]) -> str:
    if dataset == "cifar10":
        return _join(
            "pgd20 / pgd100 as posted: eps and targeting not stated (the official cifar10.py trains and evaluates "
            "with untargeted Linf PGD, eps 8/255, step 2/255, random start)",
            "'Simple' / 'Wide' are the authors' nets, not advdef architectures",
            "denoise op presumably the script's non-local dot product" if "denoise" in row else "",
            "single runs",
        )
    if at == "standard":
        return "clean top-1 on the 50k ImageNet val images after standard (non-adversarial) training; single run"
    return _join(
        "ImageNet val (50k); TARGETED PGD towards a random wrong class, Linf eps 16/255, step 1/255 (1.6/255 for "
        "10 iterations), random start, accuracy counts the true class (much weaker than untargeted PGD)"
        if any(m.endswith("_targeted") for m in metrics) else "",
        "caad2017_blackbox = ImageNet val images classified correctly under all 5 best CAAD 2017 attackers, "
        "eps 32/255 (black-box)" if "caad2017_blackbox" in metrics else "",
        "trained with targeted PGD-30 AT, eps 16/255, adversarial images only, label smoothing 0.1",
        "4 denoising blocks after res2..res5" if "denoise4" in row
        else "a denoising block after every residual block, x_j 2x2 max-pooled" if "denoise_all" in row else "",
        "final model, single run",
    )


def _denoise(name: str, factory: Any) -> list[PublishedResult]:
    records = []
    for dataset, row, at, raw in _settings(getattr(factory, "published", {})):
        if not isinstance(raw, Mapping):
            continue
        arch, defense = _DENOISE_ROWS.get(row, (row, name))
        metrics = _numbers(raw)
        records.append(PublishedResult(
            defense=defense, dataset=dataset, arch=arch, at=at, checkpoint="last", metrics=metrics,
            source=_denoise_source(dataset, at, metrics), protocol=_denoise_protocol(dataset, at, row, metrics),
            paper=name,
        ))
    return records


# -- Smooth adversarial training ---------------------------------------------------------------

SMOOTH_CITE = "SAT paper (arXiv:2006.14536) / Xie thesis ch. 5"


def _smooth_source(at: str, spec: str) -> str:
    params = parse_spec(spec).params if spec != "none" else {}
    if at == "standard":
        where = "Sec. 5.3.2 text"
    elif spec == "none" or params.get("passes", "all") != "all":
        where = "Table 5.1"
    elif str(params.get("act")) == "elu":
        where = "Sec. 5.4.3 text"
    else:
        where = "Sec. 5.4 text (Fig. 5.3)"
    return f"{SMOOTH_CITE}, {where}"


def _smooth_protocol(at: str, spec: str) -> str:
    passes = parse_spec(spec).params.get("passes", "all") if spec != "none" else "all"
    surrogate = (f"passes={passes}: ReLU forward, parametric-softplus (beta 10) backward in the chosen passes"
                 if passes != "all" else "")
    if at == "standard":
        return _join("clean top-1 on the 50k ImageNet val images, ResNet-50, standard (non-adversarial) training",
                     surrogate, "single run")
    return _join(
        "ImageNet val (50k), ResNet-50 trained with PGD-1 AT at eps 4/255, step 4/255 "
        "(pgd_at:eps=4/255,alpha=4/255,steps=1), 100 epochs",
        "pgd200 = untargeted PGD-200, Linf eps 4/255, step 1/255",
        surrogate, "last epoch, single run; not comparable with eps 8/255 CIFAR numbers",
    )


def _smooth(name: str, factory: Any) -> list[PublishedResult]:
    records = []
    for dataset, arch, at, rows in _settings(getattr(factory, "published", {})):
        if not isinstance(rows, Mapping):
            continue
        for spec, raw in rows.items():
            if not isinstance(raw, Mapping):
                continue
            records.append(PublishedResult(
                defense=spec, dataset=dataset, arch=arch, at=at, checkpoint="last", metrics=_numbers(raw),
                source=_smooth_source(at, spec), protocol=_smooth_protocol(at, spec), paper=name,
            ))
    return records


# -- other plugins -----------------------------------------------------------------------------

def _none(name: str, factory: Any) -> list[PublishedResult]:
    """Plugins whose data holds no accuracies of an advdef-like setting (randomize: competition scores)."""
    return []


def _generic(name: str, factory: Any) -> list[PublishedResult]:
    """Third-party plugins: `published[dataset][arch][at] = {column: percent}`, or `{"last": ..., "best": ...}`,
    or `at@best` keys; columns are taken as they are (no "autoattack" -> "aa" guess)."""
    published = getattr(factory, "published", {})
    if not isinstance(published, Mapping):
        return []
    protocol = published.get("protocol", {})
    if isinstance(protocol, Mapping):
        note = _join(*(f"{k}: {v}" for k, v in protocol.items() if isinstance(v, str)))
    else:
        note = str(protocol)
    note = " ".join(note.split()) or "protocol not stated by the plugin"
    doc = (getattr(factory, "citation", "") or name).strip()
    source = f"{name} plugin's published numbers ({doc.split('. ')[0][:120]})"
    records = []
    for dataset, arch, key, raw in _settings(published):
        if not isinstance(raw, Mapping):
            continue
        at, _, checkpoint = key.partition("@")
        blocks = ([(c, raw[c]) for c in CHECKPOINTS if isinstance(raw.get(c), Mapping)]
                  or [(checkpoint if checkpoint in CHECKPOINTS else "last", raw)])
        for ckpt, block in blocks:
            metrics = _numbers(block)
            if metrics:
                records.append(PublishedResult(defense=name, dataset=dataset, arch=arch, at=at, checkpoint=ckpt,
                                               metrics=metrics, source=source, protocol=note, paper=name))
    return records


_ADAPTERS = {"cas": _cas, "cifs": _cifs, "fsr": _fsr, "ewas": _ewas, "denoise": _denoise, "smooth": _smooth,
             "randomize": _none, "none": _none}


def _sort_key(record: PublishedResult) -> tuple:
    return (record.paper, record.dataset, record.arch, record.at, CHECKPOINTS.index(record.checkpoint)
            if record.checkpoint in CHECKPOINTS else len(CHECKPOINTS), record.defense)


# -- API ---------------------------------------------------------------------------------------

def published_results(defense: str | None = None) -> list[PublishedResult]:
    """Every paper accuracy record of the registered defense plugins, in a fixed order.

    `defense` (a plugin name or spec) keeps the records of that plugin's paper and the records
    whose defense is that plugin: `fsr` gives FSR's rows and its paper's undefended baselines,
    `none` every paper's undefended baselines. An unknown name is a UserError.
    """
    wanted = None
    if defense is not None:
        wanted = _plugin_name(defense)
        DEFENSES.get(wanted)  # a typo is an error naming the valid plugins
    records: list[PublishedResult] = []
    for name in DEFENSES.names():
        plugin = DEFENSES.get(name)
        records.extend(_ADAPTERS.get(name, _generic)(name, plugin.factory))
    if wanted is not None:
        records = [r for r in records if r.paper == wanted or _plugin_name(r.defense) == wanted]
    return sorted(records, key=_sort_key)


def match_published(dataset: str, arch: str, defense: str, at: str) -> list[PublishedResult]:
    """The paper records for the setting of an advdef run (its dataset, arch, defense and AT specs).

    Dataset, architecture and AT method match by plugin name (`resnet18:width=64` is a resnet18,
    `trades:beta=6` a trades run; resnet18 is not preact_resnet18). The defense matches by plugin
    name, except that
      - a record whose defense spec has parameters (`smooth:act=silu`, `fsr:ablation=no_sep`,
        `ewas:lam=0.05`) matches only a run whose canonical defense spec is the same;
      - a record without parameters (the paper's default configuration) does not match a run that
        is one of those other published configurations of the same plugin.
    """
    dataset_name, arch_name, at_name = _plugin_name(dataset), _plugin_name(arch), _plugin_name(at)
    plugin = _plugin_name(defense)
    run = _canonical(defense)
    records = [r for r in published_results() if _plugin_name(r.defense) == plugin]
    variants = {_canonical(r.defense) for r in records if _has_params(r.defense)} - {None}
    matches = []
    for record in records:
        if (record.dataset, _plugin_name(record.arch), _plugin_name(record.at)) != (dataset_name, arch_name, at_name):
            continue
        if _has_params(record.defense):
            if run is not None and _canonical(record.defense) == run:
                matches.append(record)
        elif run not in variants:
            matches.append(record)
    return matches


__all__ = ["PAPER_ARCHS", "PAPER_AT_METHODS", "PAPER_DATASETS", "PublishedResult", "match_published",
           "published_results"]
