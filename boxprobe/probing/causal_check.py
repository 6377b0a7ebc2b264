"""Causal check of the ``first_object`` probe: remove what it reads at the answer prefix, watch the answer.

At each chosen layer, for each held-out test query (a non-empty box), the residual stream at the appended
answer prefix " the" (role ``answer_prefix``) loses the fitted probe's *decision subspace among that query's
candidates*: the span of the probe's weight rows for the objects the description mentions, centred (a
softmax only sees differences between logits), as an orthogonal basis scaled by its singular values. After
the edit the probe's logits over the candidates are all equal, so the probe itself is at chance; the
question is whether the model's probability of the correct first object drops too, and by more than when
random direction sets of the same count and norms are removed (:func:`random_directions_like`, several
seeds). The gold answer is teacher-forced in one pass (:func:`boxprobe.probing.interventions.probe_causal_check`).

This follows the INLP-style amnesic probing of Ravfogel et al. (2020) / Elazar et al. (2021) rather than a
reference implementation of the boxes papers: Tang et al. (PootieT/entity-tracking-mi) and Kim & Schuster
(sebschu/entity-tracking-lms) report probes without an intervention, and Prakash et al. (Nix07/finetuning)
patch activations between prompts instead of removing directions. We name it the "candidate-subspace
ablation" because it removes a per-query subspace (the probe's weights restricted to the candidates the
probe's own argmax is restricted to), not one global INLP nullspace: a global one would have to span the
probe's ~100 object directions, most of the toy models' 128-wide stream, and no random control of that
size could tell anything apart.

Layers: those where the probe's accuracy interval lies above every baseline's upper bound (majority,
initial_state, embedding, random_init, permutation), unless given. Intervals: :func:`causal_effects`
(cluster bootstrap over sample_ids, which nest the states; percentiles, bounded).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from boxprobe.data.queries import QuerySet
from boxprobe.probing.interventions import causal_effects, probe_causal_check
from boxprobe.probing.probes import LayerwiseLogisticProbe
from boxprobe.probing.targets import Target

logger = logging.getLogger(__name__)
BASELINE_KINDS = ("majority", "initial_state", "embedding", "random_init", "permutation")


def layers_above_baselines(accuracy: pd.DataFrame, model: str, probe: str = "first_object") -> list[int]:
    """Layers where the task probe's ci_low exceeds the highest ci_high of every baseline present there."""
    acc = accuracy[(accuracy.model == model) & (accuracy.probe == probe) & (accuracy.metric == "accuracy")
                   & (accuracy.subset == "all")]
    task = acc[acc.kind == "task"].set_index("layer")["ci_low"]
    best = acc[acc.kind.isin(BASELINE_KINDS)].groupby("layer")["ci_high"].max()
    return [int(layer) for layer, low in task.items() if low > best.get(layer, -np.inf)]


def candidate_directions(probe: LayerwiseLogisticProbe, slot: int, mask: np.ndarray) -> list[np.ndarray]:
    """Per item: an orthogonal basis (rows scaled by singular values) of the probe's centred weight rows for
    the item's candidate classes (``mask`` [n, n_classes] over class indices) at cached layer ``slot``."""
    W = probe.coef_[slot]  # [K, d]
    classes = np.asarray(probe.classes_).astype(int)
    out = []
    for row in mask:
        present = np.flatnonzero(row[classes]) if W.shape[0] == len(classes) else np.arange(W.shape[0])
        rows = W[present] - W[present].mean(0) if W.shape[0] == len(classes) else W
        _, s, Vh = np.linalg.svd(rows, full_matrices=False)
        keep = s > (s.max() if s.size else 0) * 1e-8
        out.append(Vh[keep] * s[keep, None])
    return out


def run_causal_check(model, queries: QuerySet, target: Target, probe: LayerwiseLogisticProbe,
                     layers: dict[int, int], vocab: Sequence[str], *, n: int, n_random: int, hook: str,
                     seed: int, batch_size: int) -> pd.DataFrame:
    """Per-query rows of :func:`probe_causal_check` at each layer (``layers``: model layer -> cached slot),
    on ``n`` test items of the ``first_object`` target drawn with ``seed`` (all when fewer), plus group
    (sample_id) and numops columns."""
    chosen = np.arange(len(target.y))
    if n < len(chosen):
        chosen = np.sort(np.random.default_rng(seed).choice(len(chosen), n, replace=False))
    sub = queries.select(target.query_index[chosen])
    objects = [vocab[c] for c in target.y[chosen]]
    frames = []
    for layer, slot in layers.items():
        dirs = candidate_directions(probe, slot, target.mask[chosen])
        df = probe_causal_check(model, sub, objects, dirs, layer=layer, n_random=n_random, seed=seed, hook=hook,
                                role="answer_prefix", batch_size=batch_size)
        frames.append(df.assign(group=target.groups[chosen][df["query"]], numops=target.numops[chosen][df["query"]]))
    return pd.concat(frames, ignore_index=True)


def causal_table(raw: pd.DataFrame, model: str, n_boot: int, seed: int) -> pd.DataFrame:
    """Tidy ``causal_check.csv`` rows of one model: :func:`causal_effects` per layer, clustered by sample_id."""
    frames = []
    for layer, df in raw.groupby("layer"):
        groups = df[df.condition == "none"].sort_values("query")["group"].to_numpy()
        k = float(df.loc[df.condition == "probe", "k"].mean())
        frames.append(causal_effects(df, groups, n_boot=n_boot, seed=seed).assign(model=model, layer=int(layer),
                                                                                   k_mean=k))
    out = pd.concat(frames, ignore_index=True)
    front = ["model", "layer", "condition", "metric", "value", "ci_low", "ci_high", "n"]
    return out[front + [c for c in out.columns if c not in front]]
