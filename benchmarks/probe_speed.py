"""Benchmark: the batched all-layers probe trainer against a loop of sklearn LogisticRegression over layers.

Both fit the same L2 objective (same C, lbfgs, tol=1e-4, max_iter=1000) on the same features, single-threaded
(torch.set_num_threads(1); BLAS/OpenMP limited to 1 thread for sklearn), best of --repeats timings each.
Features are synthetic and shaped like a residual-stream cache (a large per-layer mean offset, anisotropic
covariance with a few high-variance "outlier" dimensions, class signal planted along random directions
with a strength that grows with depth), or real ones:

- ``--model M``: caches checkpoint M (e.g. ``assets/models/toy-base``) on a freshly generated test subsample
  (``--per-numops`` states per numops value, all 7 boxes each) in a temporary directory first;
- ``--cache DIR``: an existing boxprobe.activations.cache directory;
- in both, features of --hook at --role, labels from the metadata column --label, split by sample_id;
- ``--features``: an .npz with X [n_items, n_layers, d_model] and y [n_items], or a directory holding X.npy
  and y.npy.

``--label first_object`` benchmarks the probe of :mod:`boxprobe.probing.experiment`'s headline target: the
first answer object at the appended answer prefix " the" (role ``answer_prefix``, k=0; non-empty boxes), one
multinomial probe over the object vocabulary whose argmax is restricted to the objects the description
mentions (:func:`boxprobe.probing.targets.object_target`), against one sklearn multinomial
``LogisticRegression`` per layer with the same candidate-restricted argmax.

Any other target of :data:`boxprobe.probing.targets.TARGETS` (``--label empty``, ``kth_object``, ``prior_1``,
``mention``, ``global_state``; not ``incremental``, whose labels need the description texts) is read the way
:class:`boxprobe.probing.experiment.ProbeExperiment` reads it (its role, rows, labels and counted cells from
``build_target``): class targets as above (candidate-restricted where candidates are given), multi-label
targets as the contents probe below, and ``global_state`` as one softmax per object over the items that count
it, ours one ``LayerwiseLogisticProbe`` per object (all layers at once, as the experiment fits it), sklearn one
per (layer, object).

``--label gold`` (the default; any column of object lists works) benchmarks the queried-box contents probe,
the library's main one: a multi-label probe with one binary output per object, counted only where the object
is mentioned (``LayerwiseMultiLabelProbe``, balanced class weights), against sklearn fitted per layer *and*
object on the mentioned items. A problem sklearn cannot fit (one class only) predicts that class, on both
sides. A scalar column (``query_box``, ``numops``) benchmarks the multinomial ``LayerwiseLogisticProbe``.

Both sides are also scored on the objective they minimise (float64, summed over layers and outputs), next to a
tight float64 fit of the same probe (tol=1e-8, untimed): a speed-up bought by stopping early, or an accuracy
gap caused by sklearn stopping short of the optimum, shows.

Last line: ``ratio=<sklearn time / our time> accuracy_gap=<max over layers of |test acc difference| in points>``.

    .venv/bin/python benchmarks/probe_speed.py [--n-items 3000 --n-layers 5 --d-model 128 --n-classes 8]
    .venv/bin/python benchmarks/probe_speed.py --model assets/models/toy-base [--per-numops 52] [--label gold]
    .venv/bin/python benchmarks/probe_speed.py --model assets/models/toy-base --label first_object
    .venv/bin/python benchmarks/probe_speed.py --model assets/models/toy-base --label global_state
    .venv/bin/python benchmarks/probe_speed.py --cache runs/demo/cache/toy-base --label query_box
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits

from boxprobe.probing.metrics import split_by_group
from boxprobe.probing.probes import LayerwiseLogisticProbe, LayerwiseMultiLabelProbe
from boxprobe.probing.targets import TARGET_ROLE, TARGETS


def synthetic_cache(n_items: int, n_layers: int, d_model: int, n_classes: int, seed: int, isotropic: bool = False):
    """Cache-shaped features; ``isotropic`` drops the offset, power-law spectrum and outlier dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_items)
    X = np.empty((n_items, n_layers, d_model))
    for layer in range(n_layers):
        depth = layer / max(n_layers - 1, 1)
        rotation, _ = np.linalg.qr(rng.standard_normal((d_model, d_model)))
        spectrum = np.arange(1, d_model + 1) ** -0.8  # power-law variance, like real residual streams
        noise = (rng.standard_normal((n_items, d_model)) * np.sqrt(spectrum)) @ rotation.T
        noise[:, rng.choice(d_model, 2, replace=False)] *= 20  # "massive activation" dimensions
        means = rng.standard_normal((n_classes, d_model)) / np.sqrt(d_model)
        signal = (0.15 + 1.2 * depth) * means[y]  # decodability grows with depth
        offset = rng.standard_normal(d_model) * (2 + 4 * depth)
        if isotropic:
            noise, offset = rng.standard_normal((n_items, d_model)) / np.sqrt(d_model), 0.0
        X[:, layer] = offset + noise + signal
    return X, y


def load_features(path: Path):
    if path.is_dir():
        return np.load(path / "X.npy"), np.load(path / "y.npy")
    data = np.load(path)
    return data["X"], data["y"]


def load_cache(directory: Path, hook: str, role: str, label: str):
    """(X, y, groups, mask, kind): a probe target's (:func:`load_target`), or a metadata column's: y [n] for a
    scalar column (mask None); for a column of object lists, y [n, n_objects] in/out with mask [n, n_objects] =
    the object is mentioned in the context (the contents probe's counted cells)."""
    from boxprobe.activations.cache import open_cache  # only needed for real caches
    from boxprobe.probing.metrics import contents_labels, mentioned_mask

    cache = open_cache(directory)
    if label in TARGETS:
        return load_target(cache, hook, label)
    meta = cache.metadata(role)
    if label not in meta:
        raise SystemExit(f"--label {label!r} is not a metadata column of {directory}; columns: {', '.join(meta)}")
    keep = meta[label].notna().to_numpy()  # e.g. prior_k where there is no k-th earlier state
    X = cache.activations(hook, role).float().numpy()[keep]
    meta = meta[keep]
    groups = meta["sample_id"].to_numpy() if "sample_id" in meta else None
    if meta[label].map(np.isscalar).all():
        return X, meta[label].to_numpy().astype(str), groups, None, "class"
    vocab = sorted({obj for objects in meta["mentioned"] for obj in objects})
    return X, contents_labels(meta[label], vocab), groups, mentioned_mask(meta["mentioned"], vocab), "multilabel"


def load_target(cache, hook: str, name: str):
    """(X, y, groups, mask) of the experiment's target ``name`` (:mod:`boxprobe.probing.targets`) on a cache that
    holds its role(s): class targets give y [n] class indices and mask [n, C] candidates; multi-label targets
    y / mask [n, V] (cells that count); per-object softmaxes (``global_state``) y [n, V] the class of each
    object (box or none), mask [n, V] the objects counted."""
    from boxprobe.data.task import load_vocabulary
    from boxprobe.probing.targets import TARGET_ROLE, build_target

    roles = TARGET_ROLE[name] if isinstance(TARGET_ROLE[name], tuple) else (TARGET_ROLE[name],)
    meta = {r: cache.metadata(r).reset_index(drop=True) for r in roles}
    if name == "incremental":
        raise SystemExit("--label incremental needs the description texts, which a cache does not keep.")
    # global_state keeps one item per description; a state (sample_id, num_operations) names it.
    by_query = pd.concat(meta.values()).drop_duplicates("query_index").set_index("query_index")
    contexts = {q: f"{r.sample_id}/{r.num_operations}" for q, r in by_query.iterrows()}
    t, role = build_target(name, meta, contexts, load_vocabulary("objects"))
    X = np.concatenate([cache.activations(hook, r).float().numpy() for r in roles])[t.rows]
    return X, t.y, t.groups, t.mask, t.kind


def restricted_argmax(logits: np.ndarray, classes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Argmax of ``logits`` [n, (L,) K] over ``classes`` [K] among each row's ``candidates`` [n, n_objects]."""
    allowed = candidates[:, classes]  # [n, K]
    allowed = allowed[:, None, :] if logits.ndim == 3 else allowed
    return classes[np.where(allowed, logits, -np.inf).argmax(-1)]


def cache_model(model_path: str, per_numops: int, seed: int, directory: Path, role="query_last") -> Path:
    """Cache resid_post at ``role`` (or a tuple of roles) of a checkpoint on a fresh test subsample; returns the
    cache directory."""
    from boxprobe.activations.cache import CacheConfig, build_cache, file_sha256
    from boxprobe.data.queries import prepare
    from boxprobe.models.loading import load_model
    from boxprobe.data.task import TaskConfig, generate_dataset, read_examples

    data = generate_dataset(TaskConfig(seed=seed), directory / "data", subsample_per_numops=per_numops)
    model = load_model(model_path)
    queries = prepare(model, read_examples(data["test-subsample"]))
    cfg = CacheConfig(batch_size=32, roles=role if isinstance(role, tuple) else (role,))
    build_cache(model, queries, directory / "cache", cfg, data_hash=file_sha256(data["test-subsample"]))
    return directory / "cache"


def objective(coef, intercept, X, y, C, sample_weight=None) -> float:
    """sklearn's LogisticRegression objective (float64) at (coef [K, d], intercept [K]) for one problem."""
    logits = X.astype(np.float64) @ coef.T + intercept
    sw = np.ones(len(y)) if sample_weight is None else sample_weight
    if coef.shape[0] == 1:
        z = logits[:, 0]
        loss = np.logaddexp(0, z) - (y == 1) * z
    else:
        loss = logsumexp(logits, 1) - logits[np.arange(len(y)), y]
    return float((sw * loss).sum() / sw.sum() + 0.5 / (C * sw.sum()) * (coef**2).sum())


def best_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


class PerObjectSoftmax:
    """The experiment's per-object softmax probe (``global_state``; :class:`boxprobe.probing.baselines.
    FittedProbe`): one :class:`LayerwiseLogisticProbe` (all layers at once) per object, on the items that count
    it; an object with one class in training predicts that class (as sklearn's side does)."""

    def __init__(self, **params):
        self.params = params

    def tight(self) -> "PerObjectSoftmax":
        return PerObjectSoftmax(**{**self.params, "dtype": "float64", "tol": 1e-8, "max_iter": 20000})

    def fit(self, X, Y, M):
        self.models, self.constant = {}, {}
        for o in range(Y.shape[1]):
            items = np.flatnonzero(M[:, o])
            classes = np.unique(Y[items, o])
            if len(classes) >= 2:
                self.models[o] = LayerwiseLogisticProbe(**self.params).fit(X[items], Y[items, o])
            elif len(classes) == 1:
                self.constant[o] = classes[0]
        self.n_iter_ = np.max([m.n_iter_ for m in self.models.values()], 0)
        return self

    def predict(self, X):
        out = np.full((len(X), X.shape[1], max([*self.models, *self.constant]) + 1), -1)
        for o, value in self.constant.items():
            out[:, :, o] = value
        for o, model in self.models.items():
            out[:, :, o] = model.predict(X)
        return out


class _Constant:
    """What a user does where sklearn refuses to fit (one class in the training items): predict that class."""

    def __init__(self, value):
        self.value, self.coef_, self.intercept_ = value, None, None
        self.n_iter_ = np.zeros(1, int)

    def predict(self, X):
        return np.full(len(X), self.value)


def sklearn_fit(X, y, C, tol, max_iter, class_weight=None):
    if len(np.unique(y)) < 2:
        return _Constant(y[0])
    return LogisticRegression(C=C, tol=tol, max_iter=max_iter, class_weight=class_weight).fit(X, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, default=None, help=".npz (X, y) or a directory with X.npy, y.npy")
    parser.add_argument("--cache", type=Path, default=None, help="a boxprobe activation cache directory")
    parser.add_argument("--model", default=None, help="a checkpoint to cache first (e.g. assets/models/toy-base)")
    # 52 x 7 numops = 364 states, two thirds of them (~243) trained on: about the fit split of ProbeExperiment's
    # default (train_limit=300 states, 80% fit / 20% validation), so the problem sizes are the experiment's.
    parser.add_argument("--per-numops", type=int, default=52, help="with --model: states per numops value")
    parser.add_argument("--hook", default="resid_post")
    parser.add_argument("--role", default="query_last")
    parser.add_argument("--label", default="gold", help="metadata column to probe for (with --cache or --model)")
    parser.add_argument("--n-items", type=int, default=3000)
    parser.add_argument("--n-layers", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-classes", type=int, default=8)
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--precondition", default="auto")
    parser.add_argument("--device", default="cpu", help="our trainer's device (cpu keeps the comparison fair)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isotropic", action="store_true", help="synthetic features without offset/anisotropy")
    args = parser.parse_args()

    torch.set_num_threads(1)
    groups = mask = None
    kind = "class"
    if args.model is not None:
        scratch = tempfile.TemporaryDirectory()
        role = TARGET_ROLE[args.label] if args.label in TARGETS else args.role
        args.cache = cache_model(args.model, args.per_numops, args.seed, Path(scratch.name), role)
    candidates = None
    if args.cache is not None:
        X, y, groups, mask, kind = load_cache(args.cache, args.hook, args.role, args.label)
        if kind == "class" and mask is not None:
            # Candidates only restrict an argmax (fitting is over every class, on both sides).
            candidates, mask = (None if mask.all() else mask), None
        if args.label in TARGETS:
            args.role = " + ".join(TARGET_ROLE[args.label]) if kind == "blocks" else TARGET_ROLE[args.label]
        source = f"{args.model or args.cache} ({args.hook} at {args.role} -> {args.label})"
    elif args.features is not None:
        X, y = load_features(args.features)
        source = str(args.features)
    else:
        X, y = synthetic_cache(args.n_items, args.n_layers, args.d_model, args.n_classes, args.seed, args.isotropic)
        source = "synthetic isotropic features" if args.isotropic else "synthetic cache-like features"
    if groups is not None:  # no sample_id on both sides of the split
        train, _, test = split_by_group(groups, (2 / 3, 0.0, 1 / 3), seed=args.seed)
    else:
        order = np.random.default_rng(args.seed).permutation(len(y))
        train, test = order[: int(len(y) * 2 / 3)], order[int(len(y) * 2 / 3):]
    multilabel = mask is not None  # one problem per (layer, object): binary (multi-label) or a softmax (blocks)
    blocks = kind == "blocks"
    n_layers = X.shape[1]
    # One sklearn problem per layer (multi-class) or per (layer, object) on its counted items (multi-label).
    outputs = range(y.shape[1]) if multilabel else [None]
    cells = {o: (train[mask[train, o]], test[mask[test, o]]) if multilabel else (train, test) for o in outputs}
    targets = {o: y[:, o].astype(int) if multilabel else y for o in outputs}
    class_weight = "balanced" if multilabel and not blocks else None
    what = f"{y.shape[1]} objects (multi-label, counted cells)" if multilabel else f"{len(np.unique(y))} classes"
    if blocks:
        what = f"{y.shape[1]} objects x {int(y.max()) + 1} classes (one softmax per object, counted objects)"
    if candidates is not None:
        what += f" ({len(np.unique(y[train]))} in train), argmax among the mentioned objects"
    print(f"features: {source}, X {X.shape}, {what}, train {len(train)}, test {len(test)}")
    print(f"settings: C={args.C}, tol={args.tol}, max_iter={args.max_iter}, lbfgs, class_weight={class_weight}; "
          f"single-threaded: torch.set_num_threads(1), sklearn BLAS/OpenMP limited to 1 thread")

    if blocks:
        ours = PerObjectSoftmax(C=args.C, tol=args.tol, max_iter=args.max_iter, device=args.device,
                                precondition=args.precondition)
        fit_ours = lambda: ours.fit(X[train], y[train], mask[train])  # noqa: E731
    elif multilabel:
        ours = LayerwiseMultiLabelProbe(C=args.C, tol=args.tol, max_iter=args.max_iter, device=args.device,
                                        precondition=args.precondition, class_weight=class_weight)
        fit_ours = lambda: ours.fit(X[train], y[train], mask[train])  # noqa: E731
    else:
        ours = LayerwiseLogisticProbe(C=args.C, tol=args.tol, max_iter=args.max_iter, device=args.device,
                                      precondition=args.precondition)
        fit_ours = lambda: ours.fit(X[train], y[train])  # noqa: E731

    def fit_sklearn():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            models = {(layer, o): sklearn_fit(X[cells[o][0], layer], targets[o][cells[o][0]], args.C, args.tol,
                                              args.max_iter, class_weight)
                      for layer in range(n_layers) for o in outputs}
        return models, sum(issubclass(w.category, ConvergenceWarning) for w in caught)

    with threadpool_limits(limits=1):
        # Warm both up once (imports, allocator, LAPACK, thread pools) on a small slice, untimed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warm = train[:200]
            LogisticRegression().fit(X[warm, 0], np.arange(len(warm)) % 2)
        LayerwiseLogisticProbe(device=args.device, precondition=args.precondition).fit(
            X[warm, :1], np.arange(len(warm)) % 2)
        t_sk, (models, n_unconverged) = best_time(fit_sklearn, args.repeats)
        t_ours, _ = best_time(fit_ours, args.repeats)

    # Where sklearn stops short (max_iter, or its line search giving up) the two can differ by more than the
    # tolerance; a tight float64 fit (untimed) shows which side is nearer the optimum both are after.
    optimum = ours.tight() if blocks else clone(ours).set_params(dtype="float64", tol=1e-8, max_iter=20000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimum.fit(X[train], y[train], mask[train]) if multilabel else optimum.fit(X[train], y[train])

    # Test accuracy over counted cells, and each fit's objective, per layer.
    def predict(probe, Xs, rows):
        if candidates is None:
            return probe.predict(Xs)
        return restricted_argmax(probe.decision_function(Xs), np.asarray(probe.classes_), candidates[rows])

    probes = {"ours": (ours, predict(ours, X[test], test)), "optimum": (optimum, predict(optimum, X[test], test))}
    position = {item: i for i, item in enumerate(test)}
    rows = []
    for layer in range(n_layers):
        right, objectives, total = dict.fromkeys(["sklearn", *probes], 0), dict.fromkeys(["sklearn", *probes], 0.0), 0
        for o in outputs:
            tr, te = cells[o]
            m = models[layer, o]
            if len(te):
                idx = [position[i] for i in te]
                sk_pred = m.predict(X[te, layer]) if candidates is None or m.coef_ is None else predict(m, X[te, layer], te)
                right["sklearn"] += (sk_pred == targets[o][te]).sum()
                for name, (_, pred) in probes.items():
                    right[name] += ((pred[idx, layer, o] if multilabel else pred[idx, layer]) == targets[o][te]).sum()
                total += len(te)
            if m.coef_ is not None:  # compare objectives where sklearn fitted a problem
                y_idx = np.searchsorted(m.classes_, targets[o][tr])
                sw = compute_sample_weight(class_weight, y_idx) if class_weight else None
                objectives["sklearn"] += objective(m.coef_, m.intercept_, X[tr, layer], y_idx, args.C, sw)
                for name, (probe, _) in probes.items():
                    if blocks:
                        if o in probe.models:
                            p = probe.models[o]
                            objectives[name] += objective(p.coef_[layer], p.intercept_[layer], X[tr, layer], y_idx,
                                                          args.C)
                        continue
                    k = slice(o, o + 1) if multilabel else slice(None)
                    objectives[name] += objective(probe.coef_[layer, k], probe.intercept_[layer, k], X[tr, layer],
                                                  y_idx, args.C, sw)
        n_iter_sk = max(int(models[layer, o].n_iter_.max()) for o in outputs)
        rows.append((layer, {k: v / total for k, v in right.items()}, objectives, n_iter_sk))
    print(f"{'layer':>5} {'sklearn acc':>11} {'ours acc':>9} {'optimum acc':>11} {'sk n_iter':>9} "
          f"{'sk objective':>13} {'our objective':>13} {'optimum':>13}")
    for layer, acc, obj, n_iter_sk in rows:
        print(f"{layer:>5} {100 * acc['sklearn']:>11.2f} {100 * acc['ours']:>9.2f} {100 * acc['optimum']:>11.2f} "
              f"{n_iter_sk:>9} {obj['sklearn']:>13.6f} {obj['ours']:>13.6f} {obj['optimum']:>13.6f}")
    gap_to_optimum = {k: 100 * max(abs(acc[k] - acc["optimum"]) for _, acc, _, _ in rows) for k in ("sklearn", "ours")}
    print(f"sklearn loop: {t_sk:.3f} s for {len(models)} fits ({n_unconverged} hit max_iter); ours ({args.device}, "
          f"precondition={args.precondition}): {t_ours:.3f} s, {int(ours.n_iter_.max())} iterations (max over layers)")
    print(f"accuracy gap to the float64 optimum (points, max over layers): sklearn {gap_to_optimum['sklearn']:.2f}, "
          f"ours {gap_to_optimum['ours']:.2f}")
    ratio = t_sk / t_ours
    gap = 100 * max(abs(acc["sklearn"] - acc["ours"]) for _, acc, _, _ in rows)
    print(f"ratio={ratio:.2f} accuracy_gap={gap:.2f}")


if __name__ == "__main__":
    main()
