"""Whether two loaded models can be patched into each other: same architecture, shapes and tokenizer.

Cross-model patching (:mod:`boxprobe.causal.cmap`) moves activations between a base model and its code-trained
sibling; that only means something when every hooked shape and every token id agree.
"""

from __future__ import annotations

import logging
from typing import Sequence

from transformer_lens.model_bridge import TransformerBridge

from boxprobe.errors import BoxprobeError
from boxprobe.models.loading import model_label

logger = logging.getLogger(__name__)

# Boxes-style strings on which two tokenizers must agree for cross-model patching.
DEFAULT_PROBE_STRINGS = (
    "Box 0 contains the apple and the book.",
    "Move the ball from Box 3 to Box 1. Box 1 contains",
    "Description: Box 6 contains nothing.",
    " the",
)


class ModelMismatchError(BoxprobeError, ValueError):
    """Two models differ in a way that makes activations from one meaningless in the other."""


_SHAPE_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_key_value_heads")


def _vocab_differences(tok_a, tok_b, label_a: str, label_b: str) -> tuple[list[str], bool]:
    """Differences between two tokenizers' vocabularies; second value: one extends the other."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return [], False
    shared = va.keys() & vb.keys()
    clashes = sorted(t for t in shared if va[t] != vb[t])
    if clashes:
        ex = ", ".join(f"{t!r}: {va[t]} vs {vb[t]}" for t in clashes[:3])
        return [f"tokenizer: {len(clashes)} shared tokens have different ids ({ex})"], False
    only_a, only_b = len(va.keys() - vb.keys()), len(vb.keys() - va.keys())
    msg = (
        f"tokenizer vocab: {label_a} has {len(va)} tokens and {label_b} has {len(vb)} "
        f"({only_a} only in {label_a}, {only_b} only in {label_b})"
    )
    return [msg], only_a == 0 or only_b == 0


def compare_models(
    model_a: TransformerBridge,
    model_b: TransformerBridge,
    allow_vocab_extension: bool = True,
    probe_strings: Sequence[str] = DEFAULT_PROBE_STRINGS,
) -> list[str]:
    """Every difference that matters for patching activations between two models.

    Compares the architecture, n_layers, d_model, n_heads, d_head, d_mlp, n_key_value_heads,
    d_vocab and the tokenizers (vocab ids, BOS id, and token ids of `probe_strings`).
    With `allow_vocab_extension`, a vocab that only adds tokens to the other's with all shared
    ids equal (CodeLlama-7b's 16 infilling tokens on top of Llama-2-7b's) and the d_vocab
    difference it causes are tolerated, since boxes prompts tokenize identically.
    """
    la, lb = model_label(model_a), model_label(model_b)
    if la == lb:
        la, lb = f"{la} (a)", f"{lb} (b)"
    diffs: list[str] = []
    ca, cb = model_a.cfg, model_b.cfg
    arch_a = getattr(ca, "architecture", None) or getattr(ca, "original_architecture", None)
    arch_b = getattr(cb, "architecture", None) or getattr(cb, "original_architecture", None)
    if arch_a != arch_b:
        diffs.append(f"architecture: {la} is {arch_a}, {lb} is {arch_b}")
    for attr in _SHAPE_FIELDS:
        va, vb = getattr(ca, attr, None), getattr(cb, attr, None)
        if va != vb:
            diffs.append(f"{attr}: {la} has {va}, {lb} has {vb}")

    tok_a, tok_b = model_a.tokenizer, model_b.tokenizer
    if tok_a is None or tok_b is None:
        diffs.append(f"tokenizer: missing on {la if tok_a is None else lb}")
        extension = False
    else:
        vocab_diffs, extension = _vocab_differences(tok_a, tok_b, la, lb)
        tolerated = extension and allow_vocab_extension
        if tolerated:
            logger.info("tolerating vocab extension: %s", vocab_diffs[0])
        else:
            diffs.extend(vocab_diffs)
        if tok_a.bos_token_id != tok_b.bos_token_id:
            diffs.append(f"tokenizer bos id: {la} has {tok_a.bos_token_id}, {lb} has "
                         f"{tok_b.bos_token_id}")
        for s in probe_strings:
            ids_a = tok_a(s, add_special_tokens=False)["input_ids"]
            ids_b = tok_b(s, add_special_tokens=False)["input_ids"]
            if ids_a != ids_b:
                diffs.append(f"tokenizer: {s!r} tokenizes to {ids_a} in {la}, {ids_b} in {lb}")
    if ca.d_vocab != cb.d_vocab and not (extension and allow_vocab_extension):
        diffs.append(f"d_vocab: {la} has {ca.d_vocab}, {lb} has {cb.d_vocab}")
    return diffs


def check_same_family(
    model_a: TransformerBridge,
    model_b: TransformerBridge,
    allow_vocab_extension: bool = True,
    probe_strings: Sequence[str] = DEFAULT_PROBE_STRINGS,
) -> None:
    """Raise ModelMismatchError listing every difference `compare_models` finds."""
    diffs = compare_models(model_a, model_b, allow_vocab_extension, probe_strings)
    if diffs:
        raise ModelMismatchError(
            f"{model_label(model_a)} and {model_label(model_b)} cannot be patched into each "
            "other; pick a pair from the same family (see boxprobe.registry.MODEL_PAIRS). "
            "Differences:\n  - " + "\n  - ".join(diffs)
        )
