"""Behavioural evaluation: batching, the fast path against generation, context reuse, files and bad inputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import boxprobe.behaviour.evaluate as ev
from boxprobe.cli import main
from boxprobe.behaviour.evaluate import ContextLengthError, EvalConfig, evaluate_file, kv_cache_works
from boxprobe.data.prompts import build_queries, load_template
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.models.loading import ModelLoadError, load_model
from boxprobe.behaviour.scoring import parse_contents
from boxprobe.data.task import MASK, TaskConfig, generate_sequences, load_vocabulary, sequence_examples, write_examples
from boxprobe.models.toy import build_tokenizer
from helpers import make_toy_checkpoint

TOY_META = {"prompt_template": "toy", "prompt_format": "per-box"}


def evaluate(model, examples, prompt_format=None, limit=None, **config):
    """prepare() then evaluate(), the library's one entry shape."""
    queries = prepare(model, examples, resolve_spec(model, format=prompt_format), limit=limit)
    return ev.evaluate(model, queries, EvalConfig(**config))


def make_checkpoint(path, tok, n_ctx=512, boost_period=4.0, seed=0):
    """A random toy Llama; wide weights and a larger "." embedding make greedy answers varied and short."""
    def boost(model, tokenizer):
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(".")] *= boost_period

    return make_toy_checkpoint(path, d_model=64, d_mlp=128, n_ctx=n_ctx, seed=seed, init_std=0.2, metadata=TOY_META,
                               edit=boost, tokenizer=tok)


def task_examples(num_samples=4, num_operations=3, seed=1):
    cfg = TaskConfig(num_samples=num_samples, num_operations=num_operations, seed=seed)
    return [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "ckpt"
    return make_checkpoint(d, build_tokenizer(str(d)))


@pytest.fixture(scope="module")
def toy(toy_dir):
    return load_model(toy_dir, device="cpu")


@pytest.fixture(scope="module")
def examples():
    return task_examples()  # 4 sequences x 4 prefixes x 7 boxes; contexts of different lengths


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    write_examples(path, examples[:42])
    return path


def test_left_padded_batches_equal_single_prompts(toy, examples):
    subset = examples[::4][:24]  # mixes contexts of 0..3 operations, so rows need different padding
    one = evaluate(toy, subset, method="both", batch_size=1, progress=False).frame
    eight = evaluate(toy, subset, method="both", batch_size=8, progress=False).frame
    assert len(one) == 24
    for col in ("prediction", "exact_fast", "correct_fast", "exact_generate", "correct_generate"):
        assert one[col].tolist() == eight[col].tolist(), col
    assert one["prediction"].nunique() > 3  # a constant prediction would make the comparison weak


def test_fast_path_matches_generation_on_varied_answers(toy, examples):
    # Golds taken from the model's own greedy answers (right), those answers with the last object changed or
    # one more word (wrong late), and the true golds (wrong early): the fast verdict must equal generation's.
    base = examples[:84]
    first = evaluate(toy, base, method="generate", batch_size=16, progress=False).frame
    varied = []
    for i, (ex, pred) in enumerate(zip(base, first["prediction"])):
        words = pred.rstrip(".").split()
        if i % 3 == 0 and pred.endswith(".") and words:
            answer = " ".join(words)
        elif i % 3 == 1 and pred.endswith(".") and words:
            answer = " ".join(words[:-1] + ["apple" if words[-1] != "apple" else "cup"] + ["cup"] * (i % 2))
        else:
            answer = ex.answer_text
        if parse_contents(answer) is not None:
            varied.append(dataclasses.replace(ex, masked_content=f"{MASK} {answer}"))
    assert len(varied) >= 60
    result = evaluate(toy, varied, method="both", batch_size=16, progress=False)
    frame = result.frame
    assert (frame["exact_fast"] == frame["exact_generate"]).all()
    assert result.summary["agreement"]["exact_match"] == 1.0
    assert frame["exact_generate"].sum() >= 10 and (~frame["exact_generate"]).sum() >= 10
    tok = toy.tokenizer
    mismatch_at = set()
    for gold, pred, ok in zip(frame["gold"], frame["prediction"], frame["exact_generate"]):
        if not ok:
            g, p = tok(f" {gold}.", add_special_tokens=False)["input_ids"], tok(pred, add_special_tokens=False)["input_ids"]
            mismatch_at.add(next((i for i, (a, b) in enumerate(zip(g, p)) if a != b), min(len(g), len(p))))
    assert len(mismatch_at) >= 3  # wrong at the first token, later, and by stopping early or late


def test_context_reuse_equals_no_reuse(toy, examples, monkeypatch):
    assert kv_cache_works(toy, toy.tokenizer("Box 0 contains the apple and the cup .")["input_ids"])
    subset = examples[:35]
    reused = evaluate(toy, subset, method="both", batch_size=14, reuse_context=True, progress=False)
    plain = evaluate(toy, subset, method="both", batch_size=14, reuse_context=False, progress=False)
    assert reused.summary["context_reuse"] and not plain.summary["context_reuse"]
    cols = ["prediction", "exact_fast", "correct_fast", "exact_generate", "correct_generate"]
    assert reused.frame[cols].equals(plain.frame[cols])
    # Where the cache cannot be trusted, generation recomputes every step and still gives the same answers.
    monkeypatch.setattr(ev, "kv_cache_works", lambda model, tokens: False)
    uncached = evaluate(toy, subset, method="both", batch_size=14, progress=False)
    assert not uncached.summary["kv_cache"] and not uncached.summary["context_reuse"]
    assert uncached.frame[cols].equals(plain.frame[cols])


def test_context_reuse_in_compatibility_mode(toy_dir, examples):
    compat = load_model(toy_dir, device="cpu", compatibility_mode=True)
    assert kv_cache_works(compat, compat.tokenizer("Box 0 contains the apple and the cup .")["input_ids"])
    reused = evaluate(compat, examples[:21], method="both", batch_size=7, progress=False)
    plain = evaluate(compat, examples[:21], method="both", batch_size=7, reuse_context=False, progress=False)
    assert reused.summary["context_reuse"] and reused.summary["weight_mode"] == "compatibility"
    cols = ["prediction", "exact_fast", "exact_generate"]
    assert reused.frame[cols].equals(plain.frame[cols])


def test_all_boxes_format(toy, examples):
    result = evaluate(toy, examples[:56], prompt_format="all-boxes", method="both", batch_size=3, progress=False)
    frame = result.frame
    assert len(frame) == 56 and frame["query"].nunique() == 8
    assert (frame.groupby("query")["box"].apply(list) == [list(range(7))] * 8).all()
    assert result.summary["agreement"]["exact_match"] == 1.0
    # A query is exact only if every one of its boxes passes the fast per-box check.
    per_query = frame.groupby("query").agg(exact=("exact_fast", "first"), boxes=("correct_fast", "all"))
    assert (per_query["exact"] <= per_query["boxes"]).all()


def test_all_boxes_fast_verdict_per_box_span(toy, examples):
    tok = toy.tokenizer
    item = prepare(toy, examples[:7], resolve_spec(toy, format="all-boxes"))[0]
    spans = item.spans
    assert len(spans) == 7 and spans[0][0] == 0 and spans[-1][1] == len(item.gold)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert tok.decode(item.gold[slice(*spans[1])]).startswith("Box 1 contains")
    stops = ev.stop_ids(tok)

    def verdicts(argmax):
        rows = ev._rows(item, "fast", argmax, None, tok, stops)
        return [r["correct_fast"] for r in rows], rows[0]["exact_fast"]
    assert verdicts(list(item.gold)) == ([True] * 7, True)
    wrong = list(item.gold)
    wrong[spans[2][1] - 2] = tok.convert_tokens_to_ids("kite" if tok.decode(wrong[spans[2][1] - 2]) != "kite" else "cup")
    assert verdicts(wrong) == ([True, True, False, True, True, True, True], False)
    early_stop = list(item.gold)  # "." where gold has "," after box 0: box 0 is right, the statement is not
    early_stop[spans[0][1] - 1] = tok.convert_tokens_to_ids(".")
    assert verdicts(early_stop) == ([True] * 7, False)


def test_multi_token_objects_with_a_bpe_tokenizer(tmp_path):
    cfg = TaskConfig(num_samples=10, num_operations=4, seed=3)
    texts = [sequence_examples(s, cfg)[-1].sentence for s in generate_sequences(cfg)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = "".join(sorted(set("".join(texts + list(load_vocabulary("objects")))) | set("Description: Statement:\n")))
    backend.train_from_iterator(texts + [alphabet], trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    path = tmp_path / "bpe"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", name_or_path=str(path), add_bos_token=True)
    make_checkpoint(path, tok)
    model = load_model(path, device="cpu")
    examples = [e for s in generate_sequences(cfg)[:2] for e in sequence_examples(s, cfg)][:28]
    objects = {o for e in examples for o in (parse_contents(e.gold) or ())}
    assert any(len(tok(f" {o}", add_special_tokens=False)["input_ids"]) > 1 for o in objects)
    result = evaluate(model, examples, method="both", batch_size=7, progress=False)
    assert result.summary["agreement"]["exact_match"] == 1.0
    assert len(result.frame) == 28
    item = prepare(model, examples[:1])[0]
    assert tok.decode(item.gold) == examples[0].answer_text + "."


def test_evaluate_file_writes_summary(toy_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result = evaluate_file(toy_dir, data_file, out, limit=21, config=EvalConfig(method="both", batch_size=7))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["template"] == "toy" and summary["prompt_format"] == "per-box" and summary["method"] == "both"
    assert summary["weight_mode"] == "raw" and summary["revision"] and summary["model"] == str(toy_dir)
    for key in ("accuracy_by_numops", "n_by_numops", "ci_by_numops"):
        assert [str(k) for k in range(8)] == list(summary[key])[:8]
    assert sum(summary["n_by_numops"].values()) == summary["n_examples"] == 21
    assert 0.0 <= summary["agreement"]["correct"] <= 1.0 and "state_accuracy" in summary
    frame = result.frame
    assert {"sample_id", "box", "num_operations", "numops", "numops_move", "gold", "prediction", "correct",
            "method"} <= set(frame.columns)
    assert len((out / "results.csv").read_text().splitlines()) == 22
    assert "numops" in result.table() and "95% CI" in result.table()


def test_cli_eval_uses_checkpoint_template(toy_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["eval", "--model", str(toy_dir), "--data", str(data_file), "--out", str(out), "--limit", "14",
                 "--batch-size", "7"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["template"] == "toy" and summary["n_queries"] == 14 and summary["method"] == "greedy"
    assert "state accuracy" in capsys.readouterr().out


def test_bad_data_files(toy, data_file, tmp_path):
    good = data_file.read_text().splitlines()[0]
    cases = {"malformed.jsonl": (f"{good}\n{{not json\n", r"malformed.jsonl:2: not valid JSON"),
             "missing.jsonl": (f"{good}\n{good}\n" + json.dumps({"sentence": "x"}) + "\n", r"missing.jsonl:3: missing field"),
             "empty.jsonl": ("", r"no examples")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            evaluate_file(toy, tmp_path / name, tmp_path / "out")


def test_unknown_model_is_named(data_file, tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-boxprobe-model"):
        evaluate_file("no-such-boxprobe-model", data_file, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="no checkpoint directory"):
        evaluate_file(tmp_path / "missing_ckpt", data_file, tmp_path / "out")


def test_too_long_prompt_fails_before_any_batch(tmp_path, examples, monkeypatch):
    path = tmp_path / "short"
    make_checkpoint(path, build_tokenizer(str(path)), n_ctx=80)
    model = load_model(path, device="cpu")
    data = tmp_path / "d.jsonl"
    write_examples(data, examples[:28])
    tok = model.tokenizer
    lengths = [len(tok(q.prompt + q.continuation)["input_ids"]) - 1
               for q in build_queries(examples[:28], load_template("toy"))]
    first_bad = next(i for i, n in enumerate(lengths) if n > 80)
    assert first_bad > 0  # the short contexts fit; a later one does not

    def no_batches(*args, **kwargs):
        raise AssertionError("a batch ran before the length check")
    monkeypatch.setattr(ev, "fast_batch", no_batches)
    monkeypatch.setattr(ev, "greedy_batch", no_batches)
    with pytest.raises(ContextLengthError) as err:
        evaluate_file(model, data, tmp_path / "out")
    msg = str(err.value)
    ex = examples[first_bad]
    assert f"d.jsonl:{first_bad + 1}:" in msg and f"sample_id={ex.sample_id}" in msg
    assert "n_ctx=80" in msg and f"need {lengths[first_bad]} positions" in msg and "demonstrations" in msg
    assert not (tmp_path / "out" / "results.csv").exists()


def test_failed_batch_keeps_computed_rows(toy, data_file, tmp_path, monkeypatch):
    real, calls = ev.greedy_batch, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "greedy_batch", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="device lost"):
        evaluate_file(toy, data_file, out, config=EvalConfig(batch_size=7))
    partial = (out / "results.partial.csv").read_text().splitlines()
    assert len(partial) == 1 + 7 and not (out / "summary.json").exists()
