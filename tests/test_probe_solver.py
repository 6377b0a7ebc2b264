"""The batched probe solver: sklearn's stopping rule on residual-stream-scaled features, float32 precision,
and dropping finished problems from the batch without changing any result."""

import logging
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression

from boxprobe.probing import solver as probe_solver
from boxprobe.probing.probes import LayerwiseLogisticProbe, LayerwiseMultiLabelProbe


pytestmark = pytest.mark.usefixtures("single_threaded")


def objective(coef, intercept, X, y, C):
    """sklearn's multinomial LogisticRegression objective at (coef [K, d], intercept [K])."""
    logits = X @ coef.T + intercept
    return (logsumexp(logits, 1) - logits[np.arange(len(y)), y]).mean() + 0.5 / (C * len(y)) * (coef**2).sum()


def residual_like(n=450, n_layers=3, d=32, n_classes=7, seed=0):
    """Nearly separable classes on features with a residual stream's scale: norms in the hundreds, a few
    high-variance dimensions. Whitened coordinates shrink the gradient by the feature scale here."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    means = rng.normal(size=(n_classes, d)) * 0.5
    X = rng.normal(size=(n, n_layers, d)) + means[y][:, None, :]
    X[..., :2] *= 20
    return X * np.array([4.0, 10.0, 30.0])[None, :, None] + 100 * rng.normal(size=(1, n_layers, d)), y


@pytest.mark.parametrize("precondition", ["auto", "diagonal"])
def test_large_scale_features_reach_the_optimum(precondition, caplog):
    # A stopping test in the solver's whitened coordinates stopped such fits at 2-3x the optimal objective.
    X, y = residual_like()
    with caplog.at_level(logging.WARNING, logger="boxprobe.probing.solver"):
        probe = LayerwiseLogisticProbe(C=1.0, precondition=precondition).fit(X, y)  # float32, tol=1e-4
    assert not caplog.records  # converged, or stopped at float32's floor (logged at INFO, not a warning)
    tight = LayerwiseLogisticProbe(C=1.0, precondition=precondition, dtype="float64", tol=1e-8).fit(X, y)
    for layer in range(X.shape[1]):
        with warnings.catch_warnings():  # sklearn stops short of this optimum (ConvergenceWarning)
            warnings.simplefilter("ignore")
            ref = LogisticRegression(C=1.0, tol=1e-8, max_iter=3000).fit(X[:, layer], y)
        best = objective(tight.coef_[layer], tight.intercept_[layer], X[:, layer], y, 1.0)
        assert best <= objective(ref.coef_, ref.intercept_, X[:, layer], y, 1.0) * (1 + 1e-6)
        ours = objective(probe.coef_[layer], probe.intercept_[layer], X[:, layer], y, 1.0)
        assert ours <= best * 1.01, (layer, ours, best)


def test_stopping_test_is_on_feature_coefficients():
    # The reported gradient must be the gradient w.r.t. the feature coefficients, whatever the solver's basis
    # and scale: check it, and the coefficients themselves, by autograd on the plain loss.
    torch.manual_seed(0)
    scales = torch.tensor([1.0, 10.0, 100.0, 1.0, 5.0, 0.1], dtype=torch.float64)
    X = torch.randn(2, 50, 6, dtype=torch.float64) * scales
    X = X - X.mean(1, keepdim=True)
    y = torch.randint(0, 3, (50,))
    l2 = torch.full((2, 3, 1), 0.02, dtype=torch.float64)
    targets, weights = torch.nn.functional.one_hot(y, 3).T.double(), torch.full((1, 50), 1 / 50.0, dtype=torch.float64)
    for mode in ("whiten", "diagonal", "none"):
        rotated = probe_solver.rotate(X, mode, 3)
        objective = probe_solver._Objective(rotated.R, rotated.U, rotated.var, targets, weights, l2, True)
        objective.rescale(torch.randn(2, 3, 50, dtype=torch.float64) * 3)  # some non-trivial scale
        theta = torch.randn(2, 3 * 7, dtype=torch.float64)
        loss, grad = objective.fg(theta)
        W = objective.to_features(theta).view(2, 3, 7)
        W, b = W[..., :6].clone().requires_grad_(), W[..., 6:].clone().requires_grad_()
        logits = X @ W.transpose(1, 2) + b.transpose(1, 2)  # [L, n, K]
        plain = (torch.logsumexp(logits, -1) - logits.gather(-1, y.expand(2, 50)[..., None]).squeeze(-1)).mean(1)
        plain = plain + 0.5 * 0.02 * (W * W).sum((1, 2))
        torch.testing.assert_close(loss, plain.detach())
        plain.sum().backward()
        expected = torch.maximum(W.grad.abs().amax((1, 2)), b.grad.abs().amax((1, 2)))
        torch.testing.assert_close(objective.gmax(grad), expected)


def test_dropping_finished_problems_changes_nothing(monkeypatch):
    # Outputs of very different difficulty finish at very different iterations, so the batch shrinks often.
    rng = np.random.default_rng(3)
    n, n_layers, d, n_out = 300, 3, 10, 6
    Y = rng.random((n, n_out)) < 0.4
    mask = rng.random((n, n_out)) < np.linspace(0.2, 1.0, n_out)
    strength = np.array([0.1, 0.5, 1, 2, 4, 8])[None, None, :]
    signal = np.einsum("no,od->nd", Y * strength[0], rng.normal(size=(n_out, d)))
    X = rng.normal(size=(n, n_layers, d)) + signal[:, None]
    probe = LayerwiseMultiLabelProbe(C=1.0, tol=1e-8, dtype="float64", class_weight="balanced")
    fit = lambda: clone(probe).fit(X, Y, mask)  # noqa: E731
    calls = []
    real_compact = probe_solver._Objective.compact

    def counting_compact(self, active):
        out = real_compact(self, active)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(probe_solver._Objective, "compact", counting_compact)
    compacted = fit()
    assert any(calls)  # the batch did shrink
    monkeypatch.setattr(probe_solver, "COMPACT_AT", 1.0)  # never shrink
    calls.clear()
    whole = fit()
    assert not any(calls)
    np.testing.assert_allclose(compacted.coef_, whole.coef_, atol=1e-6)
    np.testing.assert_allclose(compacted.intercept_, whole.intercept_, atol=1e-6)
    assert np.abs(compacted.n_iter_ - whole.n_iter_).max() <= 1  # summation order differs in the last bits


def test_warns_only_for_problems_that_ran_out_of_iterations(caplog):
    X, y = residual_like(seed=1)
    with caplog.at_level(logging.INFO, logger="boxprobe.probing.solver"):
        LayerwiseLogisticProbe(max_iter=3).fit(X, y)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "max_iter=3" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="boxprobe.probing.solver"):
        LayerwiseLogisticProbe(dtype="float64", tol=1e-6).fit(X, y)
    assert not caplog.records
