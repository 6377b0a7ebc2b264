"""Cross-model activation patching (CMAP): the donor's head outputs patched into the recipient.

Follows Nix07/finetuning ``experiment_3/cmap_utils.py``: on the same (clean) prompts, each circuit group's
heads in the recipient receive the donor's outputs at that group's position; the recipient's accuracy
and metric are compared before and after. Use it on pairs the recipient gets WRONG (otherwise accuracy
starts at its ceiling): :func:`wrong_pairs` selects them.

Metrics: ``accuracy`` (argmax at the answer position is the correct object), ``correct_prob`` (its
softmax probability), ``prob_change`` (Prakash et al.'s (p - p_clean) / p_clean with p_clean the
RECIPIENT's unpatched probability, so 0 "before" by construction), ``logit_diff`` and ``logprob``.

The output is long: one row per group x metric x stage ("before": the recipient unpatched, "after":
patched, "donor": the donor's own run), with the mean over pairs and an interval clustered by context;
``per_pair=True`` gives one row per pair instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Mapping

import numpy as np
import pandas as pd
import torch

from boxprobe.causal.patching import (Heads, PairBatch, Positions, _evaluate, _group_patches, _heads,
                                      _position_sites, _run, _z, answer_accuracy, copy_patch, differences,
                                      generic_patch, logit_diff, prob_change)
from boxprobe.causal.stats import summarise
from boxprobe.models.compare import check_same_family
from boxprobe.models.loading import result_model


def correct_object_logprob(logits, batch: PairBatch) -> torch.Tensor:
    """Log-probability of the clean (correct) answer token at the last position."""
    return logits[:, -1].float().log_softmax(-1).gather(1, batch.clean_answer[:, None])[:, 0]


def correct_prob(logits, batch: PairBatch) -> torch.Tensor:
    """Softmax probability of the clean (correct) answer token at the last position."""
    return logits[:, -1].float().softmax(-1).gather(1, batch.clean_answer[:, None])[:, 0]


METRICS = {"accuracy": answer_accuracy, "correct_prob": correct_prob, "prob_change": prob_change,
           "logit_diff": logit_diff, "logprob": correct_object_logprob}


def wrong_pairs(model, batch: PairBatch) -> PairBatch:
    """The pairs whose clean prompt ``model`` answers wrongly (argmax at the answer position)."""
    batch = batch.to(model.cfg.device)
    with torch.inference_mode():
        acc = answer_accuracy(model(batch.clean_tokens, attention_mask=batch.attention_mask), batch)
    return batch.select([i for i, a in enumerate(acc.tolist()) if a == 0])


def cross_model_patch(recipient, donor, batch: PairBatch, groups: Mapping[str, Heads] | None = None, *,
                      positions: Mapping[str, Positions] | Positions = "all",
                      per_layer: Literal["heads", "resid_pre"] | None = None, per_pair: bool = False,
                      allow_vocab_extension: bool = True, n_boot: int = 1000, **loop) -> pd.DataFrame:
    """Patch the donor's activations into the recipient on the same clean prompts (module docstring).

    ``positions``: one spec for every group, or group -> spec (a circuit's ``positions``). ``per_layer``
    adds rows ``L{l} heads`` / ``L{l} resid_pre`` (every head, or the residual stream, of one layer).
    Columns: model, donor, group, position_role, metric, stage, value, ci_low, ci_high, n_pairs,
    n_contexts. Raises ``ModelMismatchError`` unless ``check_same_family`` passes."""
    check_same_family(recipient, donor, allow_vocab_extension=allow_vocab_extension)
    batch = batch.to(recipient.cfg.device)
    n_layers = recipient.cfg.n_layers
    groups = {name: _heads(hs) for name, hs in (groups or {}).items()}
    names = [_z(layer) for layer in range(n_layers)] + [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    with torch.inference_mode():
        donor_logits, source = _run(donor, batch.clean_tokens, batch.attention_mask, names)
        source = {n: a.to(recipient.cfg.device, recipient.cfg.dtype) for n, a in source.items()}
        recipient_logits, target = _run(recipient, batch.clean_tokens, batch.attention_mask, names)
        batch = replace(batch, clean_prob=correct_prob(recipient_logits, batch))  # prob_change's reference
        differs = {n: differences(source[n], target[n]) for n in names}
    spec = (lambda g: positions.get(g, "all")) if isinstance(positions, Mapping) else (lambda g: positions)  # noqa: E731
    sites, labels = [], []
    for name, heads in groups.items():
        (label, pos), = _position_sites(batch, spec(name))
        sites.append(_group_patches(source, differs, heads, pos))
        labels.append((name, str(label)))
    for layer in range(n_layers) if per_layer else []:
        hook = _z(layer) if per_layer == "heads" else f"blocks.{layer}.hook_resid_pre"
        sites.append([copy_patch(hook, source[hook], differs[hook])])
        labels.append((f"L{layer} {per_layer}", "all"))
    values = generic_patch(recipient, batch, [[]] + sites, METRICS, target="clean", **loop)  # [site, metric, pair]
    before, after = values[0], values[1:]
    donor_values = _evaluate(METRICS, donor_logits, batch)
    keys, rows = [], []
    for i, (group, role) in enumerate(labels):
        for j, metric in enumerate(METRICS):
            for stage, v in (("before", before[j]), ("after", after[i, j]), ("donor", donor_values[j])):
                keys.append((group, role, metric, stage))
                rows.append(v.numpy())
    key_frame = pd.DataFrame(keys, columns=["group", "position_role", "metric", "stage"])
    key_frame.insert(0, "donor", result_model(donor))
    key_frame.insert(0, "model", result_model(recipient))
    per = np.stack(rows) if rows else np.zeros((0, len(batch)))
    if per_pair:
        return _long(key_frame, per, batch.contexts)
    out = summarise(key_frame.drop(columns="metric"), per, batch.contexts, n_boot=n_boot).drop(columns="metric")
    out.insert(4, "metric", key_frame["metric"].to_numpy())
    return out


def _long(keys: pd.DataFrame, per: np.ndarray, contexts) -> pd.DataFrame:
    n_pairs = per.shape[1]
    frame = keys.loc[keys.index.repeat(n_pairs)].reset_index(drop=True)
    return frame.assign(pair=np.tile(np.arange(n_pairs), len(keys)),
                        context=np.tile(np.asarray(list(contexts), dtype=object), len(keys)), value=per.reshape(-1))
