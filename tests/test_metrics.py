import numpy as np
import pytest

from mimicfilter.metrics import auroc, detection, spearman


def test_auroc_counts_correctly_ordered_pairs_and_half_ties():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    positives = np.array([False, False, True, True])
    assert auroc(scores, positives) == pytest.approx(0.75)
    assert auroc(np.ones(4), positives) == pytest.approx(0.5)


def test_detection_precision_recall_f1():
    result = detection(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    assert (result.precision, result.recall, result.f1) == (0.5, 0.5, 0.5)


def test_spearman_is_rank_based():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
