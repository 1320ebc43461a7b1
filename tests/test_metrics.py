"""metrics.py against values computed by hand."""

from __future__ import annotations

import math

import numpy as np

from rayimgcls.metrics import (
    average_precision,
    confusion_matrix,
    multiclass_metrics,
    multilabel_metrics,
    topk_accuracy,
    tune_thresholds,
)

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
TARGETS = np.array([0, 2, 2, 1])


def test_topk_and_confusion_matrix():
    assert topk_accuracy(PROBS, TARGETS, 1) == 0.5
    assert topk_accuracy(PROBS, TARGETS, 2) == 1.0
    assert confusion_matrix(TARGETS, PROBS.argmax(1), 3).tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]


def test_multiclass_precision_recall_f1_by_hand():
    m = multiclass_metrics(PROBS, TARGETS)
    # class 0: tp 1, fp 1 -> P .5, R 1, F1 2/3; class 1: tp 0 -> 0; class 2: tp 1, fn 1 -> P 1, R .5, F1 2/3
    assert m["per_class"]["precision"] == [0.5, 0.0, 1.0]
    assert m["per_class"]["recall"] == [1.0, 0.0, 0.5]
    assert math.isclose(m["macro_f1"], (2 / 3 + 0 + 2 / 3) / 3)
    assert "top5" not in m  # only with more than five classes
    six = np.eye(6)[[0, 1, 2, 3, 4, 5]] * 0.5 + 0.05
    assert multiclass_metrics(six, np.arange(6))["top5"] == 1.0


def test_average_precision_by_hand():
    # ranked: pos, neg, pos -> precisions at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert math.isclose(average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])), (1 + 2 / 3) / 2)
    assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
    # a tie between a positive and a negative counts as one threshold: precision 1/2 there
    assert math.isclose(average_precision(np.array([0.5, 0.5]), np.array([1, 0])), 0.5)


def test_multilabel_metrics_by_hand():
    probs = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.8, 0.6, 0.3]])
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0]])
    m = multilabel_metrics(probs, targets, [0.5, 0.5, 0.5])
    # class 0 AP 1, class 1: ranks .7(pos) .6 .2 -> 1; class 2: .6(pos) -> 1  => mAP 1
    assert m["map"] == 1.0 and m["map_classes"] == 3
    # predictions at .5: tp = 4 ((0,0),(0,2),(1,1),(2,0)), fp = 1 ((2,1)), fn = 0 -> micro F1 = 8/9
    assert math.isclose(m["micro_f1"], 8 / 9)
    m = multilabel_metrics(probs, np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]]), [0.5] * 3)
    assert m["classes_without_positives"] == 1 and m["map_classes"] == 2


def test_tuned_thresholds_maximise_f1_per_class():
    probs = np.array([[0.9], [0.35], [0.3], [0.2]])
    targets = np.array([[1], [1], [0], [0]])
    assert tune_thresholds(probs, targets) == [0.35]
    assert tune_thresholds(probs, np.zeros((4, 1))) == [0.5]


def test_topk_counts_ranks_like_a_stable_sort_with_ties():
    """topk_accuracy counts the target's rank instead of sorting; with many tied scores it must agree with a
    stable sort (ties ranked by class index), for every k."""
    from rayimgcls.metrics import topk_accuracy

    rng = np.random.default_rng(0)
    for _ in range(40):
        n, c = int(rng.integers(1, 40)), int(rng.integers(2, 12))
        probs = rng.integers(0, 4, (n, c)).astype(np.float64)  # few distinct values: ties everywhere
        targets = rng.integers(0, c, n)
        for k in (1, 2, 5):
            by_sort = (np.argsort(-probs, axis=1, kind="stable")[:, :k] == targets[:, None]).any(axis=1).mean()
            assert topk_accuracy(probs, targets, k) == float(by_sort)


def test_nan_scores_are_never_counted_as_correct():
    """A diverged model scores NaN: the review found top-1 1.0 for such a run (NaN compares false with
    everything, so the target ranked first). NaN rows are misses for top-k, predict no class for P/R/F1 and
    rank last in AP."""
    nan = np.full((4, 3), np.nan)
    assert topk_accuracy(nan, TARGETS, 1) == 0.0 and topk_accuracy(nan, TARGETS, 3) == 0.0
    half = PROBS.copy()
    half[[0, 3], 1] = np.nan  # rows 0 (a hit) and 3 lose their ranking; rows 1, 2 stay (top-2: both hits)
    assert topk_accuracy(half, TARGETS, 1) == 0.25 and topk_accuracy(half, TARGETS, 2) == 0.5
    m = multiclass_metrics(nan, TARGETS)
    assert m["top1"] == 0.0 and m["macro_recall"] == 0.0 and m["macro_f1"] == 0.0
    assert m["confusion_matrix"] == [[0] * 3] * 3 and m["per_class"]["support"] == [1, 1, 2]
    assert average_precision(np.array([np.nan, 0.1]), np.array([1, 0])) == 0.5  # the positive ranks last
    assert average_precision(np.array([np.nan, np.nan]), np.array([1, 0])) == 0.5  # a tie: one threshold
    ml = multilabel_metrics(np.full((2, 2), np.nan), np.array([[1, 0], [0, 1]]), [0.5, 0.5])
    assert ml["micro_f1"] == 0.0 and ml["sample_f1"] == 0.0
