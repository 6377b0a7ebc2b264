"""The batched solver behind :mod:`boxprobe.probes`: many independent L2 logistic regressions at once.

One batch is L layers x K logits over n items. A *problem* is one layer (softmax: the K logits share one loss)
or one (layer, output) pair (sigmoid: K independent binary regressions). Every problem is minimised
independently, exactly as sklearn's ``LogisticRegression`` (lbfgs) would minimise it alone::

    sum_i s_i * loss_i  +  l2 / 2 * ||W||^2          (s_i: sample weights normalised to sum to 1)

Why it is fast:

- every problem is a slice of one batched matmul;
- the batched L-BFGS gives each problem its own curvature history, line search and stopping test
  (``torch.optim.LBFGS`` on a summed loss couples them through one shared step);
- finished problems leave the batch: once a quarter have converged, the layers, outputs and items that only
  finished problems need are dropped, so a few slow problems do not pay for the whole batch;
- the solver works in exactly re-parametrised coordinates (:func:`precondition`) that leave the objective and
  its optimum unchanged but cut iterations several-fold on anisotropic residual-stream features.

The stopping test is sklearn's: max |gradient| <= tol w.r.t. the coefficients on the (centred) features and
the intercepts, whatever the solver's coordinates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float

logger = logging.getLogger(__name__)

# Whitening is damped by this share of the mean feature variance (or by l2, if larger). Undamped whitening
# is ideal for overlapping classes, but on (near-)separable real features it turns the penalty into a badly
# conditioned one and needs ~10x more iterations; 0.1 was the best compromise on cached toy-model features.
DAMPING = 0.1
# Drop finished problems once this share of the working batch has converged.
COMPACT_AT = 0.25


class LogisticTargets(NamedTuple):
    """Targets of a batch with K logits per layer; tensors over [K, n_items]."""

    targets: torch.Tensor  # one-hot [K, n] (softmax) or 0/1 [K, n] (sigmoid)
    weights: torch.Tensor  # [1, n] (softmax) or [K, n]; each problem's weights sum to 1
    l2: torch.Tensor  # [L, K, 1] penalty strength per layer (and output)
    softmax: bool


class Preconditioned(NamedTuple):
    """An exact change of variables W = B V: the solver fits V on features Z = X B."""

    Z: torch.Tensor  # [L, n, d]
    B: torch.Tensor  # [L, d, d] when full, else a per-feature scale [L, 1, d]
    B_inv: torch.Tensor  # B's inverse, same shape
    pen: torch.Tensor  # [L, 1, d] per-coordinate penalty factors in V's coordinates
    full: bool

    def to_features(self, Vt: torch.Tensor) -> torch.Tensor:
        """Coefficients [L, K, d] on the (centred) features from the solver's V."""
        return Vt @ self.B.transpose(1, 2) if self.full else Vt * self.B


def precondition(
    X: Float[torch.Tensor, "layer n_items d_model"], lam: Float[torch.Tensor, "layer 1"], mode: str, n_logits: int
) -> Preconditioned:
    """Change of variables that makes the loss Hessian near-isotropic; X must be centred.

    ``mode``: "whiten" (eigenvectors of the covariance), "diagonal" (per-feature scale), "none", or "auto"
    (whiten unless d_model >> K, where the eigendecomposition would cost more than it saves).
    """
    L, n, d = X.shape
    lam = lam.clamp_min(torch.finfo(X.dtype).eps)  # also scales directions with no variance
    if mode == "auto":  # whitening costs about d / (2K) loss evaluations
        mode = "whiten" if d <= max(256, 25 * n_logits) else "diagonal"
    if mode == "whiten":
        evals, U = torch.linalg.eigh(X.transpose(1, 2) @ X / n)
        evals = evals.clamp_min(0)
        scale = (evals + torch.maximum(lam, DAMPING * evals.mean(1, keepdim=True))).rsqrt()
        B = U * scale[:, None, :]
        B_inv = (U / scale[:, None, :]).transpose(1, 2)  # B = U diag(s) with s > 0
        return Preconditioned(X @ B, B, B_inv, (scale * scale)[:, None, :], True)
    if mode == "diagonal":
        var = (X * X).mean(1)
        scale = (var + torch.maximum(lam, DAMPING * var.mean(1, keepdim=True))).rsqrt()[:, None, :]
    elif mode == "none":
        scale = torch.ones(L, 1, d, device=X.device, dtype=X.dtype)
    else:
        raise ValueError(f"precondition must be 'auto', 'whiten', 'diagonal' or 'none', got {mode!r}.")
    return Preconditioned(X * scale, scale, 1 / scale, scale * scale, False)


@dataclass
class _Objective:
    """The penalised loss of a working batch: layers x logits x items, possibly a subset of the full batch."""

    Z: torch.Tensor  # [L, n, d]
    targets: torch.Tensor  # [K, n]
    weights: torch.Tensor  # [1 or K, n]
    penalty: torch.Tensor  # [L, K, d]
    B_inv: torch.Tensor  # [L, d, d] or [L, 1, d]
    full: bool
    softmax: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.penalty.shape[0], self.targets.shape[0], self.Z.shape[2]

    @property
    def n_problems(self) -> int:
        L, K, _ = self.shape
        return L if self.softmax else L * K

    def fg(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [P] and gradient [P, m] of theta [P, m], viewed as [L, K, d + 1] (coefficients, intercept)."""
        L, K, d = self.shape
        theta = theta.view(L, K, d + 1)
        Vt, b = theta[..., :d], theta[..., d:]
        logits = torch.baddbmm(b, Vt, self.Z.transpose(1, 2))  # [L, K, n]
        T, w = self.targets, self.weights
        if self.softmax:
            lse = torch.logsumexp(logits, 1, keepdim=True)
            loss = (w * (lse.squeeze(1) - (logits * T).sum(1))).sum(-1, keepdim=True)  # [L, 1]
            G = (torch.exp(logits - lse) - T) * w
        else:
            loss = (w * (torch.nn.functional.softplus(logits) - T * logits)).sum(-1)  # [L, K]
            G = (torch.sigmoid(logits) - T) * w
        pV = self.penalty * Vt
        pen_term = 0.5 * (pV * Vt).sum(-1)  # [L, K]
        loss = loss + (pen_term.sum(-1, keepdim=True) if self.softmax else pen_term)
        grad = torch.cat([torch.bmm(G, self.Z).add_(pV), G.sum(2, keepdim=True)], -1)
        return loss.reshape(self.n_problems), grad.reshape(self.n_problems, -1)

    def gmax(self, grad: torch.Tensor) -> torch.Tensor:
        """Max |gradient| per problem [P] w.r.t. the feature coefficients (g_V = g_W B, as rows) and intercepts."""
        L, K, d = self.shape
        grad = grad.view(L, K, d + 1)
        g_coef = grad[..., :d] @ self.B_inv if self.full else grad[..., :d] * self.B_inv
        return torch.maximum(g_coef.abs().amax(-1), grad[..., d].abs()).view(self.n_problems, -1).amax(1)

    def compact(self, active: torch.Tensor) -> tuple[torch.Tensor, "_Objective"] | None:
        """The smaller batch still needed by the ``active`` problems, and the kept problems' indices; None
        when dropping finished problems would save little."""
        L, K, _ = self.shape
        grid = active.view(L, 1 if self.softmax else K)
        layers = grid.any(1).nonzero().flatten()
        outputs = torch.arange(K, device=active.device) if self.softmax else grid.any(0).nonzero().flatten()
        weights = self.weights if self.softmax else self.weights[outputs]
        items = (weights > 0).any(0).nonzero().flatten()
        if len(layers) * len(outputs) * len(items) > 0.9 * L * K * self.Z.shape[1]:
            return None
        keep = layers if self.softmax else (layers[:, None] * K + outputs[None, :]).flatten()
        smaller = _Objective(
            self.Z[layers][:, items], self.targets[outputs][:, items], weights[:, items],
            self.penalty[layers][:, outputs], self.B_inv[layers], self.full, self.softmax)
        return keep, smaller


def lbfgs(objective: _Objective, x: torch.Tensor, tol: float, max_iter: int, history: int = 10, max_ls: int = 25):
    """L-BFGS on the objective's P independent problems at once, x [P, m].

    Returns (x, n_iter [P], stalled [P]): ``stalled`` marks problems stopped because no step along their
    direction decreased the loss any more (the dtype's precision floor), rather than by the tolerance.
    """
    result, ids = x.clone(), torch.arange(x.shape[0], device=x.device)
    n_iter = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    stalled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    f, g = objective.fg(x)
    P, m = x.shape
    S, Yh = x.new_zeros(history, P, m), x.new_zeros(history, P, m)
    rho = x.new_zeros(history, P)  # 0 marks an empty or rejected pair: a no-op in the two-loop recursion
    gamma = (1.0 / g.abs().sum(1).clamp_min(1e-12)).clamp(max=1.0)  # torch's first step: min(1, 1/|g|_1)
    active = objective.gmax(g) > tol
    for it in range(max_iter):
        if not active.any():
            break
        if active.sum() <= (1 - COMPACT_AT) * len(active) and (shrunk := objective.compact(active)) is not None:
            keep, objective = shrunk
            result[ids] = x
            ids, x, f, g, gamma, active = ids[keep], x[keep], f[keep], g[keep], gamma[keep], active[keep]
            S, Yh, rho = S[:, keep], Yh[:, keep], rho[:, keep]
        q, alphas = g.clone(), []
        slots = [(it - 1 - j) % history for j in range(min(it, history))]  # newest first
        for j in slots:
            a = rho[j] * (S[j] * q).sum(1)
            q -= a[:, None] * Yh[j]
            alphas.append(a)
        q *= gamma[:, None]
        for j, a in zip(reversed(slots), reversed(alphas)):
            q += (a - rho[j] * (Yh[j] * q).sum(1))[:, None] * S[j]
        d = torch.where(active[:, None], -q, 0)
        gd = (g * d).sum(1)
        uphill = active & (gd >= 0)  # a bad curvature estimate: fall back to scaled steepest descent
        d = torch.where(uphill[:, None], -gamma[:, None] * g, d)
        gd = torch.where(uphill, -gamma * (g * g).sum(1), gd)
        t = torch.ones(len(x), dtype=x.dtype, device=x.device)
        for _ in range(max_ls):
            f_new, g_new = objective.fg(x + t[:, None] * d)
            gd_new = (g_new * d).sum(1)
            # Hager & Zhang's approximate Wolfe test: in float32 the loss stops resolving decreases well before
            # the gradient reaches tol, but the slope along d still says whether the step went the right way.
            approx_wolfe = (f_new <= f + 1e-6 * f.abs()) & (gd_new >= 0.9 * gd) & (gd_new <= -(1 - 2e-4) * gd)
            ok = ~active | (f_new <= f + 1e-4 * t * gd) | approx_wolfe
            if ok.all():
                break
            t = torch.where(ok, t, 0.5 * t)
        t = torch.where(ok, t, 0)  # no decrease found (precision floor): the problem stops where it is
        if not ok.all():
            f_new, g_new = objective.fg(x + t[:, None] * d)
        s, y = t[:, None] * d, g_new - g
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        valid = active & ok & (sy > 1e-10 * yy.sqrt() * s.norm(dim=1))
        slot = it % history
        S[slot], Yh[slot], rho[slot] = s, y, torch.where(valid, 1.0 / sy.clamp_min(1e-30), 0)
        gamma = torch.where(valid, sy / yy.clamp_min(1e-30), gamma)
        x, f, g = x + s, f_new, g_new
        n_iter[ids] += active.long()
        stalled[ids] |= active & ~ok
        active = active & ok & (objective.gmax(g) > tol)
    result[ids] = x
    return result, n_iter, stalled


def adam(objective: _Objective, x: torch.Tensor, tol: float, max_iter: int, lr: float):
    """Plain full-batch Adam (betas 0.9, 0.999), written out: torch.optim's first step costs ~1 s."""
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    n_iter = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    stalled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # Adam has no line search to stall
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
    return x, n_iter, stalled


def solve(pre: Preconditioned, lt: LogisticTargets, solver: str, max_iter: int, tol: float, lr: float):
    """Minimise every problem of the batch. Returns (Vt [L, K, d], b [L, K, 1], n_iter [L])."""
    L, n, d = pre.Z.shape
    K = lt.targets.shape[0]
    objective = _Objective(pre.Z, lt.targets, lt.weights, lt.l2 * pre.pen, pre.B_inv, pre.full, lt.softmax)
    theta = pre.Z.new_zeros(objective.n_problems, (K if lt.softmax else 1) * (d + 1))
    with torch.no_grad():
        if solver == "lbfgs":
            theta, n_iter, stalled = lbfgs(objective, theta, tol, max_iter)
        elif solver == "adam":
            theta, n_iter, stalled = adam(objective, theta, tol, max_iter, lr)
        else:
            raise ValueError(f"solver must be 'lbfgs' or 'adam', got {solver!r}.")
        g_final = objective.gmax(objective.fg(theta)[1])
    unfinished, floor = (g_final > tol) & ~stalled, (g_final > tol) & stalled
    if unfinished.any():
        logger.warning("Probe solver (%s) left %d of %d problems above tol=%g after max_iter=%d iterations (max "
                       "gradient %.2g); raise max_iter, loosen tol, or regularise more (smaller C).",
                       solver, int(unfinished.sum()), objective.n_problems, tol, max_iter, g_final[unfinished].max())
    if floor.any():  # the loss cannot resolve a better point: more iterations would not help, more precision would
        logger.info("Probe solver stopped %d of %d problems at the %s precision floor, above tol=%g (max gradient "
                    "%.2g); pass dtype='float64' for a tighter fit.", int(floor.sum()), objective.n_problems,
                    str(pre.Z.dtype).removeprefix("torch."), tol, g_final[floor].max())
    theta = theta.view(L, K, d + 1)
    return theta[..., :d], theta[..., d:], n_iter.view(L, -1).amax(1)
