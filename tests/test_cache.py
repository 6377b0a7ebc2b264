"""Activation caches: positions under left padding, dtypes, manifests, hook hygiene and kill-and-resume."""

import json
import multiprocessing
import os
import signal

import pandas as pd
import pytest
import torch

import boxprobe.activations.cache as cache_mod
from boxprobe.activations.cache import (
    CacheConfig,
    CacheMismatchError,
    build_cache,
    open_cache,
    resolve_hooks,
)
from boxprobe.activations.packing import pack, packing_works
from boxprobe.config import ConfigError
from boxprobe.data.labels import query_labels
from boxprobe.models.loading import load_model
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from helpers import make_toy_checkpoint

DATA = TaskConfig(num_boxes=3, num_samples=4, num_operations=4, seed=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = make_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", d_mlp=64, metadata={"prompt_format": "per-box"})
    return load_model(directory, device="cpu")


def examples():
    return [e for s in generate_sequences(DATA) for e in sequence_examples(s, DATA)]


@pytest.fixture(scope="module")
def queries(model):
    ex = examples()
    # Interleave prefixes of different lengths so every batch is left-padded.
    order = torch.randperm(len(ex), generator=torch.Generator().manual_seed(0))[:40]
    return prepare(model, [ex[i] for i in order], resolve_spec(model, "toy"))


CFG = CacheConfig(hooks=("resid_post",), roles=("query_last", "box_mention"), batch_size=3, shard_size=8)


def hook_count(model):
    return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
            + sum(len(hp.fwd_hooks) for hp in model.hook_dict.values()))


def test_resolve_hooks(model):
    groups = resolve_hooks(model, ["resid_post", "blocks.*.hook_attn_out", "blocks.1.hook_mlp_out", "attn.hook_z",
                                   "hook_embed", "blocks.0.hook_resid_post"])
    by_name = {g.name: g for g in groups}
    assert by_name["resid_post"].hooks == ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    assert by_name["attn_out"].layers == (0, 1) and by_name["mlp_out"].layers == (1,)
    assert by_name["attn.z"].hooks[1] == "blocks.1.attn.hook_z" and by_name["embed"].layers == (-1,)
    with pytest.raises(ConfigError, match="resid_postt.*resid_post"):
        resolve_hooks(model, ["resid_postt"])
    with pytest.raises(ConfigError, match="per position"):
        resolve_hooks(model, ["attn.pattern"])


def test_config_validation():
    with pytest.raises(ConfigError, match="shardsize"):
        CacheConfig.from_dict({"shardsize": 3})
    with pytest.raises(ConfigError, match="ruin linear probes"):
        CacheConfig(dtype="int8")
    with pytest.raises(ConfigError, match="role"):
        CacheConfig(roles=("query_end",))
    assert CacheConfig.from_dict({"hooks": ["resid_post"], "dtype": "float16"}).hooks == ("resid_post",)


def test_batched_cache_equals_unbatched_run_with_cache(model, queries, tmp_path):
    cfg = CacheConfig(hooks=("resid_post", "attn.hook_z"), roles=("query_last", "box_mention"), batch_size=4,
                      shard_size=8, reuse_context=False)
    reader = build_cache(model, queries[:12], tmp_path, cfg, progress=False)
    lengths = [len(it.prompt) for it in queries[:4]]
    assert len(set(lengths)) > 1, "the first batch must need left padding"
    last, meta = reader.activations("resid_post", "query_last"), reader.metadata("query_last")
    boxes, bmeta = reader.activations("blocks.*.hook_resid_post", "box_mention"), reader.metadata("box_mention")
    z = reader.activations("attn.z", "query_last")
    assert last.shape == (12, 2, 32) and z.shape == (12, 2, 4, 8) and len(boxes) == len(bmeta)
    assert list(meta["query_index"]) == list(range(12))
    for i, q in enumerate(queries.queries[:12]):
        _, ref = model.run_with_cache(q.prompt, names_filter=lambda n: n.endswith(("hook_resid_post", "hook_z")))
        for layer in range(2):
            torch.testing.assert_close(last[i, layer], ref[f"blocks.{layer}.hook_resid_post"][0, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(z[i, layer], ref[f"blocks.{layer}.attn.hook_z"][0, -1], atol=1e-5, rtol=0)
        rows = bmeta[bmeta["query_index"] == i]
        expected = ref["blocks.1.hook_resid_post"][0, torch.tensor(rows["token_index"].to_numpy())]
        torch.testing.assert_close(boxes[torch.tensor(rows["item"].to_numpy()), 1], expected, atol=1e-5, rtol=0)
    # Per-shard iteration gives the same rows, and one explicit layer keeps its axis.
    assert torch.equal(torch.cat([a for a, _ in reader.iter_shards("resid_post", "query_last")]), last)
    assert torch.equal(reader.activations("blocks.1.hook_resid_post", "query_last")[:, 0], last[:, 1])
    assert meta.loc[3, "gold"] == query_labels(queries[3].query)["gold"] and meta.loc[3, "role"] == "query_last"


def test_prefix_reuse_matches_full_passes_and_answer_roles(model, tmp_path):
    """Each context's prefix once, packed with its queries' suffixes, gives the rows of one full pass per
    prompt, answer-prefix roles (in the teacher-forced gold) included; ``layers`` keeps only those blocks."""
    assert packing_works(model, examples_ids(model))
    # Consecutive queries of one context, so contexts share prefixes within batches.
    qs = prepare(model, examples()[:21], resolve_spec(model, "toy"))
    roles = ("query_last", "box_mention", "answer_prefix", "answer_object")
    shared = dict(hooks=("resid_post",), roles=roles, batch_size=7, shard_size=64)
    reused = build_cache(model, qs, tmp_path / "r", CacheConfig(**shared, layers=(1,)), progress=False)
    plain = build_cache(model, qs, tmp_path / "p", CacheConfig(**shared, reuse_context=False), progress=False)
    assert reused.layers("resid_post") == (1,) and plain.layers("resid_post") == (0, 1)
    for role in roles:
        a, b = reused.activations("resid_post", role), plain.activations("resid_post", role)
        assert len(a) and a.shape[1] == 1
        torch.testing.assert_close(a[:, 0], b[:, 1], atol=1e-4, rtol=0)
    meta = reused.metadata("answer_prefix")
    for row in meta.head(6).itertuples():
        ids = qs[row.query_index].ids
        assert model.tokenizer.convert_ids_to_tokens(ids[row.token_index]) == "the"
        _, ref = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == "blocks.1.hook_resid_post")
        torch.testing.assert_close(reused.activations("resid_post", "answer_prefix")[row.item, 0],
                                   ref["blocks.1.hook_resid_post"][0, row.token_index], atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="layers \\[5\\] do not exist"):
        build_cache(model, qs, tmp_path / "x", CacheConfig(**shared, layers=(5,)), progress=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes_roundtrip(model, queries, tmp_path, dtype):
    cfg = CacheConfig(hooks=("resid_post",), roles=("query_last",), dtype=dtype, batch_size=3, shard_size=4)
    reader = build_cache(model, queries[:6], tmp_path / "c", cfg, progress=False)
    acts = open_cache(tmp_path / "c").activations("resid_post", "query_last")
    assert acts.dtype == getattr(torch, dtype) and acts.shape == (6, 2, 32)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["dtype"] == dtype
    ref = build_cache(model, queries[:6], tmp_path / "f32", CacheConfig(roles=("query_last",), batch_size=3),
                      progress=False).activations("resid_post", "query_last")
    torch.testing.assert_close(acts.float(), ref, atol=0.02 * float(ref.abs().max()), rtol=0)
    assert reader.complete


def test_manifest_mismatch_is_refused(model, queries, tmp_path):
    build_cache(model, queries[:6], tmp_path, CFG, progress=False)
    for changed, field in [(dict(hooks=("attn_out",)), "hooks"), (dict(dtype="bfloat16"), "dtype"),
                           (dict(roles=("query_last",)), "roles"), (dict(layers=(0,)), "layers")]:
        with pytest.raises(CacheMismatchError, match=f"{field}.*(delete|another directory)"):
            build_cache(model, queries[:6], tmp_path, CacheConfig(**{**CFG.__dict__, **changed}), progress=False)
    with pytest.raises(CacheMismatchError, match="queries_sha256"):
        build_cache(model, queries[6:12], tmp_path, CFG, progress=False)
    other_spec = prepare(model, queries.examples[:6], resolve_spec(model, "toy", "all-boxes"))
    with pytest.raises(CacheMismatchError, match="spec: cached"):
        build_cache(model, other_spec, tmp_path, CFG, progress=False)
    with pytest.raises(CacheMismatchError, match="data_sha256"):
        build_cache(model, queries[:6], tmp_path, CFG, data_hash="0" * 64, progress=False)
    compat = load_model(model.boxprobe_info.path_or_id, device="cpu", compatibility_mode=True)
    with pytest.raises(CacheMismatchError, match="weight_mode: cached 'raw', requested 'compatibility'"):
        build_cache(compat, queries[:6], tmp_path, CFG, progress=False)
    # The same request reuses every shard without a forward pass.
    calls = []
    build_cache(model, queries[:6], tmp_path, CFG, progress=False, on_batch=lambda k, b: calls.append(k))
    assert calls == []


def test_no_hook_survives_an_exception(model, queries, tmp_path, monkeypatch):
    tokens = torch.tensor([queries[0].prompt])
    with torch.inference_mode():
        before = model(tokens)
    n_hooks = hook_count(model)
    real_gather, seen = cache_mod._gather, []

    def failing(*args):
        seen.append(1)
        if len(seen) == 2:  # in the middle of a forward pass, after one hook copied its rows
            raise RuntimeError("boom")
        return real_gather(*args)

    monkeypatch.setattr(cache_mod, "_gather", failing)
    with pytest.raises(RuntimeError, match="boom"):
        build_cache(model, queries[:6], tmp_path / "a", CFG, progress=False)
    assert hook_count(model) == n_hooks

    def interrupt(k, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_gather", real_gather)
    with pytest.raises(KeyboardInterrupt):
        build_cache(model, queries[:6], tmp_path / "b", CFG, progress=False, on_batch=interrupt)
    assert hook_count(model) == n_hooks
    with torch.inference_mode():
        assert torch.equal(model(tokens), before)


def examples_ids(model):
    return prepare(model, examples()[:1], resolve_spec(model, "toy"))[0].ids


def test_pack_lays_out_prefix_then_suffixes():
    """Hand-worked: prefix [5, 6], suffixes [7] and [8, 9]; a second row [1] + [2], padded."""
    p = pack([[5, 6], [1]], [[[7], [8, 9]], [[2]]], pad_id=0, device="cpu", dtype=torch.float32)
    assert p.ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert p.positions.tolist() == [[0, 1, 2, 2, 3], [0, 1, 0, 0, 0]]
    assert p.starts == [[2, 3], [1]]
    seen = (p.mask[:, 0] == 0).int().tolist()
    assert seen[0] == [[1, 0, 0, 0, 0],   # prefix: causal
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],   # suffix 1: prefix and itself
                       [1, 1, 0, 1, 0],   # suffix 2: prefix and itself, not suffix 1
                       [1, 1, 0, 1, 1]]
    assert seen[1][1] == [1, 1, 0, 0, 0] and seen[1][3] == [1, 0, 1, 1, 0]  # padding: the prefix and padding


def test_models_that_ignore_packing_cache_plain_prompts(model, queries, tmp_path, monkeypatch, caplog):
    """A model that would not honour the packed mask is detected, warned about, and cached prompt by prompt."""
    reference = build_cache(model, queries[:14], tmp_path / "a", CFG, progress=False)
    real_forward = type(model).forward

    def mask_ignored(self, *args, **kw):  # what a bridge that drops 4D masks and position ids computes
        if kw.get("attention_mask") is not None and kw["attention_mask"].dim() == 4:
            kw.pop("attention_mask"), kw.pop("position_ids", None)
        return real_forward(self, *args, **kw)

    monkeypatch.setattr(type(model), "forward", mask_ignored)
    assert not packing_works(model, queries[0].ids)
    with caplog.at_level("WARNING"):
        fallback = build_cache(model, queries[:14], tmp_path / "b", CFG, progress=False)
    assert "does not take packed prompts" in caplog.text
    for role in CFG.roles:
        torch.testing.assert_close(fallback.activations("resid_post", role), reference.activations("resid_post", role),
                                   atol=1e-4, rtol=0)


def test_description_roles_are_stored_once_per_context(model, queries, tmp_path):
    """Rows of the description's roles come once per context (under its first query), query roles once per query;
    a cache written before this (no ``context_rows`` in its manifest) is refused, not mixed."""
    qs = queries[:14]
    cfg = CacheConfig(hooks=("resid_post",), roles=("query_last", "box_mention"), batch_size=5, shard_size=8)
    reader = build_cache(model, qs, tmp_path / "c", cfg, progress=False)
    contexts = [q.query.examples[0].context for q in qs.items]
    firsts = {contexts.index(c) for c in contexts}
    assert 1 < len(firsts) < len(qs)  # several contexts, several queries each
    assert sorted(reader.metadata("query_last")["query_index"]) == list(range(len(qs)))
    mentions = reader.metadata("box_mention")
    assert set(mentions["query_index"]) == firsts
    pos = qs.positions
    per_query = pos[pos["role"] == "box_mention"].groupby("item").size()
    assert len(mentions) == sum(per_query[i] for i in firsts) < per_query.sum()
    for row in mentions.head(3).itertuples():  # each stored row is that query's own activation there
        _, ref = model.run_with_cache(torch.tensor([qs[row.query_index].ids]),
                                      names_filter=lambda n: n == "blocks.1.hook_resid_post")
        torch.testing.assert_close(reader.activations("resid_post", "box_mention")[row.Index, 1],
                                   ref["blocks.1.hook_resid_post"][0, row.token_index], atol=1e-4, rtol=0)
    manifest = tmp_path / "c" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["context_rows"]
    manifest.write_text(json.dumps(old))
    with pytest.raises(CacheMismatchError, match="context_rows"):
        build_cache(model, qs, tmp_path / "c", cfg, progress=False)


def _events(path):
    return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []


def test_killed_runs_resume_without_recomputing(model, queries, tmp_path):
    """SIGKILL a forked caching process at four points; the resumed cache equals an uninterrupted one."""
    reference = build_cache(model, queries, tmp_path / "ref", CFG, progress=False)
    out, log = tmp_path / "killed", tmp_path / "events.txt"

    def record(*event):
        with log.open("a") as f:
            f.write(" ".join(map(str, event)) + "\n")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def child(point):
        on_shard = lambda k: (record("written", k), point == "after_shard_0" and die())
        on_batch = lambda k, b: (record("batch", k), point == "mid_shard_2" and (k, b) == (2, 1) and die())
        if point == "writing_shard_3":
            real_write = cache_mod._write_file
            cache_mod._write_file = lambda path, data: (real_write(path, data),
                                                        "00003.safetensors" in path and die())
        if point == "renaming_shard_3":
            real_replace = cache_mod.os.replace
            cache_mod.os.replace = lambda a, b: (real_replace(a, b), str(b).endswith("00003.jsonl") and die())
        try:
            build_cache(model, queries, out, CFG, progress=False, on_batch=on_batch, on_shard=on_shard)
        finally:
            os._exit(3)  # never reached when killed; never run pytest's teardown in the child

    ctx = multiprocessing.get_context("fork")
    for point in ("after_shard_0", "mid_shard_2", "writing_shard_3", "renaming_shard_3"):
        proc = ctx.Process(target=child, args=(point,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL, point
        if point == "writing_shard_3":
            assert (out / "shard-00003.safetensors.tmp").exists()
        if point == "renaming_shard_3":
            assert (out / "shard-00003.jsonl").exists() and not (out / "shard-00003.safetensors").exists()
    assert json.loads((out / "manifest.json").read_text())["completed_shards"] == [0, 1, 2]
    leftovers = []

    def resumed_batch(k, b):
        record("batch", k)
        leftovers.append(sorted(p.name for p in out.glob("shard-00003*")))

    resumed = build_cache(model, queries, out, CFG, progress=False, on_batch=resumed_batch,
                          on_shard=lambda k: record("written", k))
    assert leftovers[0] == [], "the partial shard's files are discarded before it is recomputed"

    events = _events(log)
    written = [int(k) for kind, k in events if kind == "written"]
    assert sorted(written) == [0, 1, 2, 3, 4], "every shard is written exactly once"
    for i, (kind, k) in enumerate(events):  # no batch of a shard runs after that shard was written
        if kind == "written":
            assert ("batch", k) not in events[i + 1:]
    assert not list(out.glob("*.tmp")) and resumed.complete and resumed.manifest["n_items"] == len(queries)
    for role in CFG.roles:
        torch.testing.assert_close(resumed.activations("resid_post", role), reference.activations("resid_post", role))
        pd.testing.assert_frame_equal(resumed.metadata(role), reference.metadata(role))
