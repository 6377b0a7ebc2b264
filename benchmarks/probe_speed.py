"""Benchmark: the batched all-layers probe trainer against a loop of sklearn LogisticRegression over layers.

Both fit the same L2 objective (same C, lbfgs, tol=1e-4, max_iter=1000) on the same features, single-threaded
(torch.set_num_threads(1); BLAS/OpenMP limited to 1 thread for sklearn), best of --repeats timings each.
Features are synthetic and shaped like a residual-stream cache (a large per-layer mean offset, anisotropic
covariance with a few high-variance "outlier" dimensions, class signal planted along random directions
with a strength that grows with depth), or real ones: --cache DIR (a boxprobe.cache directory; features of
--hook at --role, labels from the metadata column --label, split by sample_id) or --features (an .npz with
X [n_items, n_layers, d_model] and y [n_items], or a directory holding X.npy and y.npy).

Last line: ``ratio=<sklearn time / our time> accuracy_gap=<max over layers of |test acc difference| in points>``.

    .venv/bin/python benchmarks/probe_speed.py [--n-items 3000 --n-layers 5 --d-model 128 --n-classes 8]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from boxprobe.probe_metrics import split_by_group
from boxprobe.probes import LayerwiseLogisticProbe


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
    from boxprobe.cache import open_cache  # only needed for real caches

    cache = open_cache(directory)
    meta = cache.metadata(role)
    if label not in meta:
        raise SystemExit(f"--label {label!r} is not a metadata column of {directory}; columns: {', '.join(meta)}")
    keep = meta[label].notna().to_numpy()
    X = cache.activations(hook, role).float().numpy()[keep]
    groups = meta["sample_id"].to_numpy()[keep] if "sample_id" in meta else None
    return X, meta[label].to_numpy()[keep].astype(str), groups


def best_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, default=None, help=".npz (X, y) or a directory with X.npy, y.npy")
    parser.add_argument("--cache", type=Path, default=None, help="a boxprobe activation cache directory")
    parser.add_argument("--hook", default="resid_post")
    parser.add_argument("--role", default="query_last")
    parser.add_argument("--label", default="query_box", help="metadata column to probe for (with --cache)")
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
    groups = None
    if args.cache is not None:
        X, y, groups = load_cache(args.cache, args.hook, args.role, args.label)
        source = f"{args.cache} ({args.hook} at {args.role} -> {args.label})"
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
    X_train, X_test, y_train, y_test = X[train], X[test], y[train], y[test]
    n_layers = X.shape[1]
    print(f"features: {source}, X {X.shape}, {len(np.unique(y))} classes, train {len(train)}, test {len(test)}")
    print(f"settings: C={args.C}, tol={args.tol}, max_iter={args.max_iter}, lbfgs; "
          f"single-threaded: torch.set_num_threads(1), sklearn BLAS/OpenMP limited to 1 thread")

    ours = LayerwiseLogisticProbe(C=args.C, tol=args.tol, max_iter=args.max_iter, device=args.device,
                                  precondition=args.precondition)

    def fit_sklearn():
        models = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            for layer in range(n_layers):
                models.append(LogisticRegression(C=args.C, tol=args.tol, max_iter=args.max_iter)
                              .fit(X_train[:, layer], y_train))
        return models, sum(issubclass(w.category, ConvergenceWarning) for w in caught)

    with threadpool_limits(limits=1):
        # Warm both up once (imports, allocator, LAPACK, thread pools) on a small slice, untimed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            LogisticRegression().fit(X_train[:200, 0], y_train[:200])
        LayerwiseLogisticProbe(device=args.device, precondition=args.precondition).fit(X_train[:200, :1], y_train[:200])
        t_sk, (models, n_unconverged) = best_time(fit_sklearn, args.repeats)
        t_ours, _ = best_time(lambda: ours.fit(X_train, y_train), args.repeats)

    acc_sk = np.array([m.score(X_test[:, layer], y_test) for layer, m in enumerate(models)])
    acc_ours = ours.score(X_test, y_test)
    sk_pred = np.stack([m.predict(X_test[:, layer]) for layer, m in enumerate(models)], 1)
    agree = (sk_pred == ours.predict(X_test)).mean(0)
    print(f"{'layer':>5} {'sklearn acc':>11} {'ours acc':>9} {'agree':>6} {'sk n_iter':>9}")
    for layer in range(n_layers):
        print(f"{layer:>5} {100 * acc_sk[layer]:>11.2f} {100 * acc_ours[layer]:>9.2f} {100 * agree[layer]:>6.1f} "
              f"{int(models[layer].n_iter_[0]):>9}")
    print(f"sklearn loop: {t_sk:.3f} s ({n_unconverged} layer fits hit max_iter); ours ({args.device}, "
          f"precondition={args.precondition}): {t_ours:.3f} s, {int(ours.n_iter_.max())} iterations (max over layers)")
    ratio = t_sk / t_ours
    gap = 100 * np.abs(acc_sk - acc_ours).max()
    print(f"ratio={ratio:.2f} accuracy_gap={gap:.2f}")


if __name__ == "__main__":
    main()
