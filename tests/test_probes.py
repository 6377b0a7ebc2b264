"""Layerwise probes against sklearn, and the probe targets / splits / controls / metrics helpers."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from boxprobe.probing.metrics import (
    bootstrap_difference,
    contents_labels,
    contents_metrics,
    control_contents_labels,
    control_labels,
    control_state_labels,
    inlp_directions,
    majority_baseline,
    majority_state_baseline,
    mentioned_mask,
    nullspace_projection,
    object_box_labels,
    random_directions_like,
    selectivity,
    split_by_group,
)
from boxprobe.probing.probes import LayerwiseLogisticProbe, LayerwiseMultiLabelProbe, select_C


def planted(n=600, n_layers=3, d=16, n_classes=4, strengths=(0.3, 1.0, 3.0), seed=0, offset=5.0):
    """Class means along planted directions, stronger in later layers, plus a large mean offset."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    means = rng.normal(size=(n_classes, d))
    X = rng.normal(size=(n, n_layers, d)) + np.asarray(strengths)[None, :, None] * means[y][:, None, :]
    return X + offset * rng.normal(size=(1, n_layers, d)), y


pytestmark = pytest.mark.usefixtures("single_threaded")


def sklearn_layers(X, y, **kw):
    return [LogisticRegression(tol=1e-10, max_iter=10000, **kw).fit(X[:, layer], y) for layer in range(X.shape[1])]


@pytest.fixture(scope="module")
def multinomial_reference():
    X, y = planted()
    return X, y, sklearn_layers(X[:400], y[:400], C=0.5)


@pytest.mark.parametrize("precondition", ["auto", "diagonal", "none"])
def test_multinomial_matches_sklearn(precondition, multinomial_reference):
    X, y, ref = multinomial_reference
    tr, te = slice(0, 400), slice(400, None)
    probe = LayerwiseLogisticProbe(C=0.5, tol=1e-7, dtype="float64", precondition=precondition).fit(X[tr], y[tr])
    assert probe.coef_.shape == (3, 4, 16) and probe.intercept_.shape == (3, 4)
    pred = probe.predict(X[te])
    for layer, m in enumerate(ref):
        np.testing.assert_array_equal(pred[:, layer], m.predict(X[te, layer]))
        np.testing.assert_allclose(probe.coef_[layer], m.coef_, atol=2e-3 * np.abs(m.coef_).max())
        np.testing.assert_allclose(probe.predict_proba(X[te])[:, layer], m.predict_proba(X[te, layer]), atol=1e-3)
    acc = probe.score(X[te], y[te])
    assert acc[0] < acc[2]  # the planted signal grows with depth
    assert np.abs(acc - [m.score(X[te, layer], y[te]) for layer, m in enumerate(ref)]).max() <= 0.01


@pytest.mark.parametrize("precondition", ["whiten", "diagonal"])
def test_more_features_than_items_matches_sklearn(precondition):
    """d_model > n_items makes the feature covariance singular; whitening must still be exact."""
    X, y = planted(n=120, n_layers=1, d=200, n_classes=3, strengths=(0.8,), offset=10.0)
    probe = LayerwiseLogisticProbe(tol=1e-6, dtype="float64", precondition=precondition).fit(X[:60], y[:60])
    m = sklearn_layers(X[:60], y[:60])[0]
    np.testing.assert_allclose(probe.coef_[0], m.coef_, atol=2e-3 * np.abs(m.coef_).max())
    np.testing.assert_array_equal(probe.predict(X[60:])[:, 0], m.predict(X[60:, 0]))


def test_default_float32_settings_agree_with_sklearn():
    X, y = planted(n=900, seed=4)
    tr, te = slice(0, 600), slice(600, None)
    probe = LayerwiseLogisticProbe(device="cpu").fit(X[tr], y[tr])  # float32, tol=1e-4
    ref = sklearn_layers(X[tr], y[tr])
    np.testing.assert_array_equal(probe.predict(X[te]), np.stack([m.predict(X[te, i]) for i, m in enumerate(ref)], 1))
    defaults = [LogisticRegression(max_iter=5000).fit(X[tr, i], y[tr]).score(X[te, i], y[te]) for i in range(3)]
    assert np.abs(probe.score(X[te], y[te]) - defaults).max() <= 0.01


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_binary_and_class_weight_match_sklearn(class_weight):
    X, y = planted(n=500, n_classes=2, strengths=(0.2, 0.5, 1.0), seed=2)
    y = np.where((y == 1) | (np.arange(len(y)) % 4 == 0), "yes", "no")  # imbalanced string labels
    probe = LayerwiseLogisticProbe(C=2.0, class_weight=class_weight, tol=1e-7, dtype="float64").fit(X, y)
    assert probe.coef_.shape == (3, 1, 16) and list(probe.classes_) == ["no", "yes"]
    for layer, m in enumerate(sklearn_layers(X, y, C=2.0, class_weight=class_weight)):
        np.testing.assert_allclose(probe.coef_[layer], m.coef_, atol=2e-3 * np.abs(m.coef_).max())
        np.testing.assert_allclose(probe.intercept_[layer], m.intercept_, atol=2e-3 * max(1, abs(m.intercept_[0])))
        np.testing.assert_array_equal(probe.predict(X)[:, layer], m.predict(X[:, layer]))


def test_standardize_matches_scaled_sklearn_and_l2_maps_to_C():
    X, y = planted(n=400, seed=3)
    X = X * np.geomspace(0.1, 30, 16)  # badly scaled features
    probe = LayerwiseLogisticProbe(C=0.3, standardize=True, tol=1e-7, dtype="float64").fit(X, y)
    via_l2 = LayerwiseLogisticProbe(l2=1 / (0.3 * len(y)), standardize=True, tol=1e-7, dtype="float64").fit(X, y)
    np.testing.assert_allclose(via_l2.coef_, probe.coef_, rtol=1e-4, atol=1e-6)
    for layer in range(3):
        mu, sd = X[:, layer].mean(0), X[:, layer].std(0)
        m = LogisticRegression(C=0.3, tol=1e-10, max_iter=10000).fit((X[:, layer] - mu) / sd, y)
        np.testing.assert_allclose(probe.coef_[layer] * sd, m.coef_, atol=2e-3 * np.abs(m.coef_).max())


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_multilabel_with_mask_matches_per_output_sklearn(class_weight):
    rng = np.random.default_rng(4)
    n, n_layers, d, n_out = 400, 2, 12, 5
    Y = rng.random((n, n_out)) < 0.3
    mask = rng.random((n, n_out)) < 0.6
    signal = (Y @ rng.normal(size=(n_out, d)))[:, None, :] * np.array([0.3, 1.0])[None, :, None]
    X = rng.normal(size=(n, n_layers, d)) + signal
    probe = LayerwiseMultiLabelProbe(C=1.0, class_weight=class_weight, tol=1e-7, dtype="float64").fit(X, Y, mask)
    assert probe.coef_.shape == (n_layers, n_out, d) and probe.predict(X).shape == (n, n_layers, n_out)
    for layer in range(n_layers):
        for o in range(n_out):
            m = LogisticRegression(class_weight=class_weight, tol=1e-10, max_iter=10000)
            m.fit(X[mask[:, o], layer], Y[mask[:, o], o])
            np.testing.assert_allclose(probe.coef_[layer, o], m.coef_[0], atol=2e-3 * np.abs(m.coef_).max())
            np.testing.assert_array_equal(probe.predict(X)[:, layer, o], m.predict(X[:, layer]))
    score = probe.score(X, Y, mask)
    manual = [((probe.predict(X)[:, layer] == Y) & mask).sum() / mask.sum() for layer in range(n_layers)]
    np.testing.assert_allclose(score, manual)
    assert score[1] > score[0]


def test_layer_batch_torch_input_and_per_layer_C_are_consistent():
    X, y = planted(n=300, seed=5)
    C = np.array([0.1, 1.0, 10.0])
    full = LayerwiseLogisticProbe(C=C, tol=1e-7, dtype="float64").fit(X, y)
    batched = LayerwiseLogisticProbe(C=C, tol=1e-7, dtype="float64", layer_batch=1)
    batched.fit(torch.tensor(X), torch.tensor(y))
    np.testing.assert_allclose(batched.coef_, full.coef_, atol=1e-4)
    for layer in range(3):
        single = LayerwiseLogisticProbe(C=C[layer], tol=1e-7, dtype="float64").fit(X[:, layer:layer + 1], y)
        np.testing.assert_allclose(single.coef_[0], full.coef_[layer], atol=1e-4)
    assert full.n_iter_.shape == (3,) and (full.n_iter_ > 0).all()


def test_adam_solver_reaches_lbfgs_accuracy():
    X, y = planted(n=600, seed=6, offset=0.0)
    tr, te = slice(0, 400), slice(400, None)
    lbfgs = LayerwiseLogisticProbe().fit(X[tr], y[tr]).score(X[te], y[te])
    adam = LayerwiseLogisticProbe(solver="adam", lr=0.2, max_iter=300, tol=1e-3).fit(X[tr], y[tr]).score(X[te], y[te])
    assert np.abs(adam - lbfgs).max() <= 0.02


def test_sklearn_conventions_and_errors():
    X, y = planted(n=200)
    probe = LayerwiseLogisticProbe(C=3.0, max_iter=50)
    assert not hasattr(probe, "coef_")
    with pytest.raises(NotFittedError):
        probe.predict(X)
    assert probe.get_params()["C"] == 3.0 and clone(probe).C == 3.0
    assert probe.fit(X, y) is probe
    assert probe.predict(X).shape == (200, 3) and probe.score(X, y).shape == (3,)
    np.testing.assert_allclose(probe.predict_proba(X).sum(-1), 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="n_items, n_layers, d_model"):
        probe.fit(X[:, 0], y)
    with pytest.raises(ValueError, match="single class"):
        LayerwiseLogisticProbe().fit(X, np.zeros(200))
    with pytest.raises(ValueError, match="fitted on 3"):
        probe.predict(X[:, :2])
    with pytest.raises(ValueError, match="solver"):
        LayerwiseLogisticProbe(solver="sgd").fit(X, y)


def test_select_C_uses_validation_argmax():
    X, y = planted(n=500, seed=7, d=40, strengths=(0.05, 0.4, 2.0))
    tr, va = slice(0, 150), slice(150, 300)
    Cs = [1e-3, 1e-1, 10.0]
    sel = select_C(X[tr], y[tr], X[va], y[va], Cs)
    assert sel.C.shape == (3,) and set(sel.C) <= set(Cs)
    table = sel.scores.pivot(index="C", columns="layer", values="val_score")
    for layer in range(3):
        assert table.loc[sel.C[layer], layer] == table[layer].max()
        direct = LayerwiseLogisticProbe(C=sel.C[layer]).fit(X[tr], y[tr]).score(X[va], y[va])[layer]
        assert direct == pytest.approx(table.loc[sel.C[layer], layer])
    assert sel.estimator.score(X[va], y[va]) == pytest.approx(table.max(axis=0).to_numpy())
    glob = select_C(X[tr], y[tr], X[va], y[va], Cs, per_layer=False)
    assert len(set(glob.C)) == 1 and glob.C[0] == table.mean(axis=1).idxmax()
    onehot = y[:, None] == np.arange(4)
    ones = np.ones((150, 4), bool)
    ml = select_C(X[tr], onehot[tr], X[va], onehot[va], Cs, estimator=LayerwiseMultiLabelProbe(),
                  mask_train=ones, mask_val=ones)
    assert isinstance(ml.estimator, LayerwiseMultiLabelProbe) and ml.C.shape == (3,)


def test_warm_start_starts_at_the_previous_solution():
    """A refit from its own optimum stops at once; a start for other classes or layers is ignored."""
    X, y = planted(n=300, seed=3, d=24)
    for estimator, target in ((LayerwiseLogisticProbe, y), (LayerwiseMultiLabelProbe, y[:, None] == np.arange(4))):
        kw = {} if estimator is LayerwiseLogisticProbe else {"mask": np.ones(target.shape, bool)}
        probe = estimator(C=1.0, standardize=True, warm_start=True).fit(X, target, **kw)
        cold_iters = probe.n_iter_.copy()
        probe.fit(X, target, **kw)
        assert (probe.n_iter_ <= 2).all() and (cold_iters >= 5).all(), (cold_iters, probe.n_iter_)
    probe = LayerwiseLogisticProbe(warm_start=True).fit(X, y)
    assert (probe.fit(X, (y + 1) % 4 + 10).n_iter_ >= 5).all()  # other classes: no start
    assert (probe.fit(X[:, :2], y).n_iter_ >= 5).all()  # other layers: no start


def test_split_by_group_keeps_groups_apart():
    groups = np.repeat(np.arange(50), 13)
    train, val, test = split_by_group(groups, (0.6, 0.2, 0.2), seed=3)
    assert len(train) + len(val) + len(test) == len(groups)
    sets = [set(groups[idx]) for idx in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert [len(s) for s in sets] == [30, 10, 10]
    again = split_by_group(groups, (0.6, 0.2, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(split_by_group(groups, seed=4)[2], test)
    with pytest.raises(ValueError, match="sum"):
        split_by_group(groups, (0.5, 0.2, 0.2))


def test_label_builders():
    vocab = ["apple", "book", "cup"]
    Y = contents_labels([{"cup"}, set(), {"apple", "book"}], vocab)
    np.testing.assert_array_equal(Y, [[0, 0, 1], [0, 0, 0], [1, 1, 0]])
    M = mentioned_mask([{"book"}, {"apple"}, set()], vocab)
    np.testing.assert_array_equal(M, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    with pytest.raises(KeyError, match="'pear'"):
        contents_labels([{"pear"}], vocab)
    states = [(("apple",), ("cup", "book"), ()), ((), ("apple",), ())]
    table = object_box_labels(states, [{"cup", "apple", "pear"}, {"apple", "book"}])
    assert table.to_dict("list") == {
        "item": [0, 0, 0, 1, 1], "object": ["apple", "cup", "pear", "apple", "book"], "label": [0, 1, 3, 1, 3]}


def test_contents_metrics_by_hand():
    Y = np.array([[1, 0, 0], [0, 1, 1]], bool)
    mentioned = np.array([[1, 1, 0], [0, 1, 1]], bool)
    pred = np.stack([Y, [[1, 1, 0], [0, 1, 0]]], axis=1)  # layer 0 perfect; layer 1 one error per item
    df = contents_metrics(pred, Y, mentioned, numops=np.array([0, 2]))
    def get(layer, metric, numops):
        return df[(df.layer == layer) & (df.metric == metric) & (df.numops == numops)].value.item()

    assert get(0, "exact_set", "all") == 1.0 and get(1, "exact_set", "all") == 0.0
    assert get(1, "full", "all") == pytest.approx(4 / 6)
    assert get(1, "non_trivial", "all") == pytest.approx(2 / 4)
    assert get(1, "non_trivial", 0) == pytest.approx(1 / 2) and get(1, "full", 2) == pytest.approx(2 / 3)
    assert set(df.numops) == {"all", 0, 2} and set(df.columns) >= {"layer", "metric", "numops", "value"}


def test_controls_and_baselines():
    rng = np.random.default_rng(0)
    types = rng.choice(["apple", "book", "cup", "dog", "egg"], 400)
    labels = rng.integers(0, 8, 400)
    ctrl = control_labels(types, labels, seed=1)
    for t in set(types):
        assert len(set(ctrl[types == t])) == 1  # consistent per type
    assert np.array_equal(ctrl, control_labels(list(types), labels, seed=1))
    assert set(ctrl) <= set(labels)
    assert len({tuple(control_labels(types, labels, seed=s)) for s in range(5)}) > 1
    queries = rng.integers(0, 7, 400)
    Y = rng.random((400, 6)) < np.linspace(0.1, 0.9, 6)
    Yc = control_contents_labels(queries, Y, seed=2)
    for q in range(7):
        assert (Yc[queries == q] == Yc[queries == q][0]).all()
    assert Yc.shape == Y.shape
    np.testing.assert_allclose(selectivity([0.9, 0.8], np.array([0.5, 0.8])), [0.4, 0.0])
    assert majority_baseline([1, 1, 2], [1, 2, 2, 2]) == 0.25
    Y_train, Y_test = np.array([[1, 0], [1, 0], [0, 1]]), np.array([[1, 1]])
    assert majority_baseline(Y_train, Y_test) == 0.5
    assert majority_baseline(Y_train, Y_test, mask_test=np.array([[1, 0]])) == 1.0


def test_global_state_control_and_majority_work_on_class_blocks():
    # Three objects x 3 classes: object 0 is always in class 2, object 1 in class 0 or 1, object 2 never counted.
    rng = np.random.default_rng(0)
    n, K = 300, 3
    classes = np.stack([np.full(n, 2), rng.integers(0, 2, n), np.zeros(n, int)], 1)  # [n, objects]
    Y = np.eye(K, dtype=bool)[classes].reshape(n, -1)
    mask = np.repeat(np.array([True, True, False]), K)[None].repeat(n, 0)
    queries = rng.integers(0, 7, n)
    control = control_state_labels(queries, Y, mask, K, seed=3)
    blocks = control.reshape(n, 3, K)
    assert (blocks.sum(-1) == 1).all()  # one class per object, scored by argmax like the task
    for q in range(7):
        assert (control[queries == q] == control[queries == q][0]).all()  # consistent per queried box
    assert (blocks[:, 0].argmax(-1) == 2).all()  # drawn from the object's own classes
    assert set(blocks[:, 1].argmax(-1)) == {0, 1}
    # Majority: object 0's class (always right) and object 1's majority class, over counted objects only.
    train, test = slice(0, 200), slice(200, None)
    majority_1 = np.bincount(classes[train, 1]).argmax()
    expected = (1 + (classes[test, 1] == majority_1).mean()) / 2
    assert majority_state_baseline(Y[train], Y[test], mask[train], mask[test], K) == pytest.approx(expected)
    # Cell-wise majority would count every "not this class" cell right: a different, inflated number.
    assert majority_baseline(Y[train], Y[test], mask[train], mask[test]) > expected


def test_bootstrap_difference_clusters():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 10)
    a = np.repeat(rng.random(40) < 0.8, 10)[:, None] & np.ones((1, 2), bool)  # items of a group are identical
    df = bootstrap_difference(a, a, groups, n_boot=200)
    assert (df[["diff", "ci_low", "ci_high"]].to_numpy() == 0).all()
    b = a.copy()
    b[:, 1] = np.repeat(rng.random(40) < 0.2, 10)
    df = bootstrap_difference(a, b, groups, n_boot=500, seed=1)
    assert df.loc[1, "ci_low"] > 0 and df.loc[1, "ci_low"] <= df.loc[1, "diff"] <= df.loc[1, "ci_high"]
    per_item = bootstrap_difference(a, b, np.arange(400), n_boot=500, seed=1)
    assert (df.ci_high - df.ci_low)[1] > 2 * (per_item.ci_high - per_item.ci_low)[1]  # clusters widen the CI
    with pytest.raises(ValueError, match="differ"):
        bootstrap_difference(a, b[:, :1], groups)


def test_nullspace_and_random_directions():
    rng = np.random.default_rng(0)
    D = rng.normal(size=(3, 10))
    D = np.concatenate([D, D[:1] * 2])  # a repeated direction must not break the projection
    P = nullspace_projection(D)
    np.testing.assert_allclose(D @ P, 0, atol=1e-10)
    np.testing.assert_allclose(P @ P, P, atol=1e-10)
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    assert round(np.trace(P)) == 7
    Pt = nullspace_projection(torch.tensor(D, dtype=torch.float32))
    assert isinstance(Pt, torch.Tensor) and Pt.dtype == torch.float32
    R = random_directions_like(D, seed=1)
    np.testing.assert_allclose(np.linalg.norm(R, axis=1), np.linalg.norm(D, axis=1))
    assert np.abs(R @ D[0] / np.linalg.norm(R, axis=1) / np.linalg.norm(D[0])).max() < 0.99
    np.testing.assert_array_equal(R, random_directions_like(D, seed=1))


def test_inlp_removes_linear_information():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    X = rng.normal(size=(600, 8))
    X[:, 0] += 3 * (2 * y - 1)
    X[:, 1] += 1.5 * (2 * y - 1)
    dirs = inlp_directions(X, y, n_directions=4)
    assert dirs.shape == (4, 8)
    before = LayerwiseLogisticProbe().fit(X[:400, None], y[:400]).score(X[400:, None], y[400:])[0]
    Xp = X @ nullspace_projection(dirs)
    after = LayerwiseLogisticProbe().fit(Xp[:400, None], y[:400]).score(Xp[400:, None], y[400:])[0]
    control = X @ nullspace_projection(random_directions_like(dirs, seed=0))
    kept = LayerwiseLogisticProbe().fit(control[:400, None], y[:400]).score(control[400:, None], y[400:])[0]
    assert before > 0.95 and after < 0.65 and kept > after + 0.1
