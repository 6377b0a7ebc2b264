"""Faithfulness, completeness and minimality of a circuit, with Prakash et al.'s ablation rule.

Follows Nix07/finetuning ``experiment_1/faithfulness_analysis.py`` and ``path_patching/pp_utils.py``
(``get_mean_activations``, ``load_ablate_data``): every head's output is mean-ablated at every position,
except a circuit head at a position where the circuit uses it (its group's position: position-specific
head sets); the means come from a SEPARATE dataset of random-label prompts (here: the corrupt prompts
of a reference pair batch, built from other examples), taken per position counted from the end of the
prompt (prompts of one template line up at their ends; positions further back than the shortest
reference prompt get the mean over every position). Faithfulness is the circuit's accuracy over the
full model's. Completeness (Wang et al. 2022, as Prakash's ``completeness.ipynb``): for each group K,
|F(C \\ K) - F(M \\ K)|, where removing K ablates its heads at every position. Minimality
(``experiment_1/minimality.py``): for each head v, the largest F(C \\ K) - F(C \\ (K + v)) over K = {}
and K = the rest of v's group.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from boxprobe.causal.patching import (PairBatch, Patch, _prepare, _z, answer_accuracy, generic_patch,
                                      prob_change)
from boxprobe.causal.stats import clustered_bootstrap

# A head set: position spec (or ALL: every position) -> heads kept there.
ALL = "*all*"
HeadSet = Mapping[str, Sequence[tuple[int, int]]]


def reference_means(model, reference: PairBatch, width: int) -> dict[str, torch.Tensor]:
    """Per layer, the mean ``hook_z`` [width, n_heads, d_head] of ``reference``'s corrupt (random-label)
    prompts, per position counted from the end (right-aligned with a batch of ``width`` positions)."""
    reference = reference.to(model.cfg.device)
    names = [_z(layer) for layer in range(model.cfg.n_layers)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(reference.corrupt_tokens, attention_mask=reference.attention_mask,
                                        names_filter=names)
    mask = (reference.attention_mask if reference.attention_mask is not None
            else torch.ones_like(reference.corrupt_tokens)).bool()
    means = {}
    for name in names:
        z = cache[name]  # [ref, pos, head, d_head], left-padded: ends line up
        m = mask[..., None, None].to(z.dtype)
        overall = (z * m).sum((0, 1)) / m.sum((0, 1))
        per = (z * m).sum(0) / m.sum(0).clamp(min=1)
        full = mask.all(0)  # positions every reference prompt reaches
        per[~full] = overall
        out = overall.expand(width, *overall.shape).clone()
        k = min(width, per.shape[0])
        out[width - k:] = per[per.shape[0] - k:]
        means[name] = out
    return means


def _ablate_setter(act, offset: int, *, mean, clean, keep) -> None:
    mean, clean = mean.to(act.device), clean.to(act.device)  # no-ops unless blocks sit on several devices
    keep = [(None if pos is None else pos.to(act.device), heads) for pos, heads in keep]
    act[:] = mean[offset:].to(act.dtype)
    for pos, heads in keep:
        if pos is None:  # kept at every position
            act[:, :, torch.as_tensor(heads, device=act.device)] = clean[:, offset:, heads]
            continue
        rows = torch.arange(act.shape[0], device=act.device)
        ok = pos >= offset
        r, p = rows[ok], pos[ok]
        if heads is None:
            act[r, p - offset] = clean[r, p]
        else:
            h = torch.as_tensor(heads, device=act.device)
            act[r[:, None], (p - offset)[:, None], h[None, :]] = clean[r[:, None], p[:, None], h[None, :]]


def ablation_sites(model, batch: PairBatch, sets: Sequence[HeadSet | None], means, clean) -> list[list[Patch]]:
    """One site per head set: every head mean-ablated everywhere but at its set's positions (None: no ablation)."""
    sites = []
    for kept in sets:
        if kept is None:
            sites.append([])
            continue
        by_layer: dict[int, list] = {}
        for spec, heads in kept.items():
            pos = None if spec == ALL else batch.positions(spec)
            for layer in {int(layer) for layer, _ in heads}:
                by_layer.setdefault(layer, []).append((pos, sorted({int(h) for l, h in heads if int(l) == layer})))
        sites.append([Patch(_z(layer), partial(_ablate_setter, mean=means[_z(layer)], clean=clean[_z(layer)],
                                               keep=by_layer.get(layer, [])), 0)
                      for layer in range(model.cfg.n_layers)])
    return sites


def evaluate_head_sets(model, batch: PairBatch, sets: Mapping[str, HeadSet | None], reference: PairBatch, *,
                       n_boot: int = 1000, **loop) -> pd.DataFrame:
    """Accuracy and prob_change of the clean prompts with each head set kept (the rest mean-ablated).

    Columns: set, metric (accuracy | prob_change), value, ci_low, ci_high (clustered by context), n_pairs."""
    names = [_z(layer) for layer in range(model.cfg.n_layers)]
    batch, _, _, clean, _ = _prepare(model, batch, names, "noising")
    means = {n: m.to(model.cfg.device) for n, m in reference_means(model, reference, batch.n_pos).items()}
    sites = ablation_sites(model, batch, list(sets.values()), means, clean)
    metrics = {"accuracy": answer_accuracy, "prob_change": prob_change}
    values = generic_patch(model, batch, sites, metrics, target="clean", **loop).numpy()  # [set, metric, pair]
    rows = []
    for j, m in enumerate(metrics):
        mean, lo, hi = clustered_bootstrap(values[:, j], batch.contexts, n_boot=n_boot)
        rows += [(name, m, mean[i], lo[i], hi[i], len(batch)) for i, name in enumerate(sets)]
    return pd.DataFrame(rows, columns=["set", "metric", "value", "ci_low", "ci_high", "n_pairs"])


def _everyone(model, positions: Sequence[str]) -> HeadSet:
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    return {p: heads for p in positions}


def _minus(kept: HeadSet, removed: set[tuple[int, int]]) -> HeadSet:
    return {p: [x for x in hs if tuple(x) not in removed] for p, hs in kept.items()}


def circuit_head_set(groups: Mapping[str, Sequence], positions: Mapping[str, str]) -> HeadSet:
    """The position-specific head set of a circuit: each position keeps the heads of the groups there."""
    out: dict[str, list] = {}
    for g, heads in groups.items():
        out.setdefault(positions[g], []).extend((int(l), int(h)) for l, h in heads)
    return out


def evaluate_circuit(model, batch: PairBatch, groups: Mapping[str, Sequence], positions: Mapping[str, str],
                     reference: PairBatch, *, n_random: int = 5, seed: int = 0, minimality: bool = True,
                     **loop) -> dict:
    """Faithfulness, completeness and minimality of a circuit (module docstring).

    Returns {"sets": frame of every evaluated head set, "faithfulness": acc(circuit) / acc(full),
    "faithfulness_prob": the same with the probability of the correct object, "completeness": frame per
    group, "minimality": frame per head}. Random sets have the circuit's size at each position."""
    circuit = circuit_head_set(groups, positions)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    everyone = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    rng = np.random.default_rng(seed)
    sets: dict[str, HeadSet | None] = {"full": None, "circuit": circuit, "empty": {}}
    for i in range(n_random):
        sets[f"random_{i}"] = {p: [everyone[j] for j in rng.choice(len(everyone), size=len(hs), replace=False)]
                               for p, hs in circuit.items()}
    for g, heads in groups.items():
        removed = {(int(l), int(h)) for l, h in heads}
        sets[f"circuit-{g}"] = _minus(circuit, removed)
        # The full model without K: K's heads ablated at every position; every other head kept everywhere.
        sets[f"full-{g}"] = {ALL: [x for x in everyone if x not in removed]}
    head_list = [(g, (int(l), int(h))) for g, hs in groups.items() for l, h in hs]
    if minimality:
        for g, v in head_list:
            rest = {(int(l), int(h)) for l, h in groups[g]} - {v}
            sets[f"min-{v[0]}.{v[1]}-none"] = _minus(circuit, {v})
            if rest:
                sets[f"min-{v[0]}.{v[1]}-K"] = _minus(circuit, rest)
                sets[f"min-{v[0]}.{v[1]}-Kv"] = _minus(circuit, rest | {v})
    frame = evaluate_head_sets(model, batch, sets, reference, **loop)
    acc = frame[frame["metric"] == "accuracy"].set_index("set")["value"]
    prob = frame[frame["metric"] == "prob_change"].set_index("set")["value"]
    out = {"sets": frame, "faithfulness": float(acc["circuit"] / acc["full"]) if acc["full"] else float("nan"),
           "faithfulness_prob": float((1 + prob["circuit"]) / (1 + prob["full"]))}
    out["completeness"] = pd.DataFrame(
        [(g, acc[f"circuit-{g}"], acc[f"full-{g}"], abs(acc[f"circuit-{g}"] - acc[f"full-{g}"])) for g in groups],
        columns=["group", "circuit_without", "full_without", "gap"])
    if minimality:
        rows = []
        for g, v in head_list:
            key = f"{v[0]}.{v[1]}"
            drops = [prob["circuit"] - prob[f"min-{key}-none"]]
            if f"min-{key}-K" in prob:
                drops.append(prob[f"min-{key}-K"] - prob[f"min-{key}-Kv"])
            rows.append((g, v[0], v[1], float(max(drops))))
        out["minimality"] = pd.DataFrame(rows, columns=["group", "layer", "head_index", "prob_drop"])
    return out
