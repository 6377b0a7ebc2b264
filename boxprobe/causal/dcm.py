"""Desiderata-based component masking (DCM): which heads carry what a desideratum changes.

Follows Nix07/finetuning ``DCM.py`` / ``experiment_2/DCM.py``: a mask over heads is learned so that
patching the masked heads' outputs from the source (counterfactual) run into the base run makes the
model produce the desideratum's counterfactual answer, while an L1 penalty keeps the mask small. Here
the mask is continuous during training (a sigmoid of free logits, patched as
``z = z_base + m * (z_source - z_base)``) and read as binary at 0.5 at the end, as Prakash et al. do.

Desiderata are pair kinds (:mod:`boxprobe.data.pairs`): ``object-value`` (the queried box's objects
replaced: heads that carry the object's value) and ``positional`` (the description's clauses
reordered: heads that carry the box's position). The base run is the clean prompt, the source the
corrupt prompt, and the target token the corrupt answer token.
"""

from __future__ import annotations

from functools import partial

import pandas as pd
import torch

from boxprobe.causal.patching import PairBatch, _z
from boxprobe.errors import ArgumentError


def learn_head_mask(model, batch: PairBatch, *, positions: str | int | None = None, steps: int = 100,
                    lr: float = 0.1, sparsity: float = 0.01, init: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Learn a mask over every (layer, head) for the batch's desideratum (module docstring).

    ``positions``: where heads are patched (a role of ``PairBatch.positions``; None: every position).
    Loss: cross-entropy of the corrupt answer token at the last position + ``sparsity`` x the mask's
    sum. Columns: layer, head_index, mask (in [0, 1]), selected (mask > 0.5); attrs["history"] holds the
    loss per step and attrs["accuracy"] the share of pairs whose argmax is the target token under the
    binary mask."""
    if steps < 1:
        raise ArgumentError(f"steps must be >= 1, got {steps}.")
    batch = batch.to(model.cfg.device)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [_z(layer) for layer in range(n_layers)]
    with torch.no_grad():
        _, base = model.run_with_cache(batch.clean_tokens, attention_mask=batch.attention_mask, names_filter=names)
        _, source = model.run_with_cache(batch.corrupt_tokens, attention_mask=batch.attention_mask, names_filter=names)
    diff = {n: (source[n] - base[n]).detach() for n in names}
    where = torch.ones(batch.clean_tokens.shape, dtype=torch.bool, device=batch.clean_tokens.device)
    if positions is not None:
        pos = batch.positions(positions)
        where = torch.zeros_like(where)
        where[torch.arange(len(batch)), pos] = True
    torch.manual_seed(seed)
    logits_param = torch.full((n_layers, n_heads), float(init), device=batch.clean_tokens.device, requires_grad=True)
    opt = torch.optim.Adam([logits_param], lr=lr)
    target = batch.corrupt_answer

    def hooks(mask):
        # One closure per layer: a hook's own name may be the aliased ``attn.o.hook_in``.
        def patch(act, hook, *, layer):  # moved to the hooked block's device (device maps spread blocks)
            dev = act.device
            scale = mask[layer].to(dev)[None, None, :, None] * where.to(dev)[:, :, None, None]
            return act + diff[_z(layer)].to(dev) * scale
        return [(_z(layer), partial(patch, layer=layer)) for layer in range(n_layers)]

    history = []
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        mask = torch.sigmoid(logits_param)
        with model.hooks(fwd_hooks=hooks(mask)):
            out = model(batch.clean_tokens, attention_mask=batch.attention_mask)[:, -1].float()
        loss = torch.nn.functional.cross_entropy(out, target) + sparsity * mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    mask = torch.sigmoid(logits_param.detach())
    with torch.no_grad(), model.hooks(fwd_hooks=hooks((mask > 0.5).float())):
        acc = float((model(batch.clean_tokens, attention_mask=batch.attention_mask)[:, -1].argmax(-1) == target)
                    .float().mean())
    frame = pd.DataFrame([(l, h, float(mask[l, h])) for l in range(n_layers) for h in range(n_heads)],
                         columns=["layer", "head_index", "mask"])
    frame["selected"] = frame["mask"] > 0.5
    frame.attrs["history"], frame.attrs["accuracy"] = history, acc
    return frame
