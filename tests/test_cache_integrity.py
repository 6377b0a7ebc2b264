"""Issue 13, section 1: a damaged, truncated, missing or non-finite cache shard never reaches a result."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from boxprobe.activations.cache import MANIFEST, CacheConfig, build_cache, open_cache
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from boxprobe.errors import DataError
from boxprobe.models.loading import load_model
from helpers import make_toy_checkpoint

DATA = TaskConfig(num_boxes=3, num_samples=3, num_operations=2, seed=1)
CFG = CacheConfig(hooks=("resid_post",), roles=("query_last",), batch_size=4, shard_size=8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = make_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", d_mlp=64,
                                    metadata={"prompt_format": "per-box"})
    return load_model(directory, device="cpu")


@pytest.fixture(scope="module")
def queries(model):
    ex = [e for s in generate_sequences(DATA) for e in sequence_examples(s, DATA)][:20]
    return prepare(model, ex, resolve_spec(model, "toy"))


@pytest.fixture
def built(model, queries, tmp_path):
    reader = build_cache(model, queries, tmp_path, CFG, progress=False)
    return tmp_path, reader.activations("resid_post", "query_last").clone()


def test_manifest_records_checksums_and_rows(built):
    out, acts = built
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["shards"]) == ["0", "1", "2"]
    assert [r["rows"]["query_last"] for r in manifest["shards"].values()] == [8, 8, 4]
    assert all(len(r["sha256"]) == 64 for r in manifest["shards"].values())


def test_byte_flip_is_caught_named_and_rebuilt_on_rerun(model, queries, built, caplog):
    out, acts = built
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40  # a bit in the last activation: still a valid safetensors file
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.safetensors.*checksum.*--repair"):
        open_cache(out).activations("resid_post", "query_last")
    calls = []
    with caplog.at_level(logging.WARNING):
        reader = build_cache(model, queries, out, CFG, progress=False, on_batch=lambda k, b: calls.append(k))
    assert set(calls) == {1}  # only the damaged shard is recomputed
    assert "shard-00001.safetensors" in caplog.text
    assert torch.equal(reader.activations("resid_post", "query_last"), acts)


def test_deleted_shard_with_a_complete_manifest_is_an_error_then_rebuilt(model, queries, built):
    out, acts = built
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(DataError, match=r"shard-00002\.safetensors.*missing"):
        open_cache(out)
    reader = build_cache(model, queries, out, CFG, progress=False)
    assert torch.equal(reader.activations("resid_post", "query_last"), acts)


def test_truncated_shard_is_rebuilt(model, queries, built):
    out, acts = built
    shard = out / "shard-00000.jsonl"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(DataError, match="shard-00000"):
        open_cache(out).metadata("query_last")
    reader = build_cache(model, queries, out, CFG, progress=False)
    assert len(reader.metadata("query_last")) == len(queries)


def test_truncated_manifest_is_named_and_repair_rebuilds(model, queries, built):
    out, acts = built
    path = out / MANIFEST
    path.write_text(path.read_text()[:200])
    for call in (lambda: open_cache(out), lambda: build_cache(model, queries, out, CFG, progress=False)):
        with pytest.raises(DataError, match=r"manifest\.json is damaged.*--repair"):
            call()
    reader = build_cache(model, queries, out, CFG, progress=False, repair=True)
    assert torch.equal(reader.activations("resid_post", "query_last"), acts)


def test_row_count_mismatch_is_refused(built):
    out, acts = built
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"]["0"]["rows"]["query_last"] = 7
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 8 .*rows.*manifest 7"):
        open_cache(out).activations("resid_post", "query_last")


def test_non_finite_activations_name_model_layer_role_and_rows(built):
    out, acts = built
    shard = out / "shard-00001.safetensors"
    tensors = load_file(shard)
    tensors["resid_post/query_last"][3, 1, 5] = float("nan")
    save_file(tensors, shard, metadata={"shard": "1"})
    # Re-record the checksum, as if the model itself had produced the NaN.
    import hashlib
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"]["1"]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest))
    reader = open_cache(out)
    with pytest.raises(DataError, match=r"non-finite.*layer\(s\) \[1\], role query_last, 1 row\(s\) of shard 1 "
                                        r"\(query_index \[11\]\)"):
        reader.activations("resid_post", "query_last")
    assert reader.activations("blocks.0.hook_resid_post", "query_last").isfinite().all()  # other layers still read
