"""Where and in what dtype a model is loaded: one config block for every command and config that loads
models, passed through to :func:`boxprobe.models.loading.load_model` (and on to TransformerLens's
``boot_transformers``, which dispatches with accelerate)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from boxprobe.errors import ArgumentError


@dataclass(frozen=True)
class LoadConfig:
    """Model placement; None everywhere loads on one device in its default dtype."""

    device: str | None = None
    """cpu, cuda, cuda:1...; None picks cuda when available. Exclusive with device_map / n_devices."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None: bfloat16 on cuda, float32 on cpu."""
    device_map: str | dict | None = None
    """"auto", "balanced" or {module: device} (cpu / disk targets offload)."""
    n_devices: int | None = None
    """Split the model evenly over this many CUDA devices."""
    max_memory: dict | None = None
    """Per-device budget for the dispatcher, e.g. {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}."""
    offload_folder: str | None = None
    """Where "disk" entries of device_map keep their weights."""

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``load_model``, only those set."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def override(self, other: "LoadConfig") -> "LoadConfig":
        """This placement with ``other``'s set fields in place of its own (command-line flags over a config)."""
        return dataclasses.replace(self, **other.kwargs())

    def single_device(self) -> "LoadConfig":
        """Device and dtype only: for a re-initialised copy, which ``load_model`` builds on one device."""
        return LoadConfig(device=self.device, dtype=self.dtype)


def parse_mapping(text: str | None, flag: str) -> str | dict | None:
    """A CLI value that is a word ("auto") or a JSON object ('{"model.layers.0": "cpu"}')."""
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArgumentError(f"{flag}: not valid JSON ({err.msg}); write e.g. '{{\"0\": \"70GiB\", \"cpu\": \"100GiB\"}}'") \
            from None
    # JSON keys are strings; accelerate wants GPU indices as ints
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
