"""The models of the seed paper, the comparisons it draws, and its published accuracies.

Source of every figure here: Kim, Schuster & Toshniwal (2024), "Code Pretraining Improves Entity
Tracking Abilities of Language Models", arXiv 2405.21068 (boxes task, 2-shot in-context prompts,
greedy decoding, all 7 boxes stated per prompt). Accuracies are in percent, indexed by the number
of operations that affected the queried box (0..7); "random-baseline" is the paper's random
baseline. The figures are typed in as literals so the package never reads reference files at run
time; cite the paper wherever they are shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import pandas as pd

from boxprobe.errors import ConfigError

PAPER_CITATION = (
    "Kim, Schuster & Toshniwal (2024), 'Code Pretraining Improves Entity Tracking Abilities "
    "of Language Models', arXiv 2405.21068"
)
RANDOM_BASELINE = "random-baseline"
NUMOPS = tuple(range(8))

Training = Literal["base", "code", "math", "aligned"]
Comparison = Literal["code", "math", "alignment"]
COMPARISONS: tuple[str, ...] = ("code", "math", "alignment")


@dataclass(frozen=True)
class ModelSpec:
    """One evaluated model: registry `name` (the paper's label) and where to get it.

    `family` is the model lineage ("llama-2", "codellama", ...); `architecture` is the
    Hugging Face model class, which is what cross-model patching needs to match; `training`
    says what distinguishes the model from its base (extra code / math data, or alignment).
    """

    name: str
    hf_id: str
    family: str
    architecture: str
    params_b: float
    training: Training
    notes: str = ""


def _spec(name, hf_id, family, arch, params_b, training, notes=""):
    return name, ModelSpec(name, hf_id, family, arch, params_b, training, notes)


_LLAMA, _GEMMA, _MISTRAL = "LlamaForCausalLM", "GemmaForCausalLM", "MistralForCausalLM"

REGISTRY: dict[str, ModelSpec] = dict(
    [
        _spec("Llama-2-7b", "meta-llama/Llama-2-7b-hf", "llama-2", _LLAMA, 7, "base"),
        _spec("CodeLlama-7b", "codellama/CodeLlama-7b-hf", "codellama", _LLAMA, 7, "code",
              "Llama-2-7b + code; vocab extended by 16 infilling tokens"),
        _spec("Llama-2-13b", "meta-llama/Llama-2-13b-hf", "llama-2", _LLAMA, 13, "base"),
        _spec("CodeLlama-13b", "codellama/CodeLlama-13b-hf", "codellama", _LLAMA, 13, "code",
              "Llama-2-13b + code; vocab extended by 16 infilling tokens"),
        _spec("Llama-2-70b", "meta-llama/Llama-2-70b-hf", "llama-2", _LLAMA, 70, "base"),
        _spec("CodeLlama-70b", "codellama/CodeLlama-70b-hf", "codellama", _LLAMA, 70, "code",
              "Llama-2-70b + code"),
        _spec("CodeLlama-34b", "codellama/CodeLlama-34b-hf", "codellama", _LLAMA, 34, "code"),
        _spec("deepseek-llm-7b-base", "deepseek-ai/deepseek-llm-7b-base", "deepseek", _LLAMA,
              7, "base"),
        _spec("deepseek-coder-7b-base-v1.5", "deepseek-ai/deepseek-coder-7b-base-v1.5",
              "deepseek", _LLAMA, 7, "code", "deepseek-llm-7b-base + code"),
        _spec("deepseek-math-7b-base", "deepseek-ai/deepseek-math-7b-base", "deepseek", _LLAMA,
              7, "math", "deepseek-coder-7b-base-v1.5 + math"),
        _spec("gemma-7b", "google/gemma-7b", "gemma", _GEMMA, 7, "base"),
        _spec("codegemma-7b", "google/codegemma-7b", "gemma", _GEMMA, 7, "code",
              "gemma-7b + code"),
        _spec("llama-7b", "huggyllama/llama-7b", "llama", _LLAMA, 7, "base"),
        _spec("float-7b", "nikhil07prakash/float-7b", "llama", _LLAMA, 7, "math",
              "llama-7b fine-tuned on arithmetic"),
        _spec("Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", "mistral", _MISTRAL, 7, "base"),
        _spec("OpenMath-Mistral-7B", "nvidia/OpenMath-Mistral-7B-v0.1-hf", "mistral", _MISTRAL,
              7, "math", "Mistral-7B-v0.1 + math"),
        _spec("llemma_7b", "EleutherAI/llemma_7b", "llemma", _LLAMA, 7, "math",
              "CodeLlama-7b + math"),
        _spec("llemma_34b", "EleutherAI/llemma_34b", "llemma", _LLAMA, 34, "math",
              "CodeLlama-34b + math"),
        _spec("Llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "llama-2", _LLAMA, 7,
              "aligned"),
        _spec("Llama-2-13b-chat", "meta-llama/Llama-2-13b-chat-hf", "llama-2", _LLAMA, 13,
              "aligned"),
        _spec("Llama-2-70b-chat", "meta-llama/Llama-2-70b-chat-hf", "llama-2", _LLAMA, 70,
              "aligned"),
        _spec("CodeLlama-7b-Instruct", "codellama/CodeLlama-7b-Instruct-hf", "codellama",
              _LLAMA, 7, "aligned"),
        _spec("CodeLlama-13b-Instruct", "codellama/CodeLlama-13b-Instruct-hf", "codellama",
              _LLAMA, 13, "aligned"),
        _spec("CodeLlama-70b-Instruct", "codellama/CodeLlama-70b-Instruct-hf", "codellama",
              _LLAMA, 70, "aligned"),
        _spec("deepseek-llm-7b-chat", "deepseek-ai/deepseek-llm-7b-chat", "deepseek", _LLAMA,
              7, "aligned"),
        _spec("deepseek-coder-7b-instruct-v1.5", "deepseek-ai/deepseek-coder-7b-instruct-v1.5",
              "deepseek", _LLAMA, 7, "aligned"),
        _spec("gemma-7b-it", "google/gemma-7b-it", "gemma", _GEMMA, 7, "aligned"),
        _spec("codegemma-7b-it", "google/codegemma-7b-it", "gemma", _GEMMA, 7, "aligned"),
        _spec("Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", "mistral",
              _MISTRAL, 7, "aligned"),
    ]
)


class ModelPair(NamedTuple):
    """A (comparison, base, treated) triple of registry names, as the paper pairs them."""

    comparison: str
    base: str
    treated: str


MODEL_PAIRS: list[ModelPair] = [
    ModelPair("code", "Llama-2-7b", "CodeLlama-7b"),
    ModelPair("code", "Llama-2-13b", "CodeLlama-13b"),
    ModelPair("code", "Llama-2-70b", "CodeLlama-70b"),
    ModelPair("code", "deepseek-llm-7b-base", "deepseek-coder-7b-base-v1.5"),
    ModelPair("code", "gemma-7b", "codegemma-7b"),
    ModelPair("math", "llama-7b", "float-7b"),
    ModelPair("math", "Mistral-7B-v0.1", "OpenMath-Mistral-7B"),
    ModelPair("math", "deepseek-coder-7b-base-v1.5", "deepseek-math-7b-base"),
    ModelPair("math", "CodeLlama-7b", "llemma_7b"),
    ModelPair("math", "CodeLlama-34b", "llemma_34b"),
    ModelPair("alignment", "Llama-2-7b", "Llama-2-7b-chat"),
    ModelPair("alignment", "Llama-2-13b", "Llama-2-13b-chat"),
    ModelPair("alignment", "Llama-2-70b", "Llama-2-70b-chat"),
    ModelPair("alignment", "CodeLlama-7b", "CodeLlama-7b-Instruct"),
    ModelPair("alignment", "CodeLlama-13b", "CodeLlama-13b-Instruct"),
    ModelPair("alignment", "CodeLlama-70b", "CodeLlama-70b-Instruct"),
    ModelPair("alignment", "deepseek-llm-7b-base", "deepseek-llm-7b-chat"),
    ModelPair("alignment", "deepseek-coder-7b-base-v1.5", "deepseek-coder-7b-instruct-v1.5"),
    ModelPair("alignment", "gemma-7b", "gemma-7b-it"),
    ModelPair("alignment", "codegemma-7b", "codegemma-7b-it"),
    ModelPair("alignment", "Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.2"),
]

# Accuracy (%) for numops 0..7, from the paper's results (see module docstring).
PAPER_ACCURACY: dict[str, tuple[float, ...]] = {
    "Llama-2-7b":                      (65.54, 4.96, 7.94, 4.30, 5.56, 4.93, 5.66, 3.45),
    "CodeLlama-7b":                    (90.87, 13.69, 12.28, 7.99, 6.60, 4.93, 8.49, 13.79),
    "Llama-2-13b":                     (77.05, 25.18, 15.97, 12.75, 8.68, 8.45, 10.38, 17.24),
    "CodeLlama-13b":                   (95.70, 60.78, 32.87, 25.35, 20.14, 21.83, 26.42, 13.79),
    "Llama-2-70b":                     (99.00, 71.91, 43.67, 31.18, 21.88, 25.35, 25.47, 27.59),
    "CodeLlama-70b":                   (99.39, 76.60, 54.20, 47.31, 40.97, 36.62, 43.40, 37.93),
    "deepseek-llm-7b-base":            (71.83, 8.44, 7.29, 4.61, 1.04, 2.11, 3.77, 6.90),
    "deepseek-coder-7b-base-v1.5":     (97.16, 57.52, 33.61, 23.96, 19.10, 17.61, 8.49, 13.79),
    "gemma-7b":                        (95.78, 45.82, 14.04, 8.60, 5.56, 7.75, 7.55, 3.45),
    "codegemma-7b":                    (91.33, 53.76, 21.70, 13.67, 6.94, 5.63, 8.49, 3.45),
    "llama-7b":                        (97.93, 0.71, 10.53, 2.92, 3.82, 3.52, 0.94, 3.45),
    "float-7b":                        (89.33, 1.56, 12.37, 5.07, 5.21, 2.82, 4.72, 13.79),
    "Mistral-7B-v0.1":                 (96.01, 50.28, 18.56, 11.37, 8.68, 12.68, 7.55, 10.34),
    "OpenMath-Mistral-7B":             (90.94, 34.40, 14.22, 8.76, 5.90, 4.93, 5.66, 20.69),
    "deepseek-math-7b-base":           (98.93, 60.28, 35.73, 26.73, 24.65, 16.20, 23.58, 27.59),
    "llemma_7b":                       (84.65, 26.81, 13.20, 8.29, 4.51, 6.34, 9.43, 0.00),
    "CodeLlama-34b":                   (94.70, 71.28, 33.89, 31.18, 21.53, 14.79, 19.81, 24.14),
    "llemma_34b":                      (95.24, 75.60, 36.10, 31.64, 21.53, 14.79, 21.70, 20.69),
    "Llama-2-7b-chat":                 (87.95, 35.53, 24.38, 14.29, 12.15, 14.79, 7.55, 3.45),
    "Llama-2-13b-chat":                (77.51, 36.67, 19.94, 16.28, 9.03, 11.27, 11.32, 13.79),
    "Llama-2-70b-chat":                (93.25, 75.67, 47.00, 37.33, 26.39, 22.54, 24.53, 37.93),
    "CodeLlama-7b-Instruct":           (96.16, 36.03, 18.19, 12.29, 6.60, 5.63, 3.77, 10.34),
    "CodeLlama-13b-Instruct":          (97.77, 71.13, 35.83, 23.35, 17.01, 14.79, 19.81, 20.69),
    "CodeLlama-70b-Instruct":          (98.70, 83.40, 59.65, 51.92, 46.18, 40.85, 39.62, 44.83),
    "deepseek-llm-7b-chat":            (70.30, 27.30, 17.27, 11.21, 11.81, 9.15, 6.60, 3.45),
    "deepseek-coder-7b-instruct-v1.5": (91.71, 54.54, 26.41, 18.13, 13.89, 11.27, 17.92, 3.45),
    "gemma-7b-it":                     (93.25, 55.96, 21.98, 15.51, 7.99, 8.45, 11.32, 17.24),
    "codegemma-7b-it":                 (93.48, 69.57, 26.22, 19.82, 12.50, 12.68, 11.32, 10.34),
    "Mistral-7B-Instruct-v0.2":        (86.72, 51.70, 24.01, 18.43, 14.24, 12.68, 16.98, 17.24),
    RANDOM_BASELINE:                   (41.06, 17.85, 12.70, 11.87, 10.58, 9.16, 7.51, 12.59),
}  # fmt: skip


def resolve_model_name(name: str) -> str:
    """Map a registry name (e.g. "CodeLlama-7b") to its Hugging Face id; pass anything else
    (hub ids, checkpoint paths) through unchanged."""
    spec = REGISTRY.get(str(name))
    return spec.hf_id if spec is not None else str(name)


def registry_name_for(hf_id: str) -> str | None:
    """The registry name whose Hugging Face id is `hf_id`, or None."""
    for spec in REGISTRY.values():
        if spec.hf_id == hf_id:
            return spec.name
    return None


def pairs(comparison: str | None = None) -> list[ModelPair]:
    """The paper's model pairs, optionally only those of one comparison
    ("code", "math" or "alignment")."""
    if comparison is None:
        return list(MODEL_PAIRS)
    if comparison not in COMPARISONS:
        raise ConfigError(
            f"unknown comparison {comparison!r}; choose one of {', '.join(COMPARISONS)}"
        )
    return [p for p in MODEL_PAIRS if p.comparison == comparison]


def paper_accuracy_frame() -> pd.DataFrame:
    """The paper's accuracies as a tidy frame: one row per (model, numops), with columns
    model, hf_id (None for the random baseline), numops, accuracy (a fraction in [0, 1]) and
    source (the citation)."""
    rows = []
    for model, accs in PAPER_ACCURACY.items():
        spec = REGISTRY.get(model)
        for numops, acc in zip(NUMOPS, accs, strict=True):
            rows.append(
                {
                    "model": model,
                    "hf_id": spec.hf_id if spec is not None else None,
                    "numops": numops,
                    "accuracy": round(acc / 100.0, 6),
                    "source": PAPER_CITATION,
                }
            )
    return pd.DataFrame(rows, columns=["model", "hf_id", "numops", "accuracy", "source"])
