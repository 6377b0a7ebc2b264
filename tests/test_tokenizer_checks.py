"""Issue 13, section 3: tokenizers that would silently break prompts are refused or warned about."""

import dataclasses
import json
import logging
import shutil

import pytest

from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from boxprobe.errors import BoxprobeError
from boxprobe.models.loading import load_model

TOY = "assets/models/toy-base"


def test_a_tokenizer_without_pad_bos_eos_is_refused_with_the_fix(tmp_path):
    ckpt = tmp_path / "nospecial"
    shutil.copytree(TOY, ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        config.pop(key)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    # The checkpoint's own tokenizer is used (not the bridge's, which substituted '<|endoftext|>' -> <unk>).
    with pytest.raises(BoxprobeError, match=r"no pad, eos or bos token.*tokenizer_config\.json"):
        load_model(ckpt, device="cpu")


def test_unknown_words_are_counted_and_shown(caplog):
    model = load_model(TOY, device="cpu")
    cfg = TaskConfig(num_samples=2, num_operations=1, seed=0)
    examples = [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)][:7]
    word = next(w for w in ("bag", "book", "cup", "key", "ring", "stone") if f"the {w}" in examples[0].sentence)
    odd = [dataclasses.replace(e, **{f: getattr(e, f).replace(f"the {word}", "the bägel")
                                     for f in ("sentence", "sentence_masked", "masked_content")}) for e in examples]
    with caplog.at_level(logging.WARNING, logger="boxprobe.data.queries"):
        prepare(model, examples, resolve_spec(model))
    assert "unknown token" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="boxprobe.data.queries"):
        prepare(model, odd, resolve_spec(model))
    assert "7 of 7 queries hold" in caplog.text and "'bägel' x" in caplog.text


def test_a_truncated_weights_file_is_one_clear_error(tmp_path):
    ckpt = tmp_path / "truncated"
    shutil.copytree(TOY, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(BoxprobeError, match="truncated or damaged"):
        load_model(ckpt, device="cpu")
