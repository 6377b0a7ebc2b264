"""Shared test helpers: tiny random checkpoints that load offline through TransformerBridge.

`make_tiny_checkpoint` writes a Hugging Face checkpoint directory (config, safetensors weights,
word-level tokenizer) small enough to build and run in well under a second on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# Enough of the boxes-task vocabulary for prompts like "Box 0 contains the apple ."
DEFAULT_WORDS: tuple[str, ...] = (
    "Box", "box", "contains", "the", "and", "nothing", "is", "empty", "Move", "Put", "Remove",
    "into", "from", "in", ".", ",", ":", "Description", "Statement", "Boxes",
    "0", "1", "2", "3", "4", "5", "6",
    "apple", "ball", "bell", "book", "car", "cup", "fan", "hat", "key", "map", "pen", "ring",
)

ARCHITECTURES = ("llama", "mistral", "gemma")


def make_tokenizer(
    words: Sequence[str] = DEFAULT_WORDS, name_or_path: str = "tiny"
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer that prepends <s> (BOS) to every sequence."""
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        name_or_path=name_or_path,
    )
    return tok


def _make_config(arch: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, d_model: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig(**common, tie_word_embeddings=False), LlamaForCausalLM
    if arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        # Grouped-query attention like the real Mistral-7B (8 query heads share 2 kv heads).
        common.update(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)
        return MistralConfig(**common), MistralForCausalLM
    if arch == "gemma":
        from transformers import GemmaConfig, GemmaForCausalLM

        common.update(head_dim=d_model // 4)
        return GemmaConfig(**common), GemmaForCausalLM
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    words: Sequence[str] = DEFAULT_WORDS,
    d_model: int = 64,
    seed: int = 0,
    metadata: dict | None = None,
) -> Path:
    """Write a tiny random `arch` causal LM + word-level tokenizer to `path` and return it.

    `metadata`, when given, is written to `boxprobe.json` next to the weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(words, name_or_path=str(path))
    config, model_cls = _make_config(
        arch, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, d_model
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random init is tiny (std 0.02); widen it so logits differ clearly between tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if metadata is not None:
        (path / "boxprobe.json").write_text(json.dumps(metadata))
    return path


TOY_METADATA = {"prompt_template": "toy", "prompt_format": "per-box"}


def make_toy_checkpoint(path, *, n_layers=2, d_model=32, n_heads=4, d_mlp=None, n_ctx=256, seed=0,
                        init_std=None, metadata=TOY_METADATA, edit=None, tokenizer=None) -> Path:
    """A random toy Llama with the toy tokenizer (or ``tokenizer``), saved like the bundled checkpoints.

    ``init_std`` redraws every weight matrix from N(0, init_std): wider weights make attention and
    logits far from uniform, so heads and answers differ. ``edit(model, tokenizer)`` may change
    weights before saving.
    """
    from boxprobe.models.toy import build_tokenizer
    from boxprobe.models.toy import ModelShape, build_model, save_checkpoint

    tok = tokenizer if tokenizer is not None else build_tokenizer(str(path))
    torch.manual_seed(seed)
    shape = ModelShape(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp or 2 * d_model, n_ctx=n_ctx)
    model = build_model(shape, len(tok), tok)
    with torch.no_grad():
        if init_std is not None:
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
        if edit is not None:
            edit(model, tok)
    save_checkpoint(model, tok, Path(path), metadata)
    return Path(path)


def make_tiny_gguf(path: str | Path, quant: str = "Q8_0", seed: int = 0, d_model: int = 64) -> Path:
    """Write a tiny random Llama as a GGUF file (byte-level BPE vocabulary, `quant` weight matrices).

    Loads through transformers' GGUF reader like a llama.cpp export, so the GGUF code paths can be
    tested quickly without the real SmolLM2 file.
    """
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<s>", "</s>"]
    spelled = list(bytes_to_unicode().values())
    merges = ["Ġ t", "Ġt h", "Ġth e", "B o", "Bo x"]
    tokens = specials + spelled + ["Ġt", "Ġth", "Ġthe", "Bo", "Box"]
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))  # 3 control, 1 normal
    n_layers, n_heads, n_kv, d_ff = 2, 4, 2, 2 * d_model
    d_head = d_model // n_heads
    qtype = gguf.GGMLQuantizationType[quant]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-gguf-llama")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant}"))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    rng = np.random.default_rng(seed)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = rng.normal(0.0, 0.2, size=(rows, cols)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.normal(size=d_model)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), d_model)
    for i in range(n_layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", n_heads * d_head, d_model)
        matrix(f"blk.{i}.attn_k.weight", n_kv * d_head, d_model)
        matrix(f"blk.{i}.attn_v.weight", n_kv * d_head, d_model)
        matrix(f"blk.{i}.attn_output.weight", d_model, n_heads * d_head)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", d_ff, d_model)
        matrix(f"blk.{i}.ffn_up.weight", d_ff, d_model)
        matrix(f"blk.{i}.ffn_down.weight", d_model, d_ff)
    norm("output_norm.weight")
    matrix("output.weight", len(tokens), d_model)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
