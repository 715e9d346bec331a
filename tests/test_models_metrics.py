"""Evaluation metrics against hand-computed values (sklearn is not installed)."""
import numpy as np
import pytest

from edgefuse.models.evaluate import balanced_accuracy, conditions, macro_f1, scores


def test_macro_f1_hand_computed():
    # true: 0 0 0 1 1 2 ; pred: 0 1 0 1 2 2
    # class 0: tp2 fp0 fn1 -> F1 = 4/5 = 0.8
    # class 1: tp1 fp1 fn1 -> F1 = 2/4 = 0.5
    # class 2: tp1 fp1 fn0 -> F1 = 2/3
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 1, 0, 1, 2, 2])
    assert macro_f1(y, p, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert balanced_accuracy(y, p, 3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_abstentions_count_as_misses_and_absent_classes_are_skipped():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, -1, 1, 1])
    # class 0: tp1, support 2, predicted 1 -> 2/3 ; class 1: tp2, support2, pred2 -> 1
    assert macro_f1(y, p, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    s = scores(y, p, 3)
    assert s["accuracy"] == 0.75 and s["abstained"] == 1


def test_perfect_and_constant_predictions():
    y = np.array([0, 1, 1, 0, 1])
    assert macro_f1(y, y, 2) == 1.0
    # always 0: class0 F1 = 2*2/(2+5) ; class1 F1 = 0
    assert macro_f1(y, np.zeros(5, int), 2) == pytest.approx((4 / 7) / 2)


def test_degraded_condition_drops_half_of_present_seeded():
    class WS:  # the two attributes conditions() reads
        modalities = ("a", "b")
        mask = np.ones((10, 2), np.float32)
    WS.mask[:3, 1] = 0
    c1 = conditions(WS, np.arange(10), seed=1)
    c2 = conditions(WS, np.arange(10), seed=1)
    assert (~c1["without:a"][:, 0]).all() and (c1["without:a"][:, 1] == (WS.mask[:, 1] > 0)).all()
    assert c1["degraded:b"][:, 1].sum() == 7 - 7 // 2
    assert (c1["degraded:b"] == c2["degraded:b"]).all()
    assert (c1["degraded:a"][:, 1] == (WS.mask[:, 1] > 0)).all()
