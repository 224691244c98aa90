"""Evaluation: attacks over a fixed sample set, per-sample outcomes, worst cases, intervals."""

from advdef.evaluation.engine import EvalConfig, evaluate_run
from advdef.evaluation.stats import Proportion, wilson_interval
from advdef.evaluation.summary import EvalSummary, summarize

__all__ = ["EvalConfig", "EvalSummary", "Proportion", "evaluate_run", "summarize", "wilson_interval"]
