"""The toy checkpoint format: a word-level tokenizer (built locally with ``tokenizers``) and a small
Llama, as the bundled ``toy-*`` checkpoints use. Tests and benchmarks build random checkpoints with
:func:`save_random_checkpoint`; the training lab lives in ``experiments/toy_pretraining``."""

from __future__ import annotations

import string
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from boxprobe.data.task import load_vocabulary

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Words of the boxes task in both phrasings, the prompt templates, and the code corpus.
TASK_WORDS = """Box Container contains nothing the and Move from to Remove Put into Pick up in place it them
Take out of Place inside there is are empty Description Statement now""".split()
CODE_WORDS = """boxes append remove pop extend clear add discard print sorted list set len x for if not
True False None""".split()
PUNCTUATION = tuple(". , : ; ' \" ( ) [ ] { } = + - * / # _ ! ?".split()) + ("\n",)
# Splits on spaces, then isolates newlines, words and single punctuation marks.
PRE_TOKENIZER_PATTERN = r"\n|\w+|[^\w\s]"


def toy_words() -> list[str]:
    """Every word of the toy vocabulary, in a fixed order (so token ids never depend on a hash)."""
    words = list(SPECIAL_TOKENS) + TASK_WORDS + CODE_WORDS + list(PUNCTUATION)
    words += [str(d) for d in range(10)] + list(string.ascii_uppercase) + list(string.ascii_lowercase)
    words += list(load_vocabulary("objects")) + list(load_vocabulary("objects_rare"))
    return list(dict.fromkeys(words))  # de-duplicate, keeping the first position


def build_tokenizer(name_or_path: str = "boxprobe-toy") -> PreTrainedTokenizerFast:
    """The toy tokenizer: word level, BOS prepended, left padding for batched evaluation."""
    vocab = {w: i for i, w in enumerate(toy_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", name_or_path=name_or_path, add_bos_token=True)
    return fast


def save_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(str(directory))
    tok.save_pretrained(directory)
    return tok


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a toy Llama."""

    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 8
    """Attention heads per layer."""
    d_mlp: int = 512
    """Hidden width of each MLP."""
    n_ctx: int = 512
    """Longest sequence the model accepts (a 12-operation prompt is about 230 tokens)."""


def build_model(shape: ModelShape, vocab_size: int, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_heads,
        max_position_embeddings=shape.n_ctx, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def save_checkpoint(model: LlamaForCausalLM, tokenizer, directory: Path, metadata: dict) -> None:
    """An HF-format checkpoint: config, safetensors weights, tokenizer and ``boxprobe.json``."""
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "boxprobe.json").write_text(json.dumps(metadata, indent=2) + "\n")
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        directory.rename(old)
        tmp.rename(directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(directory)


TOY_METADATA = {"prompt_template": "toy", "prompt_format": "per-box"}


def save_random_checkpoint(directory: str | Path, shape: ModelShape = ModelShape(), seed: int = 0,
                           metadata: dict | None = None) -> Path:
    """An untrained toy checkpoint (toy tokenizer, seeded init) in the bundled models' format."""
    directory = Path(directory)
    tok = build_tokenizer(str(directory))
    torch.manual_seed(seed)
    save_checkpoint(build_model(shape, len(tok), tok), tok, directory, TOY_METADATA if metadata is None else metadata)
    return directory
