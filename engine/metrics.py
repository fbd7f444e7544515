"""Evaluation metrics: the papers' numbers, from predictions and labels.

Classification (``eval_accuracy``, ``eval_macro_f1``, ``eval_mcc``, and for two classes ``eval_f1``, the F1 of class
1 that GLUE reports for MRPC and QQP); regression (``eval_mse``, ``eval_pearson``, ``eval_spearman``, STS-B's). Each is
computed here with numpy and defined as scikit-learn and SciPy define it (``tests/test_data_sources.py`` checks them
against ``sklearn.metrics`` and ``scipy.stats`` on the same predictions):

* macro-F1: the unweighted mean of the per-class F1 over the classes present in the labels or the predictions, a
  class with no true and no predicted example scoring 0 (``f1_score(average="macro", zero_division=0)``);
* Matthews correlation: the multiclass form from the confusion matrix (Gorodkin 2004), 0 when undefined
  (``matthews_corrcoef``);
* Spearman: Pearson's r of the average ranks (ties share their mean rank); Pearson and Spearman are NaN when either
  side is constant (``scipy.stats.pearsonr`` / ``spearmanr``).

Every metric says whether higher is better (``DIRECTION``), which studies use to check their ``mode``.
"""

from __future__ import annotations

import math

import numpy as np

CLASSIFICATION = ("eval_accuracy", "eval_macro_f1", "eval_mcc")
BINARY = ("eval_f1",)  # two classes only
REGRESSION = ("eval_mse", "eval_pearson", "eval_spearman")
DIRECTION = {
    "eval_loss": "min",
    "eval_accuracy": "max",
    "eval_macro_f1": "max",
    "eval_f1": "max",
    "eval_mcc": "max",
    "eval_mse": "min",
    "eval_pearson": "max",
    "eval_spearman": "max",
    "perplexity": "min",  # causal LMs (engine.lm_eval)
}
METRICS = tuple(DIRECTION)
DEFAULT_HEADLINE = {"classification": "eval_accuracy", "regression": "eval_pearson", "multiple_choice": "eval_accuracy"}


def task_metrics(task: str, num_classes: int = 0) -> tuple[str, ...]:
    """The metrics a run of ``task`` records (besides ``eval_loss``)."""
    if task == "regression":
        return REGRESSION
    return CLASSIFICATION + (BINARY if num_classes == 2 else ())


def headline(task: str, declared: str | None = None) -> str:
    """The metric a run is judged by: the one the dataset spec or recipe declares, else the task's usual one."""
    return declared or DEFAULT_HEADLINE.get(task, "eval_accuracy")


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred == true)) if len(true) else math.nan


def _confusion(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Confusion matrix over the classes present in either array (rows: true, columns: predicted)."""
    classes, inverse = np.unique(np.concatenate([true, pred]), return_inverse=True)
    t, p = inverse[: len(true)], inverse[len(true) :]
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix


def _f1_per_class(matrix: np.ndarray) -> np.ndarray:
    tp = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(0) + matrix.sum(1)  # 2 tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def macro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    return float(_f1_per_class(_confusion(pred, true)).mean()) if len(true) else math.nan


def binary_f1(pred: np.ndarray, true: np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive`` (0 when it is never true nor predicted)."""
    tp = float(np.sum((pred == positive) & (true == positive)))
    denominator = float(np.sum(pred == positive) + np.sum(true == positive))
    return 2 * tp / denominator if denominator else 0.0


def matthews(pred: np.ndarray, true: np.ndarray) -> float:
    matrix = _confusion(pred, true).astype(np.float64)
    t_sum, p_sum = matrix.sum(1), matrix.sum(0)
    n, correct = matrix.sum(), np.trace(matrix)
    cov_ytyp = correct * n - t_sum @ p_sum
    cov_ypyp = n**2 - p_sum @ p_sum
    cov_ytyt = n**2 - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp))


def mse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean((pred.astype(np.float64) - true.astype(np.float64)) ** 2)) if len(true) else math.nan


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    r = float(xc @ yc / (np.linalg.norm(xc) * np.linalg.norm(yc)))
    return max(-1.0, min(1.0, r))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given the mean of the ranks they span (``scipy.stats.rankdata(method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_average_ranks(np.asarray(x)), _average_ranks(np.asarray(y)))


def compute(task: str, outputs: np.ndarray, labels: np.ndarray, num_classes: int = 0) -> dict[str, float]:
    """The task's metrics from model outputs (logits (N, C), or (N, 1) / (N,) predictions for regression)."""
    if task == "regression":
        pred = outputs.reshape(len(outputs), -1)[:, 0] if outputs.ndim > 1 else outputs
        return {"eval_mse": mse(pred, labels), "eval_pearson": pearson(pred, labels),
                "eval_spearman": spearman(pred, labels)}  # fmt: skip
    pred = outputs.argmax(-1) if outputs.ndim > 1 else outputs
    out = {"eval_accuracy": accuracy(pred, labels), "eval_macro_f1": macro_f1(pred, labels),
           "eval_mcc": matthews(pred, labels)}  # fmt: skip
    if num_classes == 2:
        out["eval_f1"] = binary_f1(pred, labels)
    return out
