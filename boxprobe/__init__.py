"""boxprobe: mechanistic interpretability of entity tracking (the boxes task) in language models.

The public API, stage by stage (imported lazily, so ``import boxprobe`` and the CLI start at once)::

    from boxprobe import TaskConfig, generate_dataset, load_model, resolve_spec, prepare, evaluate
    model = load_model("assets/models/toy-base")
    queries = prepare(model, "data/boxes/test-subsample.jsonl", resolve_spec(model))
    evaluate(model, queries)

Every analysis takes ``(model, queries, config)``; ``queries`` comes from :func:`prepare` alone.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # data: the task, prompts and the one query set
    "TaskConfig": "boxprobe.data.task", "Example": "boxprobe.data.task", "generate_dataset": "boxprobe.data.task",
    "read_examples": "boxprobe.data.task", "load_template": "boxprobe.data.prompts",
    "PromptSpec": "boxprobe.data.queries", "resolve_spec": "boxprobe.data.queries", "prepare": "boxprobe.data.queries",
    "QuerySet": "boxprobe.data.queries", "build_pairs": "boxprobe.data.pairs", "collate_pairs": "boxprobe.data.pairs",
    # models
    "load_model": "boxprobe.models.loading", "model_id": "boxprobe.models.loading",
    "convert_gguf": "boxprobe.models.gguf",
    # behaviour
    "evaluate": "boxprobe.behaviour.evaluate", "evaluate_file": "boxprobe.behaviour.evaluate",
    "EvalConfig": "boxprobe.behaviour.evaluate", "EvalResult": "boxprobe.behaviour.evaluate",
    # activations
    "build_cache": "boxprobe.activations.cache", "CacheConfig": "boxprobe.activations.cache",
    "open_cache": "boxprobe.activations.cache", "attention_to_roles": "boxprobe.activations.attention",
    "AttentionConfig": "boxprobe.activations.attention",
    # probing
    "ProbeExperiment": "boxprobe.probing.experiment", "ProbeExperimentConfig": "boxprobe.probing.experiment",
    # causal
    "patch_resid_pre": "boxprobe.causal.patching", "patch_heads": "boxprobe.causal.patching",
    "patch_head_groups": "boxprobe.causal.patching", "path_patch": "boxprobe.causal.path",
    "cross_model_patch": "boxprobe.causal.cmap", "discover_circuit": "boxprobe.causal.circuit",
    "evaluate_circuit": "boxprobe.causal.faithfulness", "circuit_study": "boxprobe.causal.study",
    # report and pipeline
    "dashboard_from_run": "boxprobe.report.dashboard", "run_demo": "boxprobe.pipeline.demo",
    "DemoConfig": "boxprobe.pipeline.demo",
    # errors
    "BoxprobeError": "boxprobe.errors", "ConfigError": "boxprobe.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'boxprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
