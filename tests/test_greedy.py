"""method="greedy": token-identical to plain greedy decoding, cheaper; regex-constrained decoding; paper templates."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import regex
import torch
from transformers import AutoModelForCausalLM

import boxprobe.behaviour.evaluate as ev
from boxprobe.behaviour.constrained import KST24_REGEX, RegexConstraint, constraint_for, statement_regex
from boxprobe.behaviour.decoding import batches_by_context, cache_keyword_fix, generate_batch, stop_ids
from boxprobe.behaviour.scoring import parse_contents
from boxprobe.behaviour.speculative import SharedPrefix, TokenCount, count_per_prompt, greedy_batch, lookup_draft
from boxprobe.data.prompts import build_queries, load_template
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import MASK, TaskConfig, generate_sequences, sequence_examples
from boxprobe.models.loading import load_model
from boxprobe.models.toy import build_tokenizer
from helpers import make_tiny_checkpoint, make_toy_checkpoint

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def task_examples(num_samples=4, num_operations=3, seed=1):
    cfg = TaskConfig(num_samples=num_samples, num_operations=num_operations, seed=seed)
    return [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)]


def run_eval(model, examples, template=None, prompt_format=None, **config):
    """prepare() then evaluate(): the library's one entry shape."""
    queries = prepare(model, examples, resolve_spec(model, template, prompt_format))
    return ev.evaluate(model, queries, ev.EvalConfig(**config))


def decode_both(model, examples, fmt="per-box", template="toy", batch_size=8, max_new_tokens=None, constrained=False):
    """Token lists from greedy_batch (shared prefix, speculative) and generate_batch (plain), per query."""
    tpl = load_template(template)
    items = list(prepare(model, examples, resolve_spec(model, tpl, fmt)).items)
    tok = model.tokenizer
    stops, pad = stop_ids(tok), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    max_new = max_new_tokens or max(len(it.gold) for it in items) + 8
    constraint, states = ev._constraint(tpl, items, tok) if constrained else (None, [None] * len(items))
    state_of = {id(it): s for it, s in zip(items, states)}
    counts, fast, plain = TokenCount(), [], []
    with torch.inference_mode(), cache_keyword_fix(model):
        shared = SharedPrefix(model, items, counts)
        for batch in batches_by_context(items, batch_size):
            st = [state_of[id(it)] for c in batch for it in c]
            fast += greedy_batch(model, batch, shared, True, pad, max_new, stops, counts, constraint, st)
            count_per_prompt([it for c in batch for it in c], fast[-len(st):], counts)
            plain += generate_batch(model, batch, True, True, pad, max_new, stops, constraint, st)
    return items, fast, plain, counts, stops, max_new


def hf_generate(path, items, stops, max_new, pad_id, batch_size=8):
    """Plain transformers greedy generate on the same checkpoint: left-padded, KV cache on, stopped at a stop token."""
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    for s in range(0, len(items), batch_size):
        rows = [it.prompt for it in items[s:s + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              eos_token_id=sorted(stops), pad_token_id=pad_id, use_cache=True)
        for row in gen[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def with_own_answers(model, examples, template="toy"):
    """Golds replaced by the model's greedy answers, some altered late: drafts accepted whole, in part, or not at all."""
    first = run_eval(model, examples, template=template, method="generate", progress=False).frame
    varied = []
    for i, (ex, pred) in enumerate(zip(examples, first["prediction"])):
        words = str(pred).rstrip(".").split()
        answer = ex.answer_text
        if i % 3 == 0 and words:
            answer = " ".join(words)
        elif i % 3 == 1 and words:
            answer = " ".join(words[:-1] + ["apple" if words[-1] != "apple" else "cup"])
        if parse_contents(answer) is not None:
            varied.append(dataclasses.replace(ex, masked_content=f"{MASK} {answer}"))
    return varied


def assert_greedy_matches_generation(model, examples, fmt="per-box", template="default", batch_size=8,
                                     min_accepted=0):
    """The check for any model (the lead's ``smollm2`` fixture too): greedy == plain generation, token for token,
    and the speculative path computes fewer positions than a per-prompt run."""
    items, fast, plain, counts, _, _ = decode_both(model, examples, fmt, template, batch_size)
    assert len(fast) == len(items)
    assert fast == plain
    accepted = sum(f[:len(it.gold)] == it.gold for it, f in zip(items, fast))
    assert accepted >= min_accepted
    return items, fast, counts


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "ckpt"

    def boost(model, tokenizer):  # a larger "." embedding makes greedy answers short and varied
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(".")] *= 4.0
    return make_toy_checkpoint(d, d_model=64, d_mlp=128, n_ctx=512, seed=0, init_std=0.2,
                               edit=boost, tokenizer=build_tokenizer(str(d)))


@pytest.fixture(scope="module")
def toy(toy_dir):
    return load_model(toy_dir, device="cpu")


@pytest.fixture(scope="module")
def examples():
    return task_examples()


@pytest.mark.parametrize("fmt", ["per-box", "all-boxes"])
def test_greedy_tokens_equal_generate_and_hf_on_random_toy(toy, toy_dir, examples, fmt):
    subset = examples[:84] if fmt == "all-boxes" else with_own_answers(toy, examples[:84])
    items, fast, plain, counts, stops, max_new = decode_both(toy, subset, fmt, "toy", batch_size=16)
    assert fast == plain
    tok = toy.tokenizer
    assert fast == hf_generate(toy_dir, items, stops, max_new, tok.pad_token_id)
    if fmt == "per-box":  # all three draft outcomes occur: accepted whole, diverging late, diverging at once
        first_diff = {next((i for i, (a, b) in enumerate(zip(f, it.gold)) if a != b), len(f)) for it, f in zip(items, fast)}
        assert 0 in first_diff and any(0 < d < len(it.gold) for d, it in zip(first_diff, items))
        assert sum(f == it.gold for it, f in zip(items, fast)) >= 10
    assert len({tuple(f) for f in fast}) > 3


@pytest.mark.parametrize("fmt", ["per-box", "all-boxes"])
def test_greedy_tokens_equal_generate_on_tiny_llama(tiny_llama_dir, examples, fmt):
    model = load_model(tiny_llama_dir, device="cpu")
    items, fast, plain, _, stops, max_new = decode_both(model, examples[:42], fmt, "toy", batch_size=7, max_new_tokens=12)
    assert fast == plain
    assert fast == hf_generate(tiny_llama_dir, items, stops, max_new, model.tokenizer.pad_token_id)


@pytest.mark.parametrize("fmt", ["per-box", "all-boxes"])
def test_greedy_tokens_on_bundled_toy_base(examples, fmt):
    model = load_model(ROOT / "assets" / "models" / "toy-base", device="cpu")
    items, fast, counts = assert_greedy_matches_generation(model, examples[:56], fmt, "toy", batch_size=14,
                                                          min_accepted=10 if fmt == "per-box" else 0)
    if fmt == "per-box":  # 7 queries share each description; the instruction-free prefix is "<s> Description:"
        assert counts.per_prompt > 2 * counts.computed


def test_evaluate_greedy_equals_generate_and_counts_tokens(toy, examples):
    greedy = run_eval(toy, examples[:42], method="greedy", batch_size=14, progress=False)
    plain = run_eval(toy, examples[:42], method="generate", batch_size=14, progress=False)
    cols = ["prediction", "correct", "exact_generate"]
    assert greedy.frame[cols].equals(plain.frame[cols])
    s = greedy.summary
    assert s["method"] == "greedy" and s["protocol"]["decoding"] == "greedy" and s["protocol"]["template"] == "toy"
    assert s["tokens"]["computed"] < s["tokens"]["per_prompt_run"] and s["tokens"]["ratio"] > 1
    assert plain.summary["tokens"] is None
    # Without a trustworthy cache every pass recomputes; the answers stay the same.
    uncached = run_eval(toy, examples[:42], method="greedy", batch_size=14, kv_cache=False, progress=False)
    assert uncached.frame[cols].equals(plain.frame[cols])
    no_reuse = run_eval(toy, examples[:42], method="greedy", batch_size=14, reuse_context=False, progress=False)
    assert no_reuse.frame[cols].equals(plain.frame[cols])
    assert no_reuse.summary["tokens"]["computed"] > s["tokens"]["computed"]


def test_lookup_draft_takes_what_followed_the_latest_match():
    seq = [5, 6, 7, 8, 5, 6, 9, 1, 5, 6]
    assert lookup_draft(seq, 3) == [9, 1, 5]  # no earlier [1, 5, 6]; [5, 6] last occurred at 4
    assert lookup_draft(seq, 9) == [9, 1, 5, 6]  # cut at the end of the sequence
    assert lookup_draft([4, 7, 4, 8, 2, 7, 4], 2) == [8, 2]  # [2, 7, 4] absent before; [7, 4] at 1
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft(seq, 0) == []


def test_prompt_lookup_drafts_change_the_cost_not_the_answers(monkeypatch, examples):
    import boxprobe.behaviour.speculative as sp
    model = load_model(ROOT / "assets" / "models" / "toy-base", device="cpu")
    # Every gold says "nothing": where the model names objects it leaves the draft at once and decodes them all.
    varied = [dataclasses.replace(ex, masked_content=f"{MASK} nothing") for ex in examples[:56]]
    calls = []
    real = sp.forward_logits
    monkeypatch.setattr(sp, "forward_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    frames, n_calls = [], []
    for k in (0, 4):
        calls.clear()
        frames.append(run_eval(model, varied, template="toy", batch_size=14, draft_tokens=k, progress=False).frame)
        n_calls.append(len(calls))
    cols = ["prediction", "correct", "exact_generate"]
    assert frames[0][cols].equals(frames[1][cols])
    assert (~frames[0]["exact_generate"]).sum() >= 10  # enough answers leave the gold to need decoding
    assert n_calls[1] < n_calls[0]


def test_smollm2_greedy_matches_generation(smollm2):
    model = smollm2
    examples = task_examples(num_samples=2, num_operations=4, seed=3)[:21]
    assert_greedy_matches_generation(model, examples, "per-box", "default", batch_size=7)
    assert_greedy_matches_generation(model, examples[:14], "all-boxes", "kst24", batch_size=2)


# -- regex-constrained decoding ------------------------------------------------------------------


def test_automaton_agrees_with_re():
    rng = random.Random(0)
    patterns = [KST24_REGEX, statement_regex("Statement: ", "Box", None), r"a(b|cd)*e?[^x]{1,3}\.", r"\d+ [a-z]*"]
    for pattern in patterns:
        c = RegexConstraint(pattern, ["x"], set())
        alphabet = sorted(set(re.sub(r"\\.|[^a-zA-Z0-9 ,.:]", "", pattern) + "xyz09 ,."))
        samples = [KST24_REGEX.replace("( [a-zA-Z]+)*", "").replace("\\", "")]
        for _ in range(400):
            samples.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
        if pattern == KST24_REGEX:  # also near-misses of real statements
            good = ("Statement: " + ", ".join(f"Box {b} contains the cup" for b in range(7)) + ".")
            samples += [good, good[:-1], good.replace("cup", "c3p"), good.replace(", Box 3", ",Box 3"), good + "."]
        for text in samples:
            state = c.feed(c.initial, text)
            assert c.accepting(state) == bool(re.fullmatch(pattern, text)), (pattern, text)
            # a live state is exactly a prefix of some match (the regex module's partial matching)
            assert (state is not None) == bool(regex.fullmatch(pattern, text, partial=True)), (pattern, text)


def test_token_mask_follows_the_regex(toy):
    tok = toy.tokenizer
    c = constraint_for(statement_regex("Statement: ", "Box", [0, 1]), tok)
    state = c.start("Statement: Box 0 contains")
    allowed = {tok.convert_ids_to_tokens(i) for i in c.allowed(state).nonzero().flatten().tolist()}
    assert {"the", "nothing", ",", "Box"} <= allowed and not allowed & {".", "0", "1", "<s>", "</s>"}  # any word
    state = c.advance(state, tok.convert_tokens_to_ids(","))
    assert {tok.convert_ids_to_tokens(i) for i in c.allowed(state).nonzero().flatten().tolist()} == {"B", "Box"}  # "B" starts " Box" too
    with pytest.raises(ValueError, match="cannot begin a match"):
        c.start("Statement: Box 1 contains")


@pytest.mark.parametrize("fmt", ["per-box", "all-boxes"])
def test_constrained_greedy_equals_constrained_generate(toy, examples, fmt):
    items, fast, plain, _, _, _ = decode_both(toy, examples[:42], fmt, "toy", batch_size=14, constrained=True)
    assert fast == plain
    tok = toy.tokenizer
    pattern = statement_regex("Statement: ", "Box", None if fmt == "per-box" else list(range(7)))
    finished = 0
    for it, f in zip(items, fast):
        text = "Statement: " + it.query.examples[0].statement_prefix + " " + tok.decode(f)
        text = text.replace(" ,", ",").replace(" .", ".")  # the toy decoder's spacing, as in token_texts
        assert regex.fullmatch(pattern, text, partial=True), text  # never leaves the language
        if f and f[-1] in stop_ids(tok):
            finished += 1
            assert re.fullmatch(pattern, text), text
    if fmt == "per-box":  # a random model rarely completes seven boxes within the token budget
        assert finished >= len(items) // 2
    result = run_eval(toy, examples[:42], prompt_format=fmt, constrained=True, batch_size=14, progress=False)
    assert result.summary["protocol"]["decoding"] == "greedy, regex-constrained"
    assert result.summary["protocol"]["regex"] == pattern
    with pytest.raises(ValueError, match="needs decoding"):
        run_eval(toy, examples[:7], method="fast", constrained=True, progress=False)


# -- the papers' templates -------------------------------------------------------------------------

DEMO_1 = ("Box 0 contains the car, Box 1 contains the cross, Box 2 contains the bag and the machine, Box 3 contains "
          "the paper and the string, Box 4 contains the bill, Box 5 contains the apple and the cash and the glass, "
          "Box 6 contains the bottle and the map.")
DEMO_2 = (DEMO_1 + " Remove the car from Box 0. Remove the paper and the string from Box 3. Put the plane into Box 0. "
          "Move the map from Box 6 to Box 2. Remove the bill from Box 4. Put the coat into Box 3.")


def test_kst24_template_renders_the_papers_prompt(examples):
    # najoungkim/code-models-entity-tracking: prompt_structure.base_few_shots as outlines renders it (no newline
    # after the test description), BASE_EXAMPLES, and REGEX_EXPR's opening "Statement: Box 0 contains".
    ex = [e for e in examples if e.num_operations == 1][:7]
    query = build_queries(ex, load_template("kst24"), "all-boxes")[0]
    expected = (
        'Given the description after "Description:", write a true statement about all boxes and their contents to '
        'the description after "Statement:".\n\n'
        f"Description: {DEMO_1}\nStatement: {DEMO_1}\n\n"
        f"Description: {DEMO_2}\nStatement: Box 0 contains the plane, Box 1 contains the cross, Box 2 contains the "
        "bag and the machine and the map, Box 3 contains the coat, Box 4 contains nothing, Box 5 contains the apple "
        "and the cash and the glass, Box 6 contains the bottle.\n\n"
        f"Description: {ex[0].context}Statement: Box 0 contains")
    assert query.prompt == expected
    assert load_template("kst24").answer_regex == KST24_REGEX
    assert re.fullmatch(KST24_REGEX, "Statement: Box 0 contains" + query.continuation)


def test_tang_template_renders_their_prompt(examples):
    # PootieT/entity-tracking-mi utils.py: PROMPT + description + ".\nStatement: " + "Box k contains" (format_sentence).
    ex = examples[9]
    query = build_queries([ex], load_template("tang"), "per-box")[0]
    expected = (
        'Given the description after "Description:", write a true statement about a box and its contents according '
        'to the description after "Statement:".\n\n'
        f"Description: {DEMO_1}\nStatement: Box 3 contains the paper and the string.\n\n"
        f"Description: {DEMO_2}\nStatement: Box 2 contains the bag and the machine and the map.\n\n"
        f"Description: {ex.context}\nStatement: {ex.statement_prefix}")
    assert query.prompt == expected
    assert load_template("default").reference.startswith("ours")
