"""The papers' own numbers as normalized records (advdef.report.published)."""

from __future__ import annotations

import pytest

from advdef.errors import UserError
from advdef.registry import DATASETS, DEFENSES, MODELS, TRAINING
from advdef.report.published import (
    PAPER_ARCHS, PAPER_AT_METHODS, PAPER_DATASETS, PublishedResult, match_published, published_results,
)

RECORDS = published_results()


def find(paper: str, defense: str, dataset: str, arch: str, at: str, checkpoint: str) -> PublishedResult:
    found = [r for r in RECORDS if (r.paper, r.defense, r.dataset, r.arch, r.at, r.checkpoint)
             == (paper, defense, dataset, arch, at, checkpoint)]
    assert len(found) == 1, found
    return found[0]


# (paper, defense, dataset, arch, at, checkpoint, column, percent): values copied from the papers' tables.
KNOWN = [
    ("cas", "cas", "cifar10", "resnet18", "pgd_at", "last", "clean", 86.79),
    ("cas", "cas", "cifar10", "resnet18", "pgd_at", "last", "aa", 44.74),  # the plugin's "autoattack"
    ("cas", "cas", "cifar10", "resnet18", "pgd_at", "best", "aa", 47.40),
    ("cas", "cas", "cifar10", "resnet18", "pgd_at", "last", "pgd20@eps=16/255", 16.64),
    ("cas", "cas", "cifar10", "resnet18", "pgd_at", "last", "table4_pgd20_cas_loss", 47.99),
    ("cas", "cas", "cifar10", "resnet18", "mart", "last", "md_cas", 49.89),
    ("cas", "none", "cifar10", "resnet18", "trades", "last", "aa", 47.46),
    ("cas", "none", "cifar10", "resnet18", "standard", "last", "clean", 92.75),
    ("cas", "cas", "cifar10", "vgg16_bn", "trades", "best", "pgd20", 49.86),
    ("cas", "cas", "cifar10", "wrn34_10", "mart", "last", "cw", 57.11),
    ("cas", "cas", "svhn", "resnet18", "mart", "last", "nattack", 80.12),
    ("cifs", "cifs", "cifar10", "resnet18", "pgd_at", "best", "clean", 82.46),  # "pgd_at@best"
    ("cifs", "cifs", "cifar10", "resnet18", "pgd_at", "last", "aa_custom", 46.20),
    ("cifs", "cifs", "cifar10", "wrn28_10", "fat", "last", "cw", 52.34),
    ("cifs", "cifs", "cifar10", "resnet18", "trades", "last", "pgd100", 43.65),
    ("cifs", "cifs", "fashion_mnist", "resnet10", "pgd_at", "last", "pgd40", 66.59),
    ("cifs", "cifs", "svhn", "resnet18", "pgd_at", "last", "aa_custom", 42.10),
    ("fsr", "fsr", "cifar10", "resnet18", "trades", "last", "aa", 48.45),
    ("fsr", "none", "cifar10", "resnet18", "trades", "last", "aa", 46.81),
    ("fsr", "fsr", "svhn", "vgg16_bn", "trades", "last", "pgd20", 54.56),
    ("fsr", "none", "svhn", "vgg16_bn", "mart", "last", "ensemble", 37.64),
    ("fsr", "fsr:ablation=no_sep", "cifar10", "resnet18", "pgd_at", "last", "aa", 45.47),
    ("fsr", "fsr:ablation=no_rec", "cifar10", "resnet18", "pgd_at", "last", "pgd20", 50.06),
    ("ewas", "ewas", "cifar10", "resnet18", "pgd_at", "last", "apgd_square", 55.60),
    ("ewas", "none", "cifar10", "resnet18", "pgd_at", "last", "apgd_square", 37.02),
    ("ewas", "ewas", "cifar10", "resnet18", "pgd_at", "last", "pgd20@attack_lam=1", 46.99),
    ("ewas", "ewas", "cifar10", "wrn34_10", "pgd_at", "last", "pgd20@attack_lam=10", 47.19),
    ("ewas", "ewas", "cifar10", "wrn28_10", "pgd_at", "last", "cw", 67.07),
    ("ewas", "ewas:lam=0.05", "svhn", "resnet18", "pgd_at", "last", "cw", 69.67),
    ("ewas", "none", "svhn", "resnet18", "pgd_at", "last", "pgd20", 50.35),
    ("denoise", "denoise:op=nonlocal_embedded_gaussian", "imagenet", "official_resnet152", "pgd_at_targeted", "last",
     "pgd2000_targeted", 42.6),
    ("denoise", "none", "imagenet", "official_resnet152", "pgd_at_targeted", "last", "pgd10_targeted", 52.5),
    ("denoise", "denoise:op=nonlocal_embedded_gaussian,subsample=2", "imagenet", "official_resnet152",
     "pgd_at_targeted", "last", "caad2017_blackbox", 49.5),
    ("denoise", "none", "imagenet", "official_resnet152", "standard", "last", "clean", 78.91),
    ("denoise", "denoise", "cifar10", "official_cifar_simple", "pgd_at", "last", "pgd20", 45.2),
    ("denoise", "none", "cifar10", "official_cifar_wide", "pgd_at", "last", "pgd100", 46.4),
    ("smooth", "smooth:act=silu", "imagenet", "resnet50", "pgd_at", "last", "pgd200", 42.3),
    ("smooth", "none", "imagenet", "resnet50", "pgd_at", "last", "pgd200", 33.0),
    ("smooth", "smooth:act=softplus,beta=10,passes=attack", "imagenet", "resnet50", "pgd_at", "last", "clean", 68.3),
    ("smooth", "smooth:act=elu,alpha=2", "imagenet", "resnet50", "pgd_at", "last", "pgd200", 33.2),
    ("smooth", "smooth:act=softplus,beta=10,passes=update", "imagenet", "resnet50", "standard", "last", "clean", 77.0),
]


@pytest.mark.parametrize("paper,defense,dataset,arch,at,checkpoint,column,value", KNOWN,
                         ids=[f"{k[0]}-{k[1]}-{k[2]}-{k[3]}-{k[4]}-{k[5]}-{k[6]}" for k in KNOWN])
def test_known_values(paper, defense, dataset, arch, at, checkpoint, column, value):
    record = find(paper, defense, dataset, arch, at, checkpoint)
    assert record.metrics[column] == pytest.approx(value)


def test_record_counts_per_paper():
    counts = {paper: sum(r.paper == paper for r in RECORDS) for paper in {r.paper for r in RECORDS}}
    assert counts == {"cas": 50, "cifs": 11, "fsr": 26, "ewas": 16, "denoise": 10, "smooth": 11}


def test_autoattack_columns():
    """"aa" is standard AutoAttack only: CAS's and FSR's; CIFS's and EWAS's APGD + Square subsets keep their names."""
    for record in RECORDS:
        assert "autoattack" not in record.metrics
        if "aa" in record.metrics:
            assert record.paper in ("cas", "fsr"), record
    assert not any("aa" in r.metrics for r in RECORDS if r.paper in ("cifs", "ewas"))
    assert "apgd_square" in find("ewas", "ewas", "cifar10", "resnet18", "pgd_at", "last").metrics
    assert "aa_custom" in find("cifs", "cifs", "cifar10", "wrn28_10", "pgd_at", "last").metrics
    assert "NOT standard AutoAttack" in find("cifs", "cifs", "cifar10", "wrn28_10", "pgd_at", "last").protocol
    assert "NOT standard AutoAttack" in find("ewas", "none", "cifar10", "resnet18", "pgd_at", "last").protocol


def test_metrics_are_percentages():
    for record in RECORDS:
        assert record.metrics, record
        for column, value in record.metrics.items():
            assert type(value) is float, (record.source, column)
            assert 0.0 <= value <= 100.0, (record.source, column, value)


def test_every_record_is_described():
    for record in RECORDS:
        assert record.source.strip() and record.protocol.strip(), record
        assert "\n" not in record.protocol and "\n" not in record.source
        assert record.checkpoint in ("last", "best")
        assert record.paper in DEFENSES.names()
        if record.checkpoint == "best":
            assert "TEST set" in record.protocol  # the papers select "best" on the test set


def test_names_are_advdef_names_or_declared_paper_names():
    models, datasets, methods = set(MODELS.names()), set(DATASETS.names()), set(TRAINING.names())
    assert not set(PAPER_ARCHS) & models
    assert not set(PAPER_DATASETS) & datasets
    assert not set(PAPER_AT_METHODS) & methods
    for record in RECORDS:
        assert record.arch in models or record.arch in PAPER_ARCHS, record.arch
        assert record.dataset in datasets or record.dataset in PAPER_DATASETS, record.dataset
        assert record.at in methods or record.at in PAPER_AT_METHODS, record.at
        DEFENSES.canonical(record.defense)  # every defense is a valid advdef spec


def test_keys_are_unique_and_order_is_deterministic():
    keys = [(r.paper, r.defense, r.dataset, r.arch, r.at, r.checkpoint) for r in RECORDS]
    assert len(keys) == len(set(keys))  # the report de-duplicates on this key
    assert published_results() == RECORDS
    order = [(r.paper, r.dataset, r.arch, r.at, ("last", "best").index(r.checkpoint)) for r in RECORDS]
    assert order == sorted(order)
    cas = [(r.defense, r.checkpoint) for r in RECORDS if (r.paper, r.arch, r.at, r.dataset)
           == ("cas", "resnet18", "pgd_at", "cifar10")]
    assert cas == [("cas", "last"), ("none", "last"), ("cas", "best"), ("none", "best")]


def test_no_randomize_records():
    assert not [r for r in RECORDS if r.paper == "randomize" or r.defense.startswith("randomize")]
    assert published_results("randomize") == []


def test_filter_by_defense():
    fsr = published_results("fsr")
    assert {r.paper for r in fsr} == {"fsr"}
    assert {r.defense for r in fsr} == {"fsr", "none", "fsr:ablation=no_sep", "fsr:ablation=no_rec"}
    baselines = published_results("none")
    assert {r.defense for r in baselines} == {"none"}
    assert {r.paper for r in baselines} == {"cas", "fsr", "ewas", "denoise", "smooth"}
    with pytest.raises(UserError):
        published_results("fsrr")


def test_fsr_ablation_full_is_the_main_record():
    full = find("fsr", "fsr", "cifar10", "resnet18", "pgd_at", "last").metrics
    factory = DEFENSES.get("fsr").factory
    assert all(full[k] == v for k, v in factory.published_ablations["full"].items())


# -- matching a run's setting ------------------------------------------------------------------

def keys(records):
    return sorted((r.paper, r.defense, r.checkpoint) for r in records)


def test_match_fsr_trades():
    records = match_published("cifar10", "resnet18", "fsr", "trades")
    assert keys(records) == [("fsr", "fsr", "last")]
    assert records[0].metrics["aa"] == 48.45


def test_match_canonical_run_specs():
    """A run stores canonical specs with every parameter."""
    run = (DATASETS.canonical("cifar10"), MODELS.canonical("resnet18"), DEFENSES.canonical("fsr"),
           TRAINING.canonical("trades:beta=6"))
    assert match_published(*run) == match_published("cifar10", "resnet18", "fsr", "trades")
    assert match_published("cifar10", "resnet18:width=64", "fsr", "trades:beta=6")[0].metrics["aa"] == 48.45


def test_match_undefended_baselines():
    records = match_published("cifar10", "resnet18", "none", "trades")
    assert keys(records) == [("cas", "none", "best"), ("cas", "none", "last"), ("ewas", "none", "last"),
                             ("fsr", "none", "last")]
    fsr = [r for r in records if r.paper == "fsr"][0]
    assert fsr.metrics["aa"] == 46.81


def test_match_needs_the_same_architecture_and_method():
    assert match_published("cifar10", "preact_resnet18", "fsr", "trades") == []
    assert match_published("cifar10", "resnet18", "fsr", "fat") == []
    assert match_published("cifar100", "resnet18", "fsr", "trades") == []
    assert match_published("cifar10", "resnet18", "cifs", "fat")[0].metrics["clean"] == 86.35


def test_match_cas_checkpoints_and_parameters():
    assert keys(match_published("cifar10", "resnet18", "cas", "pgd_at")) == [("cas", "cas", "best"),
                                                                              ("cas", "cas", "last")]
    # a record without parameters is the paper's configuration; other runs of the plugin match by name
    assert len(match_published("cifar10", "vgg16_bn", "cas:beta=3", "mart")) == 2
    assert len(match_published("cifar10", "vgg16_bn", DEFENSES.canonical("cas:beta=3"), "mart")) == 2


def test_match_smooth_by_spec():
    def specs(defense, at="pgd_at"):
        return [r.defense for r in match_published("imagenet", "resnet50", defense, at)]

    assert specs("smooth") == ["smooth:act=silu"]  # the default act is silu
    assert specs("smooth:act=swish") == ["smooth:act=silu"]  # alias
    assert specs(DEFENSES.canonical("smooth:act=silu")) == ["smooth:act=silu"]
    assert specs("smooth:act=softplus,beta=10") == ["smooth:act=softplus,beta=10"]
    assert specs("smooth:act=softplus,beta=10,passes=attack") == ["smooth:act=softplus,beta=10,passes=attack"]
    assert specs("smooth:act=elu") == ["smooth:act=elu"]
    assert specs("smooth:act=elu,alpha=2.0") == ["smooth:act=elu,alpha=2"]
    assert specs("smooth:act=gelu") == []
    update = "smooth:act=softplus,beta=10,passes=update"
    assert specs(update, "standard") == [update]
    assert specs("none") == ["none"]


def test_match_parameterized_variants_exclude_the_default_record():
    assert [r.defense for r in match_published("cifar10", "resnet18", "fsr:ablation=no_sep", "pgd_at")] == [
        "fsr:ablation=no_sep"]
    assert [r.defense for r in match_published("cifar10", "resnet18", "fsr", "pgd_at")] == ["fsr"]
    # EWAS's SVHN numbers are for lam 0.05; the default lam 0.01 is another model
    assert match_published("svhn", "resnet18", "ewas", "pgd_at") == []
    assert [r.metrics["cw"] for r in match_published("svhn", "resnet18", "ewas:lam=0.05", "pgd_at")] == [69.67]


def test_match_unknown_defense_is_empty():
    assert match_published("cifar10", "resnet18", "randomize", "pgd_at") == []
    assert match_published("cifar10", "resnet18", "nosuchdefense", "pgd_at") == []
