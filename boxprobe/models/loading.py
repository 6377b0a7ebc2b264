"""Loading models as TransformerBridges, and naming them (`model_id`, `model_label`).

Hub ids, registry names (see `boxprobe.models.registry`) and local checkpoint directories all go through
`TransformerBridge.boot_transformers`, so a fine-tuned checkpoint and its hub original are loaded
and hooked identically. Failures a user can hit (missing directory, a model absent from the
offline cache) are turned into `ModelLoadError`s that name the model and say what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from transformer_lens.model_bridge import TransformerBridge

from boxprobe.models.registry import resolve_model_name
from boxprobe.errors import BoxprobeError

logger = logging.getLogger(__name__)

METADATA_FILE = "boxprobe.json"
BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[2] / "assets" / "models"
"""The toy checkpoints ship with the source repository (``assets/models``), not inside the wheel."""
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip
# Files that determine a local checkpoint's behaviour, hashed into its revision.
_FINGERPRINT_GLOBS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin",
                      "tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_FULL_HASH_MAX_BYTES = 64 * 2**20
_SAMPLE_BYTES = 2**20


class ModelLoadError(BoxprobeError, ValueError):
    """A model or checkpoint could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, attached to the bridge as `model.boxprobe_info`.

    `revision` is the hub commit hash for hub models (None if unknown), a content
    fingerprint (`checkpoint_fingerprint`) for local directories and the file's sha256 for GGUF
    files. `weight_mode` is "raw" (HF weights, logits match HF) or "compatibility"
    (HookedTransformer-style folded and centred weights). `prompt_format` comes from the
    checkpoint's boxprobe.json, if any. `device` is the embedding's device; `device_map` is the
    realised module -> device placement when the model was dispatched with a device map.
    """

    name: str
    source: Literal["hub", "local", "gguf"]
    path_or_id: str
    revision: str | None
    weight_mode: Literal["raw", "compatibility"]
    prompt_format: str | None
    device: str
    dtype: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    device_map: dict[str, str] | None = field(default=None, hash=False, compare=False)
    n_devices: int = 1

    @property
    def model_id(self) -> str:
        """A file-name-safe identity: the model's name plus a short revision, e.g.
        ``toy-base@1a2b3c4d5e6f``. See `model_id`."""
        return _make_model_id(self.path_or_id, self.source, self.revision)


_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
MODEL_ID_REVISION_LENGTH = 12


def _make_model_id(path_or_id: str, source: str, revision: str | None) -> str:
    # Built from the resolved hub id or path, so a registry name and its hub id, or a relative and an
    # absolute path, give the same id. A local model is named by its directory (or .gguf file stem);
    # the revision, a content hash, tells apart two directories of the same name.
    base = path_or_id
    if source != "hub":
        base = Path(path_or_id.rstrip("/\\")).name or path_or_id
        if base.lower().endswith(".gguf"):
            base = base[: -len(".gguf")]
    base = _UNSAFE_ID_CHARS.sub("_", base.replace("/", "--")).strip("_") or "model"
    if revision is None:
        rev = "unknown-revision"
    elif revision.startswith("random-init-"):
        rev = revision  # already "random-init-<seed>-of-<fingerprint>"
    else:
        rev = revision[:MODEL_ID_REVISION_LENGTH]
    return f"{base}@{_UNSAFE_ID_CHARS.sub('_', rev)}"


def resolve_device(device: str | torch.device | None) -> str:
    """None -> "cuda" when available, else "cpu"; anything else is validated and returned."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"invalid device {device!r}: {e}; use e.g. 'cpu' or 'cuda'") from e
    # Fail here, naming the device, rather than deep inside the first .to(device) with torch's message.
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available on this machine "
                                 f"(torch {torch.__version__}); use 'cpu', or leave the device unset to pick cuda only when present")
        if resolved.index is not None and resolved.index >= count:
            raise ModelLoadError(f"device {device!r} asked for, but this machine has {count} CUDA device(s) "
                                 f"(cuda:0..cuda:{count - 1})")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available on this machine; use 'cpu'")
    return str(resolved)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """None -> bfloat16 on cuda, float32 elsewhere; strings like "bfloat16" are converted."""
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or a torch.dtype)"
        )
    return _DTYPES[key]


def _offline() -> bool:
    env = any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    try:
        from huggingface_hub import constants

        return env or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return env


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a path.
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith("/")
    )


def _describe(name: str, resolved: str) -> str:
    return f"{name!r}" if name == resolved else f"{name!r} ({resolved})"


def _cached_hub_revision(hf_id: str, revision: str | None) -> str | None:
    """The cached snapshot's commit hash if `hf_id`'s config.json is in the HF cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(hf_id, "config.json", revision=revision)
    except ValueError:  # malformed repo id
        return None
    if not isinstance(hit, str):
        return None
    parts = Path(hit).parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else "cached"


def model_n_layers(name_or_path: str | Path) -> int | None:
    """The number of blocks a model will have, read from its ``config.json`` without loading weights
    (a checkpoint directory, or a hub model in the local cache); None when there is no config to read
    (a GGUF file, a model not downloaded yet). For checking layer indices before a model loads."""
    name = str(name_or_path)
    resolved = resolve_model_name(name)
    path: Path | None = Path(resolved).expanduser() / "config.json"
    if not path.is_file():
        path = None
        if not _looks_like_path(resolved) and not resolved.lower().endswith(".gguf"):
            from huggingface_hub import try_to_load_from_cache

            try:
                hit = try_to_load_from_cache(resolved, "config.json")
            except ValueError:  # not a repo id
                hit = None
            path = Path(hit) if isinstance(hit, str) else None
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the loader names a broken checkpoint better
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def check_checkpoint_dir(path: str | Path, name: str | None = None) -> Path:
    """Check that `path` is a loadable HF checkpoint directory; return it resolved."""
    path = Path(path).expanduser()
    label = name if name is not None else str(path)
    if not path.exists():
        raise ModelLoadError(
            f"model {label!r}: no checkpoint directory at {path}; check the path, or pass a "
            "Hugging Face id or registry name instead"
        )
    if not path.is_dir():
        raise ModelLoadError(
            f"model {label!r}: {path} is a file, not a checkpoint directory; pass the directory "
            "that holds config.json"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model {label!r}: {path} has no config.json, so it is not a Hugging Face checkpoint "
            "directory; pass the directory written by save_pretrained"
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(
            f"model {label!r}: {path} has a config.json but no weights (expected one of "
            f"{', '.join(WEIGHT_FILES)}); save the model with save_pretrained"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model {label!r}: {path} has no tokenizer files (expected one of "
            f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there with save_pretrained"
        )
    return path.resolve()


def checkpoint_fingerprint(path: str | Path, length: int = 12) -> str:
    """A short sha256 fingerprint of a checkpoint directory's config, weight and tokenizer files.

    Files up to 64 MiB are hashed whole; larger weight shards by size plus their first, middle
    and last MiB, which keeps multi-GB checkpoints fast while still changing with the weights.
    """
    path = Path(path)
    files = sorted({f for pat in _FINGERPRINT_GLOBS for f in path.glob(pat) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= _FULL_HASH_MAX_BYTES:
                h.update(fh.read())
                continue
            for offset in (0, size // 2, size - _SAMPLE_BYTES):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:length]


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """Read the optional boxprobe.json of a checkpoint directory ({} when there is none).

    It records how the checkpoint was made, e.g. {"prompt_format": "per-box", "template": "toy"}.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"no checkpoint directory at {path}; cannot read {METADATA_FILE}")
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        return {}
    try:
        data = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{meta_file}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
            "fix or delete the file"
        ) from e
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"{meta_file}: expected a JSON object, got {type(data).__name__}; fix or delete it"
        )
    return data


def use_checkpoint_tokenizer(model: TransformerBridge, source: str, revision: str | None = None) -> None:
    """Give the bridge the checkpoint's own tokenizer, with its own start-token rule.

    TransformerBridge 4.3 rebuilds the tokenizer to prepend a start token, which SmolLM2's tokenizer
    (among others) does not: prompts then differ from the model's own, and chat prompts begin with
    the start token twice. The checkpoint's tokenizer is installed instead, and TransformerLens'
    BOS settings follow it, so ``to_tokens`` gives the same ids as ``tokenizer(text)``.
    """
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        logger.warning("could not load the checkpoint's own tokenizer from %s (%s); keeping the bridge's", source, err)
        return
    if not getattr(own, "is_fast", False):
        return  # token positions need offset mappings; the bridge's tokenizer stays
    ids = own("a")["input_ids"]
    adds_bos = own.bos_token_id is not None and ids[:1] == [own.bos_token_id]
    # The bridge's tokenizer setter re-runs TransformerLens' setup, which adds the start token back.
    model._tokenizer = own
    model.cfg.tokenizer_prepends_bos = adds_bos
    model.cfg.default_prepend_bos = adds_bos


def setup_tokenizer_for_batching(model: TransformerBridge) -> None:
    """Give the tokenizer a pad token (eos, else bos) and pad on the left, so that the last
    position of every row in a padded batch is the prompt's real last token."""
    tok = model.tokenizer
    if tok is None:
        raise ModelLoadError(f"model {model.cfg.model_name!r} has no tokenizer")
    if tok.pad_token is None:
        fallback = tok.eos_token if tok.eos_token is not None else tok.bos_token
        if fallback is None:
            raise ModelLoadError(
                f"model {model.cfg.model_name!r}: tokenizer has no pad, eos or bos token to pad "
                "batches with; set pad_token (and bos_token, eos_token) in the checkpoint's tokenizer_config.json"
            )
        tok.pad_token = fallback
    # transformers fills a missing special token with "<|endoftext|>"; in a vocabulary without it, that is
    # <unk>: every batch would pad with <unk> and the prompts would lose their BOS token, silently.
    unk = tok.unk_token_id
    absent = [f"{kind} {token!r}" for kind, token in (("pad_token", tok.pad_token), ("bos_token", tok.bos_token),
                                                      ("eos_token", tok.eos_token))
              if token is not None and unk is not None and token != tok.unk_token
              and tok.convert_tokens_to_ids(token) == unk]
    if absent:
        raise ModelLoadError(
            f"model {model.cfg.model_name!r}: the tokenizer's {', '.join(absent)} is not in its vocabulary (it "
            "maps to the unknown token), so batches would pad with <unk> and prompts lose their BOS token. "
            "Set pad_token, bos_token and eos_token in the checkpoint's tokenizer_config.json to tokens of its "
            "vocabulary (e.g. \"<pad>\", \"<s>\", \"</s>\").")
    tok.padding_side = "left"
    model.cfg.default_padding_side = "left"


_OFFLOAD_TARGETS = ("cpu", "disk")


def _check_placement(
    device: str | torch.device | None,
    device_map: str | dict[str, str | int] | None,
    n_devices: int | None,
    max_memory: dict | None,
    random_init: bool,
    label: str,
) -> bool:
    """Reject placement arguments TransformerBridge cannot honour; True if the model is dispatched."""
    if n_devices is not None and n_devices < 1:
        raise ModelLoadError(f"model {label}: n_devices must be at least 1, got {n_devices}")
    dispatched = device_map is not None or (n_devices or 1) > 1
    if not dispatched:
        if max_memory is not None:
            raise ModelLoadError(
                f"model {label}: max_memory only applies to a dispatched model; also pass "
                "device_map (e.g. 'auto') or n_devices > 1"
            )
        return False
    if device is not None:
        raise ModelLoadError(
            f"model {label}: device and device_map/n_devices are mutually exclusive; pass one"
        )
    if device_map is not None and n_devices is not None and n_devices > 1:
        raise ModelLoadError(
            f"model {label}: pass either device_map or n_devices, not both (n_devices builds a "
            "balanced device map itself)"
        )
    if random_init:
        raise ModelLoadError(
            f"model {label}: random_init builds the model itself, which TransformerBridge cannot "
            "dispatch with device_map/n_devices/max_memory; load it on one device"
        )
    if (n_devices or 1) > 1 and torch.cuda.device_count() < n_devices:
        raise ModelLoadError(
            f"model {label}: n_devices={n_devices} needs {n_devices} CUDA devices, found "
            f"{torch.cuda.device_count()}; lower n_devices or pass a device_map"
        )
    if isinstance(device_map, dict):
        targets = {str(v).lower() for v in device_map.values()}
        if "meta" in targets:
            raise ModelLoadError(
                f"model {label}: device_map sends modules to 'meta', which holds no weights; use "
                "'cpu' or 'disk' for offloading"
            )
        offloaded = targets & set(_OFFLOAD_TARGETS)
        if offloaded and targets - set(_OFFLOAD_TARGETS):
            # TransformerLens 4.3 rejects such maps: CPU/disk offload is only verified without a GPU.
            raise ModelLoadError(
                f"model {label}: device_map mixes accelerators ({sorted(targets - offloaded)}) with "
                f"{sorted(offloaded)} offload, which TransformerBridge does not support; put every "
                "module on accelerators, or every module on 'cpu'/'disk'"
            )
    return True


def _default_dtype_device(device_map) -> str:
    """The device whose default dtype a dispatched model gets: cuda unless it all lives on cpu/disk."""
    if isinstance(device_map, dict):
        targets = {str(v).lower() for v in device_map.values()}
        return "cpu" if targets <= set(_OFFLOAD_TARGETS) else "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compatibility_mode: bool = False,
    revision: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    device_map: str | dict[str, str | int] | None = None,
    n_devices: int | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | Path | None = None,
) -> TransformerBridge:
    """Load a registry name, Hugging Face id, local checkpoint directory or GGUF file as a
    TransformerBridge.

    A ``.gguf`` file, or a directory holding exactly one and no config.json, is dequantised to a
    float32 checkpoint once and cached by the file's sha256 (see `boxprobe.models.gguf`); its
    ModelInfo records that sha256 as the revision and the quantisation in its metadata.

    With ``random_init=True`` the architecture, config and tokenizer are the checkpoint's but the
    weights are freshly initialised (seeded): the random-init baseline of probing studies. Its
    name and revision say so, so caches of the two never mix.

    Args:
        name_or_path: e.g. "CodeLlama-7b", "codellama/CodeLlama-7b-hf", "runs/ckpt" or
            "models/x.Q4_1.gguf".
        device: None picks "cuda" when available, else "cpu". Exclusive with device_map.
        dtype: None picks bfloat16 on cuda and float32 on cpu; or "float32" / "bfloat16" /
            "float16" / a torch.dtype.
        compatibility_mode: apply HookedTransformer-style weight processing (folded
            LayerNorm, centred weights); logits then match HF only up to a per-position
            constant, i.e. log-probs match.
        revision: hub revision (branch, tag or commit) for hub models.
        device_map: Hugging Face device map ("auto", "balanced" or {module: device}) to spread
            the model over devices, or offload it to "cpu" / "disk". TransformerBridge does
            not support maps that mix accelerators with cpu/disk offload.
        n_devices: split the model evenly over this many CUDA devices.
        max_memory: per-device memory budget for the dispatcher, with device_map or n_devices.
        offload_folder: where "disk" entries of device_map keep their weights (default: a
            temporary directory chosen by transformers).

    Returns:
        The bridge, in eval mode, with a left-padding tokenizer and `model.boxprobe_info`.
    """
    name = str(name_or_path)
    dispatched = _check_placement(device, device_map, n_devices, max_memory, random_init, repr(name))
    device_str = None if dispatched else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device_str or _default_dtype_device(device_map))
    resolved = name if isinstance(name_or_path, Path) else resolve_model_name(name)
    gguf_file = None
    local = (
        isinstance(name_or_path, Path)
        or _looks_like_path(resolved)
        or Path(resolved).is_dir()
        or resolved.lower().endswith(".gguf")
    )
    if local:
        from boxprobe.models import gguf as gguf_files

        gguf_file = gguf_files.find_gguf(resolved)
    if gguf_file is not None:
        converted, sha = gguf_files.cached_conversion(gguf_file)
        ckpt = check_checkpoint_dir(converted, name)
        metadata = {**read_checkpoint_metadata(ckpt), "converted_dir": str(ckpt)}
        source, target, rev = "gguf", str(ckpt), sha
    elif local:
        ckpt = check_checkpoint_dir(resolved, name)
        metadata = read_checkpoint_metadata(ckpt)
        source, target, rev = "local", str(ckpt), checkpoint_fingerprint(ckpt)
    else:
        metadata, source, target = {}, "hub", resolved
        rev = _cached_hub_revision(resolved, revision)
        if rev is None and _offline():
            raise ModelLoadError(
                f"{_describe(name, resolved)} is not a local directory and is not in the Hugging "
                "Face cache; HF_HUB_OFFLINE is set, so it cannot be downloaded now. Download it "
                f"first (e.g. `huggingface-cli download {resolved}` with network access) or pass "
                "a checkpoint directory"
            )
    placement = device_str or f"device_map={device_map!r}, n_devices={n_devices}"
    logger.info("loading %s from %s on %s as %s", name, target, placement, torch_dtype)
    hf_model = None
    if random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target, revision=revision))
        hf_model.to(device=device_str, dtype=torch_dtype)
    placement_kwargs: dict[str, Any] = {}
    if dispatched:
        placement_kwargs = {"device_map": device_map, "n_devices": n_devices, "max_memory": max_memory,
                            "offload_folder": None if offload_folder is None else str(offload_folder)}
    try:
        model = TransformerBridge.boot_transformers(
            target, device=device_str, dtype=torch_dtype, revision=revision, hf_model=hf_model,
            **placement_kwargs,
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError) as e:
        hint = (" (a weights file is truncated or damaged: download or convert the checkpoint again)"
                if isinstance(e, SafetensorError) else "")
        raise ModelLoadError(
            f"failed to load model {_describe(name, target)} with "
            f"TransformerBridge.boot_transformers: {e}{hint}"
        ) from e
    model.eval()
    use_checkpoint_tokenizer(model, target, revision)
    setup_tokenizer_for_batching(model)
    if compatibility_mode:
        try:
            model.enable_compatibility_mode(disable_warnings=True)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            raise ModelLoadError(
                f"model {name!r}: compatibility mode failed ({e}); load it without "
                "compatibility_mode, or on one device without device_map offload"
            ) from e
    if source == "hub":
        rev = getattr(model.original_model.config, "_commit_hash", None) or rev
    prompt_format = metadata.get("prompt_format")
    if random_init:
        name, rev = f"{name} (random init, seed {seed})", f"random-init-{seed}-of-{rev}"
    realised_map = getattr(model.original_model, "hf_device_map", None)
    model.boxprobe_info = ModelInfo(
        name=name,
        source=source,
        path_or_id=str(gguf_file) if gguf_file is not None else target,
        revision=rev,
        weight_mode="compatibility" if compatibility_mode else "raw",
        prompt_format=str(prompt_format) if prompt_format is not None else None,
        device=str(model.cfg.device) if dispatched else device_str,
        dtype=str(torch_dtype).removeprefix("torch."),
        metadata=metadata,
        device_map={k: str(v) for k, v in realised_map.items()} if realised_map else None,
        n_devices=int(getattr(model.cfg, "n_devices", 1) or 1),
    )
    # While config.use_cache is set, transformers builds a key-value cache in every forward pass: every
    # layer's keys and values for the whole batch, held to the end of the pass (memory that grows with depth)
    # and never read. Passes that want one ask for it (use_cache=True, or past_key_values).
    for config in {id(c): c for c in (model.original_model.config,
                                      getattr(model.original_model.config, "get_text_config", lambda: None)())
                   if c is not None}.values():
        config.use_cache = False
    return model


def model_info(model: TransformerBridge) -> ModelInfo | None:
    """The ModelInfo `load_model` attached, or None for bridges built another way."""
    return getattr(model, "boxprobe_info", None)


def model_label(model: TransformerBridge) -> str:
    """A short human-readable name for messages: the name it was loaded by, else cfg.model_name."""
    info = model_info(model)
    return info.name if info is not None else str(getattr(model.cfg, "model_name", "model"))


def model_id(model: TransformerBridge) -> str:
    """A stable, file-name-safe identity of a loaded model: its name plus a short revision.

    Hub models (by registry name or hub id alike) give ``org--name@<commit>``, local checkpoints
    ``<dir name>@<content hash>`` (so two directories of the same name but different weights
    differ), GGUF files ``<file stem>@<sha256>``, random-init baselines
    ``<name>@random-init-<seed>-of-<hash>``.
    Raises ValueError for a bridge not loaded by `load_model`, which has no recorded revision.
    """
    info = model_info(model)
    if info is None:
        raise ValueError(
            f"model {model_label(model)!r} was not loaded with boxprobe's load_model, so its "
            "revision is unknown; load it with boxprobe.models.loading.load_model"
        )
    return info.model_id


def result_model(model: TransformerBridge) -> str:
    """The ``model`` column of result frames: :func:`model_id` for a model loaded by `load_model` (as every other
    frame names it), else the bridge's own name (a bare bridge has no recorded revision)."""
    return model_id(model) if model_info(model) is not None else model_label(model)


def model_context_length(model: TransformerBridge) -> int:
    """The model's maximum sequence length (cfg.n_ctx)."""
    return int(model.cfg.n_ctx)
