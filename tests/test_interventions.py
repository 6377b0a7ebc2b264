"""Direction ablation: what the hook removes, where, baselines, batching, hook hygiene and the causal-check table."""

import numpy as np
import pandas as pd
import pytest
import torch

import boxprobe.probing.interventions as iv
from boxprobe.activations.cache import CacheConfig, build_cache
from boxprobe.data.labels import query_labels
from boxprobe.models.loading import load_model
from boxprobe.probing.metrics import nullspace_projection
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from helpers import make_toy_checkpoint

D_MODEL = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Wide weights, so output distributions are far from uniform.
    directory = make_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", d_model=D_MODEL, d_mlp=64, init_std=0.3)
    return load_model(directory, device="cpu")


@pytest.fixture(scope="module")
def queries(model):
    data = TaskConfig(num_boxes=3, num_samples=4, num_operations=4, seed=1)
    examples = [e for s in generate_sequences(data) for e in sequence_examples(s, data)]
    order = np.random.default_rng(0).permutation(len(examples))  # mix prompt lengths: batches need padding
    qs = prepare(model, [examples[i] for i in order], resolve_spec(model, "toy"))
    return qs.select([i for i, q in enumerate(qs.queries) if query_labels(q)["gold"]][:10])


@pytest.fixture(scope="module")
def objects(queries):
    return [query_labels(q)["gold"][-1] for q in queries.queries]


def hook_count(model):
    return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
            + sum(len(hp.fwd_hooks) for hp in model.hook_dict.values()))


def baseline(model, queries, objects, **kw):
    return iv.ablate_directions(model, queries, torch.zeros(0, D_MODEL), layer=0, objects=objects, **kw)


def capture_resid_pre1(model, fn):
    """Run ``fn`` while capturing blocks.1.hook_resid_pre (what follows blocks.0.hook_resid_post's edit)."""
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: seen.append(act.clone()))]):
        fn()
    return seen[0] if len(seen[0]) > 1 else seen[0][0]


def test_ablation_removes_the_directions_at_query_last_only(model, queries, objects):
    q, obj = queries[:4], objects[:4]
    D = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(1))
    before = capture_resid_pre1(model, lambda: baseline(model, q, obj, batch_size=4))
    after = capture_resid_pre1(model, lambda: iv.ablate_directions(model, q, D, layer=0, objects=obj, batch_size=4))
    tok = model.tokenizer
    prompts = [len(tok(x.prompt)["input_ids"]) for x in q.queries]
    rows = [len(tok(x.prompt + x.continuation)["input_ids"]) - 1 for x in q.queries]  # prompt + gold[:-1]
    assert len(set(rows)) > 1, "the batch must be left-padded"
    for i, (n_prompt, n_row) in enumerate(zip(prompts, rows)):
        pos = before.shape[1] - n_row + n_prompt - 1  # query_last (the prompt's last token) under left padding
        assert (before[i, pos] @ D.T).abs().max() > 0.1  # there was something to remove
        torch.testing.assert_close(after[i, pos] @ D.T, torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(after[i, pos], before[i, pos] @ nullspace_projection(D), atol=1e-5, rtol=0)
        others = torch.arange(before.shape[1]) != pos
        torch.testing.assert_close(after[i, others], before[i, others], atol=0, rtol=0)


def test_all_positions_and_other_roles(model, queries, objects):
    q, obj = queries[:1], objects[:1]
    D = torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(2))
    after = capture_resid_pre1(model, lambda: iv.ablate_directions(model, q, D, layer=0, role=None, objects=obj))
    assert float((after @ D.T).abs().max()) < 1e-4
    before = capture_resid_pre1(model, lambda: baseline(model, q, obj))
    boxes = capture_resid_pre1(model, lambda: iv.ablate_directions(model, q, D, layer=0, role="box_mention",
                                                                   objects=obj))
    changed = (boxes != before).any(-1)
    assert 1 < int(changed.sum()) < len(before)  # several box mentions, not every position
    assert float((boxes[changed] @ D.T).abs().max()) < 1e-4


def test_empty_or_zero_directions_equal_the_baseline(model, queries, objects):
    ref = iv.probe_causal_check(model, queries, objects, torch.zeros(0, D_MODEL), layer=0, n_random=0)
    none = ref[ref.condition == "none"].reset_index(drop=True)
    for D in (torch.zeros(0, D_MODEL), torch.zeros(2, D_MODEL), np.zeros((1, D_MODEL))):
        out = iv.ablate_directions(model, queries, D, layer=0, objects=objects)
        np.testing.assert_allclose(out["p_object"], none["p_object"], rtol=1e-5, atol=0)
        assert (out["rest_unchanged"] == none["rest_unchanged"]).all()
        assert (out["answer_exact"] == none["answer_exact"]).all()


def test_full_basis_changes_everything_and_k0_nothing(model, queries, objects):
    basis = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(3)))[0]
    base = baseline(model, queries, objects)
    vocab = len(model.tokenizer)
    assert (base["p_object"] - 1 / vocab).abs().max() > 1e-3  # the baseline is not uniform
    # Zero residual at the last layer: RMSNorm gives 0, so the logits are 0 and the answer is uniform.
    full = iv.ablate_directions(model, queries, basis, layer=-1, role=None, objects=objects)
    np.testing.assert_allclose(full["p_object"], 1 / vocab, rtol=1e-4)
    # At query_last only, layer 0: later answer tokens change, through attention only (one of ~100 keys in a
    # random model, so a small change, but far above float noise).
    mid = iv.ablate_directions(model, queries, basis, layer=0, objects=objects)
    assert (mid["logp_object"] - base["logp_object"]).abs().max() > 1e-2
    none = iv.ablate_directions(model, queries, basis[:0], layer=0, objects=objects)
    np.testing.assert_allclose(none["logp_object"], base["logp_object"], atol=1e-5)


def test_batched_equals_single(model, queries, objects):
    D = torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(4))
    lengths = {len(it.prompt) for it in queries[:4]}
    assert len(lengths) > 1, "the batch must need left padding"
    for layer, hook in ((0, "resid_post"), (1, "resid_pre")):
        batched = iv.ablate_directions(model, queries, D, layer=layer, hook=hook, objects=objects, batch_size=4)
        single = iv.ablate_directions(model, queries, D, layer=layer, hook=hook, objects=objects, batch_size=1)
        np.testing.assert_allclose(batched["logp_object"], single["logp_object"], atol=1e-4)
        assert (batched["rest_unchanged"] == single["rest_unchanged"]).all()
        assert (batched["object_index"] == single["object_index"]).all()


def test_object_index_points_at_the_object(model, queries, objects):
    out = baseline(model, queries, objects)
    tok = model.tokenizer
    for q, obj, j in zip(queries.queries, objects, out["object_index"]):
        gold = tok(q.prompt + q.continuation)["input_ids"][len(tok(q.prompt)["input_ids"]):]
        assert tok.decode([gold[j]]).strip() == obj


def test_no_hook_survives_an_exception(model, queries, objects, monkeypatch):
    before = hook_count(model)

    def boom(act, P):
        raise RuntimeError("projection failed")

    monkeypatch.setattr(iv, "_project", boom)
    with pytest.raises(RuntimeError, match="projection failed"):
        iv.ablate_directions(model, queries[:3], torch.ones(1, D_MODEL), layer=0, objects=objects[:3])
    assert hook_count(model) == before
    monkeypatch.undo()
    ref = baseline(model, queries[:3], objects[:3])
    again = baseline(model, queries[:3], objects[:3])
    np.testing.assert_allclose(again["p_object"], ref["p_object"], rtol=1e-6)


def test_input_errors(model, queries, objects):
    D = torch.ones(1, D_MODEL)
    with pytest.raises(ValueError, match="not in its gold answer"):
        iv.ablate_directions(model, queries[:1], D, layer=0, objects=["zebra"])
    with pytest.raises(ValueError, match="one\\s+object"):
        iv.ablate_directions(model, queries[:2], D, layer=0, objects=objects[:1])
    with pytest.raises(ValueError, match="d_model=32"):
        iv.ablate_directions(model, queries[:1], torch.ones(1, 16), layer=0, objects=objects[:1])
    with pytest.raises(ValueError, match="out of range"):
        iv.ablate_directions(model, queries[:1], D, layer=5, objects=objects[:1])
    with pytest.raises(ValueError, match="resid_post"):
        iv.ablate_directions(model, queries[:1], D, layer=0, hook="attn_out", objects=objects[:1])
    with pytest.raises(ValueError, match="roles are"):
        iv.ablate_directions(model, queries[:1], D, layer=0, role="query_end", objects=objects[:1])


def test_causal_check_table_and_summary(model, queries, objects):
    D = np.random.default_rng(5).standard_normal((2, D_MODEL)) * [[3.0], [0.5]]
    df = iv.probe_causal_check(model, queries, objects, D, layer=0, n_random=3, seed=7, batch_size=4)
    n = len(queries)
    assert df.groupby("condition").size().to_dict() == {"none": n, "probe": n, "random": 3 * n}
    assert sorted(df.loc[df.condition == "random", "seed"].unique()) == [7, 8, 9]
    assert df.loc[df.condition != "random", "seed"].isna().all()
    # Random sets have the probe's count and norm; they differ from the probe and from each other.
    norms = df.groupby("condition")["norm"].unique()
    assert np.allclose(np.concatenate([norms["probe"], norms["random"]]), np.linalg.norm(D))
    assert set(df.loc[df.condition != "none", "k"]) == {2}
    probe = df[df.condition == "probe"].reset_index(drop=True)
    direct = iv.ablate_directions(model, queries, D, layer=0, objects=objects)
    np.testing.assert_allclose(probe["p_object"], direct["p_object"], rtol=1e-5)
    rnd = df[df.condition == "random"].pivot(index="query", columns="seed", values="p_object")
    assert not np.allclose(rnd[7], rnd[8])
    summary = iv.summarize_causal_check(df)
    assert list(summary["condition"]) == ["none", "probe", "random"]
    row = summary.set_index("condition").loc["random"]
    assert row["n_seeds"] == 3 and row["n_queries"] == n
    assert row["p_object"] == pytest.approx(df.loc[df.condition == "random", "p_object"].mean())
    assert row["ci_low"] < row["p_object"] < row["ci_high"]
    none = summary.set_index("condition").loc["none"]
    assert none["rest_unchanged"] == pytest.approx(df.loc[df.condition == "none", "rest_unchanged"].mean())


def test_object_directions_from_cache(model, queries, tmp_path):
    data = TaskConfig(num_boxes=3, num_samples=8, num_operations=3, seed=2)
    examples = [e for s in generate_sequences(data) for e in sequence_examples(s, data)]
    qs = prepare(model, examples, resolve_spec(model, "toy"))
    reader = build_cache(model, qs, tmp_path / "c", CacheConfig(roles=("query_last",), batch_size=8), progress=False)
    meta = reader.metadata("query_last")
    counts = pd.Series([o for g in meta["gold"] for o in g]).value_counts()
    obj = counts.index[0]
    D = iv.object_directions_from_cache(reader, obj, layer=1, n_directions=2, C=1.0)
    assert D.shape == (2, D_MODEL)
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-6)
    assert abs(float(D[0] @ D[1])) < 1e-4  # INLP: each direction lies in the previous nullspace
    train = np.flatnonzero(meta["sample_id"] < 4)
    D_train = iv.object_directions_from_cache(reader, obj, layer=1, items=train)
    assert D_train.shape == (1, D_MODEL) and not np.allclose(D_train[0], D[0])
    with pytest.raises(ValueError, match="never in the queried box"):
        iv.object_directions_from_cache(reader, "zebra", layer=1, mentioned_only=False)


def test_per_query_directions(model, queries, objects):
    D = np.random.default_rng(8).standard_normal((2, D_MODEL))
    shared = iv.ablate_directions(model, queries, D, layer=0, objects=objects, batch_size=4)
    listed = iv.ablate_directions(model, queries, [D] * len(queries), layer=0, objects=objects, batch_size=4)
    np.testing.assert_allclose(listed["logp_object"], shared["logp_object"], atol=1e-4)
    empty = iv.ablate_directions(model, queries, [D[:0]] * len(queries), layer=0, objects=objects)
    np.testing.assert_allclose(empty["logp_object"], baseline(model, queries, objects)["logp_object"], atol=1e-6)
    # Query 0 alone loses directions: only its answer changes.
    one = [D if i == 0 else D[:0] for i in range(len(queries))]
    mixed = iv.ablate_directions(model, queries, one, layer=0, objects=objects, batch_size=4)
    assert abs(mixed["logp_object"][0] - shared["logp_object"][0]) < 1e-4
    np.testing.assert_allclose(mixed["logp_object"][1:], empty["logp_object"][1:], atol=1e-5)
    df = iv.probe_causal_check(model, queries, objects, one, layer=0, n_random=2, batch_size=4)
    rnd = df[df.condition == "random"]
    assert set(rnd.loc[rnd["query"] == 0, "k"]) == {2} and set(rnd.loc[rnd["query"] > 0, "k"]) == {0}
    np.testing.assert_allclose(rnd.loc[rnd["query"] == 0, "norm"], np.linalg.norm(D))
    with pytest.raises(ValueError, match="one \\[k, d_model\\] set per query"):
        iv.ablate_directions(model, queries, [D], layer=0, objects=objects)


def test_causal_effects_are_paired_bounded_and_clustered(model, queries, objects):
    D = np.random.default_rng(9).standard_normal((3, D_MODEL)) * 5
    df = iv.probe_causal_check(model, queries, objects, D, layer=0, n_random=2, batch_size=4)
    eff = iv.causal_effects(df, n_boot=300).set_index(["condition", "metric"])
    per = df.groupby(["condition", "query"])["p_object"].mean().unstack(0)
    assert eff.loc[("probe - none", "p_object"), "value"] == pytest.approx((per["probe"] - per["none"]).mean())
    means = eff.loc[["none", "probe", "random"]]
    assert ((means.ci_low >= 0) & (means.ci_high <= 1)).all()
    assert ((eff.ci_low <= eff.value + 1e-12) & (eff.value <= eff.ci_high + 1e-12)).all()
    # One cluster holding every query: every resample is the full sample, so the interval collapses.
    one = iv.causal_effects(df, groups=["s"] * len(queries), n_boot=50)
    np.testing.assert_allclose(one.ci_low, one.value) and np.testing.assert_allclose(one.ci_high, one.value)
    assert (one.n_clusters == 1).all()
