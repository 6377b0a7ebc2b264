"""Tests for boxprobe.behaviour.scoring: the matching rule, all-boxes splitting, metrics and the random baseline."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pandas as pd
import pytest

from boxprobe.behaviour import scoring
from boxprobe.behaviour.scoring import (
    accuracy_by_numops, contents_match, normal_ci, parse_contents, precision_recall,
    random_baseline_by_numops, random_baseline_probability, split_all_boxes_statement,
    state_accuracy, wilson_ci,
)


def test_doctests_pass():
    result = doctest.testmod(scoring)
    assert result.attempted >= 8
    assert result.failed == 0


# -- the matching rule --------------------------------------------------------------------------

def test_word_order_does_not_matter():
    assert contents_match("the cup and the apple and the bag", "the apple and the bag and the cup")


def test_article_whitespace_and_case():
    assert contents_match("apple and ball", "the apple and the ball")
    assert contents_match("  The apple   and the  ball ", "the apple and the ball")
    # "the" is only an article at the start of an item, not a substring to delete.
    assert parse_contents("the theater") == {"theater"}


def test_final_period_with_or_without_space():
    assert contents_match("the apple.", "the apple")
    assert contents_match("the apple .", "the apple")
    assert contents_match("nothing.", "nothing")


@pytest.mark.parametrize("pred", [
    "the apple, the ball, and the cup",
    "the apple, the ball and the cup",
    "the apple, the ball, the cup",
    "the apple,and the ball , the cup",
])
def test_comma_and_oxford_comma_forms(pred):
    assert parse_contents(pred) == {"apple", "ball", "cup"}
    assert contents_match(pred, "the apple and the ball and the cup")


def test_nothing_versus_blank_prediction():
    assert contents_match("nothing", "nothing")
    assert contents_match("is empty", "nothing")
    assert contents_match("contains nothing", "nothing")
    assert not contents_match("", "nothing")
    assert not contents_match("   ", "nothing")
    assert not contents_match(None, "nothing")
    assert not contents_match(float("nan"), "nothing")
    assert not contents_match("nothing", "the apple")
    assert not contents_match("the apple", "nothing")


def test_extra_or_missing_object_is_wrong():
    assert not contents_match("the apple and the ball and the cup", "the apple and the ball")
    assert not contents_match("the apple", "the apple and the ball")
    assert not contents_match("the apple and the cup", "the apple and the ball")


def test_multi_word_objects():
    assert parse_contents("the teddy bear and the cup") == {"teddy bear", "cup"}
    assert contents_match("the cup, and the teddy bear", "the teddy bear and the cup")
    assert not contents_match("the teddy and the bear and the cup", "the teddy bear and the cup")
    # "and" inside a word is not a separator.
    assert parse_contents("the sand and the band") == {"sand", "band"}


def test_seq2seq_forms():
    assert contents_match("contains the ball and the apple", "the apple and the ball")
    assert contents_match("<extra_id_0> contains the apple <extra_id_1>", "the apple")
    assert contents_match("<pad> <extra_id_0> is empty </s>", "nothing")


def test_malformed_predictions_are_unparseable():
    # A dangling "and" (a truncated generation) is not silently accepted.
    assert not contents_match("the apple and", "the apple")
    assert parse_contents("the apple, , the ball") is None
    assert parse_contents("the apple and nothing") is None
    assert parse_contents("contains") is None


def test_unparseable_gold_raises():
    with pytest.raises(ValueError, match="Gold content string"):
        contents_match("the apple", "")


# -- all-boxes statements -----------------------------------------------------------------------

def test_split_all_boxes_with_missing_box():
    text = ("Box 0 contains the apple, Box 1 contains nothing, Box 2 contains the bag, and the cup, "
            "Box 4 contains the teddy bear and the pen, and Box 3 is empty.")
    boxes = split_all_boxes_statement(text, num_boxes=6)
    assert boxes == {0: "the apple", 1: "nothing", 2: "the bag, and the cup", 3: "nothing",
                     4: "the teddy bear and the pen", 5: None}
    assert contents_match(boxes[2], "the bag and the cup")
    assert contents_match(boxes[4], "the pen and the teddy bear")
    assert not contents_match(boxes[5], "nothing")


def test_split_all_boxes_container_labels():
    text = "Container B contains the ball and the key, Container A contains nothing, Container C is empty."
    boxes = split_all_boxes_statement(text, num_boxes=4, box_label="Container")
    assert boxes == {0: "nothing", 1: "the ball and the key", 2: "nothing", 3: None}
    # With the wrong label nothing is found.
    assert set(split_all_boxes_statement(text, num_boxes=4).values()) == {None}


def test_split_all_boxes_stops_at_period_and_first_mention_wins():
    text = "Box 0 contains the apple. Then more text. Box 0 contains the ball, Box 9 contains the key"
    boxes = split_all_boxes_statement(text, num_boxes=2)
    assert boxes == {0: "the apple", 1: None}


def test_split_does_not_treat_box_object_as_marker():
    text = "Box 0 contains the box and the apple, Box 1 contains the cup"
    assert split_all_boxes_statement(text, num_boxes=2) == {0: "the box and the apple", 1: "the cup"}


# -- intervals and accuracy tables --------------------------------------------------------------

def test_normal_and_wilson_ci_hand_computed():
    # p = 0.5, n = 100: se = 0.05, half-width 1.96 * 0.05 = 0.098.
    assert normal_ci(50, 100) == pytest.approx((0.402, 0.598))
    # Wilson: centre 0.5, half = 1.96 / (1 + 1.96^2/100) * sqrt(0.0025 + 1.96^2/40000) = 0.096170.
    assert wilson_ci(50, 100) == pytest.approx((0.403830, 0.596170), abs=1e-6)
    # p = 0.8, n = 25: se = 0.08, half = 0.1568.
    assert normal_ci(20, 25) == pytest.approx((0.6432, 0.9568))
    assert all(math.isnan(x) for x in normal_ci(0, 0) + wilson_ci(0, 0))


def test_wilson_nondegenerate_at_zero_and_clipping():
    assert normal_ci(0, 10) == (0.0, 0.0)
    low, high = wilson_ci(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(1.96**2 / 10 / (1 + 1.96**2 / 10))  # 0.27754
    assert wilson_ci(10, 10)[0] == pytest.approx(1 - high)
    # 9/10: 0.9 + 1.96 * sqrt(0.009) = 1.086 is clipped to 1.
    assert normal_ci(9, 10)[1] == 1.0


def test_accuracy_by_numops_table():
    df = pd.DataFrame({
        "numops": [0] * 4 + [1] * 5 + [9],
        "correct": [True, True, True, False] + [True, False, False, False, False] + [True],
    })
    table = accuracy_by_numops(df, numops_values=range(3))
    assert list(table.columns) == ["numops", "n", "n_correct", "accuracy", "ci_low", "ci_high",
                                   "wilson_low", "wilson_high"]
    assert table["numops"].tolist() == [0, 1, 2]
    assert table["n"].tolist() == [4, 5, 0]
    assert table["accuracy"].iloc[:2].tolist() == pytest.approx([0.75, 0.2])
    assert math.isnan(table["accuracy"].iloc[2])
    half = 1.96 * math.sqrt(0.2 * 0.8 / 5)
    assert table.loc[1, "ci_low"] == pytest.approx(max(0.0, 0.2 - half))
    assert table.loc[1, "ci_high"] == pytest.approx(0.2 + half)
    assert table.loc[0, "wilson_low"] < 0.75 < table.loc[0, "wilson_high"]
    assert accuracy_by_numops(df, numops_values=None)["numops"].tolist() == [0, 1, 9]


def test_accuracy_by_numops_errors():
    with pytest.raises(KeyError, match="numops"):
        accuracy_by_numops(pd.DataFrame({"correct": [True]}))
    with pytest.raises(ValueError, match="missing"):
        accuracy_by_numops(pd.DataFrame({"numops": [0, 0], "correct": [True, None]}))


def test_state_accuracy():
    df = pd.DataFrame({
        "sample_id": [0, 0, 0, 0, 1, 1],
        "num_operations": [0, 0, 1, 1, 0, 0],
        "correct": [True, True, True, False, True, True],
    })
    # States (0,0) and (1,0) fully correct, (0,1) not.
    assert state_accuracy(df) == pytest.approx(2 / 3)
    assert state_accuracy(df, state_columns=("sample_id",)) == pytest.approx(1 / 2)
    with pytest.raises(KeyError, match="num_operations"):
        state_accuracy(df.drop(columns="num_operations"))


def test_precision_recall():
    assert precision_recall("the apple and the cup", "the apple and the ball and the pen") == \
        pytest.approx((0.5, 1 / 3))
    assert precision_recall("the ball and the apple", "the apple and the ball") == (1.0, 1.0)
    assert precision_recall("the apple and the ball and the cup", "the apple") == pytest.approx((1 / 3, 1.0))
    assert precision_recall("nothing", "nothing") == (1.0, 1.0)
    assert precision_recall("nothing", "the apple") == (0.0, 0.0)
    assert precision_recall("the apple", "nothing") == (0.0, 0.0)
    assert precision_recall("", "nothing") == (0.0, 0.0)
    assert precision_recall(frozenset({"apple"}), frozenset({"apple", "cup"})) == (1.0, 0.5)


# -- random baseline ----------------------------------------------------------------------------

def test_random_baseline_probability():
    assert random_baseline_probability({"apple", "ball", "cup"}, {"apple", "cup"}) == 1 / 8
    assert random_baseline_probability({"apple", "ball", "cup"}, set()) == 1 / 8
    assert random_baseline_probability(["apple", "apple"], ["apple"]) == 1 / 2  # distinct objects
    assert random_baseline_probability(set(), set()) == 1.0
    with pytest.raises(ValueError, match="not among the mentioned"):
        random_baseline_probability({"apple"}, {"ball"})


def test_random_baseline_exhaustive_and_monte_carlo():
    mentioned, gold = ["apple", "ball", "cup", "pen"], {"ball", "pen"}
    subsets = [set(c) for r in range(5) for c in itertools.combinations(mentioned, r)]
    assert sum(s == gold for s in subsets) / len(subsets) == random_baseline_probability(mentioned, gold)

    rng = np.random.default_rng(0)
    trials = 40_000
    # A uniform subset of M is an independent fair coin per object; "nothing" is the empty subset.
    picks = rng.random((trials, len(mentioned))) < 0.5
    guesses = ("nothing" if not row.any() else " and ".join(f"the {o}" for o, b in zip(mentioned, row) if b)
               for row in picks)
    hits = sum(contents_match(g, "the ball and the pen") for g in guesses)
    expected = random_baseline_probability(mentioned, gold)
    assert abs(hits / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_random_baseline_by_numops():
    df = pd.DataFrame({"numops": [0, 0, 1, 2], "n_mentioned": [1, 3, 2, 0]})
    table = random_baseline_by_numops(df)
    assert table["numops"].tolist() == [0, 1, 2]
    assert table["n"].tolist() == [2, 1, 1]
    assert table["baseline_accuracy"].tolist() == pytest.approx([(0.5 + 0.125) / 2, 0.25, 1.0])

    by_sets = pd.DataFrame({"numops": [0, 0, 1], "mentioned": [["a"], ["a", "b", "c"], ("a", "a", "b")]})
    table2 = random_baseline_by_numops(by_sets, numops_values=[0, 1, 3])
    assert table2["baseline_accuracy"].iloc[:2].tolist() == pytest.approx([0.3125, 0.25])
    assert math.isnan(table2["baseline_accuracy"].iloc[2])
    with pytest.raises(KeyError, match="n_mentioned"):
        random_baseline_by_numops(pd.DataFrame({"numops": [0]}))


def test_clustered_wilson_widens_for_correlated_boxes_and_stays_in_bounds():
    from boxprobe.behaviour.scoring import clustered_wilson_ci, wilson_ci

    # Four states of seven boxes, each state all right or all wrong: 28 items carry the information of 4.
    y = [1] * 14 + [0] * 14
    states = [s for s in range(4) for _ in range(7)]
    # Hand-worked: cluster residual sums are +-3.5, so the cluster-robust variance is 4/3 * 49 / 28^2 and the
    # design effect 9.33: an effective n of 3 with 1.5 successes.
    assert clustered_wilson_ci(y, states) == pytest.approx(wilson_ci(1.5, 3.0))
    # One item per cluster: only the G/(G-1) small-sample factor remains, an effective n of 27.
    assert clustered_wilson_ci(y, range(28)) == pytest.approx(wilson_ci(13.5, 27.0))
    lo, hi = clustered_wilson_ci([0] * 21, [s // 7 for s in range(21)])
    assert lo == 0.0 and 0 < hi < 1  # bounded, not a degenerate [0, 0]


def test_accuracy_table_has_scope_int_numops_and_the_nothing_baseline():
    from boxprobe.behaviour.scoring import accuracy_table

    df = pd.DataFrame({"numops": [0, 0, 1, 1], "correct": [True, False, True, True],
                       "gold": ["nothing", "the cup", "nothing", "nothing"],
                       "sample_id": [1, 1, 2, 2], "num_operations": [0, 0, 1, 1]})
    t = accuracy_table(df, numops_values=None)
    assert list(t["scope"]) == ["numops", "numops", "all"] and str(t["numops"].dtype) == "Int64"
    assert t["numops"].isna().tolist() == [False, False, True]
    assert list(t["nothing_baseline"]) == [0.5, 1.0, 0.75] and list(t["accuracy"]) == [0.5, 1.0, 0.75]
    assert ((t["ci_low"] >= 0) & (t["ci_high"] <= 1)).all()
