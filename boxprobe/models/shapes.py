"""Architecture shapes of the registry's models, typed in from their public ``config.json`` files.

Each figure is the value of the Hugging Face config field named in `ModelShape`'s docstrings, read
from ``https://huggingface.co/<hf_id>/blob/main/config.json`` (the `source` of each shape). They let
``boxprobe plan`` size a run (weights, key-value cache, activation cache, FLOPs) before any weight is
downloaded. Parameter counts are computed from the shape (`ModelShape.params`), not typed, so they
cannot drift from it; a test checks the formula against loaded checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from boxprobe.errors import ConfigError, MissingFileError
from boxprobe.models.registry import REGISTRY, resolve_model_name


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's public shape (Llama-style: gated MLP, RMSNorm, no biases)."""

    n_layers: int
    """``num_hidden_layers``."""
    d_model: int
    """``hidden_size``."""
    n_heads: int
    """``num_attention_heads``."""
    n_kv_heads: int
    """``num_key_value_heads`` (grouped-query attention); equal to n_heads without it."""
    d_head: int
    """``head_dim`` where the config has one (Gemma: 256), else d_model / n_heads."""
    d_mlp: int
    """``intermediate_size``."""
    vocab: int
    """``vocab_size`` (rows of the embedding, including padding rows)."""
    tied_embeddings: bool
    """``tie_word_embeddings``: the unembedding shares the embedding's weights."""
    n_ctx: int
    """``max_position_embeddings``."""
    source: str
    """Where the figures come from."""

    @property
    def params(self) -> int:
        """Parameter count: embeddings, attention (q, k, v, o), gated MLP (3 matrices) and norms."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_mlp
        per_layer = attn + mlp + 2 * self.d_model
        embed = self.vocab * self.d_model * (1 if self.tied_embeddings else 2)
        return self.n_layers * per_layer + embed + self.d_model

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        """Key-value cache bytes one token occupies across all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.d_head * bytes_per_value


def _hub(hf_id: str) -> str:
    return f"https://huggingface.co/{hf_id}/blob/main/config.json"


# (n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, vocab, tied, n_ctx) per architecture family.
_LLAMA2_7B = (32, 4096, 32, 32, 128, 11008, 32000, False, 4096)
_LLAMA2_13B = (40, 5120, 40, 40, 128, 13824, 32000, False, 4096)
_LLAMA2_70B = (80, 8192, 64, 8, 128, 28672, 32000, False, 4096)
_CODELLAMA_7B = (32, 4096, 32, 32, 128, 11008, 32016, False, 16384)
_CODELLAMA_13B = (40, 5120, 40, 40, 128, 13824, 32016, False, 16384)
_CODELLAMA_34B = (48, 8192, 64, 8, 128, 22016, 32000, False, 16384)
_CODELLAMA_70B = (80, 8192, 64, 8, 128, 28672, 32016, False, 4096)
_DEEPSEEK_7B = (30, 4096, 32, 32, 128, 11008, 102400, False, 4096)
_GEMMA_7B = (28, 3072, 16, 16, 256, 24576, 256000, True, 8192)
_LLAMA1_7B = (32, 4096, 32, 32, 128, 11008, 32000, False, 2048)
_MISTRAL_7B = (32, 4096, 32, 8, 128, 14336, 32000, False, 32768)

_BY_NAME = {
    "Llama-2-7b": _LLAMA2_7B, "Llama-2-7b-chat": _LLAMA2_7B,
    "Llama-2-13b": _LLAMA2_13B, "Llama-2-13b-chat": _LLAMA2_13B,
    "Llama-2-70b": _LLAMA2_70B, "Llama-2-70b-chat": _LLAMA2_70B,
    "CodeLlama-7b": _CODELLAMA_7B, "CodeLlama-7b-Instruct": _CODELLAMA_7B, "llemma_7b": _CODELLAMA_7B,
    "CodeLlama-13b": _CODELLAMA_13B, "CodeLlama-13b-Instruct": _CODELLAMA_13B,
    "CodeLlama-34b": _CODELLAMA_34B, "llemma_34b": _CODELLAMA_34B,
    "CodeLlama-70b": _CODELLAMA_70B, "CodeLlama-70b-Instruct": _CODELLAMA_70B,
    "deepseek-llm-7b-base": _DEEPSEEK_7B, "deepseek-llm-7b-chat": _DEEPSEEK_7B,
    "deepseek-coder-7b-base-v1.5": _DEEPSEEK_7B, "deepseek-coder-7b-instruct-v1.5": _DEEPSEEK_7B,
    "deepseek-math-7b-base": _DEEPSEEK_7B,
    "gemma-7b": _GEMMA_7B, "gemma-7b-it": _GEMMA_7B, "codegemma-7b": _GEMMA_7B, "codegemma-7b-it": _GEMMA_7B,
    "llama-7b": _LLAMA1_7B, "float-7b": _LLAMA1_7B,
    "Mistral-7B-v0.1": _MISTRAL_7B, "OpenMath-Mistral-7B": _MISTRAL_7B, "Mistral-7B-Instruct-v0.2": _MISTRAL_7B,
}  # fmt: skip

SHAPES: dict[str, ModelShape] = {
    name: ModelShape(*values, source=_hub(REGISTRY[name].hf_id)) for name, values in _BY_NAME.items()
}


def shape_from_config(config: dict, source: str) -> ModelShape:
    """A shape from a Hugging Face ``config.json`` mapping (Llama, Mistral, Gemma, Qwen2-style fields)."""
    try:
        d_model, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return ModelShape(
            n_layers=int(config["num_hidden_layers"]), d_model=d_model, n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            d_head=int(config.get("head_dim") or d_model // n_heads), d_mlp=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]), tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            n_ctx=int(config.get("max_position_embeddings") or 0), source=source)
    except KeyError as err:
        raise ConfigError(f"{source}: config has no {err.args[0]!r}; plan needs a decoder-only transformer "
                          "config with hidden_size, num_attention_heads, num_hidden_layers, intermediate_size "
                          "and vocab_size") from None


def model_shape(name_or_path: str | Path) -> ModelShape:
    """The shape of a registry model (typed in), or of a local checkpoint (read from its config.json)."""
    name = str(name_or_path)
    if name in SHAPES:
        return SHAPES[name]
    path = Path(name)
    config = path / "config.json" if path.is_dir() else path
    if config.is_file() and config.suffix == ".json":
        return shape_from_config(json.loads(config.read_text()), str(config))
    for registry_name, spec in REGISTRY.items():
        if spec.hf_id == resolve_model_name(name) and registry_name in SHAPES:
            return SHAPES[registry_name]
    if path.exists():
        raise MissingFileError(f"{path} has no config.json; pass a checkpoint directory or a registry name")
    raise ConfigError(f"no shape for {name!r}: pass a registry name ({', '.join(list(SHAPES)[:3])}, ...) or "
                      "a local checkpoint directory with a config.json")
