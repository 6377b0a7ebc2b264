"""Every analysis on a real pretrained model (SmolLM2-135M-Instruct, BPE, grouped-query attention),
each checked against something computed independently: the checkpoint's own tokenizer, plain
transformers, hand-located tokens, or a TransformerLens hook computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from boxprobe.activations.attention import AttentionConfig, attention_to_roles
from boxprobe.activations.cache import CacheConfig, build_cache
from boxprobe.behaviour.evaluate import EvalConfig, evaluate
from boxprobe.causal.cmap import cross_model_patch
from boxprobe.causal.patching import patch_heads, patch_resid_pre
from boxprobe.data.pairs import build_pairs, collate_pairs, logit_diff
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig
from boxprobe.probing.interventions import ablate_directions


@pytest.fixture(scope="module")
def examples():
    cfg = TaskConfig(num_samples=2, num_operations=2, seed=3)
    return [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)]


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def own_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def queries(smollm2, examples):
    """Seven boxes of one non-trivial state, in the default 2-shot per-box prompt."""
    state = [e for e in examples if e.num_operations == 2][:7]
    return prepare(smollm2, state, resolve_spec(smollm2))


def test_tokenisation_is_the_checkpoints_own(smollm2, own_tokenizer, queries):
    assert queries.spec.template.name == "default" and queries.spec.format == "per-box"
    for it in queries:
        assert it.prompt == own_tokenizer(it.query.prompt)["input_ids"]
        assert it.ids == own_tokenizer(it.query.prompt + it.query.continuation)["input_ids"]
    assert own_tokenizer.bos_token_id not in queries[0].ids[:1]  # SmolLM2's tokenizer adds no start token


def test_chat_prompts_start_with_one_start_token(smollm2, own_tokenizer, examples):
    chat = prepare(smollm2, examples[:2], resolve_spec(smollm2, chat=True))
    start = own_tokenizer.convert_tokens_to_ids("<|im_start|>")
    for it in chat:
        text = it.query.prompt
        assert text.startswith("<|im_start|>") and not text.startswith("<|im_start|><|im_start|>")
        assert it.prompt == own_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert it.prompt[0] == start and it.prompt[1] != start
        assert text.rstrip().endswith("Statement: " + it.query.examples[0].statement_prefix)


def test_positions_are_the_hand_located_tokens(smollm2, queries):
    tok = smollm2.tokenizer
    for i, it in enumerate(queries):
        words = tok.convert_ids_to_tokens(it.ids)
        ex = it.query.examples[0]
        assert words[int(queries.single("query_last")[i])] == "Ġcontains"
        # " Box 3" is ['ĠBox', 'Ġ', '3']: the label's token is the digit, after 'ĠBox', 'Ġ'.
        qbox = int(queries.role("query_box").query("item == @i")["token_index"].iloc[0])
        assert words[qbox - 2: qbox + 1] == ["ĠBox", "Ġ", str(ex.box)]
        gold = ex.gold.removesuffix(".").split(" and ") if ex.gold != "nothing" else []
        prefixes = queries.role("answer_prefix").query("item == @i").sort_values("k")
        objects = queries.role("answer_object").query("item == @i").sort_values("k")
        assert len(prefixes) == len(objects) == len(gold)
        for (_, p), (_, o), want in zip(prefixes.iterrows(), objects.iterrows(), gold):
            assert words[p.token_index] == "Ġthe" and o.token_index == p.token_index + 1
            assert want.removeprefix("the ").startswith(tok.decode(it.ids[o.token_index]).strip())


def test_evaluate_matches_plain_transformers(smollm2, hf, queries):
    result = evaluate(smollm2, queries, EvalConfig(method="fast", batch_size=7, progress=False))
    for it, row in zip(queries, result.frame.itertuples()):
        with torch.inference_mode():
            logits = hf(torch.tensor([it.ids[:-1]])).logits[0]
        argmax = logits[len(it.prompt) - 1:].argmax(-1).tolist()
        assert row.correct_fast == (argmax == it.gold)


def test_cache_matches_transformers_hidden_states(smollm2, hf, queries, tmp_path):
    roles = ("query_last", "answer_prefix", "box_mention")
    reader = build_cache(smollm2, queries, tmp_path, CacheConfig(roles=roles, layers=(0, 14, 29), batch_size=7),
                         progress=False)
    for role in roles:
        acts, meta = reader.activations("resid_post", role), reader.metadata(role)
        for row in meta.head(4).itertuples():
            with torch.inference_mode():
                states = hf(torch.tensor([queries[row.query_index].ids]), output_hidden_states=True).hidden_states
            for slot, layer in enumerate((0, 14, 29)):
                # hidden_states[l + 1] is block l's output, except the last, which HF returns after the final norm.
                if layer == 29:
                    continue
                ref = states[layer + 1][0, row.token_index]
                torch.testing.assert_close(acts[row.item, slot], ref, atol=2e-3 * float(ref.abs().max()), rtol=0)


def test_attention_under_grouped_query_heads(smollm2, hf, queries):
    raw = attention_to_roles(smollm2, queries[:3], AttentionConfig(progress=False))
    assert set(raw["head_index"]) == set(range(9))  # query heads, not the 3 key-value heads
    with torch.inference_mode():
        att = hf(torch.tensor([queries[0].prompt]), output_attentions=True).attentions  # [1, head, q, k] per layer
    labels = queries.role("box_mention", box=queries[0].query.examples[0].box).query("item == 0")["token_index"]
    for layer in (0, 15, 29):
        want = att[layer][0, :, -1, torch.tensor(labels.to_numpy())].sum(-1).numpy()
        got = raw.query("query == 0 and layer == @layer and role == 'queried_box_label'").sort_values("head_index")["mass"]
        np.testing.assert_allclose(got.to_numpy(), want, atol=1e-4)


def test_probe_experiment_runs_on_chosen_layers(smollm2, tmp_path):
    from boxprobe.data.task import write_examples

    for name, seed, n in (("test", 4, 3), ("train", 5, 8)):  # states of 1 operation; a 4/1 fit/validation split
        cfg = TaskConfig(num_samples=n, num_operations=1, seed=seed)
        write_examples(tmp_path / f"{name}.jsonl",
                       [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg) if e.num_operations])
    cfg = ProbeExperimentConfig(models=("smollm2",), data=str(tmp_path / "test.jsonl"), out_dir=str(tmp_path / "run"),
                                template="toy", targets=("first_object",), layers=(3, 20), random_init="none",
                                baselines=("majority",), n_boot=20, Cs=(1.0,), train_limit=None)
    run = ProbeExperiment(cfg, models=[smollm2]).run()
    acc = run.probe_accuracy.query("metric == 'accuracy' and subset == 'all'")
    task = acc.query("kind == 'task'")
    assert sorted(task["layer"].unique()) == [3, 20]  # the model's own layer numbers
    assert task["value"].between(0, 1).all() and task["model"].str.startswith("SmolLM2").all()
    assert {"majority", "model_argmax"} <= set(acc["kind"])  # the baseline and the model's own answer beside it


def test_patching_a_head_equals_a_hand_written_hook(smollm2, queries):
    pairs, _ = build_pairs(smollm2, queries, "query-box", limit=2)
    assert pairs, "SmolLM2's tokenizer must give equal-length query-box pairs"
    batch = collate_pairs(pairs[:1], smollm2.tokenizer.pad_token_id)
    layer, head = 20, 7
    frame = patch_heads(smollm2, batch, positions="query_last", progress=False, metric=logit_diff)
    got = float(frame.query("layer == @layer and head_index == @head")["value"].iloc[0])
    name = f"blocks.{layer}.attn.hook_z"
    with torch.inference_mode():
        _, clean = smollm2.run_with_cache(batch.clean_tokens, names_filter=lambda n: n == name)

        def put(z, hook):
            z[:, -1, head] = clean[name][:, -1, head]  # per query head: 9 of them over 3 key-value heads
            return z
        logits = smollm2.run_with_hooks(batch.corrupt_tokens, fwd_hooks=[(name, put)])
    want = float(logits[0, -1, batch.clean_answer[0]] - logits[0, -1, batch.corrupt_answer[0]])
    assert got == pytest.approx(want, abs=1e-3)


def test_patching_shortcuts_are_exact_on_padded_pairs(smollm2, examples, caplog):
    """Layer skip, key-value prefix, skipped pairs and the last-position read under grouped-query attention
    and left padding: equal to running every site over every block and position."""
    several = prepare(smollm2, examples, resolve_spec(smollm2))  # six contexts, of different lengths
    pairs, _ = build_pairs(smollm2, several, "query-box", limit=None)
    by_length = {len(p.clean_ids): p for p in pairs}
    assert len(by_length) >= 2, "need pairs of two lengths for a padded batch"
    batch = collate_pairs(list(by_length.values())[:2], smollm2.tokenizer.pad_token_id)
    kw = dict(layers=[3, 29], positions=["query_box", -1], metric=logit_diff, progress=False)
    with caplog.at_level("WARNING"):
        fast = patch_resid_pre(smollm2, batch, **kw)
    assert not [r for r in caplog.records if "shortcuts" in r.message]  # none was dropped as inexact
    plain = patch_resid_pre(smollm2, batch, shortcuts=False, **kw)
    np.testing.assert_allclose(fast["value"], plain["value"], atol=1e-3)
    assert np.abs(plain["value"]).max() > 0.1


def test_cross_model_patch_from_itself_changes_nothing(smollm2, queries):
    pairs, _ = build_pairs(smollm2, queries, "query-box", limit=1)
    batch = collate_pairs(pairs, smollm2.tokenizer.pad_token_id)
    cmap = cross_model_patch(smollm2, smollm2, batch, {"L29 all": [(29, h) for h in range(9)]}, progress=False)
    value = cmap.set_index(["group", "metric", "stage"])["value"].unstack("stage")
    assert len(value) and {"before", "after"} <= set(value.columns)
    np.testing.assert_allclose(value["after"], value["before"], atol=1e-4)


def test_probe_causal_check_ablates_at_the_answer_prefix(smollm2, queries):
    nonempty = queries.select([i for i, it in enumerate(queries) if it.query.examples[0].gold != "nothing"][:2])
    objects = [it.query.examples[0].gold.split(" and ")[0].removeprefix("the ").rstrip(".") for it in nonempty]
    D = torch.randn(2, 576, generator=torch.Generator().manual_seed(0))
    none = ablate_directions(smollm2, nonempty, D[:0], layer=10, role="answer_prefix", objects=objects)
    cut = ablate_directions(smollm2, nonempty, D, layer=10, role="answer_prefix", objects=objects)
    assert (none["p_object"] != cut["p_object"]).all()  # the edit at " the" reaches the object's token
