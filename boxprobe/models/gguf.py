"""GGUF files (llama.cpp's quantised format) as ordinary float32 Hugging Face checkpoints.

`convert_gguf` dequantises a GGUF file with transformers' GGUF reader and writes a checkpoint
directory that `load_model` loads like any other, plus a ``boxprobe.json`` that records the source
file, its sha256 and its quantisation. The weights are the quantised model's, dequantised: they are
not the original full-precision model's, and interpretability results describe the quantised model.

`load_model` accepts a ``.gguf`` file (or a directory holding exactly one) and converts it once into
a cache directory keyed by the file's sha256 (`gguf_cache_root`), reused by later loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from boxprobe.models.loading import METADATA_FILE, ModelLoadError, check_checkpoint_dir
from boxprobe.files import file_sha256  # noqa: F401  (re-exported: callers hash data files)

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
CACHE_ENV = "BOXPROBE_CACHE"
"""Environment variable naming boxprobe's cache root (default ``~/.cache/boxprobe``)."""
DEQUANTIZED_NOTE = (
    "weights dequantised to float32 from a quantised GGUF file: they are the quantised model's "
    "weights, not the original full-precision model's, so results describe the quantised model"
)


def _gguf_module():
    try:
        import gguf
    except ImportError as e:
        raise ModelLoadError(
            "reading GGUF files needs the gguf package: pip install gguf"
        ) from e
    return gguf


def gguf_cache_root() -> Path:
    """Where converted GGUF checkpoints are cached: ``$BOXPROBE_CACHE/gguf``, else
    ``~/.cache/boxprobe/gguf``."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "boxprobe") / "gguf"


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: `path` itself if it ends in .gguf, the single .gguf file of a
    directory without config.json, else None (not a GGUF source)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}; check the path")
        return path.resolve()
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(
            f"{path} holds {len(found)} GGUF files ({names}); pass the path of the one to load"
        )
    return found[0].resolve() if found else None


def read_gguf_metadata(gguf_path: str | Path) -> dict[str, Any]:
    """Architecture, name, quantisation type (e.g. "Q4_1") and tensor-type counts of a GGUF file."""
    gguf = _gguf_module()
    gguf_path = Path(gguf_path)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(
            f"{gguf_path} is not a readable GGUF file ({e}); check that the file is complete"
        ) from e

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    file_type = field("general.file_type")
    if file_type is None:
        quantization = None
    else:
        try:  # llama.cpp names file types "MOSTLY_Q4_1", "ALL_F32", ...
            quantization = gguf.LlamaFileType(int(file_type)).name
            quantization = quantization.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quantization = f"file_type {file_type}"
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "quantization": quantization,
        "tensor_types": dict(sorted(tensor_types.items())),
    }


def _dequantised_model(gguf_path: Path):
    """The GGUF's model and tokenizer via transformers, as a plain (savable) float32 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise ModelLoadError(
            f"transformers could not read {gguf_path} ({e}); check that transformers supports "
            "its architecture and quantisation type"
        ) from e
    # A model loaded from GGUF keeps a quantization_config and refuses save_pretrained;
    # rebuild the same architecture without it and move the dequantised tensors in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    return model.eval(), tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a GGUF file as a float32 Hugging Face checkpoint directory; return `out_dir`.

    The directory holds config.json, safetensors weights, the tokenizer files and a boxprobe.json
    with the source file name, its sha256, its quantisation type and tensor types, and a note that
    the weights are dequantised. It is written to a temporary directory next to `out_dir` and
    renamed into place, so an interrupted conversion never leaves a half-written checkpoint.
    An existing `out_dir` is replaced only with ``overwrite=True``.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise ModelLoadError(f"no GGUF file at {gguf_path}; check the path")
    if out_dir.exists() and not overwrite:
        raise ModelLoadError(
            f"{out_dir} already exists; pass another output directory or overwrite=True"
        )
    info = read_gguf_metadata(gguf_path)
    sha = file_sha256(gguf_path)
    logger.info("converting %s (%s, sha256 %s) to %s", gguf_path, info["quantization"], sha[:12], out_dir)
    model, tokenizer = _dequantised_model(gguf_path)

    import importlib.metadata

    import transformers

    metadata = {
        "source_format": "gguf",
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha,
        "quantization": info["quantization"],
        "tensor_types": info["tensor_types"],
        "gguf_architecture": info["architecture"],
        "gguf_name": info["name"],
        "dequantized": True,
        "dtype": "float32",
        "note": DEQUANTIZED_NOTE,
        "converted_with": {"transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf")},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():  # only reached with overwrite=True
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_converted(directory: str | Path, sha256: str) -> bool:
    """Whether `directory` is a complete conversion of the GGUF file whose sha256 is `sha256`."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
        check_checkpoint_dir(directory)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("gguf_sha256") == sha256


def cached_conversion(gguf_path: str | Path) -> tuple[Path, str]:
    """The cached float32 checkpoint of a GGUF file, converting it on first use.

    The cache directory is ``gguf_cache_root() / <sha256>``; returns it and the file's sha256.
    """
    gguf_path = Path(gguf_path)
    sha = file_sha256(gguf_path)
    target = gguf_cache_root() / sha
    if is_converted(target, sha):
        logger.info("using cached conversion of %s at %s", gguf_path.name, target)
        return target, sha
    try:
        convert_gguf(gguf_path, target, overwrite=target.exists())
    except OSError as e:
        # Another process may have renamed its own conversion into place first.
        if not is_converted(target, sha):
            raise ModelLoadError(
                f"could not write the converted {gguf_path.name} to {target} ({e}); set "
                f"{CACHE_ENV} to a writable directory"
            ) from e
    return target, sha
