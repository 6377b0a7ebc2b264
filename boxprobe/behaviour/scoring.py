"""Scoring of boxes-task predictions, accuracy tables with confidence intervals, and a random baseline.

The rule (Kim & Schuster 2023): a predicted content string is split into objects on ", and", " and"
and ","; the article "the", surrounding whitespace and the final period are dropped. A prediction is
correct iff its set of objects equals the gold set. An empty box must be predicted as "nothing"
(or the seq2seq form "is empty"); a blank prediction is wrong even for an empty box.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from boxprobe.errors import DataError, MissingKeyError

logger = logging.getLogger(__name__)

__all__ = [
    "parse_contents", "contents_match", "split_all_boxes_statement", "normal_ci", "wilson_ci",
    "accuracy_by_numops", "state_accuracy", "precision_recall", "random_baseline_probability",
    "random_baseline_by_numops",
]

# ", and" must be tried before "," so that the Oxford comma does not leave an "and the x" item.
_SEPARATOR = re.compile(r"\s*,\s*and\s+|\s+and\s+|\s*,\s*")
# T5 sentinels and special tokens that a seq2seq decode may leave in the text.
_SENTINEL = re.compile(r"<extra_id_\d+>")
_SPECIAL = re.compile(r"</s>|<pad>|<s>")


def parse_contents(text: str | None) -> frozenset[str] | None:
    """The set of objects named by a content string; ``frozenset()`` for "nothing".

    Accepts "the apple and the ball", "the apple, the ball, and the cup.", "nothing", and the
    seq2seq forms "contains the apple" / "is empty" (a T5 ``<extra_id_0>`` prefix is ignored and
    the text is cut at the next sentinel). Matching is case-insensitive; runs of whitespace count
    as one space, so multi-word objects such as "teddy bear" survive. Returns ``None`` when the
    text is blank or malformed (an empty item, or "nothing" listed next to objects).

    >>> sorted(parse_contents("The cup, the teddy bear, and the apple ."))
    ['apple', 'cup', 'teddy bear']
    >>> parse_contents("is empty"), parse_contents("  ")
    (frozenset(), None)
    """
    if not isinstance(text, str):  # None, or a NaN from a pandas column of missing generations
        return None
    text = _SPECIAL.sub(" ", text).strip()
    text = _SENTINEL.split(text)[1 if _SENTINEL.match(text) else 0]
    text = " ".join(text.lower().split()).rstrip(". ")
    if text.startswith("contains "):
        text = text[len("contains "):]
    if text in ("nothing", "is empty"):
        return frozenset()
    if not text or text == "contains":
        return None
    objects = set()
    for item in _SEPARATOR.split(text):
        item = item.strip()
        if item.startswith("the "):
            item = item[len("the "):].strip()
        if not item or item in ("the", "nothing"):
            return None
        objects.add(item)
    return frozenset(objects)


def contents_match(prediction: str | None, gold: str) -> bool:
    """Whether ``prediction`` names exactly the objects of ``gold`` (order and "the" do not matter).

    >>> contents_match("the ball and the apple.", "the apple and the ball")
    True
    >>> contents_match("the apple, and the ball", "the apple and the ball")
    True
    >>> contents_match("the apple", "the apple and the ball")
    False
    >>> contents_match("nothing", "nothing"), contents_match("", "nothing")
    (True, False)
    """
    gold_set = parse_contents(gold)
    if gold_set is None:
        raise DataError(
            f"Gold content string {gold!r} could not be parsed; expected e.g. 'the apple and the ball' "
            "or 'nothing'. Check the gold column of your data.")
    return parse_contents(prediction) == gold_set


def split_all_boxes_statement(text: str, num_boxes: int = 7, box_label: str = "Box") -> dict[int, str | None]:
    """Split "Box 0 contains the apple, Box 1 contains nothing, ..." into per-box content strings.

    Splits on the "<label> <id> contains" / "<label> <id> is empty" markers, never on commas, since
    objects inside one box are themselves joined with "," and "and". Ids are digits ("Box 3") or
    letters ("Container D" -> 3). A box's content runs to the next marker (or the first period or
    newline) and loses the joining ", and" / "," before the next box; "is empty" becomes "nothing".
    A box that is never mentioned maps to ``None`` (scored wrong); if a box is mentioned twice
    the first mention counts; markers for ids >= ``num_boxes`` only end the previous box.

    >>> split_all_boxes_statement("Box 1 is empty, and Box 0 contains the cup, the pen.", 3)
    {0: 'the cup, the pen', 1: 'nothing', 2: None}
    """
    marker = re.compile(
        rf"\b{re.escape(box_label)}\s+(\d+|[A-Za-z])\b\s+(contains\b|is\s+empty\b)", re.IGNORECASE)
    matches = list(marker.finditer(text))
    result: dict[int, str | None] = {box: None for box in range(num_boxes)}
    for i, m in enumerate(matches):
        ident = m.group(1)
        box = int(ident) if ident.isdigit() else ord(ident.upper()) - ord("A")
        if box >= num_boxes or result[box] is not None:
            continue
        if m.group(2).lower().startswith("is"):
            result[box] = "nothing"
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        content = re.split(r"\.|\n", text[m.end():end], maxsplit=1)[0]
        # Drop the ", and" / "," / " and" that joins this box to the next one.
        result[box] = re.sub(r"(?:\s*,)?(?:\s+and)?[\s,]*$", "", content).strip()
    return result


def normal_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation interval ``p ± z*sqrt(p(1-p)/n)`` clipped to [0, 1]; NaNs when n == 0.

    >>> [round(x, 3) for x in normal_ci(50, 100)]
    [0.402, 0.598]
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    half = z * math.sqrt(p * (1 - p) / n)
    return (max(0.0, p - half), min(1.0, p + half))


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval; unlike the normal interval it is not degenerate at p = 0 or 1."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def clustered_wilson_ci(correct: Sequence[bool], clusters: Sequence, z: float = 1.96) -> tuple[float, float]:
    """Wilson interval on the effective sample size of clustered items; NaNs when empty.

    The boxes of one state are not independent samples. The cluster-robust variance of the mean
    (sum over clusters of squared residual sums, with the G/(G-1) small-sample factor) over the
    simple-random-sampling variance is the design effect; the Wilson interval is taken at
    n / design effect, so it stays within [0, 1] (the effect is floored at 1: never narrower than
    treating every item as independent).
    """
    y = np.asarray(correct, dtype=float)
    n = len(y)
    if n == 0:
        return (math.nan, math.nan)
    p = float(y.mean())
    sums = pd.Series(y - p).groupby(pd.Series(list(clusters)).astype(str).to_numpy()).sum().to_numpy()
    groups = len(sums)
    deff = 1.0
    if groups > 1 and 0 < p < 1:
        var_cluster = groups / (groups - 1) * float((sums ** 2).sum()) / n ** 2
        deff = max(1.0, var_cluster / (p * (1 - p) / n))
    n_eff = n / deff
    return wilson_ci(p * n_eff, n_eff, z)


def accuracy_table(df: pd.DataFrame, numops_values: Iterable[int] | None = range(8),
                   clusters: Sequence[str] = ("sample_id", "num_operations"), z: float = 1.96) -> pd.DataFrame:
    """Tidy accuracy per numops and over all rows, with intervals clustered by state and the baseline
    of always answering "nothing".

    Columns: scope (``numops`` or ``all``), numops (Int64; missing for ``all``), n, n_correct, accuracy,
    ci_low, ci_high (:func:`clustered_wilson_ci`), nothing_baseline (the fraction of gold answers that
    are "nothing": what a model that never tracks anything scores).
    """
    _require_columns(df, ("numops", "correct", "gold", *clusters), "accuracy_table")
    correct = _correct_column(df)
    empty = df["gold"].astype(str).str.strip().str.rstrip(".").eq("nothing")
    key = df[list(clusters)].astype(str).agg("/".join, axis=1)
    values = sorted(df["numops"].unique()) if numops_values is None else list(numops_values)
    cells = [("numops", int(v), df["numops"] == v) for v in values] + [("all", pd.NA, pd.Series(True, df.index))]
    rows = []
    for scope, value, mask in cells:
        n, k = int(mask.sum()), int(correct[mask].sum())
        lo, hi = clustered_wilson_ci(correct[mask], key[mask], z)
        rows.append({"scope": scope, "numops": value, "n": n, "n_correct": k, "accuracy": k / n if n else math.nan,
                     "ci_low": lo, "ci_high": hi, "nothing_baseline": float(empty[mask].mean()) if n else math.nan})
    table = pd.DataFrame(rows)
    table["numops"] = table["numops"].astype("Int64")
    return table


def _require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MissingKeyError(f"{what} needs columns {missing}, but the DataFrame has {list(df.columns)}.")


def _correct_column(df: pd.DataFrame) -> pd.Series:
    if df["correct"].isna().any():
        raise DataError("Column 'correct' holds missing values; score every row (True/False) first.")
    return df["correct"].astype(bool)


def accuracy_by_numops(df: pd.DataFrame, numops_values: Iterable[int] | None = range(8),
                       z: float = 1.96) -> pd.DataFrame:
    """Accuracy per number of operations affecting the box, with normal and Wilson 95% intervals.

    Returns columns numops, n, n_correct, accuracy, ci_low, ci_high, wilson_low, wilson_high, one
    row per value in ``numops_values`` (all values present in ``df`` when ``None``); a value with no
    rows gets n = 0 and NaN accuracy. Rows whose numops is not listed are left out (and logged).
    """
    _require_columns(df, ("numops", "correct"), "accuracy_by_numops")
    correct = _correct_column(df)
    values = sorted(df["numops"].unique()) if numops_values is None else list(numops_values)
    left_out = int((~df["numops"].isin(values)).sum())
    if left_out:
        logger.info("accuracy_by_numops: %d rows have numops outside %s and are left out.", left_out, values)
    rows = []
    for value in values:
        mask = df["numops"] == value
        n, k = int(mask.sum()), int(correct[mask].sum())
        rows.append({"numops": int(value), "n": n, "n_correct": k, "accuracy": k / n if n else math.nan,
                     **dict(zip(("ci_low", "ci_high"), normal_ci(k, n, z))),
                     **dict(zip(("wilson_low", "wilson_high"), wilson_ci(k, n, z)))})
    return pd.DataFrame(rows, columns=["numops", "n", "n_correct", "accuracy", "ci_low", "ci_high",
                                       "wilson_low", "wilson_high"])


def state_accuracy(df: pd.DataFrame, state_columns: Iterable[str] = ("sample_id", "num_operations")) -> float:
    """Fraction of states (rows grouped by ``state_columns``) whose boxes are all correct; NaN if empty."""
    state_columns = list(state_columns)
    _require_columns(df, [*state_columns, "correct"], "state_accuracy")
    if df.empty:
        return math.nan
    correct = _correct_column(df)
    return float(correct.groupby([df[c] for c in state_columns]).all().mean())


def precision_recall(prediction: str | frozenset[str] | None,
                     gold: str | frozenset[str]) -> tuple[float, float]:
    """Object-level (precision, recall) of one prediction; strings are parsed with :func:`parse_contents`.

    Edge cases: both sets empty ("nothing" for an empty box) -> (1, 1); exactly one of them empty
    ("nothing" for a full box, or objects for an empty box) -> (0, 0), since the claim about the
    box is false; an unparseable/blank prediction -> (0, 0).

    >>> precision_recall("the apple and the cup", "the apple and the ball and the pen")
    (0.5, 0.3333333333333333)
    """
    pred = parse_contents(prediction) if isinstance(prediction, str) or prediction is None else prediction
    gold_set = parse_contents(gold) if isinstance(gold, str) else gold
    if gold_set is None:
        raise DataError(f"Gold content string {gold!r} could not be parsed; expected e.g. 'the apple' or 'nothing'.")
    if pred is None:
        return (0.0, 0.0)
    if not pred and not gold_set:
        return (1.0, 1.0)
    if not pred or not gold_set:
        return (0.0, 0.0)
    hits = len(set(pred) & set(gold_set))
    return (hits / len(pred), hits / len(gold_set))


def random_baseline_probability(mentioned: Iterable[str], gold: Iterable[str]) -> float:
    """Chance that a uniformly random subset of the mentioned objects equals the gold set.

    Baseline: "guess a random subset of the objects mentioned in the context". With M the set
    of distinct objects mentioned in the context and gold set G ⊆ M, the guesser picks one of the
    2^|M| subsets of M uniformly (the empty subset means "nothing"). Exactly one subset equals
    G, so it is correct with probability 2^-|M|, whatever G is.

    >>> random_baseline_probability({"apple", "ball", "cup"}, {"ball"})
    0.125
    """
    mentioned, gold = set(mentioned), set(gold)
    if not gold <= mentioned:
        raise DataError(f"Gold objects {sorted(gold - mentioned)} are not among the mentioned objects "
                         f"{sorted(mentioned)}; the baseline assumes gold ⊆ mentioned.")
    return 2.0 ** -len(mentioned)


def random_baseline_by_numops(df: pd.DataFrame, numops_values: Iterable[int] | None = None) -> pd.DataFrame:
    """Expected accuracy of the random-subset baseline per numops (mean of 2^-|M| over rows).

    ``df`` needs columns numops and either ``n_mentioned`` (|M|, an int) or ``mentioned`` (an
    iterable of the objects mentioned in each example's context). Returns columns numops, n,
    baseline_accuracy; values default to those present in ``df``.
    """
    if "n_mentioned" in df.columns:
        sizes = df["n_mentioned"].astype(int)
    elif "mentioned" in df.columns:
        sizes = df["mentioned"].map(lambda objs: len(set(objs)))
    else:
        raise MissingKeyError("random_baseline_by_numops needs a column 'n_mentioned' or 'mentioned', "
                       f"but the DataFrame has {list(df.columns)}.")
    _require_columns(df, ("numops",), "random_baseline_by_numops")
    prob = np.power(2.0, -sizes.to_numpy(dtype=float))
    values = sorted(df["numops"].unique()) if numops_values is None else list(numops_values)
    rows = []
    for value in values:
        mask = (df["numops"] == value).to_numpy()
        rows.append({"numops": int(value), "n": int(mask.sum()),
                     "baseline_accuracy": float(prob[mask].mean()) if mask.any() else math.nan})
    return pd.DataFrame(rows, columns=["numops", "n", "baseline_accuracy"])
