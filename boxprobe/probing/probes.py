"""Layerwise linear probes trained for all layers (and all outputs) at once as one batched torch problem.

Probes take arrays (numpy or torch), never models, and follow scikit-learn's estimator conventions.
The objective is exactly scikit-learn's L2 ``LogisticRegression`` (lbfgs) objective, per layer::

    sum_i s_i * loss_i / sum_i s_i  +  l2 / 2 * ||W||^2,     l2 = 1 / (C * sum_i s_i)

with ``s_i`` the sample (class) weights, so ``s_i = 1`` gives ``l2 = 1 / (C * n_train)`` and the same ``C``
means the same solution as ``LogisticRegression(C=C)``. Intercepts are not penalised. Binary targets use one
logit (sklearn's binary parametrisation); three or more classes use the multinomial (softmax) loss.

The solver (batched L-BFGS or Adam, preconditioning, dropping finished problems) is in
:mod:`boxprobe.probing.solver`. ``tol`` means what it means in sklearn: the max-abs gradient with respect to the
coefficients and intercepts.
"""

from __future__ import annotations

import copy
import logging
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Shaped
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted

from boxprobe.probing import solver as probe_solver
from boxprobe.probing.solver import LogisticTargets
from boxprobe.errors import ArgumentError, ConfigError, DataError

logger = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor
Features = Float[Array, "n_items n_layers d_model"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_numpy(a) -> np.ndarray:
    """A tensor (any device) or array-like as a NumPy array."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _check_X(X, n_layers: int | None = None) -> Array:
    X = X if isinstance(X, torch.Tensor) else np.asarray(X)
    if X.ndim != 3:
        raise ArgumentError(f"X must be shaped [n_items, n_layers, d_model], got shape {tuple(X.shape)}; "
                         "for a single layer pass X[:, None, :].")
    if n_layers is not None and X.shape[1] != n_layers:
        raise ArgumentError(f"X has {X.shape[1]} layers but the probe was fitted on {n_layers}.")
    check_finite(X, "X")
    return X


def check_finite(X: Array, name: str = "X") -> None:
    """A DataError naming the rows and layers of ``X`` [n_items, n_layers, ...] that hold NaN or inf:
    a probe would fit NaN coefficients on them, or score them as negatives."""
    finite = torch.isfinite(X) if isinstance(X, torch.Tensor) else np.isfinite(X)
    finite = to_numpy(finite.reshape(X.shape[0], X.shape[1], -1).all(-1))
    if not finite.all():
        rows, layers = np.nonzero(~finite)
        raise DataError(f"{name} holds non-finite values (NaN or inf) in {len(np.unique(rows))} row(s) "
                        f"{np.unique(rows)[:5].tolist()} at layer(s) {np.unique(layers)[:10].tolist()}; "
                        "drop those rows or rebuild the activations they came from.")


def _layer_block(X: Array, sl: slice, device, dtype) -> Float[torch.Tensor, "layer n_items d_model"]:
    """Layers ``sl`` of X as a [layer, n_items, d_model] tensor on ``device`` (copies only that slice)."""
    block = X[:, sl] if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X[:, sl]))
    return block.to(device=device, dtype=dtype).transpose(0, 1).contiguous()


class _LayerwiseBase(BaseEstimator):
    def __init__(self, C=1.0, l2=None, max_iter: int = 1000, tol: float = 1e-4, class_weight=None,
                 solver: str = "lbfgs", standardize: bool = False, precondition: str = "auto", lr: float = 1e-2,
                 device=None, dtype="float32", layer_batch: int | None = None, warm_start: bool = False):
        self.C = C
        self.l2 = l2
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.solver = solver
        self.standardize = standardize
        self.precondition = precondition
        self.lr = lr
        self.device = device
        self.dtype = dtype
        self.layer_batch = layer_batch
        self.warm_start = warm_start

    def _torch_setup(self):
        dtype = getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating torch dtype such as 'float32', got {self.dtype!r}.")
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(f"class_weight must be None or 'balanced', got {self.class_weight!r}.")
        if self.precondition not in ("auto", "whiten", "diagonal", "none"):
            raise ConfigError(f"precondition must be 'auto', 'whiten', 'diagonal' or 'none', got {self.precondition!r}.")
        return torch.device(self.device or default_device()), dtype

    def _l2(self, n_layers: int, sw_sum: torch.Tensor) -> torch.Tensor:
        """Penalty strength [L, K, 1] from C (or l2), scalar or per layer, and the weight sums [K] of each output."""
        value = np.broadcast_to(np.asarray(self.C if self.l2 is None else self.l2, dtype=float), (n_layers,))
        if not np.isfinite(value).all() or ((value <= 0).any() if self.l2 is None else (value < 0).any()):
            raise ConfigError(f"C must be positive and finite, l2 non-negative and finite; got C={self.C!r}, l2={self.l2!r}.")
        value = torch.as_tensor(value.copy(), dtype=sw_sum.dtype, device=sw_sum.device)[:, None, None]
        if self.l2 is not None:
            return value.expand(n_layers, sw_sum.shape[0], 1)
        return 1.0 / (value * sw_sum.clamp_min(1e-12)[None, :, None])

    def _fit_problem(self, X, prob_for_layers) -> None:
        """Fit all layers, ``layer_batch`` at a time; ``prob_for_layers(sl)`` gives those layers' LogisticTargets."""
        device, dtype = self._torch_setup()
        n_layers = X.shape[1]
        step = self.layer_batch or n_layers
        coefs, intercepts, means, n_iters = [], [], [], []
        for start in range(0, n_layers, step):
            sl = slice(start, min(start + step, n_layers))
            Xl = _layer_block(X, sl, device, dtype)
            prob = prob_for_layers(sl)
            mu = Xl.mean(1, keepdim=True)
            sd = Xl.std(1, correction=0, keepdim=True) if self.standardize else torch.ones_like(mu)
            sd = torch.where(sd > 0, sd, torch.ones_like(sd))
            Xl = (Xl - mu).div_(sd)
            rotated = probe_solver.rotate(Xl, self.precondition, prob.targets.shape[0])
            del Xl
            W, b, n_iter = probe_solver.solve(rotated, prob, self.solver, self.max_iter, self.tol, self.lr,
                                              self._warm_init(sl, n_layers, mu[:, 0], sd[:, 0], prob.targets.shape[0]))
            W = W / sd  # [L, K, d] coefficients on raw features
            del rotated
            coefs.append(to_numpy(W).astype(np.float64))
            means.append(to_numpy(mu[:, 0]).astype(np.float64))
            intercepts.append(to_numpy(b[..., 0]).astype(np.float64))
            n_iters.append(to_numpy(n_iter))
        self.coef_ = np.concatenate(coefs)
        self.mean_ = np.concatenate(means)
        bad = ~(np.isfinite(self.coef_).all((1, 2)) & np.isfinite(np.concatenate(intercepts)).all(1))
        if bad.any():
            raise DataError(f"The probe fit gave non-finite coefficients at layer(s) {np.flatnonzero(bad).tolist()}: the "
                            f"features are too large for {dtype} (max |x| = {float(np.abs(to_numpy(X)).max()):.3g}). "
                            "Pass standardize=True or dtype='float64', or check the activations.")
        # The solver's intercept is for centred features; the raw-feature intercept subtracts mean . coef.
        self.intercept_ = np.concatenate(intercepts) - np.einsum("lkd,ld->lk", self.coef_, self.mean_)
        self.n_iter_ = np.concatenate(n_iters)
        self.n_features_in_ = X.shape[2]
        self.n_layers_ = n_layers

    def _warm_init(self, sl: slice, n_layers: int, mu, sd, n_logits: int):
        """With ``warm_start``, the previous fit's layers ``sl`` as a start (W, b) in the solver's centred (and
        standardised) coordinates; None without a previous fit of the same shape (sklearn's warm_start)."""
        coef = getattr(self, "coef_", None) if self.warm_start else None
        if coef is None or coef.shape != (n_layers, n_logits, mu.shape[-1]):
            return None
        W = torch.as_tensor(coef[sl], dtype=mu.dtype, device=mu.device) * sd[:, None, :]
        b = torch.as_tensor(self.intercept_[sl], dtype=mu.dtype, device=mu.device) + torch.einsum(
            "lkd,ld->lk", torch.as_tensor(coef[sl], dtype=mu.dtype, device=mu.device), mu)
        return W, b[..., None]

    def decision_function(self, X: Features) -> Float[np.ndarray, "n_items n_layers k"]:
        """Logits [n_items, n_layers, K] on raw features (centred first, for float32 accuracy)."""
        check_is_fitted(self, "coef_")
        X = _check_X(X, self.n_layers_)
        device, dtype = self._torch_setup()
        b_centred = self.intercept_ + np.einsum("lkd,ld->lk", self.coef_, self.mean_)
        step = self.layer_batch or self.n_layers_
        out = []
        for start in range(0, self.n_layers_, step):
            sl = slice(start, min(start + step, self.n_layers_))
            Xl = _layer_block(X, sl, device, dtype)
            mu, W, b = (torch.as_tensor(a[sl], device=device, dtype=dtype) for a in (self.mean_, self.coef_, b_centred))
            logits = torch.baddbmm(b[:, None, :], Xl - mu[:, None, :], W.transpose(1, 2))  # [L, n, K]
            out.append(to_numpy(logits.transpose(0, 1)).astype(np.float64))
        return np.concatenate(out, axis=1)


def _balanced(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency class weights n / (n_classes * count) along the last dim (sklearn's 'balanced')."""
    present = counts > 0
    weight = counts.sum(-1, keepdim=True) / (present.sum(-1, keepdim=True) * counts.clamp_min(1))
    return torch.where(present, weight, torch.zeros_like(counts))


class LayerwiseLogisticProbe(_LayerwiseBase):
    """Per-layer logistic regression (multinomial, or binary for two classes) on X [n_items, n_layers, d_model].

    Parameters: ``C`` (float or one per layer; same meaning as sklearn's ``C``) or ``l2`` (penalty strength
    directly, overrides C: ``l2 = 1 / (C * n_train)``), ``max_iter``, ``tol``, ``class_weight`` (None or
    "balanced"), ``solver`` ("lbfgs" or "adam", with learning rate ``lr``), ``standardize`` (z-score each layer's
    features with train mean/std; the penalty then acts on standardised coefficients, like a StandardScaler
    pipeline), ``precondition`` ("auto", "whiten", "diagonal", "none": solver speed only), ``device`` (None =
    cuda when available), ``dtype``, ``layer_batch`` (layers per batched problem, to bound memory; None = all),
    ``warm_start`` (start from the previous fit's coefficients where their shape matches, as in sklearn).

    Fitted: ``coef_`` [n_layers, K, d_model] (K = 1 for binary, as in sklearn, else n_classes), ``intercept_``
    [n_layers, K], ``classes_``, ``mean_`` [n_layers, d_model], ``n_iter_`` [n_layers]. Coefficients always apply
    to the raw features, whether or not ``standardize`` is set.
    """

    def fit(self, X: Features, y: Shaped[Array, "n_items"]) -> "LayerwiseLogisticProbe":
        X = _check_X(X)
        y = to_numpy(y)
        if y.shape != (X.shape[0],):
            raise ArgumentError(f"y must be shaped [n_items]={X.shape[0]}, got {y.shape}.")
        previous = getattr(self, "classes_", None)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if previous is not None and not np.array_equal(previous, self.classes_):
            self.__dict__.pop("coef_", None)  # a warm start for other classes would start nowhere useful
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise DataError(f"y has a single class {self.classes_!r}; a probe needs at least two.")
        device, dtype = self._torch_setup()
        y_t = torch.as_tensor(y_idx, device=device)
        sw = torch.ones(len(y_idx), device=device, dtype=dtype)
        if self.class_weight == "balanced":
            sw = _balanced(torch.bincount(y_t, minlength=n_classes).to(dtype))[y_t]
        weights = (sw / sw.sum())[None]
        if n_classes == 2:  # sklearn's binary parametrisation: one logit for classes_[1]
            targets = (y_t == 1).to(dtype)[None]
        else:
            targets = torch.nn.functional.one_hot(y_t, n_classes).to(dtype).T.contiguous()
        sw_sum = sw.sum().expand(targets.shape[0])
        l2 = self._l2(X.shape[1], sw_sum)
        self._fit_problem(X, lambda sl: LogisticTargets(targets, weights, l2[sl], n_classes > 2))
        return self

    def decision_function(self, X: Features) -> Float[np.ndarray, "n_items n_layers *k"]:
        """Logits [n_items, n_layers, n_classes], or [n_items, n_layers] for binary (as in sklearn)."""
        logits = super().decision_function(X)
        return logits[..., 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X: Features) -> Float[np.ndarray, "n_items n_layers n_classes"]:
        """Class probabilities [n_items, n_layers, n_classes]."""
        logits = torch.as_tensor(self.decision_function(X))
        if len(self.classes_) == 2:
            return torch.stack([torch.sigmoid(-logits), torch.sigmoid(logits)], -1).numpy()
        return torch.softmax(logits, -1).numpy()

    def predict(self, X: Features) -> Shaped[np.ndarray, "n_items n_layers"]:
        """Predicted class labels [n_items, n_layers]."""
        logits = self.decision_function(X)
        idx = (logits > 0).astype(int) if len(self.classes_) == 2 else logits.argmax(-1)
        return self.classes_[idx]

    def score(self, X: Features, y: Shaped[Array, "n_items"]) -> Float[np.ndarray, "n_layers"]:
        """Accuracy per layer [n_layers]."""
        return (self.predict(X) == to_numpy(y)[:, None]).mean(0)


class LayerwiseMultiLabelProbe(_LayerwiseBase):
    """Independent binary logistic probes per (layer, output) on X [n_items, n_layers, d_model], Y [n_items, n_outputs].

    Same parameters as :class:`LayerwiseLogisticProbe`. ``mask`` [n_items, n_outputs] says which (item, output)
    cells count (e.g. objects mentioned in the context); each output's problem is sklearn's
    ``LogisticRegression(C)`` fit on its masked items only (``l2 = 1 / (C * n_masked)``).
    Fitted: ``coef_`` [n_layers, n_outputs, d_model], ``intercept_`` [n_layers, n_outputs], ``mean_``, ``n_iter_``.
    """

    def fit(
        self, X: Features, Y: Shaped[Array, "n_items n_outputs"], mask: Bool[Array, "n_items n_outputs"] | None = None
    ) -> "LayerwiseMultiLabelProbe":
        X = _check_X(X)
        device, dtype = self._torch_setup()
        T = torch.as_tensor(to_numpy(Y).astype(bool), device=device)
        if T.ndim != 2 or T.shape[0] != X.shape[0]:
            raise ArgumentError(f"Y must be shaped [n_items={X.shape[0]}, n_outputs], got {tuple(T.shape)}.")
        M = torch.ones_like(T) if mask is None else torch.as_tensor(to_numpy(mask).astype(bool), device=device)
        if M.shape != T.shape:
            raise ArgumentError(f"mask must have Y's shape {tuple(T.shape)}, got {tuple(M.shape)}.")
        counted = T[M.bool()]
        if len(counted) and bool((counted == counted[0]).all()):
            raise DataError(f"Every counted target cell is {'positive' if bool(counted[0]) else 'negative'} (e.g. every "
                            "box is empty): a probe has nothing to learn, and the task, control and majority scores "
                            "would all be 1.0. Check the data file.")
        T, M = T.T.to(dtype), M.T.to(dtype)  # [O, n]
        sw = M.clone()
        if self.class_weight == "balanced":
            per_class = _balanced(torch.stack([((1 - T) * M).sum(1), (T * M).sum(1)], 1))  # [O, 2]: neg, pos
            sw = M * torch.where(T > 0, per_class[:, 1:], per_class[:, :1])
        sw_sum = sw.sum(1)
        empty = (sw_sum == 0).nonzero().flatten().tolist()
        if empty:
            logger.warning("Outputs %s have no masked training items; their probes stay at zero.", empty)
        weights = sw / sw_sum.clamp_min(1e-12)[:, None]
        self.n_outputs_ = T.shape[0]
        l2 = self._l2(X.shape[1], sw_sum)
        self._fit_problem(X, lambda sl: LogisticTargets(T, weights, l2[sl], False))
        return self

    def predict_proba(self, X: Features) -> Float[np.ndarray, "n_items n_layers n_outputs"]:
        """Probability that each output is positive, [n_items, n_layers, n_outputs]."""
        return torch.sigmoid(torch.as_tensor(self.decision_function(X))).numpy()

    def predict(self, X: Features) -> Bool[np.ndarray, "n_items n_layers n_outputs"]:
        """Boolean predictions [n_items, n_layers, n_outputs]."""
        return self.decision_function(X) > 0

    def score(
        self, X: Features, Y: Shaped[Array, "n_items n_outputs"], mask: Bool[Array, "n_items n_outputs"] | None = None
    ) -> Float[np.ndarray, "n_layers"]:
        """Mean accuracy over (masked) cells, per layer [n_layers]."""
        correct = self.predict(X) == to_numpy(Y).astype(bool)[:, None, :]
        M = np.ones_like(correct[:, 0]) if mask is None else to_numpy(mask).astype(bool)
        return (correct * M[:, None, :]).sum((0, 2)) / max(M.sum(), 1)


def check_Cs(Cs: Sequence[float]) -> list[float]:
    """``Cs`` sorted, after checking there is at least one and each is a finite number > 0."""
    try:
        values = sorted(float(c) for c in Cs)
    except (TypeError, ValueError):
        raise ConfigError(f"Cs must be a list of numbers > 0, got {Cs!r}.") from None
    if not values or not all(np.isfinite(c) and c > 0 for c in values):
        raise ConfigError(f"Cs must be a non-empty list of finite numbers > 0 (e.g. [0.01, 0.1, 1.0]), got {list(Cs)!r}.")
    return values


class SelectedC(NamedTuple):
    C: np.ndarray  # chosen C per layer [n_layers] (all equal when selected globally)
    scores: pd.DataFrame  # columns C, layer, val_score
    estimator: _LayerwiseBase  # fitted on the training split with the chosen C


def select_C(
    X_train, y_train, X_val, y_val, Cs: Sequence[float], *, estimator: _LayerwiseBase | None = None,
    per_layer: bool = True, mask_train=None, mask_val=None,
) -> SelectedC:
    """Choose C on a validation split (never the test split), per layer or one C for all layers.

    ``estimator`` defaults to ``LayerwiseLogisticProbe()``; pass a ``LayerwiseMultiLabelProbe`` (with masks)
    for multi-label targets. Ties go to the smallest C (the strongest regularisation).
    """
    base = estimator if estimator is not None else LayerwiseLogisticProbe()
    Cs = check_Cs(Cs)
    fit_kw = {} if mask_train is None else {"mask": mask_train}
    score_kw = {} if mask_val is None else {"mask": mask_val}
    rows, fits, previous = [], {}, None
    for C in sorted(Cs):
        estimator = clone(base).set_params(C=C, l2=None)
        if previous is not None:
            # Start from the next smaller C's solution (a regularisation path, as sklearn's
            # LogisticRegressionCV walks it): the optimum is the same, reached in fewer iterations.
            estimator.set_params(warm_start=True)
            estimator.coef_, estimator.intercept_ = previous.coef_, previous.intercept_
        fits[C] = previous = estimator.fit(X_train, y_train, **fit_kw).set_params(warm_start=base.warm_start)
        val = fits[C].score(X_val, y_val, **score_kw)
        rows += [{"C": C, "layer": layer, "val_score": s} for layer, s in enumerate(val)]
    scores = pd.DataFrame(rows)
    table = scores.pivot(index="C", columns="layer", values="val_score").loc[Cs]  # [n_Cs, n_layers]
    if per_layer:
        best = np.asarray(Cs)[table.to_numpy().argmax(0)]
    else:
        best = np.full(table.shape[1], Cs[int(table.to_numpy().mean(1).argmax())])
    return SelectedC(best, scores, _assemble(fits, best))


def _assemble(fits: dict, best: np.ndarray) -> _LayerwiseBase:
    """The estimator with each layer's C ``best[layer]``, taken from the grid's fits: layers are independent
    problems on the same training items, so refitting with the per-layer C vector would solve them again."""
    out = copy.deepcopy(fits[best[0]]).set_params(C=np.asarray(best, float), l2=None)
    for layer, C in enumerate(best):
        for name in ("coef_", "intercept_", "n_iter_"):
            getattr(out, name)[layer] = getattr(fits[C], name)[layer]
    return out
