"""Invariants of the boxes task generator."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from boxprobe.errors import DataError
from boxprobe.data.task import (
    MASK,
    Operation,
    TaskConfig,
    apply_operation,
    count_numops,
    generate_dataset,
    generate_sequences,
    load_vocabulary,
    read_examples,
    render_objects,
    render_operation,
    sequence_examples,
    subsample_by_numops,
)

SMALL = TaskConfig(num_samples=300, seed=11)


@pytest.fixture(scope="module")
def sequences():
    return generate_sequences(SMALL)


def parse_objects(text: str) -> tuple[str, ...]:
    return () if text == "nothing" else tuple(sorted(p.removeprefix("the ") for p in text.split(" and ")))


def replay(seq, cfg):
    """Re-derive every state from the rendered text alone, to check the answers."""
    state = [list(b) for b in seq.initial]
    states = [tuple(tuple(sorted(b)) for b in state)]
    for op in seq.operations:
        text = render_operation(op, cfg)
        words = text.rstrip(".").split(" ")
        if words[0] == "Move":
            src, dest = int(words[-4]), int(words[-1])
            moved = parse_objects(" ".join(words[1:-6]))
            assert all(o in state[src] for o in moved), text
            state[src] = [o for o in state[src] if o not in moved]
            state[dest] += moved
        elif words[0] == "Remove":
            box = int(words[-1])
            removed = parse_objects(" ".join(words[1:-3]))
            assert all(o in state[box] for o in removed), text
            state[box] = [o for o in state[box] if o not in removed]
        else:
            box = int(words[-1])
            put = parse_objects(" ".join(words[1:-3]))
            assert not any(o in b for b in state for o in put), f"{text}: object already in a box"
            state[box] += put
        states.append(tuple(tuple(sorted(b)) for b in state))
    return states


def test_replaying_the_rendered_operations_reproduces_every_answer(sequences):
    for seq in sequences:
        states = replay(seq, SMALL)
        assert tuple(states) == seq.states
        for ex in sequence_examples(seq, SMALL):
            assert parse_objects(ex.gold) == states[ex.num_operations][ex.box]


def test_states_respect_limits_and_objects_are_unique(sequences):
    for seq in sequences:
        for state in seq.states:
            assert all(len(b) <= SMALL.max_items_per_box for b in state)
            flat = [o for b in state for o in b]
            assert len(flat) == len(set(flat))
            assert all(list(b) == sorted(b) for b in state)
        assert len(seq.operations) == SMALL.num_operations


def test_numops_counts_operations_that_changed_the_box(sequences):
    for seq in sequences[:50]:
        for ex in sequence_examples(seq, SMALL):
            ops = seq.operations[: ex.num_operations]
            changed = [op for op in ops if ex.box in (op.box, op.dest)]
            assert ex.numops == len(changed)
            assert ex.numops_by_op == {k: sum(op.kind == k for op in changed) for k in ("move", "remove", "put")}
            if ex.numops == 0:
                assert seq.states[ex.num_operations][ex.box] == seq.initial[ex.box]


def test_count_numops_on_a_hand_made_sequence():
    ops = [Operation("put", ("cup",), 0), Operation("move", ("cup",), 0, 2), Operation("remove", ("cup",), 2)]
    counts = count_numops(ops, 3)
    assert [sum(c.values()) for c in counts] == [2, 0, 2]
    assert counts[2] == {"move": 1, "remove": 1, "put": 0}


def test_apply_operation_rejects_removing_an_absent_object():
    with pytest.raises(ValueError, match="not in box"):
        apply_operation((("cup",), ()), Operation("remove", ("pen",), 0))


def test_splits_share_no_signature_and_no_initial_state(sequences):
    by_split = {}
    for seq in sequences:
        by_split.setdefault(seq.split, set()).add(seq.signature)
    assert set(by_split) == {"train", "dev", "test"}
    assert not by_split["train"] & by_split["dev"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["dev"] & by_split["test"]
    assert len({seq.initial for seq in sequences}) == len(sequences)
    n_signatures = sum(len(s) for s in by_split.values())
    assert abs(len(by_split["train"]) - 0.45 * n_signatures) <= 1
    assert abs(len(by_split["dev"]) - 0.10 * n_signatures) <= 1


def test_initial_state_distribution_matches_capped_poisson():
    seqs = generate_sequences(TaskConfig(num_samples=1500, seed=3, num_operations=0))
    counts = Counter(len(b) for s in seqs for b in s.initial)
    total = sum(counts.values())
    # min(Poisson(2), 3): P(0)=.135, P(1)=.271, P(2)=.271, P(>=3)=.323 (before duplicate removal).
    expected = {0: 0.135, 1: 0.271, 2: 0.271, 3: 0.323}
    for k, p in expected.items():
        assert abs(counts[k] / total - p) < 0.03, (k, counts[k] / total)


def test_operation_kinds_are_roughly_uniform_after_redraws(sequences):
    kinds = Counter(op.kind for s in sequences for op in s.operations)
    total = sum(kinds.values())
    assert set(kinds) == {"move", "remove", "put"}
    assert all(0.15 < n / total < 0.5 for n in kinds.values())


def test_rendering_default_format(sequences):
    seq = sequences[0]
    ex = sequence_examples(seq, SMALL)[-1]
    assert ex.sentence_masked.endswith(f"Box 6 contains {MASK} .")
    assert ex.masked_content == f"{MASK} {render_objects(seq.states[-1][6])}"
    assert ex.sentence.endswith(f"Box 6 contains {render_objects(seq.states[-1][6])}.")
    assert ex.sentence_masked.startswith("Box 0 contains ")
    assert render_objects(("cup", "apple")) == "the apple and the cup"
    assert render_objects(()) == "nothing"


def test_variant_alt_forms():
    cfg = TaskConfig(num_samples=40, seed=5, alt_forms=True)
    seqs = generate_sequences(cfg)
    text = " ".join(ex.sentence_masked for s in seqs[:10] for ex in sequence_examples(s, cfg)[-7:])
    assert "Box" not in text
    assert "Container A" in text and "Container G" in text
    ops = {render_operation(op, cfg).split(" ")[0] for s in seqs for op in s.operations}
    assert ops == {"Pick", "Take", "Place"}
    one = render_operation(Operation("move", ("cup",), 0, 1), cfg)
    two = render_operation(Operation("move", ("cup", "pen"), 0, 1), cfg)
    assert one == "Pick up the cup in Container A and place it into Container B."
    assert two == "Pick up the cup and the pen in Container A and place them into Container B."
    assert render_operation(Operation("remove", ("cup",), 2), cfg) == "Take the cup out of Container C."
    assert render_operation(Operation("put", ("cup",), 3), cfg) == "Place the cup inside Container D."
    from boxprobe.data.task import render_initial_state
    state = (("apple",), ("bag", "cup"), ()) + ((),) * 4
    assert render_initial_state(state, cfg).startswith(
        "the apple is in Container A, the bag and the cup are in Container B, there is nothing in Container C")


def test_variant_move_contents_and_seq2seq():
    cfg = TaskConfig(num_samples=5, move_contents=True, output_format="seq2seq")
    assert render_operation(Operation("move", ("cup", "pen"), 0, 1, all_contents=True), cfg) == \
        "Move the contents of Box 0 to Box 1."
    assert render_operation(Operation("move", ("cup",), 0, 1, all_contents=False), cfg) == \
        "Move the cup from Box 0 to Box 1."
    seq = generate_sequences(cfg)[0]
    for ex in sequence_examples(seq, cfg):
        assert ex.sentence_masked.endswith(f"Box {ex.box} {MASK} .")
        empty = not seq.states[ex.num_operations][ex.box]
        assert ex.masked_content == (f"{MASK} is empty" if empty else f"{MASK} contains {ex.gold}")


def test_variant_disjoint_vocabulary_and_numops_split():
    cfg = TaskConfig(num_samples=120, seed=2, disjoint_vocab_splits=("test",), numops_split=True)
    common, rare = set(load_vocabulary("objects")), set(load_vocabulary("objects_rare"))
    assert not common & rare and len(common) >= 100 and len(rare) >= 100
    for seq in generate_sequences(cfg):
        objects = {o for st in seq.states for b in st for o in b}
        assert objects <= (rare if seq.split == "test" else common)
        assert len(seq.operations) == (2 if seq.split == "train" else 12)


def test_subsample_keeps_whole_states_and_caps_per_numops(sequences):
    examples = [ex for s in sequences if s.split == "test" for ex in sequence_examples(s, SMALL)]
    sub = subsample_by_numops(examples, per_numops=10, seed=42)
    states = Counter(ex.state_key for ex in sub)
    assert set(states.values()) == {SMALL.num_boxes}
    assert len(states) <= 10 * 8
    assert subsample_by_numops(examples, per_numops=10, seed=42) == sub
    assert {ex.numops for ex in sub} >= {0, 1, 2, 3}


def test_dataset_files_round_trip(tmp_path):
    paths = generate_dataset(TaskConfig(num_samples=30, num_operations=3, seed=1), tmp_path, subsample_per_numops=5)
    assert set(paths) == {"train", "dev", "test", "test-subsample"}
    examples = read_examples(paths["train"])
    first = json.loads(paths["train"].open().readline())
    assert {"sentence", "sentence_masked", "masked_content", "sample_id", "numops", "numops_by_op"} <= set(first)
    assert examples[0].sentence == first["sentence"]
    assert examples[0].gold in first["sentence"]


def test_read_examples_reports_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field"):
        read_examples(bad)
    bad.write_text('{"sentence": "a", "sentence_masked": "Box 0 contains <extra_id_0> .", "masked_content": '
                   '"<extra_id_0> nothing", "sample_id": 0, "numops": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_examples(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_examples(bad)
    with pytest.raises(FileNotFoundError, match="boxprobe generate"):
        read_examples(tmp_path / "missing.jsonl")


def test_same_seed_gives_identical_files_whatever_the_hash_seed(tmp_path):
    code = ("import sys; from boxprobe.data.task import TaskConfig, generate_dataset; "
            "generate_dataset(TaskConfig(num_samples=60, seed=9, alt_forms=True), sys.argv[1], subsample_per_numops=5)")
    digests = []
    for hash_seed in ("0", "1", "12345"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.jsonl"))})
    assert digests[0] == digests[1] == digests[2]
    assert len(digests[0]) == 4


def test_different_seeds_differ():
    a = generate_sequences(TaskConfig(num_samples=20, seed=1))
    b = generate_sequences(TaskConfig(num_samples=20, seed=2))
    assert [s.initial for s in a] != [s.initial for s in b]


def test_config_rejects_unknown_keys_and_bad_values():
    from boxprobe.config import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'num_boxes'"):
        TaskConfig.from_dict({"num_boxs": 7})
    with pytest.raises(ConfigError, match="output_format"):
        TaskConfig(output_format="t5")


GOOD = {"sentence": "Box 0 contains the bag, Box 1 contains nothing. Box 0 contains the bag.",
        "sentence_masked": "Box 0 contains the bag, Box 1 contains nothing. Box 0 contains <extra_id_0> .",
        "masked_content": "<extra_id_0> the bag", "sample_id": 3, "numops": 0, "numops_by_op": {"move": 0},
        "num_operations": 0, "box": 0}


@pytest.mark.parametrize("change, message", [
    ({"numops": "2"}, r"bad.jsonl:2: field 'numops' must be an integer, got '2' \(str\)"),
    ({"numops": "three"}, r"bad.jsonl:2: field 'numops' must be an integer"),
    ({"sentence_masked": 7}, r"bad.jsonl:2: field 'sentence_masked' must be a string"),
    ({"sample_id": True}, r"bad.jsonl:2: field 'sample_id' must be an integer"),
    ({"numops": -1}, r"bad.jsonl:2: field 'numops' must be >= 0"),
    ({"box": 99}, r"bad.jsonl:2: field 'box' is 99, but the description names 2 boxes"),
    ({"numops_by_op": {"move": "1"}}, r"bad.jsonl:2: field 'numops_by_op' must map"),
])
def test_read_examples_checks_field_types_naming_file_and_line(tmp_path, change, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "box": 1, **change}) + "\n")
    with pytest.raises(DataError, match=message):
        read_examples(bad)


def test_read_examples_refuses_duplicate_sample_ids_with_other_content(tmp_path):
    bad = tmp_path / "bad.jsonl"
    other_state = {k: v.replace("Box 1 contains nothing", "Box 1 contains the cup") if isinstance(v, str) else v
                   for k, v in GOOD.items()}
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({**other_state, "box": 1}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2: sample_id 3 has another initial state than on line 1"):
        read_examples(bad)
    answer = {**GOOD, "sentence": GOOD["sentence"].replace("contains the bag.", "contains nothing.")}
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps(answer) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2: sample_id 3, num_operations 0, box 0 is also on line 1"):
        read_examples(bad)
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")  # an exact repeat is the same query
    assert len(read_examples(bad)) == 2
