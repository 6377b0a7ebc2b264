"""Tests for boxprobe.models.gguf: converting GGUF files, loading them through the cache, and the
real SmolLM2-135M-Instruct (Q4_1) checkpoint against plain transformers."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from conftest import SMOLLM2_SHA256
from helpers import make_tiny_gguf
from safetensors import safe_open

from boxprobe.models import gguf as gguf_mod
from boxprobe.models.gguf import convert_gguf, gguf_cache_root, read_gguf_metadata
from boxprobe.models.loading import ModelLoadError, load_model, model_id

TINY_TENSOR_TYPES = {"Q8_0": {"F32": 5, "Q8_0": 16}, "Q4_1": {"F32": 5, "Q4_1": 16}}
SMOLLM2_PROMPTS = [
    "Box 0 contains the apple and the book. Box 1 contains the",
    "Move the ball from Box 3 to Box 1. Box 1 contains",
]


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """A private conversion cache, so tests never write to ~/.cache."""
    monkeypatch.setenv("BOXPROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


# --------------------------------------------------------------------------- tiny GGUF files


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_1"])
def test_convert_round_trip_records_source_and_quantisation(tmp_path, quant):
    import gguf

    src = make_tiny_gguf(tmp_path / f"tiny.{quant}.gguf", quant=quant)
    out = convert_gguf(src, tmp_path / "hf")
    meta = json.loads((out / "boxprobe.json").read_text())
    assert meta["gguf_file"] == src.name
    assert meta["gguf_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["quantization"] == quant
    assert meta["tensor_types"] == TINY_TENSOR_TYPES[quant]
    assert meta["dequantized"] is True and "dequantised" in meta["note"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == 2
    assert not list(tmp_path.glob(".hf.*"))  # the temporary directory is gone

    # The weights are the GGUF's, dequantised (ffn_down is not permuted by the reader).
    reader = gguf.GGUFReader(src)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    with safe_open(out / "model.safetensors", "pt") as f:
        saved = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert saved.dtype == torch.float32
    torch.testing.assert_close(saved, expected.reshape(saved.shape), atol=0, rtol=0)

    with pytest.raises(ModelLoadError, match="already exists"):
        convert_gguf(src, out)


def test_load_gguf_file_then_directory_reuses_the_cache(tmp_path, gguf_cache, monkeypatch):
    src = make_tiny_gguf(tmp_path / "models" / "tiny.Q8_0.gguf")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    first = load_model(src, device="cpu")
    info = first.boxprobe_info
    assert info.source == "gguf" and info.revision == sha and info.path_or_id == str(src.resolve())
    assert info.metadata["quantization"] == "Q8_0" and info.metadata["dequantized"] is True
    assert model_id(first) == f"tiny.Q8_0@{sha[:12]}"
    converted = gguf_cache / sha
    assert info.metadata["converted_dir"] == str(converted)
    mtime = (converted / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(gguf_mod, "convert_gguf", no_conversion)
    second = load_model(str(src.parent), device="cpu")  # a directory holding one .gguf
    assert second.boxprobe_info.revision == sha
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in gguf_cache.iterdir()] == [sha]
    tokens = first.to_tokens("Box 0 contains the apple")
    with torch.inference_mode():
        torch.testing.assert_close(first(tokens), second(tokens), atol=0, rtol=0)


def test_incomplete_cache_entry_is_converted_again(tmp_path, gguf_cache):
    src = make_tiny_gguf(tmp_path / "tiny.gguf")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    (gguf_cache / sha).mkdir(parents=True)
    (gguf_cache / sha / "config.json").write_text("{}")  # e.g. left by an older, broken run
    assert load_model(src, device="cpu").boxprobe_info.metadata["gguf_sha256"] == sha


def test_gguf_errors(tmp_path, gguf_cache, monkeypatch):
    two = tmp_path / "two"
    make_tiny_gguf(two / "a.gguf")
    make_tiny_gguf(two / "b.gguf", seed=1)
    with pytest.raises(ModelLoadError, match=r"2 GGUF files \(a.gguf, b.gguf\); pass the path"):
        load_model(two)
    with pytest.raises(ModelLoadError, match="no GGUF file at"):
        load_model(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(junk)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        convert_gguf(two / "a.gguf", tmp_path / "out")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("BOXPROBE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache_root() == tmp_path / "home" / ".cache" / "boxprobe" / "gguf"
    monkeypatch.setenv("BOXPROBE_CACHE", str(tmp_path / "elsewhere"))
    assert gguf_cache_root() == tmp_path / "elsewhere" / "gguf"


def test_cli_convert(tmp_path, capsys):
    from boxprobe.cli import main

    src = make_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "hf"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    assert read_gguf_metadata(src)["quantization"] == json.loads((out / "boxprobe.json").read_text())["quantization"]
    assert main(["convert", str(src), "--out", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(src), "--out", str(out), "--overwrite"]) == 0


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_conversion_records_q4_1(smollm2_dir):
    meta = json.loads((smollm2_dir / "boxprobe.json").read_text())
    assert meta["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert meta["gguf_sha256"] == SMOLLM2_SHA256
    assert meta["quantization"] == "Q4_1"
    assert meta["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_smollm2_shape(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert cfg.d_vocab == 49152 and len(smollm2.tokenizer) == 49152
    assert smollm2.boxprobe_info.metadata["quantization"] == "Q4_1"


def test_smollm2_bridge_matches_transformers(smollm2, smollm2_dir):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for prompt in SMOLLM2_PROMPTS:
        tokens = smollm2.to_tokens(prompt)
        with torch.inference_mode():
            ours, ref = smollm2(tokens), hf(tokens).logits
        assert ref.std() > 1.0  # a real model's logits, not a constant
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
