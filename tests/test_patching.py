"""Counterfactual pairs, activation / path patching, faithfulness and CMAP on tiny toy-tokenizer Llamas.

Batched results are checked against ``transformer_lens.patching`` (equal-length, unpadded pairs) and
against a plain one-patch-per-forward reference with an attention mask (padded pairs); path patching on
hand-edited weights where the answer is known.
"""

import logging
import re
from types import SimpleNamespace
from collections import Counter

import pytest
import torch
import transformer_lens.patching as tlp
from tokenizers import pre_tokenizers

from boxprobe.causal import engine
from boxprobe.causal import patching as P
from boxprobe.causal.path import path_patch
from boxprobe.models.loading import load_model
from boxprobe.data.pairs import PAIR_KINDS, build_pairs, collate_pairs
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from boxprobe.models.toy import build_tokenizer
from boxprobe.data.queries import prepare, resolve_spec
from helpers import make_toy_checkpoint

CFG = TaskConfig(num_boxes=4, num_samples=6, num_operations=1, seed=3)
ATOL = 1e-5


def toy_checkpoint(path, d_model=64, seed=0):
    """A 2-layer, 4-head Llama with the toy tokenizer; weights widened so logits differ clearly."""
    make_toy_checkpoint(path, d_model=d_model, seed=seed, init_std=0.2)
    return path


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


@pytest.fixture(scope="module")
def model(toy_dir):
    return load_model(toy_dir, device="cpu")


@pytest.fixture(scope="module")
def examples():
    return [e for s in generate_sequences(CFG) for e in sequence_examples(s, CFG)]


def pairs_of(model, examples, kind, template=None, **kw):
    return build_pairs(model, prepare(model, examples, resolve_spec(model, template)), kind, **kw)


def bare(tokenizer):
    """Just a tokenizer and a context length: what pairs need of a model."""
    return SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(n_ctx=1024))


def same_length(pairs, n):
    length, _ = Counter(len(p.clean_ids) for p in pairs).most_common(1)[0]
    return [p for p in pairs if len(p.clean_ids) == length][:n]


@pytest.fixture(scope="module")
def flat_batch(model, examples):
    """Equal-length object-value pairs: no padding, so TransformerLens can run them too."""
    pairs, _ = pairs_of(model, examples, "object-value")
    return collate_pairs(same_length(pairs, 3), model.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def padded_batch(model, examples):
    pairs, _ = pairs_of(model, examples, "query-box")
    by_length = {len(p.clean_ids): p for p in pairs}
    batch = collate_pairs(list(by_length.values())[:3], model.tokenizer.pad_token_id)
    assert batch.attention_mask is not None and len(set(batch.pad.tolist())) == 3
    return batch


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def values(frame, *shape):
    return torch.tensor(frame["value"].to_numpy(), dtype=torch.float32).reshape(*shape)


# -- pairs ----------------------------------------------------------------------------------------------


def first_words(answer):
    return re.findall(r"\w+", answer)


@pytest.mark.parametrize("kind", [k for k in PAIR_KINDS if k != "random-query"])  # see test_circuit.py
def test_pairs_are_equal_length_and_differ_in_first_answer_token(model, examples, kind):
    tok = model.tokenizer
    pairs, stats = pairs_of(model, examples, kind, seed=1)
    assert stats.n_pairs == len(pairs) > len(examples) // 3
    assert stats.n_examples == stats.n_pairs + sum(stats.rejected.values())
    for p in pairs:
        assert len(p.clean_ids) == len(p.corrupt_ids)
        assert p.clean_ids == tuple(tok(p.clean.prompt)["input_ids"])
        assert p.clean_token != p.corrupt_token
        # The answer token is the first word after the shared prefix: an object name or "nothing".
        n_shared = len(first_words(p.answer_prefix))
        assert p.answer_prefix in ("", " the") and p.clean.prompt.endswith(p.answer_prefix)
        assert tok.decode([p.clean_token]).strip() == first_words(p.clean_answer)[n_shared]
        assert tok.decode([p.corrupt_token]).strip() == first_words(p.corrupt_answer)[n_shared]
        for ids, table in ((p.clean_ids, p.clean_positions), (p.corrupt_ids, p.corrupt_positions)):
            assert table.loc[table["role"] == "query_last", "token_index"].item() == len(ids) - 1
        clean_ex, corrupt_ex = p.clean.examples[0], p.corrupt.examples[0]
        if kind == "query-box":
            assert clean_ex.context == corrupt_ex.context and clean_ex.box != corrupt_ex.box
        elif kind == "object-value":
            swapped = re.findall(r"the (\w+)", corrupt_ex.gold)
            assert swapped and not set(swapped) & set(re.findall(r"\w+", p.clean.prompt))
            mentions = lambda t: t[t["role"] == "box_mention"]["token_index"].tolist()  # noqa: E731
            assert mentions(p.clean_positions) == mentions(p.corrupt_positions)
            differ = [i for i, (a, b) in enumerate(zip(p.clean_ids, p.corrupt_ids)) if a != b]
            objects = set(p.corrupt_positions.loc[p.corrupt_positions["object"].isin(swapped), "token_index"])
            assert set(differ) <= objects
        elif kind == "positional":
            clauses = lambda ex: ex.context.split(".")[0].split(", ")  # noqa: E731
            assert sorted(clauses(clean_ex)) == sorted(clauses(corrupt_ex))
            assert clauses(corrupt_ex) != clauses(clean_ex)
            label = clean_ex.statement_prefix.removesuffix(" contains")
            here = next(i for i, c in enumerate(clauses(clean_ex)) if label in c)
            assert label not in clauses(corrupt_ex)[here]
            assert corrupt_ex.gold == clean_ex.gold  # the true answer stays; the metric's token is the moved one
        else:
            label = corrupt_ex.statement_prefix.removesuffix(" contains")
            assert label not in p.clean.prompt and p.corrupt_answer == " nothing."
    again, _ = pairs_of(model, examples, kind, seed=1)
    assert [p.corrupt.prompt for p in again] == [p.corrupt.prompt for p in pairs]


def test_length_mismatch_is_rejected_counted_and_logged(caplog):
    cfg = TaskConfig(num_boxes=10, num_samples=2, num_operations=0, seed=0)
    examples = [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)]
    tok = build_tokenizer()  # digits split one by one: every unused label ("Box 10".."Box 19") is one token longer
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [tok.backend_tokenizer.pre_tokenizer, pre_tokenizers.Digits(individual_digits=True)])
    with caplog.at_level(logging.WARNING, logger="boxprobe.data.pairs"):
        pairs, stats = pairs_of(bare(tok), examples, "random-label", "toy")
    empty = sum(e.gold == "nothing" for e in examples)
    assert pairs == [] and stats.rejected["length"] == len(examples) - empty > 0
    assert stats.rejected["same_answer"] == empty
    assert any("different lengths" in r.message for r in caplog.records)
    # The word-level toy tokenizer has no "10".."19": the labels are unknown words, rejected as such.
    none, unknown = pairs_of(bare(build_tokenizer()), examples, "random-label", "toy")
    assert none == [] and unknown.rejected["length"] == 0
    assert unknown.rejected["tokenization"] == len(examples) - empty


def test_collate_pads_left_and_positions_follow(padded_batch):
    b = padded_batch
    for i, p in enumerate(b.pairs):
        pad = int(b.pad[i])
        assert b.attention_mask[i, :pad].sum() == 0 and b.attention_mask[i, pad:].all()
        assert b.clean_tokens[i, pad:].tolist() == list(p.clean_ids)
        for role in ("query_last", "query_box", "box_mention"):
            pos = int(b.positions(role)[i])
            t = p.clean_positions
            assert pos - pad in t.loc[t["role"] == role, "token_index"].tolist()
    assert (b.positions("query_last") == b.n_pos - 1).all() and (b.positions(-1) == b.n_pos - 1).all()


# -- activation patching ----------------------------------------------------------------------------------


def tl_metric(batch):
    return lambda logits: P.normalised_logit_diff(logits, batch).mean()


def test_matches_transformer_lens_on_unpadded_pairs(model, flat_batch):
    b = P.with_baselines(model, flat_batch)
    assert b.attention_mask is None
    L, H, n_pos = model.cfg.n_layers, model.cfg.n_heads, b.n_pos
    with torch.inference_mode():
        _, cache = model.run_with_cache(b.clean_tokens)
        ref_resid = tlp.get_act_patch_resid_pre(model, b.corrupt_tokens, cache, tl_metric(b))
        ref_all = tlp.get_act_patch_attn_head_out_all_pos(model, b.corrupt_tokens, cache, tl_metric(b))
        ref_by_pos = tlp.get_act_patch_attn_head_out_by_pos(model, b.corrupt_tokens, cache, tl_metric(b))
    resid = P.patch_resid_pre(model, b, progress=False)
    assert list(resid.columns) == ["model", "layer", "token", "position_role", "position_index", "metric", "value",
                                   "ci_low", "ci_high", "n_pairs", "n_contexts"]
    assert resid["position_index"].dtype.kind == "i" and set(resid["position_role"]) == {""}
    assert resid["metric"].unique().tolist() == ["normalised_logit_diff"]
    assert torch.allclose(values(resid, L, n_pos), ref_resid, atol=ATOL)
    assert ref_resid.abs().max() > 0.5  # the comparison is not of zeros
    heads = P.patch_heads(model, b, progress=False)
    assert {"layer", "head_index", "position_role", "position_index", "value"} <= set(heads.columns)
    assert "head" not in heads.columns and (heads["position_role"] == "all").all()
    assert torch.allclose(values(heads, L, H), ref_all, atol=ATOL)
    by_pos = P.patch_heads(model, b, positions="each", progress=False, max_batch=40)
    assert torch.allclose(values(by_pos, L, n_pos, H), ref_by_pos, atol=ATOL)
    # Starting each site at its patched layer (on by default for unpadded batches) is exact too.
    for kv, skip in ((True, True), (True, False), (False, True)):  # layer skip also works without the cache
        again = P.patch_resid_pre(model, b, progress=False, kv_prefix=kv, skip_layers=skip)
        assert torch.allclose(values(again, L, n_pos), ref_resid, atol=ATOL)
    # Without shortcuts (every site over every position, no cache) the numbers are the same.
    plain = P.patch_resid_pre(model, b, progress=False, shortcuts=False)
    assert torch.allclose(values(plain, L, n_pos), ref_resid, atol=ATOL)


def reference_patch(model, batch, hook, pos, heads=None):
    """One forward per site: the corrupt run with the clean activation copied in, attention mask passed."""
    b = P.with_baselines(model, batch)
    with torch.inference_mode():
        _, cache = model.run_with_cache(b.clean_tokens, attention_mask=b.attention_mask, names_filter=[hook])
        rows = torch.arange(len(b))

        def copy(act, hook):
            idx = (rows, pos) if heads is None else (rows, pos, heads)
            act[idx] = cache[hook.name][idx]
            return act

        with model.hooks(fwd_hooks=[(hook, copy)]):
            return P.normalised_logit_diff(model(b.corrupt_tokens, attention_mask=b.attention_mask), b).mean().item()


def test_padded_batches_match_one_site_per_forward(model, padded_batch):
    b = padded_batch
    resid = P.patch_resid_pre(model, b, progress=False)
    uncached = P.patch_resid_pre(model, b, progress=False, kv_prefix=False, max_batch=7)
    assert torch.allclose(values(resid, -1), values(uncached, -1), atol=ATOL)
    blocks_run = []  # blocks computed: skip_blocks shadows a skipped block's forward with a pass-through
    inner = type(model.blocks[0].original_component)
    real = inner.forward

    def counting(self, *args, **kw):
        blocks_run.append(1)
        return real(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:  # without the cache, sites still start at their layer
        mp.setattr(inner, "forward", counting)
        skipped = P.patch_resid_pre(model, b, progress=False, kv_prefix=False, skip_layers=True, max_batch=7)
        n_skipped, blocks_run[:] = len(blocks_run), []
        full = P.patch_resid_pre(model, b, progress=False, kv_prefix=False, skip_layers=False, max_batch=7)
    assert torch.allclose(values(skipped, -1), values(full, -1), atol=ATOL) and n_skipped < len(blocks_run)
    for layer in range(model.cfg.n_layers):
        for p in range(b.n_pos):
            got = resid[(resid["layer"] == layer) & (resid["position_index"] == p)]["value"].item()
            want = reference_patch(model, b, f"blocks.{layer}.hook_resid_pre", torch.full((len(b),), p))
            assert got == pytest.approx(want, abs=ATOL)
    for p, label in enumerate(resid.loc[resid["layer"] == 0, "token"]):
        clean, corrupt = set(b.clean_tokens[:, p].tolist()), set(b.corrupt_tokens[:, p].tolist())
        if len(clean) > 1 or len(corrupt) > 1:
            assert label == "*"
        else:
            words = [model.tokenizer.decode(list(t)) for t in (clean, corrupt)]
            assert label == (words[0] if clean == corrupt else "/".join(words))
    heads = P.patch_heads(model, b, positions="query_last", progress=False)
    for row in heads.itertuples():
        want = reference_patch(model, b, f"blocks.{row.layer}.attn.hook_z", b.positions("query_last"), row.head_index)
        assert row.value == pytest.approx(want, abs=ATOL)
    out = P.patch_layer_outputs(model, b, "mlp_out", positions=["all", "query_box"], progress=False)
    assert list(out["position_role"]) == ["all", "query_box"] * model.cfg.n_layers


@pytest.fixture(scope="module")
def padded_random_query(model, examples):
    """Random-query pairs (the default kind; contexts differ early) of three lengths: left-padded."""
    pairs, _ = pairs_of(model, examples, "random-query", correct_only=False, limit=None)
    by_length = {len(p.clean_ids): p for p in pairs}
    batch = collate_pairs(list(by_length.values())[:3], model.tokenizer.pad_token_id)
    assert batch.attention_mask is not None and len(set(batch.pad.tolist())) > 1
    return batch


def test_shortcuts_on_padded_random_query_pairs(model, padded_random_query, caplog, monkeypatch):
    """Layer skip (from the target's residual, blocks below not run), position skip (key-value prefix) and
    the last-position read, on a left-padded batch: equal to one forward per site and to no shortcuts."""
    b = padded_random_query
    calls, layer_class = Counter(), type(model.blocks[0].original_component)
    computed = layer_class.forward  # what runs when a block is computed, not passed through

    def counting(self, *args, **kwargs):
        calls[self.self_attn.layer_idx] += 1
        return computed(self, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", counting)
    with caplog.at_level(logging.WARNING):
        fast = P.patch_resid_pre(model, b, progress=False, kv_prefix=True, skip_layers=True, read_last=True)
    monkeypatch.undo()
    assert not [r for r in caplog.records if "shortcuts" in r.message]  # none was dropped as inexact
    plain = P.patch_resid_pre(model, b, progress=False, shortcuts=False)
    assert torch.allclose(values(fast, -1), values(plain, -1), atol=ATOL)
    assert values(plain, -1).abs().max() > 0.5
    for layer in range(model.cfg.n_layers):
        for p in (int(b.pad.max()) + 1, b.n_pos - 2):
            got = fast[(fast["layer"] == layer) & (fast["position_index"] == p)]["value"].item()
            want = reference_patch(model, b, f"blocks.{layer}.hook_resid_pre", torch.full((len(b),), p))
            assert got == pytest.approx(want, abs=ATOL)
    # Sites at block 1 start there: block 0 runs only in the unpatched passes and for block-0 sites.
    n_sites = [int(((fast["layer"] == l) & (fast["position_index"] >= 0)).sum()) for l in range(2)]
    assert calls[0] < calls[1] and n_sites[0] > 0
    # Some layer-0 sites change only some pairs (their tokens agree elsewhere): only those rows were run.
    name = "blocks.0.hook_resid_pre"
    with torch.inference_mode():
        _, clean = model.run_with_cache(b.clean_tokens, attention_mask=b.attention_mask, names_filter=[name])
        _, corrupt = model.run_with_cache(b.corrupt_tokens, attention_mask=b.attention_mask, names_filter=[name])
    differs = P.differences(clean[name], corrupt[name])
    partial_sites = [p for p in range(b.n_pos) if P._site_pairs(
        [P.copy_patch(name, clean[name], differs, torch.full((len(b),), p))], len(b)) is not None]
    assert partial_sites and any(P.copy_patch(name, clean[name], differs, torch.full((len(b),), p)).start is not None
                                 for p in partial_sites)
    # A patch after the last block's MLP input turns the last-position read off by itself, and stays exact.
    mlp = P.patch_layer_outputs(model, b, "mlp_out", positions=["all", -1], progress=False)
    mlp_plain = P.patch_layer_outputs(model, b, "mlp_out", positions=["all", -1], progress=False, shortcuts=False)
    assert torch.allclose(values(mlp, -1), values(mlp_plain, -1), atol=ATOL)
    assert no_hooks_left(model) and all("forward" not in blk.original_component.__dict__ for blk in model.blocks)


def test_position_ids_follow_the_bridge(model, padded_random_query):
    b = padded_random_query
    ids = P.position_ids(b.attention_mask)
    for i in range(len(b)):
        pad = int(b.pad[i])
        assert ids[i, pad:].tolist() == list(range(b.n_pos - pad))
    with torch.inference_mode():
        full = model(b.corrupt_tokens, attention_mask=b.attention_mask)
        _, cache = model.run_with_cache(b.corrupt_tokens, attention_mask=b.attention_mask,
                                        names_filter=["blocks.1.hook_resid_pre"])
        with P.skip_blocks(model, 1):
            resumed = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, attention_mask=b.attention_mask,
                            position_ids=ids)
    assert torch.allclose(resumed[:, -1], full[:, -1], atol=ATOL)


def test_skipped_blocks_come_back_after_an_exception(model, padded_batch):
    with pytest.raises(RuntimeError, match="boom"):
        with P.skip_blocks(model, 2):
            raise RuntimeError("boom")
    assert all("forward" not in blk.original_component.__dict__ for blk in model.blocks)


def test_plan_chunks_cover_each_site_once_within_a_layer():
    starts = [None, 3, 9, 4, 8, 0, 7, 7, 2]
    layer_of = [0, 0, 0, 1, 1, 1, 0, 1, 1]
    live = [i for i, s in enumerate(starts) if s is not None]
    rows = [2, 2, 2, 2, 1, 2, 2, 2, 5]
    chunks = P.plan_chunks(live, [s or 0 for s in starts], layer_of, rows, n_pos=10, n_layers=2, max_rows=4)
    assert sorted(i for c in chunks for i in c) == live
    assert all((sum(rows[i] for i in c) <= 4 or len(c) == 1) and len({layer_of[i] for i in c}) == 1 for c in chunks)
    # Far-apart starts are not merged when the wasted positions cost more than a forward.
    cost, engine.FORWARD_COST = engine.FORWARD_COST, 0
    try:
        alone = P.plan_chunks(live, [s or 0 for s in starts], layer_of, rows, 10, 2, 16)
    finally:
        engine.FORWARD_COST = cost
    assert all(len({starts[i] for i in c}) == 1 for c in alone)


def test_generic_loop_with_a_row_patched_inside_the_cached_prefix(model, padded_batch):
    """One site, per-row positions: row 0 at its BOS (equal in both prompts, before the cached prefix ends),
    the others at the queried label. Built from the public pieces: copy_patch + generic_patch."""
    b = P.with_baselines(model, padded_batch)
    pos = b.positions("query_box").clone()
    pos[0] = int(b.pad[0])
    name = "blocks.1.hook_resid_pre"
    with torch.inference_mode():
        _, clean = model.run_with_cache(b.clean_tokens, attention_mask=b.attention_mask, names_filter=[name])
        _, corrupt = model.run_with_cache(b.corrupt_tokens, attention_mask=b.attention_mask, names_filter=[name])
    patch = P.copy_patch(name, clean[name], P.differences(clean[name], corrupt[name]), pos)
    assert patch.start == int(pos[1:].min()) > int(pos[0])
    got = P.generic_patch(model, b, [[patch], []], {"v": P.normalised_logit_diff}, target="corrupt", kv_prefix=True,
                          progress=False)
    assert got.shape == (2, 1, len(b))  # per pair
    assert got[1, 0].mean().item() == pytest.approx(0.0, abs=ATOL)  # the empty site is the corrupt run
    assert got[0, 0].mean().item() == pytest.approx(reference_patch(model, b, name, pos), abs=ATOL)


def test_endpoints_and_direction(model, padded_batch):
    """Patching the whole residual stream at layer 0 runs the other prompt: 1 when denoising, 0 when noising."""
    kw = dict(layers=[0], positions="all", progress=False)
    assert P.patch_resid_pre(model, padded_batch, **kw)["value"].item() == pytest.approx(1.0, abs=ATOL)
    noised = P.patch_resid_pre(model, padded_batch, direction="noising", **kw)["value"].item()
    assert noised == pytest.approx(0.0, abs=ATOL)
    groups = P.patch_head_groups(model, padded_batch, {"none": [], "all": [(l, h) for l in range(2) for h in range(4)]},
                                 progress=False)
    assert groups.set_index("group").loc["none", "value"] == pytest.approx(0.0, abs=ATOL)
    with pytest.raises(ValueError, match="direction"):
        P.patch_resid_pre(model, padded_batch, direction="sideways", **kw)


def test_no_hook_survives_an_exception(model, padded_batch):
    clean = model(padded_batch.clean_tokens, attention_mask=padded_batch.attention_mask)
    calls = []

    def failing(logits, batch):
        calls.append(1)
        if len(calls) > 1:  # the unpatched run passes; the first patched forward fails
            raise RuntimeError("metric failed")
        return P.logit_diff(logits, batch)

    with pytest.raises(RuntimeError, match="metric failed"):
        P.patch_resid_pre(model, padded_batch, metric=failing, progress=False)
    assert no_hooks_left(model)
    calls.clear()
    with pytest.raises(RuntimeError, match="metric failed"):
        path_patch(model, padded_batch, "each", [(1, 0)], metric=failing, progress=False)
    assert no_hooks_left(model) and not model.cfg.use_split_qkv_input
    assert torch.equal(model(padded_batch.clean_tokens, attention_mask=padded_batch.attention_mask), clean)


# -- path patching ----------------------------------------------------------------------------------------


def hf_layer(model, layer):
    return model.original_model.model.layers[layer]


def test_path_patching_matches_transformer_lens_direct_path(model, flat_batch):
    b = P.with_baselines(model, flat_batch)
    with torch.inference_mode():
        _, clean = model.run_with_cache(b.clean_tokens)
        _, corrupt = model.run_with_cache(b.corrupt_tokens)
    for component in "qkv":
        with torch.inference_mode():
            ref = tlp.get_act_patch_direct_path(model, b.corrupt_tokens, clean, corrupt, tl_metric(b), 0, 1,
                                                component, verbose=False)
        for head in range(model.cfg.n_heads):
            got = path_patch(model, b, {"L0H1": [(0, 1)]}, [(1, head)], components=(component,), progress=False)
            assert got["value"].item() == pytest.approx(ref[1, head].item(), abs=ATOL)


def test_path_patching_constructed_cases(toy_dir, padded_batch):
    """Sender 0.1 writes nothing (W_O zero): every path effect is 0. Receiver 1.2 has W_Q = 0, so its
    attention is uniform whatever its input: via Q and K the effect is 0, via V it is the full effect,
    which equals patching the receiver's values recomputed by hand from RMSNorm(resid + sender delta)."""
    model = load_model(toy_dir, device="cpu")
    b = P.with_baselines(model, padded_batch)
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    with torch.no_grad():
        hf_layer(model, 0).self_attn.o_proj.weight[:, 1 * d_head:2 * d_head] = 0
        hf_layer(model, 1).self_attn.q_proj.weight[2 * d_head:3 * d_head] = 0
    b = P.with_baselines(model, b)
    corrupt = b.corrupt_logit_diff.mean().item()
    receivers = [(1, h) for h in range(n_heads)]
    zero_sender = path_patch(model, b, {"L0H1": [(0, 1)]}, receivers, metric=P.logit_diff, progress=False)
    assert zero_sender["value"].tolist() == pytest.approx([corrupt] * 3, abs=1e-6)

    out = path_patch(model, b, {"L0H3": [(0, 3)]}, [(1, 2)], metric=P.logit_diff, progress=False)
    via = dict(zip(out["component"], out["value"]))
    assert via["q"] == pytest.approx(corrupt, abs=1e-6) and via["k"] == pytest.approx(corrupt, abs=1e-6)
    assert abs(via["v"] - corrupt) > 1e-3

    with torch.inference_mode():
        names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"]
        _, clean = model.run_with_cache(b.clean_tokens, attention_mask=b.attention_mask, names_filter=names)
        _, cor = model.run_with_cache(b.corrupt_tokens, attention_mask=b.attention_mask, names_filter=names)
        pattern = cor["blocks.1.attn.hook_pattern"][:, 2, -1]  # receiver's last row: uniform over real tokens
        real = b.attention_mask.bool()
        assert torch.allclose(pattern[real], (1 / real.sum(1, keepdim=True)).expand_as(pattern)[real], atol=1e-6)
        attn = hf_layer(model, 1)
        w_o = hf_layer(model, 0).self_attn.o_proj.weight[:, 3 * d_head:4 * d_head]  # [d_model, d_head]
        delta = (clean["blocks.0.attn.hook_z"][:, :, 3] - cor["blocks.0.attn.hook_z"][:, :, 3]) @ w_o.T
        x = cor["blocks.1.hook_resid_pre"] + delta
        norm = attn.input_layernorm
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        v = (x @ attn.self_attn.v_proj.weight.T).reshape(*x.shape[:2], n_heads, d_head)

        def set_v(act, hook):
            act[:, :, 2] = v[:, :, 2]
            return act

        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_v", set_v)]):
            want = P.logit_diff(model(b.corrupt_tokens, attention_mask=b.attention_mask), b).mean().item()
    assert via["v"] == pytest.approx(want, abs=1e-5)
    assert no_hooks_left(model)


def test_patching_with_blocks_offloaded_to_disk_matches_one_device(toy_dir, model, padded_batch, flat_batch, tmp_path):
    """A device map that leaves block 1 and the final norm on disk (accelerate hooks load them per call) gives
    the single-device results: patches, the prefix cache and start-at-layer all meet blocks placed apart.
    (The toy model ties its unembedding to the embedding, so the two stay together.)"""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"}
    split = load_model(toy_dir, dtype="float32", device_map=device_map, offload_folder=tmp_path / "offload")
    assert {p.device.type for n, p in split.original_model.named_parameters() if "layers.1." in n} == {"meta"}
    for b in (padded_batch, flat_batch):
        for kw in ({}, {"kv_prefix": False}):
            want = P.patch_resid_pre(model, b, positions=["query_last", "all"], progress=False, **kw)
            got = P.patch_resid_pre(split, b, positions=["query_last", "all"], progress=False, **kw)
            assert torch.allclose(values(got, -1), values(want, -1), atol=ATOL)
        want = P.patch_heads(model, b, positions="query_last", progress=False)
        got = P.patch_heads(split, b, positions="query_last", progress=False)
        assert torch.allclose(values(got, -1), values(want, -1), atol=ATOL)
        assert values(want, -1).abs().max() > 0.1  # not a comparison of zeros
    assert no_hooks_left(split)


def test_kv_share_by_hand():
    # keys + values: 2 layers x 3 prompts x 2 x 4 heads x 8 = 384 per position; activations per row and position:
    # 4 x 32 (residual) + 2 x 128 (MLP) + 4 x 10 (scores) = 424, over 6 rows.
    cfg = SimpleNamespace(n_layers=2, n_heads=4, d_head=8, d_model=32, d_mlp=128)
    assert engine.kv_share(cfg, n_prompts=3, n_pos=10, rows=6) == pytest.approx(384 / (6 * 424))
    cfg.n_key_value_heads = 1  # grouped-query attention: a quarter of the keys and values
    assert engine.kv_share(cfg, n_prompts=3, n_pos=10, rows=6) == pytest.approx(96 / (6 * 424))


def test_kv_prefix_default_holds_the_cache_only_within_its_memory_share(model, padded_batch, monkeypatch):
    """By default the key-value prefix is used only where it adds at most KV_SHARE to a forward's memory;
    either way the numbers are the same."""
    asked = []
    monkeypatch.setattr(engine, "kv_cache_works", lambda *args: asked.append(1) or True)
    monkeypatch.setattr(engine, "KV_SHARE", 0.0)
    without = P.patch_resid_pre(model, padded_batch, progress=False)
    assert asked == []  # too large a share: not even tried
    monkeypatch.setattr(engine, "KV_SHARE", float("inf"))
    held = P.patch_resid_pre(model, padded_batch, progress=False)
    assert asked and torch.allclose(values(without, -1), values(held, -1), atol=ATOL)
