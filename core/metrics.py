"""Evaluation metrics from scikit-learn/scipy (never a metric script downloaded at run time)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def classification_metrics(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """accuracy, macro-F1 and Matthews correlation (the GLUE trio)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    p = np.asarray(preds, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    if p.size == 0:
        return {"accuracy": float("nan"), "f1": float("nan"), "mcc": float("nan")}
    return {
        "accuracy": float(accuracy_score(y, p)),
        "f1": float(f1_score(y, p, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y, p)),
    }


def regression_metrics(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman; 0.0 (not NaN) when either side is constant, so JSON stays valid."""
    from scipy.stats import pearsonr, spearmanr

    p = np.asarray(preds, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return {
            "pearson": 0.0,
            "spearman": 0.0,
            "mse": float(np.mean((p - y) ** 2)) if p.size else 0.0,
        }
    return {
        "pearson": float(pearsonr(p, y)[0]),
        "spearman": float(spearmanr(p, y)[0]),
        "mse": float(np.mean((p - y) ** 2)),
    }


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean token NLL); capped so that a diverged model still serialises to JSON."""
    if n_tokens <= 0:
        return float("nan")
    return float(math.exp(min(total_nll / n_tokens, 50.0)))


def primary_metric(task: str, problem_type: str | None) -> tuple[str, str]:
    """(metric name, "max" | "min") that early stopping and "best" follow."""
    if task in ("causal_lm", "sparsify"):
        return "perplexity", "min"
    if problem_type == "regression":
        return "pearson", "max"
    return "accuracy", "max"


def is_better(value: float | None, best: float | None, mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best
