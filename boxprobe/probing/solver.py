"""The batched solver behind :mod:`boxprobe.probing.probes`: many independent L2 logistic regressions at once.

One batch is L layers x K logits over n items. A *problem* is one layer (softmax: the K logits share one loss)
or one (layer, output) pair (sigmoid: K independent binary regressions). Every problem is minimised
independently, exactly as sklearn's ``LogisticRegression`` (lbfgs) would minimise it alone::

    sum_i s_i * loss_i  +  l2 / 2 * ||W||^2          (s_i: sample weights normalised to sum to 1)

Why it is fast:

- every problem is a slice of one batched matmul, and a line-search trial costs no matmul (logits are linear
  in the parameters, so one matmul gives them along the whole search ray);
- the batched L-BFGS gives each problem its own curvature history, line search and stopping test
  (``torch.optim.LBFGS`` on a summed loss couples them through one shared step);
- finished problems leave the batch: once a quarter have converged, the layers, outputs and items that only
  finished problems need are dropped, so a few slow problems do not pay for the whole batch;
- the solver works in exactly re-parametrised coordinates that track each problem's curvature (below).

Preconditioning. In the eigenbasis of the feature covariance (variances e_j) each problem's coefficients are
scaled by (e_j + mu)^-1/2. The Hessian at the optimum is about c * covariance + l2, where c is the mean
loss curvature p(1 - p) over the items, so mu = l2 / c would make it isotropic. c is not known in advance
(overlapping classes: c ~ 0.2; separable ones: c -> 0, and the penalty dominates), so every few iterations
each problem's c (each class's, for a softmax) is measured at the current logits and its scale reset. The
change of variables is exact, and L-BFGS's history is carried over into the new coordinates, so nothing
about the optimum changes.

The stopping test is sklearn's: max |gradient| <= tol w.r.t. the coefficients on the (centred) features and
the intercepts, whatever the solver's coordinates.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float

from boxprobe.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# mu = DAMPING * l2 / c. 10 was best (30 and 3 close, 1 and 0 worse) on cached toy-model features of 441 and
# 3,400 training items (multi-label contents, 7- and 8-class targets) and on synthetic features.
DAMPING = 10.0
# The same for softmax problems, whose c is measured per class: 3 was best (1 and 10 slower) on toy-base's
# first_object features (~100 classes, 1,000-1,500 training items) and on synthetic 8-class features.
SOFTMAX_DAMPING = 3.0
# Re-measure each problem's curvature and rescale its coordinates this often (iterations).
RESCALE_EVERY = 10
# Drop finished problems once this share of the working batch has converged.
COMPACT_AT = 0.25
# Why a problem stopped.
CONVERGED, STALLED, MAX_ITER = 0, 1, 2
# Recompute the logits from theta this often, rather than updating them along each step (rounding drift).
REFRESH_EVERY = 10


class LogisticTargets(NamedTuple):
    """Targets of a batch with K logits per layer; tensors over [K, n_items]."""

    targets: torch.Tensor  # one-hot [K, n] (softmax) or 0/1 [K, n] (sigmoid)
    weights: torch.Tensor  # [1, n] (softmax) or [K, n]; each problem's weights sum to 1
    l2: torch.Tensor  # [L, K, 1] penalty strength per layer (and output)
    softmax: bool


class Rotated(NamedTuple):
    """Centred features in the basis the solver scales: the covariance's eigenbasis, or the features' own."""

    R: torch.Tensor  # [L, n, d] features in that basis
    U: torch.Tensor | None  # [L, d, d] eigenvectors (features = R U^T), or None for the features' own basis
    var: torch.Tensor | None  # [L, 1, d] variance of each coordinate; None: do not scale ("none")


def rotate(
    X: Float[torch.Tensor, "layer n_items d_model"], mode: str, n_logits: int
) -> Rotated:
    """The solver's basis for centred features X: "whiten" (covariance eigenbasis), "diagonal" (per-feature
    scaling only), "none", or "auto" (whiten unless d_model >> K, where the eigendecomposition would cost
    more than it saves: about d / (2K) loss evaluations)."""
    L, n, d = X.shape
    if mode == "auto":
        mode = "whiten" if d <= max(256, 25 * n_logits) else "diagonal"
    if mode == "whiten":
        evals, U = torch.linalg.eigh(X.transpose(1, 2) @ X / n)
        return Rotated(X @ U, U, evals.clamp_min(0)[:, None, :])
    if mode == "diagonal":
        return Rotated(X, None, (X * X).mean(1, keepdim=True))
    if mode == "none":
        return Rotated(X, None, None)
    raise ConfigError(f"precondition must be 'auto', 'whiten', 'diagonal' or 'none', got {mode!r}.")


@dataclass
class _Objective:
    """The penalised loss of a working batch (layers x logits x items, possibly a subset of the full batch)
    in the solver's coordinates V: coefficients on the rotated features R are ``scale * V``."""

    R: torch.Tensor  # [L, n, d]
    U: torch.Tensor | None  # [L, d, d]
    var: torch.Tensor | None  # [L, 1, d]
    targets: torch.Tensor  # [K, n]
    weights: torch.Tensor  # [1 or K, n]
    l2: torch.Tensor  # [L, K, 1]
    softmax: bool
    scale: torch.Tensor | None = None  # [L, K, d]; set by rescale()

    @functools.cached_property
    def counted_cells(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Sigmoid batches whose weights are mostly zero (masked cells, e.g. objects not mentioned): flat
        indices into [K * n], their output index, weight and target; None when dense enough to skip this."""
        if self.softmax or (self.weights > 0).float().mean() > 0.5:
            return None
        cells = (self.weights > 0).flatten().nonzero().flatten()
        n = self.weights.shape[1]
        return cells, cells // n, self.weights.flatten()[cells], self.targets.flatten()[cells]

    @functools.cached_property
    def labels(self) -> torch.Tensor:
        """Class index [1, 1, n] of each item (softmax batches: the one-hot targets' argmax)."""
        return self.targets.argmax(0)[None, None, :]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.R.shape[0], self.targets.shape[0], self.R.shape[2]

    @property
    def n_problems(self) -> int:
        L, K, _ = self.shape
        return L if self.softmax else L * K

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, K, d = self.shape
        theta = theta.view(L, K, d + 1)
        return theta[..., :d], theta[..., d:]

    def curvature(self, logits: torch.Tensor) -> torch.Tensor:
        """Each problem's mean loss curvature c [L, K, 1] at these logits; for softmax, each class's diagonal
        block p (1 - p) of the per-item Hessian: a rare class's logit is far flatter than a common one's."""
        if self.softmax:
            p = torch.softmax(logits, 1)
            c = (p * (1 - p)) @ self.weights[0]
        else:
            p = torch.sigmoid(logits)
            c = (p * (1 - p) * self.weights).sum(-1)
        return c.expand(self.l2.shape[:2])[..., None]

    def rescale(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Reset every problem's scale to its curvature at ``logits``; returns old / new scale (V multiplies
        by it to stay the same point), or None when this batch is not scaled."""
        if self.var is None:
            return None
        damping = SOFTMAX_DAMPING if self.softmax else DAMPING
        mu = torch.maximum(self.l2, damping * self.l2 / self.curvature(logits).clamp_min(1e-8))
        new = (self.var + mu).rsqrt()  # [L, K, d]
        ratio = None if self.scale is None else self.scale / new
        self.scale = new
        return ratio

    def _scaled(self, Vt: torch.Tensor) -> torch.Tensor:
        return Vt if self.scale is None else Vt * self.scale

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """Logits [L, K, n] of theta [P, m], viewed as [L, K, d + 1] (coefficients, intercept); linear in theta."""
        Vt, b = self._split(theta)
        # bmm then add: baddbmm's fused bias add is slower on CPU than a separate in-place add.
        return torch.bmm(self._scaled(Vt), self.R.transpose(1, 2)).add_(b)

    def loss(self, logits: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [P] at theta, given its logits, and G [L, K, n] = weighted d loss / d logits."""
        L, K, d = self.shape
        T, w = self.targets, self.weights
        # The hot loop: few passes over [L, K, n]. Each item's loss is formed before weighting: summing the
        # softplus and target terms apart cancels catastrophically in float32.
        if self.softmax:
            # One exp pass gives both the log-sum-exp and the softmax; the target logit is gathered, not a
            # product with the one-hot targets (softmax and logsumexp over a non-last dim are slow on CPU).
            label = self.labels.expand(L, 1, -1)
            top = logits.amax(1, keepdim=True)
            G = (logits - top).exp_()
            total = G.sum(1, keepdim=True)
            item_loss = (total.log().add_(top).sub_(logits.gather(1, label)))[:, 0]  # [L, n]
            loss = (item_loss @ w[0])[:, None]  # [L, 1]
            G.mul_(w / total).scatter_add_(1, label, -w.expand(L, 1, -1))
        elif self.counted_cells is not None:  # softplus only where the weight is non-zero
            cells, output, w_cells, T_cells = self.counted_cells
            lg = logits.view(L, -1)[:, cells]  # [L, n_cells]
            item_loss = torch.nn.functional.softplus(lg).addcmul_(lg, T_cells, value=-1).mul_(w_cells)
            loss = logits.new_zeros(L, K).index_add_(1, output, item_loss)
            G = torch.sigmoid(logits).sub_(T).mul_(w)
        else:
            item_loss = torch.nn.functional.softplus(logits).addcmul_(logits, T, value=-1)  # [L, K, n]
            loss = item_loss.mul_(w).sum(-1)  # [L, K]
            G = torch.sigmoid(logits).sub_(T).mul_(w)
        W = self._scaled(self._split(theta)[0])
        return loss.add_(self._per_problem(0.5 * self.l2[..., 0] * (W * W).sum(-1))).reshape(-1), G

    def grad(self, G: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Gradient [P, m] at theta from its G."""
        Vt = self._split(theta)[0]
        g_coef = torch.bmm(G, self.R).add_(self.l2 * self._scaled(Vt))
        g_coef = self._scaled(g_coef)
        return torch.cat([g_coef, G.sum(2, keepdim=True)], -1).reshape(self.n_problems, -1)

    def slope(self, G: torch.Tensor, direction_logits: torch.Tensor, theta: torch.Tensor, direction: torch.Tensor):
        """Directional derivative [P] at theta along ``direction`` (whose logits are given): no matmul needed."""
        W, dW = self._scaled(self._split(theta)[0]), self._scaled(self._split(direction)[0])
        pen = (self.l2 * W * dW).sum(-1)
        return self._per_problem((G * direction_logits).sum(-1) + pen).reshape(-1)

    def _per_problem(self, per_logit: torch.Tensor) -> torch.Tensor:
        """[L, K] -> [L, 1] for softmax (one problem per layer), unchanged for sigmoid."""
        return per_logit.sum(-1, keepdim=True) if self.softmax else per_logit

    def broadcast(self, per_problem: torch.Tensor) -> torch.Tensor:
        """[P] -> a shape that broadcasts against [L, K, n]."""
        L, K, _ = self.shape
        return per_problem.view(L, 1 if self.softmax else K, 1)

    def fg(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [P] and gradient [P, m] of theta [P, m]."""
        f, G = self.loss(self.logits(theta), theta)
        return f, self.grad(G, theta)

    def to_features(self, theta: torch.Tensor) -> torch.Tensor:
        """theta [P, m] with the coefficients on the (centred) features in place of V."""
        Vt, b = self._split(theta)
        W = self._scaled(Vt)
        W = W @ self.U.transpose(1, 2) if self.U is not None else W
        return torch.cat([W, b], -1).reshape(self.n_problems, -1)

    def gmax(self, grad: torch.Tensor, tol: float | None = None) -> torch.Tensor:
        """Max |gradient| per problem [P] w.r.t. the feature coefficients and intercepts. With ``tol``, a lower
        bound that already exceeds it may stand in for problems that are certainly not converged."""
        g_V, g_b = self._split(grad)
        g_R = g_V if self.scale is None else g_V / self.scale  # g_V = scale * g_R
        if self.U is not None and tol is not None:
            # U is orthonormal, so each row of g_W = g_R U^T keeps its 2-norm, and max |g_W| >= ||row|| / sqrt(d):
            # a problem whose largest row norm exceeds tol * sqrt(d) is certainly not converged, and the
            # rotation (a matmul) is only needed for the others.
            bound = g_R.norm(dim=-1).view(self.n_problems, -1).amax(1) / g_R.shape[-1] ** 0.5
            if bool((bound > tol).all()):
                return bound
        g_W = g_R @ self.U.transpose(1, 2) if self.U is not None else g_R  # R = X U: g_R = g_W U
        return torch.maximum(g_W.abs().amax(-1), g_b[..., 0].abs()).view(self.n_problems, -1).amax(1)

    def compact(self, active: torch.Tensor) -> tuple[torch.Tensor, "_Objective"] | None:
        """The smaller batch still needed by the ``active`` problems, and the kept problems' indices; None
        when dropping finished problems would save little."""
        L, K, _ = self.shape
        grid = active.view(L, 1 if self.softmax else K)
        layers = grid.any(1).nonzero().flatten()
        outputs = torch.arange(K, device=active.device) if self.softmax else grid.any(0).nonzero().flatten()
        weights = self.weights if self.softmax else self.weights[outputs]
        items = (weights > 0).any(0).nonzero().flatten()
        if len(layers) * len(outputs) * len(items) > 0.9 * L * K * self.R.shape[1]:
            return None
        keep = layers if self.softmax else (layers[:, None] * K + outputs[None, :]).flatten()
        pick = lambda t: None if t is None else t[layers]  # noqa: E731
        smaller = _Objective(
            self.R[layers][:, items], pick(self.U), pick(self.var), self.targets[outputs][:, items],
            weights[:, items], self.l2[layers][:, outputs], self.softmax,
            None if self.scale is None else self.scale[layers][:, outputs])
        return keep, smaller


def lbfgs(objective: _Objective, x: torch.Tensor, tol: float, max_iter: int, history: int = 10, max_ls: int = 25):
    """L-BFGS on the objective's P independent problems at once, from x [P, m] (zeros: the scale is unset).

    Returns (theta [P, m] on the centred features, n_iter [P], status [P], gmax [P] when each stopped), status
    being CONVERGED, STALLED (no step decreased the loss any more: the dtype's precision floor) or MAX_ITER.
    """
    P, m = x.shape
    result, ids = torch.empty_like(x), torch.arange(P, device=x.device)
    n_iter = torch.zeros(P, dtype=torch.long, device=x.device)
    status = torch.full((P,), CONVERGED, dtype=torch.long, device=x.device)
    lg = objective.logits(x)
    objective.rescale(lg)
    f, G = objective.loss(lg, x)
    g = objective.grad(G, x)
    S, Yh = x.new_zeros(history, P, m), x.new_zeros(history, P, m)
    rho = x.new_zeros(history, P)  # 0 marks an empty or rejected pair: a no-op in the two-loop recursion
    gamma = (1.0 / g.abs().sum(1).clamp_min(1e-12)).clamp(max=1.0)  # torch's first step: min(1, 1/|g|_1)
    g_final = objective.gmax(g)
    active = g_final > tol

    def save():
        result[ids] = objective.to_features(x)

    for it in range(max_iter):
        if not active.any():
            break
        if active.sum() <= (1 - COMPACT_AT) * len(active) and (shrunk := objective.compact(active)) is not None:
            save()
            keep, objective = shrunk
            ids, x, f, g, gamma, active = ids[keep], x[keep], f[keep], g[keep], gamma[keep], active[keep]
            S, Yh, rho = S[:, keep], Yh[:, keep], rho[:, keep]
            lg = objective.logits(x)
        if it % RESCALE_EVERY == RESCALE_EVERY - 1 and (ratio := objective.rescale(lg)) is not None:
            # The same point and curvature pairs in the new coordinates: V and steps scale by old/new scale,
            # gradients by its inverse (so s.y, and the L-BFGS model, are unchanged).
            x, S = _scale_coefficients(x, ratio), _scale_coefficients(S, ratio)
            g, Yh = _scale_coefficients(g, 1 / ratio), _scale_coefficients(Yh, 1 / ratio)
        # The two-loop recursion, in fused ops: with few or small problems its op count is the cost.
        q, alphas = g.clone(), []
        slots = [(it - 1 - j) % history for j in range(min(it, history))]  # newest first
        for j in slots:
            a = rho[j] * torch.linalg.vecdot(S[j], q)
            q.addcmul_(a[:, None], Yh[j], value=-1)
            alphas.append(a)
        q *= gamma[:, None]
        for j, a in zip(reversed(slots), reversed(alphas)):
            q.addcmul_((a - rho[j] * torch.linalg.vecdot(Yh[j], q))[:, None], S[j])
        d = q.neg_() if bool(active.all()) else torch.where(active[:, None], -q, 0)
        gd = torch.linalg.vecdot(g, d)
        uphill = active & (gd >= 0)  # a bad curvature estimate: fall back to scaled steepest descent
        if bool(uphill.any()):
            d = torch.where(uphill[:, None], -gamma[:, None] * g, d)
            gd = torch.where(uphill, -gamma * (g * g).sum(1), gd)
        # Logits are linear in theta, so one matmul gives them along the whole ray x + t d: line-search trials
        # cost elementwise work only, and each iteration two matmuls (this one and the new gradient).
        lg_d = objective.logits(d)
        t = torch.ones(len(x), dtype=x.dtype, device=x.device)
        for _ in range(max_ls):
            x_new, lg_new = x + t[:, None] * d, torch.addcmul(lg, objective.broadcast(t), lg_d)
            f_new, G = objective.loss(lg_new, x_new)
            gd_new = objective.slope(G, lg_d, x_new, d)
            # Hager & Zhang's approximate Wolfe test: in float32 the loss stops resolving decreases well before
            # the gradient reaches tol, but the slope along d still says whether the step went the right way.
            approx_wolfe = (f_new <= f + 1e-6 * f.abs()) & (gd_new >= 0.9 * gd) & (gd_new <= -(1 - 2e-4) * gd)
            ok = ~active | (f_new <= f + 1e-4 * t * gd) | approx_wolfe
            if ok.all():
                break
            t = torch.where(ok, t, 0.5 * t)
        if not ok.all():  # no decrease found (precision floor): the problem stops where it is
            t = torch.where(ok, t, 0)
            x_new = x + t[:, None] * d
        if not ok.all() or it % REFRESH_EVERY == REFRESH_EVERY - 1:  # also undo the drift of updated logits
            lg_new = objective.logits(x_new)
            f_new, G = objective.loss(lg_new, x_new)
        g_new = objective.grad(G, x_new)
        slot = it % history
        s, y = torch.sub(x_new, x, out=S[slot]), torch.sub(g_new, g, out=Yh[slot])
        sy, yy = torch.linalg.vecdot(s, y), torch.linalg.vecdot(y, y)
        valid = active & ok & (sy > 1e-10 * yy.sqrt() * s.norm(dim=1))
        rho[slot] = torch.where(valid, 1.0 / sy.clamp_min(1e-30), 0)
        gamma = torch.where(valid, sy / yy.clamp_min(1e-30), gamma)
        x, f, g, lg = x_new, f_new, g_new, lg_new
        n_iter[ids] += active.long()
        status[ids] = torch.where(active & ~ok, STALLED, status[ids])
        # A finished problem's gradient is the one it stopped at: re-evaluating it at refreshed logits
        # would only add rounding noise around tol.
        # The bound may stand in only while every problem goes on; where one stops, its exact value is kept.
        g_max = objective.gmax(g, tol if it < max_iter - 1 and bool(ok.all()) else None)
        g_final[ids] = torch.where(active, g_max, g_final[ids])
        active = active & ok & (g_max > tol)
    status[ids] = torch.where(active, MAX_ITER, status[ids])
    save()
    return result, n_iter, status, g_final


def _scale_coefficients(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply the coefficient part of t [..., P, m] (problems laid out as [L, K, d + 1]) by factor [L, K, d]."""
    L, K, d = factor.shape
    parts = t.reshape(*t.shape[:-2], L, K, d + 1)
    return torch.cat([parts[..., :d] * factor, parts[..., d:]], -1).reshape(t.shape)


def adam(objective: _Objective, x: torch.Tensor, tol: float, max_iter: int, lr: float):
    """Plain full-batch Adam (betas 0.9, 0.999), written out: torch.optim's first step costs ~1 s. Its scale
    stays the one at the start. Returns what :func:`lbfgs` returns."""
    objective.rescale(objective.logits(x))
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    n_iter = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for step in range(1, max_iter + 1):
        g = objective.fg(x)[1]
        active = objective.gmax(g) > tol
        if not active.any():
            break
        n_iter += active.long()
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        update = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt_() + 1e-8)
        x = x - lr * torch.where(active[:, None], update, 0)
    g_final = objective.gmax(objective.fg(x)[1])
    status = torch.where(g_final > tol, MAX_ITER, CONVERGED)  # no line search to stall
    return objective.to_features(x), n_iter, status, g_final


def solve(rotated: Rotated, lt: LogisticTargets, solver: str, max_iter: int, tol: float, lr: float,
          init: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Minimise every problem of the batch, from zero or from ``init`` = (W [L, K, d] on the centred features,
    b [L, K, 1]), e.g. the solution at a nearby C. Returns (W, b, n_iter [L])."""
    L, _, d = rotated.R.shape
    K = lt.targets.shape[0]
    # Checked here too, for callers that build LogisticTargets themselves: NaN would pass every comparison.
    if not bool(torch.isfinite(lt.l2).all()) or bool((lt.l2 < 0).any()):
        raise ConfigError("The penalty l2 (1 / (C * n)) must be finite and >= 0; pass C > 0 and finite.")
    if not bool(torch.isfinite(rotated.R).all()):
        raise DataError("The probe's features hold NaN or inf (after centring: values too large for the dtype?); "
                        "check the activations, or pass standardize=True or dtype='float64'.")
    if not (max_iter >= 1 and tol >= 0 and (solver != "adam" or lr > 0)):
        raise ConfigError(f"max_iter must be >= 1, tol >= 0 and lr > 0; got max_iter={max_iter}, tol={tol}, lr={lr}.")
    objective = _Objective(rotated.R, rotated.U, rotated.var, lt.targets, lt.weights, lt.l2, lt.softmax)
    theta = rotated.R.new_zeros(objective.n_problems, (K if lt.softmax else 1) * (d + 1))
    if init is not None:  # into the solver's coordinates: V = (W U) / scale, the scale measured at init's logits
        W, b = (t.to(theta) for t in init)
        W_R = W @ rotated.U if rotated.U is not None else W
        objective.rescale(torch.bmm(W_R, rotated.R.transpose(1, 2)).add_(b))
        V = W_R if objective.scale is None else W_R / objective.scale
        theta = torch.cat([V, b], -1).reshape(theta.shape)
    with torch.no_grad():
        if solver == "lbfgs":
            theta, n_iter, status, g_final = lbfgs(objective, theta, tol, max_iter)
        elif solver == "adam":
            theta, n_iter, status, g_final = adam(objective, theta, tol, max_iter, lr)
        else:
            raise ConfigError(f"solver must be 'lbfgs' or 'adam', got {solver!r}.")
    unfinished, floor = status == MAX_ITER, (status == STALLED) & (g_final > tol)
    if unfinished.any():
        logger.warning("Probe solver (%s) left %d of %d problems above tol=%g after max_iter=%d iterations (max "
                       "gradient %.2g); raise max_iter, loosen tol, or regularise more (smaller C).",
                       solver, int(unfinished.sum()), objective.n_problems, tol, max_iter, g_final[unfinished].max())
    if floor.any():  # the loss cannot resolve a better point: more iterations would not help, more precision would
        logger.info("Probe solver stopped %d of %d problems at the %s precision floor, above tol=%g (max gradient "
                    "%.2g); pass dtype='float64' for a tighter fit.", int(floor.sum()), objective.n_problems,
                    str(rotated.R.dtype).removeprefix("torch."), tol, g_final[floor].max())
    theta = theta.view(L, K, d + 1)
    return theta[..., :d], theta[..., d:], n_iter.view(L, -1).amax(1)
