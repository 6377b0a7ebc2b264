"""Issue 13: non-finite features, degenerate targets and bad solver inputs are errors, never silent results."""

import numpy as np
import pytest

from boxprobe.errors import ConfigError, DataError
from boxprobe.probing.probes import LayerwiseLogisticProbe, LayerwiseMultiLabelProbe, select_C


def data(n=60, layers=2, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, layers, d)).astype(np.float32)
    y = (X[:, 0, 0] + 0.3 * rng.normal(size=n) > 0).astype(int)
    Y = np.stack([y, 1 - y, (X[:, 1, 1] > 0)], 1)
    return X, y, Y


def test_nan_row_in_training_is_refused_naming_rows_and_layers():
    X, y, Y = data()
    X[7, 1, 2] = np.nan
    for probe, target in ((LayerwiseLogisticProbe(device="cpu"), y), (LayerwiseMultiLabelProbe(device="cpu"), Y)):
        with pytest.raises(DataError, match=r"non-finite.*1 row\(s\) \[7\] at layer\(s\) \[1\]"):
            probe.fit(X, target)


def test_nan_rows_in_validation_or_test_are_refused_not_scored_false():
    X, y, Y = data()
    probe = LayerwiseMultiLabelProbe(device="cpu").fit(X, Y)
    bad = X.copy()
    bad[3] = np.inf
    for call in (probe.predict, probe.predict_proba, lambda a: probe.score(a, Y)):
        with pytest.raises(DataError, match=r"row\(s\) \[3\]"):
            call(bad)
    with pytest.raises(DataError, match="non-finite"):
        select_C(X[:40], Y[:40], bad[40:] if False else np.where(np.arange(20)[:, None, None] == 2, np.nan, X[40:]),
                 Y[40:], [1.0], estimator=LayerwiseMultiLabelProbe(device="cpu"))


def test_huge_features_give_an_error_not_nan_coefficients():
    X, y, Y = data()
    X[5, 0, 1] = 1e30
    with pytest.raises(DataError, match="(too large|NaN or inf)"):
        LayerwiseLogisticProbe(device="cpu").fit(X, y)


@pytest.mark.parametrize("Cs", [[float("nan")], [], [0.0], [-1.0], [float("inf")], ["abc"]])
def test_select_C_rejects_bad_Cs(Cs):
    X, y, _ = data()
    with pytest.raises(ConfigError, match="Cs must be"):
        select_C(X[:40], y[:40], X[40:], y[40:], Cs)


@pytest.mark.parametrize("C", [float("nan"), float("inf"), 0.0])
def test_probe_rejects_non_finite_or_non_positive_C(C):
    X, y, _ = data()
    with pytest.raises(ConfigError, match="C must be positive and finite"):
        LayerwiseLogisticProbe(C=C, device="cpu").fit(X, y)


def test_every_box_empty_is_refused():
    X, _, Y = data()
    with pytest.raises(DataError, match="every box is empty"):
        LayerwiseMultiLabelProbe(device="cpu").fit(X, np.zeros_like(Y))
