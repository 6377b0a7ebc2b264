"""Prakash-style circuit work: random-query pairs, path patching variants against brute-force hooks,
grouped-query k/v receivers, circuit discovery on a planted head, faithfulness against hand-made
ablations, long CMAP, clustered intervals and the ``boxprobe circuit`` command."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from boxprobe.causal import patching as P
from boxprobe.causal.circuit import Circuit, CircuitConfig, discover_circuit
from boxprobe.causal.cmap import METRICS, cross_model_patch
from boxprobe.causal.faithfulness import evaluate_circuit, evaluate_head_sets
from boxprobe.causal.path import kv_head, path_patch
from boxprobe.causal.stats import clustered_bootstrap
from boxprobe.data.counterfactual import context_key
from boxprobe.data.pairs import build_pairs, collate_pairs
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from boxprobe.models.compare import ModelMismatchError
from boxprobe.models.loading import BUNDLED_MODELS_DIR, load_model, model_id
from boxprobe.errors import ArgumentError
from helpers import make_toy_checkpoint

ATOL = 1e-5
CFG = TaskConfig(num_boxes=4, num_samples=6, num_operations=1, seed=3)


def examples_of(cfg):
    return [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)]


@pytest.fixture(scope="module")
def toy3(tmp_path_factory):
    """A random 3-layer toy Llama: MLPs between sender and receiver make the two path variants differ."""
    return load_model(make_toy_checkpoint(tmp_path_factory.mktemp("t3") / "ckpt", n_layers=3, d_model=64,
                                          init_std=0.2), device="cpu")


@pytest.fixture(scope="module")
def batch3(toy3):
    queries = prepare(toy3, examples_of(CFG), resolve_spec(toy3))
    pairs, _ = build_pairs(toy3, queries, "query-box")
    by_length = {len(p.clean_ids): p for p in pairs}
    return P.with_baselines(toy3, collate_pairs(list(by_length.values())[:3], toy3.tokenizer.pad_token_id))


# -- random-query pairs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_base():
    return load_model(BUNDLED_MODELS_DIR / "toy-base", device="cpu")


def test_random_query_pairs_follow_prakash(toy_base):
    cfg = TaskConfig(num_samples=24, num_operations=2, seed=5)
    examples = [e for e in examples_of(cfg)][:210]
    queries = prepare(toy_base, examples)
    pairs, stats = build_pairs(toy_base, queries, limit=12)
    assert 4 <= len(pairs) <= 12 and stats.n_pairs == len(pairs)
    tok = toy_base.tokenizer
    contexts = [context_key(p.clean.examples[0]) for p in pairs]
    assert len(set(contexts)) == len(contexts)  # one box per context
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.inference_mode():
        logits = toy_base(batch.clean_tokens, attention_mask=batch.attention_mask)[:, -1]
    assert (logits.argmax(-1) == batch.clean_answer).all()  # only boxes the model answers correctly
    assert (batch.positions("answer_prefix") == batch.n_pos - 1).all()
    by_prompt = {q.query.prompt: q for q in queries.items}
    for p in pairs:
        assert len(p.clean_ids) == len(p.corrupt_ids) and p.kind == "random-query"
        assert tok.decode([p.clean_ids[-1]]).strip() == "the" == tok.decode([p.corrupt_ids[-1]]).strip()
        item = by_prompt[p.clean.prompt]
        assert list(p.clean_ids) == item.ids[:len(p.clean_ids)]  # the spine's ids, up to the answer prefix
        assert tok.decode([p.clean_token]).strip() == re.findall(r"the (\w+)", p.clean_answer)[0]
        clean_ex, corrupt_ex = p.clean.examples[0], p.corrupt.examples[0]
        assert clean_ex.context != corrupt_ex.context
        label = corrupt_ex.statement_prefix.removesuffix(" contains")
        assert not re.search(rf"\b{label}\b", p.clean.prompt) and not re.search(rf"\b{label}\b", corrupt_ex.context)


def test_wrong_only_pairs_are_the_ones_the_model_gets_wrong(toy_base):
    cfg = TaskConfig(num_samples=40, num_operations=6, seed=7)
    queries = prepare(toy_base, examples_of(cfg))
    pairs, stats = build_pairs(toy_base, queries, limit=None, correct_only=False, wrong_only=True)
    assert pairs and stats.rejected["correct"] > 0
    batch = collate_pairs(pairs, toy_base.tokenizer.pad_token_id)
    with torch.inference_mode():
        logits = toy_base(batch.clean_tokens, attention_mask=batch.attention_mask)[:, -1]
    assert (logits.argmax(-1) != batch.clean_answer).all()
    assert len({context_key(p.clean.examples[0]) for p in pairs}) == len(pairs)
    with pytest.raises(ArgumentError, match="correct_only=False"):
        build_pairs(toy_base, queries, wrong_only=True)


def test_stratified_draws_numops_evenly_and_one_box_per_context():
    import pandas as pd

    from boxprobe.data.counterfactual import stratified

    table = pd.DataFrame({"numops": [0] * 10 + [1] * 10 + [2] * 2, "context": [f"c{i}" for i in range(20)] + ["c0", "c21"]})
    got = stratified(table, 9, 1, np.random.default_rng(0))
    assert got["context"].is_unique and len(got) == 9
    counts = Counter(got["numops"])
    assert counts[2] <= 2 and abs(counts[0] - counts[1]) <= 1 and counts[0] + counts[1] == 9 - counts[2]


# -- path patching against brute force -----------------------------------------------------------------------


def hf_o_proj(model, layer, head):
    d = model.cfg.d_head
    return model.original_model.model.layers[layer].self_attn.o_proj.weight[:, head * d:(head + 1) * d]


def brute_path(model, batch, sender, receiver, component, role, variant):
    """Per pair, unpadded, one forward per run: the denoising path effect on logit_diff, by plain hooks."""
    (sl, sh), out = sender, []
    n_layers = model.cfg.n_layers
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    for i in range(len(batch)):
        pad = int(batch.pad[i])
        clean, corrupt = batch.clean_tokens[i:i + 1, pad:], batch.corrupt_tokens[i:i + 1, pad:]
        p = int(batch.positions(role)[i]) - pad
        with torch.inference_mode():
            _, zc = model.run_with_cache(clean, names_filter=z_names)
            _, zk = model.run_with_cache(corrupt, names_filter=z_names)
            delta = (zc[z_names[sl]][0, p, sh] - zk[z_names[sl]][0, p, sh]) @ hf_o_proj(model, sl, sh).T
            if variant == "direct":
                if receiver == "logits":
                    hook = f"blocks.{n_layers - 1}.hook_resid_post"
                    fn = lambda act, hook: act.__setitem__((0, p), act[0, p] + delta) or act  # noqa: E731
                    with model.hooks(fwd_hooks=[(hook, fn)]):
                        logits = model(corrupt)
                else:
                    rl, rh = receiver
                    slot = rh if component == "q" else kv_head(model, rh)

                    def add(act, hook):
                        act[0, p, slot] += delta
                        return act

                    with P.split_qkv_input(model), model.hooks(fwd_hooks=[(f"blocks.{rl}.attn.hook_{component}_input", add)]):
                        logits = model(corrupt)
            else:
                def freeze(act, hook):
                    layer = int(hook.name.split(".")[1])
                    act[:] = zk[hook.name]
                    if layer == sl:
                        act[0, p, sh] = zc[hook.name][0, p, sh]
                    return act

                seen = {}
                rl = n_layers if receiver == "logits" else receiver[0]
                def record(act, hook):
                    seen["r"] = act[0, p].clone()
                    return act

                grab = [(f"blocks.{rl}.hook_resid_pre", record)] if receiver != "logits" else []
                with model.hooks(fwd_hooks=[(n, freeze) for n in z_names] + grab):
                    logits = model(corrupt)
                if receiver != "logits":
                    slot = receiver[1] if component == "q" else kv_head(model, receiver[1])

                    def put(act, hook):
                        act[0, p, slot] = seen["r"]
                        return act

                    with P.split_qkv_input(model), model.hooks(fwd_hooks=[(f"blocks.{rl}.attn.hook_{component}_input", put)]):
                        logits = model(corrupt)
            out.append(P.logit_diff(logits, batch.select([i])).item())
    return np.array(out)


@pytest.mark.parametrize("variant", ["direct", "freeze"])
def test_path_patching_variants_match_brute_force(toy3, batch3, variant):
    cases = [((0, 1), (2, 3), "q", "query_box"), ((0, 2), (2, 0), "v", "box_mention"), ((1, 3), (2, 1), "k", "query_last"),
             ((0, 1), "logits", None, "query_last"), ((1, 0), "logits", None, "query_last")]
    for sender, receiver, component, role in cases:
        got = path_patch(toy3, batch3, {"s": [sender]}, receiver if receiver == "logits" else [receiver], components=(component,) if component else ("q",),
                         receiver_positions=role, variant=variant, metric=P.logit_diff, per_pair=True, progress=False)
        want = brute_path(toy3, batch3, sender, receiver, component, role, variant)
        assert got["value"].to_numpy() == pytest.approx(want, abs=1e-4), (sender, receiver, component)
        assert (got["variant"] == variant).all()
    assert all(not hp.fwd_hooks for hp in toy3.hook_dict.values())


def test_freeze_counts_paths_through_mlps(toy3, batch3):
    kw = dict(components=("q",), receiver_positions="query_last", metric=P.logit_diff, progress=False)
    direct = path_patch(toy3, batch3, {"s": [(0, 1)]}, [(2, 0)], variant="direct", **kw)["value"].item()
    freeze = path_patch(toy3, batch3, {"s": [(0, 1)]}, [(2, 0)], variant="freeze", **kw)["value"].item()
    assert abs(direct - freeze) > 1e-4  # layer 0's and 1's MLPs carry part of the sender's effect
    with pytest.raises(ValueError, match="receiver position"):
        path_patch(toy3, batch3, {"s": [(0, 1)]}, [(2, 0)], variant="freeze", components=("q",), progress=False)


def test_grouped_query_receivers_patch_their_kv_head(smollm2):
    """SmolLM2 (9 query heads over 3 KV heads): a k/v receiver is patched at its KV head, shared by 3 query heads."""
    model = smollm2
    cfg = TaskConfig(num_boxes=3, num_samples=3, num_operations=0, seed=1)
    queries = prepare(model, examples_of(cfg)[:6], resolve_spec(model, "toy"))
    pairs, _ = build_pairs(model, queries, "query-box")
    batch = P.with_baselines(model, collate_pairs(pairs[:2], model.tokenizer.pad_token_id))
    assert kv_head(model, 4) == 1 and kv_head(model, 8) == 2
    kw = dict(receiver_positions="query_last", metric=P.logit_diff, per_pair=True, progress=False)
    a = path_patch(model, batch, {"s": [(1, 2)]}, [(3, 3)], components=("v",), **kw)
    b = path_patch(model, batch, {"s": [(1, 2)]}, [(3, 5)], components=("v",), **kw)
    assert a["value"].to_numpy() == pytest.approx(b["value"].to_numpy(), abs=1e-5)  # heads 3 and 5 share KV head 1
    assert set(a["receiver_kv_heads"]) == {"3.1"}
    want = brute_path(model, batch, (1, 2), (3, 3), "v", "query_last", "direct")
    assert a["value"].to_numpy() == pytest.approx(want, abs=1e-3)
    q = path_patch(model, batch, {"s": [(1, 2)]}, [(3, 3)], components=("q",), **kw)
    assert q["value"].to_numpy() == pytest.approx(brute_path(model, batch, (1, 2), (3, 3), "q", "query_last", "direct"),
                                                  abs=1e-3)


# -- discovery on a planted head -----------------------------------------------------------------------------


def planted_model(tmp_path):
    """Every head's W_O is zeroed except head 1.2's (scaled up): the one head that can write to the stream."""
    def plant(model, tok):
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                w = layer.self_attn.o_proj.weight
                keep = w[:, 2 * 16:3 * 16].clone()
                w.zero_()
                if i == 1:
                    w[:, 2 * 16:3 * 16] = keep * 4

    return load_model(make_toy_checkpoint(tmp_path / "planted", d_model=64, init_std=0.2, edit=plant), device="cpu")


def test_discovery_on_a_planted_head(tmp_path):
    """Every head's W_O is zero but 1.2's: it is the only head whose output can reach the logits (in both
    variants), layer-0 heads write nothing so they reach no query, and a group admits a head only when
    its effect is below -min_effect."""
    model = planted_model(tmp_path)
    queries = prepare(model, examples_of(CFG), resolve_spec(model))
    pairs, _ = build_pairs(model, queries, "random-query", correct_only=False, limit=8)
    batch = collate_pairs(pairs, model.tokenizer.pad_token_id)
    for variant in ("freeze", "direct"):
        circuit = discover_circuit(model, batch, CircuitConfig(top_k=(2, 2), variant=variant, min_effect=1e-4))
        stage1 = circuit.scores.set_index(["stage", "sender"])["value"].loc["value_fetcher"]
        assert len(stage1) == 8 and stage1.drop("L1H2").abs().max() < 1e-5 and abs(stage1["L1H2"]) > 1e-3
        assert circuit.groups == ({"value_fetcher": [(1, 2)]} if stage1["L1H2"] < -1e-4 else {})
        into = path_patch(model, batch, "each", [(1, 2)], components=("q", "k", "v"), receiver_positions="answer_prefix",
                          variant=variant, metric=P.prob_change, direction="noising", progress=False)
        assert len(into) == 4 * 3 and into["value"].abs().max() < 1e-5
    loose = discover_circuit(model, batch, CircuitConfig(top_k=(1,), min_effect=-10.0))
    best = loose.scores.set_index("sender")["value"].idxmin()  # top-1 is the most negative effect
    assert loose.groups["value_fetcher"] == [tuple(int(x) for x in re.findall(r"\d+", best))]
    path = loose.save(tmp_path / "out")
    again = Circuit.load(path)
    assert again.groups == loose.groups and json.loads(path.read_text())["n_pairs"] == len(batch)
    assert again.positions == {"value_fetcher": "answer_prefix"}


# -- faithfulness ----------------------------------------------------------------------------------------------


def test_faithfulness_ablates_by_hand(toy3, batch3):
    """A head set keeping head 2.1 at query_last only equals, by hand: every hook_z replaced by the reference
    prompts' right-aligned mean, except 2.1 at query_last; the reference is another batch's corrupt prompts."""
    queries = prepare(toy3, examples_of(TaskConfig(num_boxes=4, num_samples=6, num_operations=1, seed=9)),
                      resolve_spec(toy3))
    ref_pairs, _ = build_pairs(toy3, queries, "query-box")
    reference = collate_pairs(ref_pairs[:4], toy3.tokenizer.pad_token_id)
    sets = {"full": None, "kept": {"query_last": [(2, 1)]}, "empty": {}}
    frame = evaluate_head_sets(toy3, batch3, sets, reference, progress=False).set_index(["set", "metric"])
    assert frame.loc[("full", "prob_change"), "value"] == pytest.approx(0.0, abs=1e-6)
    names = [f"blocks.{l}.attn.hook_z" for l in range(3)]
    with torch.inference_mode():
        _, rc = toy3.run_with_cache(reference.corrupt_tokens, attention_mask=reference.attention_mask, names_filter=names)
        _, cc = toy3.run_with_cache(batch3.clean_tokens, attention_mask=batch3.attention_mask, names_filter=names)
        real = reference.attention_mask.bool() if reference.attention_mask is not None else \
            torch.ones_like(reference.corrupt_tokens, dtype=torch.bool)
        W, w = batch3.n_pos, reference.corrupt_tokens.shape[1]
        last = batch3.positions("query_last")
        for keep in ({(2, 1)}, set()):
            def ablate(act, hook):
                z = rc[hook.name]
                overall = z[real].mean(0)
                for j in range(W):  # position j counts W - j from the end
                    r = w - (W - j)
                    act[:, j] = z[:, r].mean(0) if 0 <= r and real[:, r].all() else overall
                layer = int(hook.name.split(".")[1])
                for l, h in keep:
                    if l == layer:
                        act[torch.arange(len(batch3)), last, h] = cc[hook.name][torch.arange(len(batch3)), last, h]
                return act

            with toy3.hooks(fwd_hooks=[(n, ablate) for n in names]):
                logits = toy3(batch3.clean_tokens, attention_mask=batch3.attention_mask)
            want = P.prob_change(logits, batch3).mean().item()
            name = "kept" if keep else "empty"
            assert frame.loc[(name, "prob_change"), "value"] == pytest.approx(want, abs=1e-5)
            acc = P.answer_accuracy(logits, batch3).mean().item()
            assert frame.loc[(name, "accuracy"), "value"] == pytest.approx(acc)
    assert frame["ci_low"].le(frame["value"] + 1e-9).all()


def test_evaluate_circuit_reports_three_measures(toy3, batch3):
    groups, positions = {"a": [(2, 1), (2, 0)], "b": [(1, 3)]}, {"a": "query_last", "b": "query_box"}
    ev = evaluate_circuit(toy3, batch3, groups, positions, batch3, n_random=2, progress=False)
    assert 0 <= ev["faithfulness"] or np.isnan(ev["faithfulness"])
    assert list(ev["completeness"]["group"]) == ["a", "b"] and (ev["completeness"]["gap"] >= 0).all()
    assert len(ev["minimality"]) == 3 and set(ev["minimality"]["head_index"]) == {1, 0, 3}
    sets = set(ev["sets"]["set"])
    assert {"full", "circuit", "empty", "random_0", "random_1", "circuit-a", "full-a"} <= sets


# -- CMAP, intervals ---------------------------------------------------------------------------------------------


def test_cmap_is_long_and_exact_for_the_same_model(tmp_path, toy3, batch3):
    same = toy3
    out = cross_model_patch(toy3, same, batch3, {"g": [(2, 1)]}, positions={"g": "query_last"}, progress=False)
    assert {"model", "donor", "group", "position_role", "metric", "stage", "value", "ci_low", "ci_high"} <= set(out.columns)
    # Named as every other result frame names a loaded model: its id (name@revision), not the path it came from.
    assert set(out["model"]) == set(out["donor"]) == {model_id(toy3)} and "@" in model_id(toy3)
    wide = out.pivot_table(index=["group", "metric"], columns="stage", values="value")
    assert np.allclose(wide["after"], wide["before"], atol=1e-5) and np.allclose(wide["donor"], wide["before"], atol=1e-5)
    acc = out[out["metric"] == "accuracy"]
    assert acc["ci_low"].between(0, 1).all() and acc["ci_high"].between(0, 1).all()
    per = cross_model_patch(toy3, same, batch3, {"g": [(2, 1)]}, per_pair=True, progress=False)
    assert len(per) == 3 * len(METRICS) * len(batch3) and {"pair", "context"} <= set(per.columns)
    change = out[out["metric"] == "prob_change"].set_index("stage")["value"]
    assert change["before"] == 0  # relative to the recipient's own unpatched probability
    assert out[out["metric"] == "correct_prob"]["value"].between(0, 1).all()
    narrow = load_model(make_toy_checkpoint(tmp_path / "narrow", d_model=32), device="cpu")
    with pytest.raises(ModelMismatchError, match="d_model"):
        cross_model_patch(toy3, narrow, batch3, progress=False)


def test_clustered_intervals():
    values = np.array([[0, 0, 0, 1, 1, 1.0]])
    mean, lo, hi = clustered_bootstrap(values, ["a", "a", "a", "b", "b", "b"], n_boot=500)
    assert mean[0] == 0.5 and lo[0] == 0 and hi[0] == 1  # two contexts: the mean can be 0 or 1
    _, lo6, hi6 = clustered_bootstrap(values, list("abcdef"), n_boot=500)
    assert 0 < lo6[0] and hi6[0] < 1  # six independent pairs: narrower
    _, lo1, _ = clustered_bootstrap(values, ["a"] * 6)
    assert np.isnan(lo1[0])


def test_circuit_command_writes_circuit_json(tmp_path):
    from boxprobe.cli import main
    from boxprobe.data.task import write_examples

    data = tmp_path / "data.jsonl"
    write_examples(data, examples_of(TaskConfig(num_samples=30, num_operations=1, seed=11))[:140])
    status = main(["circuit", "--model", str(BUNDLED_MODELS_DIR / "toy-base"), "--data", str(data), "--out",
                   str(tmp_path / "out"), "--pairs", "6", "--reference-pairs", "3", "--top-k", "1", "1",
                   "--no-minimality", "--threads", "1", "--dcm-steps", "3"])
    assert status == 0
    doc = json.loads((tmp_path / "out" / "circuit.json").read_text())
    assert isinstance(doc["groups"], dict) and 3 <= doc["n_pairs"] <= 6
    assert all(isinstance(h, list) and len(h) == 2 for hs in doc["groups"].values() for h in hs)
    assert doc["groups"] and isinstance(doc["faithfulness"], float)
    assert set(doc["evaluation"]["dcm"]) <= {"object-value", "positional"} and (tmp_path / "out" / "dcm.csv").exists()
    assert main(["circuit", "--model", str(BUNDLED_MODELS_DIR / "toy-base"), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "x")]) != 0


def test_circuit_command_runs_cmap_on_pairs_the_recipient_gets_wrong(tmp_path):
    import pandas as pd

    from boxprobe.cli import main
    from boxprobe.data.task import write_examples

    data = tmp_path / "data.jsonl"
    write_examples(data, examples_of(TaskConfig(num_samples=30, num_operations=6, seed=11)))
    status = main(["circuit", "--model", str(BUNDLED_MODELS_DIR / "toy-base"), "--donor",
                   str(BUNDLED_MODELS_DIR / "toy-code"), "--data", str(data), "--out", str(tmp_path / "out"),
                   "--pairs", "6", "--reference-pairs", "3", "--top-k", "1", "1", "--no-minimality", "--threads", "1",
                   "--cmap-pairs", "7"])
    assert status == 0
    cmap = pd.read_csv(tmp_path / "out" / "cmap.csv")
    assert {"circuit", "random_heads"} <= set(cmap["group"]) and (cmap["n_pairs"] <= 7).all()
    before = cmap[(cmap["stage"] == "before") & (cmap["metric"] == "accuracy")]["value"]
    assert len(before) and (before == 0).all()  # only pairs the recipient gets wrong


# -- DCM -----------------------------------------------------------------------------------------------------


def test_dcm_learns_masks_where_the_desideratum_flows(tmp_path):
    """Heads whose W_O is zero get no gradient from the task, only from the sparsity penalty, so their
    masks sink together; the one writing head (1.2) moves differently. A large penalty selects nothing."""
    from boxprobe.causal.dcm import learn_head_mask

    model = planted_model(tmp_path)
    queries = prepare(model, examples_of(CFG), resolve_spec(model))
    pairs, _ = build_pairs(model, queries, "object-value")
    batch = collate_pairs(pairs[:6], model.tokenizer.pad_token_id)
    masks = learn_head_mask(model, batch, steps=15, lr=0.2, sparsity=0.05)
    by = masks.set_index(["layer", "head_index"])["mask"]
    dead = by.drop((1, 2))
    assert dead.max() - dead.min() < 1e-6 and dead.max() < 0.5  # moved by the penalty alone, all alike
    assert abs(by[(1, 2)] - dead.iloc[0]) > 1e-3
    assert masks.attrs["history"][-1] < masks.attrs["history"][0] and 0 <= masks.attrs["accuracy"] <= 1
    none = learn_head_mask(model, batch, steps=15, lr=0.5, sparsity=50.0)
    assert not none["selected"].any()
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
