"""Shared-prefix packing: one context's prefix and all its queries' suffixes in one row, one forward pass.

The seven queries of a boxes context share everything up to the queried box. Running that prefix once and
then each suffix through a key-value cache holds keys and values of every layer between the two passes, so
peak memory grows with depth. Packing instead lays a row out as ``prefix, suffix_1, suffix_2, ...`` and
gives it a 4D attention mask in which each suffix sees the prefix and itself only, with rotary positions
that restart after the prefix for every suffix. Every suffix token then computes exactly what it computes
in its own full prompt, the prefix runs once, and no per-layer state outlives its layer (the approach of
prefix-sharing attention in SGLang's RadixAttention and of Hydragen, expressed as a mask).

:func:`packing_works` checks, once per model, that the model honours a custom 4D mask and position ids
(Hugging Face models take an already-built 4D mask as-is); callers fall back to plain prompts otherwise.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch
from jaxtyping import Float, Int

logger = logging.getLogger(__name__)


class Packed(NamedTuple):
    """A batch of packed rows: row c holds chunk c's prefix, then each member's suffix, then padding."""

    ids: Int[torch.Tensor, "row pos"]
    mask: Float[torch.Tensor, "row 1 pos pos"]  # additive: 0 where a query may attend, the dtype's min elsewhere
    positions: Int[torch.Tensor, "row pos"]  # rotary positions: each suffix continues the prefix
    starts: list[list[int]]  # starts[c][j]: where member j's suffix begins in row c


def pack(prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[Sequence[int]]], pad_id: int,
         device, dtype: torch.dtype) -> Packed:
    """Pack ``prefixes[c]`` with its ``suffixes[c]`` (token lists) into right-padded rows."""
    rows, segments, positions, starts = [], [], [], []
    for prefix, members in zip(prefixes, suffixes):
        ids, seg, pos, begin = list(prefix), [0] * len(prefix), list(range(len(prefix))), []
        for j, suffix in enumerate(members, start=1):
            begin.append(len(ids))
            ids += suffix
            seg += [j] * len(suffix)
            pos += range(len(prefix), len(prefix) + len(suffix))
        rows.append(ids), segments.append(seg), positions.append(pos), starts.append(begin)
    width = max(map(len, rows))
    pad = lambda r, v: r + [v] * (width - len(r))  # noqa: E731
    ids = torch.tensor([pad(r, pad_id) for r in rows], device=device)
    seg = torch.tensor([pad(s, -1) for s in segments], device=device)  # padding: segment -1
    pos = torch.tensor([pad(p, 0) for p in positions], device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # A query sees earlier tokens of the prefix and of its own suffix. Padding (segment -1) sees the prefix and
    # earlier padding, so no softmax row is empty; nothing reads its output.
    allowed = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return Packed(ids, mask[:, None], pos, starts)


def packing_works(model, tokens: Sequence[int]) -> bool:
    """Whether ``model`` gives packed suffixes the logits of their own prompts, on two suffixes of ``tokens``."""
    tokens = list(tokens)[:48]
    if len(tokens) < 4:
        return False
    half = len(tokens) // 2
    prefix, suffixes = tokens[:half], [tokens[half:], tokens[half:][::-1][:-1]]
    device, dtype = model.cfg.device, next(model.parameters()).dtype
    packed = pack([prefix], [suffixes], 0, device, dtype)
    try:
        with torch.inference_mode():
            got = model(packed.ids, attention_mask=packed.mask, position_ids=packed.positions)
            refs = [model(torch.tensor([prefix + s], device=device)) for s in suffixes]
    except Exception as err:  # an architecture whose bridge rejects 4D masks or position ids
        logger.warning("shared-prefix packing unavailable for %s (%s)", model.cfg.model_name, err)
        return False
    for start, suffix, ref in zip(packed.starts[0], suffixes, refs):
        a, b = got[0, start:start + len(suffix)].float(), ref[0, half:].float()
        tol = (1e-3 if dtype == torch.float32 else 5e-2) * b.abs().max().item()
        if not torch.allclose(a, b, atol=tol, rtol=0):
            return False
    return True
