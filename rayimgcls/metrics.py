"""Classification metrics in plain numpy: top-k, P/R/F1, confusion matrix, mAP, per-class thresholds.

Used by training's validation and by `rayimgcls evaluate`, so the two report the same numbers. Top-5 is only
reported with more than 5 classes (timm clamps k, making it a meaningless 100%); multi-label mAP averages
over the classes that have at least one positive and says how many were left out. A row with a NaN score (a
diverged model) has no ranking: it counts as a miss, never as a hit.
"""

from __future__ import annotations

import numpy as np


def topk_accuracy(probs: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target is among the k highest scores (ties ranked by class index, as a stable
    sort would). The target's rank is counted, not sorted for: one pass over (rows, classes), where a full sort
    of 100,000 x 1,000 scores took seconds. A row with a NaN score is a miss (NaN compares false with
    everything, so counting would rank its target first)."""
    if len(targets) == 0:
        return float("nan")
    target = probs[np.arange(len(targets)), targets][:, None]
    ahead = (probs > target).sum(axis=1)
    tied_before = ((probs == target) & (np.arange(probs.shape[1])[None, :] < targets[:, None])).sum(axis=1)
    return float(((ahead + tied_before < k) & scored(probs)).mean())


def scored(probs: np.ndarray) -> np.ndarray:
    """Per row: whether every score is a number (not NaN), i.e. the row can be ranked at all."""
    return ~np.isnan(probs).any(axis=1)


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of rows of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (targets.astype(np.int64), preds.astype(np.int64)), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def per_class_prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 per class from counts (0 where undefined, as scikit-learn's zero_division=0)."""
    tp, fp, fn = (x.astype(np.float64) for x in (tp, fp, fn))
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": (tp + fn).astype(np.int64)}


def multiclass_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Top-1, top-5 (with more than 5 classes), macro P/R/F1 and the confusion matrix. A row with a NaN score
    predicts no class (argmax would pick the NaN): it is a false negative of its class and stays out of the
    confusion matrix."""
    num_classes = probs.shape[1]
    ok = scored(probs)
    cm = confusion_matrix(targets[ok], probs[ok].argmax(axis=1), num_classes)
    tp = np.diag(cm)
    support = np.bincount(targets.astype(np.int64), minlength=num_classes)
    prf = per_class_prf(tp, cm.sum(axis=0) - tp, support - tp)
    present = prf["support"] > 0  # macro averages over the classes present in the targets
    out = {
        "top1": topk_accuracy(probs, targets, 1),
        "macro_precision": float(prf["precision"][present].mean()) if present.any() else float("nan"),
        "macro_recall": float(prf["recall"][present].mean()) if present.any() else float("nan"),
        "macro_f1": float(prf["f1"][present].mean()) if present.any() else float("nan"),
        "per_class": {k: v.tolist() for k, v in prf.items()},
        "confusion_matrix": cm.tolist(),
    }
    if num_classes > 5:
        out["top5"] = topk_accuracy(probs, targets, 5)
    return out


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each positive (ties broken by
    order, as scikit-learn's average_precision_score); NaN without positives. NaN scores rank last, tied."""
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    # Precision at each distinct threshold, so tied scores count together (compared, not subtracted: -inf - -inf
    # is NaN).
    sorted_scores = scores[order]
    distinct = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    cum_hits = np.cumsum(hits)[distinct]
    ranks = (np.arange(len(scores)) + 1)[distinct]
    precision = cum_hits / ranks
    recall_gain = np.diff(np.r_[0.0, cum_hits]) / n_pos
    return float((precision * recall_gain).sum())


def multilabel_metrics(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | list[float]) -> dict:
    """mAP (classes with positives), per-class AP, and micro/macro/sample F1 at per-class thresholds."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    targets = targets.astype(bool)
    ap = np.array([average_precision(probs[:, c], targets[:, c]) for c in range(probs.shape[1])])
    preds = probs >= thresholds[None, :]
    tp = (preds & targets).sum(axis=0)
    fp = (preds & ~targets).sum(axis=0)
    fn = (~preds & targets).sum(axis=0)
    prf = per_class_prf(tp, fp, fn)
    micro = per_class_prf(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))
    sample_tp = (preds & targets).sum(axis=1)
    sample_size = (preds.sum(axis=1) + targets.sum(axis=1)).astype(np.float64)
    sample_f1 = _safe_div(2 * sample_tp.astype(np.float64), sample_size)
    present = ~np.isnan(ap)
    return {
        "map": float(ap[present].mean()) if present.any() else float("nan"),
        "map_classes": int(present.sum()),
        "classes_without_positives": int((~present).sum()),
        "micro_f1": float(micro["f1"][0]),
        "macro_f1_ml": float(prf["f1"][prf["support"] > 0].mean()) if (prf["support"] > 0).any() else float("nan"),
        "sample_f1": float(sample_f1.mean()) if len(sample_f1) else float("nan"),
        "per_class": {"ap": [None if np.isnan(x) else float(x) for x in ap], **{k: v.tolist() for k, v in prf.items()}},
    }


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5) -> list[float]:
    """Per class, the threshold (among the observed scores) that maximises F1; `default` for classes
    without positives. Ties go to the higher threshold, which predicts fewer labels."""
    out = []
    targets = targets.astype(bool)
    for c in range(probs.shape[1]):
        pos = targets[:, c]
        if not pos.any():
            out.append(default)
            continue
        best_f1, best_t = -1.0, default
        for t in np.unique(probs[:, c]):
            pred = probs[:, c] >= t
            tp = float((pred & pos).sum())
            f1 = 2 * tp / (pred.sum() + pos.sum())
            if f1 >= best_f1:
                best_f1, best_t = f1, float(t)
        out.append(best_t)
    return out


def summary_metrics(
    probs: np.ndarray, targets: np.ndarray, multilabel: bool, thresholds: list[float] | None = None
) -> dict[str, float]:
    """The scalar metrics training logs per epoch (no per-class lists)."""
    if multilabel:
        m = multilabel_metrics(probs, targets, thresholds if thresholds is not None else [0.5] * probs.shape[1])
    else:
        m = multiclass_metrics(probs, targets)
    return {k: v for k, v in m.items() if isinstance(v, float | int)}
