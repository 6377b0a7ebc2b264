"""Tests for boxprobe.models.loading (loading, errors, pair checks) and boxprobe.models.registry (paper data)."""

from __future__ import annotations

import re

import huggingface_hub.constants
import pytest
import torch
from helpers import DEFAULT_WORDS, make_tiny_checkpoint
from transformers import AutoModelForCausalLM

from boxprobe.models import registry
from boxprobe.models.compare import ModelMismatchError, check_same_family, compare_models
from boxprobe.models.loading import (
    ModelLoadError,
    checkpoint_fingerprint,
    load_model,
    model_context_length,
    read_checkpoint_metadata,
    resolve_device,
    resolve_dtype,
)

PROMPTS = [
    "Box 0 contains the apple . Box 1 contains the",
    "Move the ball from Box 3 into Box 1 . Box 3 contains",
    "Box 6 is empty",
]


def _hf_logits(path, tokens, attention_mask=None):
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        return hf(tokens, attention_mask=attention_mask).logits


def _assert_matches_hf(model, path, log_probs=False, atol=1e-4):
    for prompt in PROMPTS:
        tokens = model.to_tokens(prompt)
        assert tokens[0, 0].item() == model.tokenizer.bos_token_id  # BOS prepended
        with torch.inference_mode():
            ours = model(tokens)
        ref = _hf_logits(path, tokens)
        assert ours.shape == ref.shape == (1, tokens.shape[1], model.cfg.d_vocab)
        # Random weights are wide enough that logits vary a lot; a trivially constant
        # output would make the parity check meaningless.
        assert ref.std() > 0.1
        if log_probs:
            ours, ref = ours.log_softmax(-1), ref.log_softmax(-1)
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny checkpoints for the architecture and pair-check tests, built once per module."""
    root = tmp_path_factory.mktemp("models")
    extra = ("banana", "kite")
    return {
        "mistral": make_tiny_checkpoint(root / "mistral", arch="mistral"),
        "gemma": make_tiny_checkpoint(root / "gemma", arch="gemma"),
        "llama_seed1": make_tiny_checkpoint(root / "llama_seed1", arch="llama", seed=1),
        "llama_d32": make_tiny_checkpoint(root / "llama_d32", arch="llama", d_model=32),
        "llama_reversed": make_tiny_checkpoint(
            root / "llama_reversed", arch="llama", words=tuple(reversed(DEFAULT_WORDS))
        ),
        "llama_extended": make_tiny_checkpoint(
            root / "llama_extended", arch="llama", words=(*DEFAULT_WORDS, *extra)
        ),
    }


# --------------------------------------------------------------------------- loading


def test_local_llama_matches_hf_and_is_set_up(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu", dtype="float32")
    _assert_matches_hf(model, tiny_llama_dir)

    info = model.boxprobe_info
    assert info.source == "local" and info.weight_mode == "raw"
    assert info.path_or_id == str(tiny_llama_dir.resolve())
    assert re.fullmatch(r"[0-9a-f]{12}", info.revision)
    assert info.revision == checkpoint_fingerprint(tiny_llama_dir)
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.prompt_format is None and info.metadata == {}
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 64 and model.cfg.n_heads == 4
    assert model_context_length(model) == 256
    assert model.tokenizer.padding_side == "left"
    assert model.tokenizer.pad_token == "<pad>"
    assert next(model.parameters()).dtype == torch.float32


def test_left_padded_batch_matches_hf_and_unpadded(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), device="cpu", dtype=torch.float32)
    batch = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    assert (tokens[:, -1] != model.tokenizer.pad_token_id).all()  # left padding
    assert (mask == 0).any()
    with torch.inference_mode():
        ours = model(tokens, attention_mask=mask)
        singles = [model(model.to_tokens(p))[0, -1] for p in PROMPTS]
    torch.testing.assert_close(ours, _hf_logits(tiny_llama_dir, tokens, mask), atol=1e-4, rtol=0)
    # Rotary attention only sees relative positions, so padding must not move the last logits.
    torch.testing.assert_close(ours[:, -1], torch.stack(singles), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "gemma"])
def test_other_architectures_match_hf(tiny_dirs, arch):
    model = load_model(tiny_dirs[arch], device="cpu", dtype="float32")
    assert model.cfg.architecture == f"{arch.capitalize()}ForCausalLM"
    _assert_matches_hf(model, tiny_dirs[arch])


def test_compatibility_mode_matches_hf_log_probs(tiny_llama_dir):
    raw = load_model(tiny_llama_dir, device="cpu", dtype="float32")
    compat = load_model(tiny_llama_dir, device="cpu", dtype="float32", compatibility_mode=True)
    assert compat.boxprobe_info.weight_mode == "compatibility"
    assert raw.boxprobe_info.weight_mode == "raw"
    # Centred unembedding shifts each position's logits by a constant: log-probs still match.
    _assert_matches_hf(compat, tiny_llama_dir, log_probs=True)
    tokens = raw.to_tokens(PROMPTS[0])
    with torch.inference_mode():
        assert (raw(tokens) - compat(tokens)).abs().max() > 1e-3  # weights really processed


def test_metadata_is_recorded(tmp_path):
    path = make_tiny_checkpoint(
        tmp_path / "ckpt", metadata={"prompt_format": "per-box", "template": "toy"}
    )
    assert read_checkpoint_metadata(path) == {"prompt_format": "per-box", "template": "toy"}
    info = load_model(path, device="cpu").boxprobe_info
    assert info.prompt_format == "per-box" and info.metadata["template"] == "toy"


def test_read_checkpoint_metadata_absent_and_malformed(tmp_path):
    assert read_checkpoint_metadata(tmp_path) == {}
    (tmp_path / "boxprobe.json").write_text('{"prompt_format": "per-box",\n  oops}')
    with pytest.raises(ModelLoadError, match=r"boxprobe\.json.*line 2"):
        read_checkpoint_metadata(tmp_path)
    (tmp_path / "boxprobe.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        read_checkpoint_metadata(tmp_path)


def test_fingerprint_tracks_weights(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=0)
    b = make_tiny_checkpoint(tmp_path / "b", seed=0)
    c = make_tiny_checkpoint(tmp_path / "c", seed=3)
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b)
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(c)


def test_device_and_dtype_defaults():
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype(None, "cuda:1") == torch.bfloat16
    for name, dt in [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                     ("float16", torch.float16), (torch.float16, torch.float16)]:
        assert resolve_dtype(name, "cpu") == dt
    with pytest.raises(ModelLoadError, match="float32, bfloat16, float16"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ModelLoadError, match="invalid device 'gpu0'"):
        resolve_device("gpu0")


def test_cuda_device_without_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ModelLoadError, match="CUDA is not available on this machine"):
            resolve_device(device)
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ModelLoadError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


# ---------------------------------------------------------------------------- errors


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    # An empty cache makes the "not cached" branch deterministic even on machines that
    # happen to hold some of these models.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_unknown_hub_id_offline(empty_hf_cache):
    with pytest.raises(ModelLoadError) as err:
        load_model("boxprobe-tests/no-such-model", device="cpu")
    msg = str(err.value)
    assert "'boxprobe-tests/no-such-model'" in msg
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "download it first" in msg.lower() and "checkpoint directory" in msg


def test_registry_name_offline_names_hf_id(empty_hf_cache):
    with pytest.raises(ModelLoadError, match=r"'CodeLlama-7b' \(codellama/CodeLlama-7b-hf\)"):
        load_model("CodeLlama-7b", device="cpu")


def test_missing_directory(tmp_path):
    missing = tmp_path / "runs" / "nope"
    for name in (missing, str(missing), "./does/not/exist"):
        with pytest.raises(ModelLoadError, match="no checkpoint directory at") as err:
            load_model(name, device="cpu")
        assert str(name) in str(err.value)


def test_directory_without_config_or_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="has no config.json") as err:
        load_model(tmp_path, device="cpu")
    assert str(tmp_path) in str(err.value) and "save_pretrained" in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "notes.txt", device="cpu")


# ------------------------------------------------------------------------ pair checks


def test_same_family_pair_passes(tiny_llama_dir, tiny_dirs):
    a = load_model(tiny_llama_dir, device="cpu")
    b = load_model(tiny_dirs["llama_seed1"], device="cpu")
    assert compare_models(a, b) == []
    check_same_family(a, b)


def test_different_d_model_raises(tiny_llama_dir, tiny_dirs):
    a = load_model(tiny_llama_dir, device="cpu")
    b = load_model(tiny_dirs["llama_d32"], device="cpu")
    with pytest.raises(ModelMismatchError, match="d_model: .* has 64, .* has 32") as err:
        check_same_family(a, b)
    assert "d_head" in str(err.value)  # every difference is listed, not just the first
    assert "architecture" not in str(err.value)


def test_different_tokenizer_raises(tiny_llama_dir, tiny_dirs):
    a = load_model(tiny_llama_dir, device="cpu")
    b = load_model(tiny_dirs["llama_reversed"], device="cpu")
    diffs = compare_models(a, b)
    assert any("shared tokens have different ids" in d for d in diffs)
    assert any("tokenizes to" in d for d in diffs)
    with pytest.raises(ModelMismatchError, match="tokenizer"):
        check_same_family(a, b)


def test_vocab_extension_is_tolerated_only_when_allowed(tiny_llama_dir, tiny_dirs):
    a = load_model(tiny_llama_dir, device="cpu")
    b = load_model(tiny_dirs["llama_extended"], device="cpu")
    assert b.cfg.d_vocab == a.cfg.d_vocab + 2
    check_same_family(a, b)  # like Llama-2-7b vs CodeLlama-7b
    with pytest.raises(ModelMismatchError) as err:
        check_same_family(a, b, allow_vocab_extension=False)
    assert "d_vocab" in str(err.value) and "2 only in" in str(err.value)


def test_different_architecture_raises(tiny_llama_dir, tiny_dirs):
    a = load_model(tiny_llama_dir, device="cpu")
    b = load_model(tiny_dirs["mistral"], device="cpu")
    diffs = compare_models(a, b)
    assert any(d.startswith("architecture:") and "MistralForCausalLM" in d for d in diffs)
    assert any(d.startswith("n_key_value_heads:") for d in diffs)


# --------------------------------------------------------------------------- registry


def test_registry_paper_figures():
    assert registry.PAPER_ACCURACY["CodeLlama-7b"][0] == 90.87
    assert registry.PAPER_ACCURACY["Llama-2-7b"][0] == 65.54
    assert registry.PAPER_ACCURACY[registry.RANDOM_BASELINE][0] == 41.06
    assert set(registry.PAPER_ACCURACY) == set(registry.REGISTRY) | {registry.RANDOM_BASELINE}
    for name, accs in registry.PAPER_ACCURACY.items():
        assert len(accs) == 8, name
        assert all(0.0 <= a <= 100.0 for a in accs), name
    hf_ids = [s.hf_id for s in registry.REGISTRY.values()]
    assert len(set(hf_ids)) == len(hf_ids)
    assert all(name == spec.name for name, spec in registry.REGISTRY.items())


def test_registry_pairs_are_consistent():
    assert len(registry.pairs("code")) == 5
    assert len(registry.pairs("math")) == 5
    assert len(registry.pairs("alignment")) == 11
    assert registry.pairs() == registry.MODEL_PAIRS
    for comparison, base, treated in registry.MODEL_PAIRS:
        assert base in registry.REGISTRY and treated in registry.REGISTRY
        # Cross-model patching needs both halves of a pair to share an architecture.
        assert registry.REGISTRY[base].architecture == registry.REGISTRY[treated].architecture
        expected = {"code": "code", "math": "math", "alignment": "aligned"}[comparison]
        assert registry.REGISTRY[treated].training == expected
    with pytest.raises(ValueError, match="code, math, alignment"):
        registry.pairs("vision")


def test_resolve_model_name_and_frame():
    assert registry.resolve_model_name("CodeLlama-7b") == "codellama/CodeLlama-7b-hf"
    assert registry.resolve_model_name("gpt2") == "gpt2"
    assert registry.resolve_model_name("/tmp/ckpt") == "/tmp/ckpt"
    frame = registry.paper_accuracy_frame()
    assert list(frame.columns) == ["model", "hf_id", "numops", "accuracy", "source"]
    assert len(frame) == 8 * len(registry.PAPER_ACCURACY)
    row = frame[(frame.model == "CodeLlama-7b") & (frame.numops == 0)]
    assert row.accuracy.item() == pytest.approx(0.9087)
    assert row.hf_id.item() == "codellama/CodeLlama-7b-hf"
    assert frame[frame.model == registry.RANDOM_BASELINE].hf_id.isna().all()
    assert frame.accuracy.between(0, 1).all()
    assert frame.source.str.contains("2405.21068").all()



def test_random_init_keeps_architecture_and_tokenizer_but_not_weights(tiny_llama_dir):
    from boxprobe.models.loading import load_model, model_info

    trained = load_model(tiny_llama_dir)
    fresh = load_model(tiny_llama_dir, random_init=True, seed=1)
    again = load_model(tiny_llama_dir, random_init=True, seed=1)
    assert compare_models(trained, fresh) == []
    tokens = trained.to_tokens("Box 0 contains the apple")
    with torch.inference_mode():
        a, b, c = trained(tokens), fresh(tokens), again(tokens)
    assert not torch.allclose(a, b, atol=1e-3)
    torch.testing.assert_close(b, c)
    assert "random init" in model_info(fresh).name and model_info(fresh).revision != model_info(trained).revision


# --------------------------------------------------------------------------- identity


def test_model_id_tells_apart_checkpoints_with_the_same_directory_name(tmp_path, monkeypatch):
    from boxprobe.models.loading import ModelInfo, model_id

    a = load_model(make_tiny_checkpoint(tmp_path / "a" / "ckpt", seed=0), device="cpu")
    b = load_model(make_tiny_checkpoint(tmp_path / "b" / "ckpt", seed=1), device="cpu")
    same_as_a = load_model(make_tiny_checkpoint(tmp_path / "c" / "ckpt", seed=0), device="cpu")
    ids = model_id(a), model_id(b), model_id(same_as_a)
    assert ids[0] != ids[1]  # same base name, different weights
    assert ids[0] == ids[2]  # content-addressed: identical checkpoints share an id
    assert all(re.fullmatch(r"ckpt@[0-9a-f]{12}", i) for i in ids)
    assert a.boxprobe_info.model_id == ids[0]
    monkeypatch.chdir(tmp_path / "b")
    assert model_id(load_model("./ckpt", device="cpu")) == ids[1]  # relative path, same id
    fresh = load_model(tmp_path / "a" / "ckpt", device="cpu", random_init=True, seed=3)
    assert model_id(fresh) == f"ckpt@random-init-3-of-{ids[0].split('@')[1]}"

    hub = ModelInfo(name="CodeLlama-7b", source="hub", path_or_id="codellama/CodeLlama-7b-hf",
                    revision="3773f63b4511b9e47a9a7ffc765eed7eb0169486", weight_mode="raw",
                    prompt_format=None, device="cpu", dtype="float32")
    assert hub.model_id == "codellama--CodeLlama-7b-hf@3773f63b4511"
    del a.boxprobe_info
    with pytest.raises(ValueError, match="load_model"):
        model_id(a)


# --------------------------------------------------------------------------- placement


def test_device_map_with_disk_offload_matches_single_device(tiny_llama_dir, tmp_path):
    single = load_model(tiny_llama_dir, device="cpu", dtype="float32")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
    offload = tmp_path / "offload"
    split = load_model(tiny_llama_dir, dtype="float32", device_map=device_map, offload_folder=offload)
    # Disk entries stay as meta placeholders, read per call from the checkpoint's safetensors file
    # (transformers reads safetensors in place, so offload_folder stays empty).
    devices = {n: p.device.type for n, p in split.original_model.named_parameters()}
    assert {d for n, d in devices.items() if "layers.1." in n or "lm_head" in n} == {"meta"}
    assert {d for n, d in devices.items() if "layers.0." in n} == {"cpu"}
    info = split.boxprobe_info
    assert info.device_map == device_map and info.device == "cpu" and info.n_devices == 2
    hooks = ["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post", "ln_final.hook_normalized"]
    for prompt in PROMPTS[:2]:
        tokens = single.to_tokens(prompt)
        with torch.inference_mode():
            ref, ref_cache = single.run_with_cache(tokens, names_filter=hooks)
            out, cache = split.run_with_cache(tokens, names_filter=hooks)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        for hook in hooks:  # hooks inside offloaded blocks still fire with the right values
            torch.testing.assert_close(cache[hook], ref_cache[hook], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="cpu", device_map="auto"), "mutually exclusive"),
        (dict(max_memory={"cpu": "1GiB"}), "max_memory only applies"),
        (dict(device_map={"model": 0, "lm_head": "cpu"}), "mixes accelerators"),
        (dict(device_map={"model": "meta", "lm_head": "cpu"}), "meta"),
        (dict(device_map="auto", random_init=True), "random_init"),
        (dict(n_devices=0), "at least 1"),
    ],
)
def test_placement_errors(tiny_llama_dir, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(tiny_llama_dir, **kwargs)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than two CUDA devices")
def test_n_devices_without_enough_gpus(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="n_devices=2 needs 2 CUDA devices"):
        load_model(tiny_llama_dir, n_devices=2)


def test_compatibility_mode_with_disk_offload_is_a_clear_error(tiny_llama_dir, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                  "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(ModelLoadError, match="without compatibility_mode"):
        load_model(tiny_llama_dir, device_map=device_map, offload_folder=tmp_path, compatibility_mode=True)
