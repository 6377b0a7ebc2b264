"""Token positions of box labels, objects and sentence ends, checked against the generator's ground truth."""

from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from boxprobe.data.positions import (
    ROLES,
    PositionError,
    batch_position_table,
    parse_description,
    position_table,
    positions_of,
)
from boxprobe.data.prompts import build_query, load_template
from boxprobe.data.task import ALT_BOX_NAMES, TaskConfig, generate_sequences, sequence_examples
from boxprobe.models.toy import build_tokenizer

STANDARD = TaskConfig(num_samples=4, num_operations=6, seed=5)
ALT = TaskConfig(num_samples=6, num_operations=8, seed=7, alt_forms=True, move_contents=True)
CONTENTS = TaskConfig(num_samples=6, num_operations=8, seed=7, move_contents=True)


def cases(cfg):
    """(sequence, last-prefix example) for every sequence, plus a few shorter prefixes of the first."""
    out = []
    for seq in generate_sequences(cfg):
        examples = sequence_examples(seq, cfg)
        out.append((seq, examples[-1]))
    seq = generate_sequences(cfg)[0]
    examples = sequence_examples(seq, cfg)
    out += [(seq, ex) for ex in examples[: cfg.num_boxes * 3 : 4]]
    return out


def label(box, cfg):
    return ALT_BOX_NAMES[box] if cfg.alt_forms else str(box)


def expected_mentions(seq, n_ops, cfg):
    """Box mentions (box, mention, op) and object mentions (object, box, mention, op) the text must name."""
    boxes = [(b, "initial", -1) for b in range(cfg.num_boxes)]
    objects = [(o, b, "initial", -1) for b, contents in enumerate(seq.initial) for o in contents]
    for i, op in enumerate(seq.operations[:n_ops]):
        if op.kind == "move":
            boxes += [(op.box, "move_src", i), (op.dest, "move_dest", i)]
            if not (cfg.move_contents and op.all_contents):
                objects += [(o, op.box, "move_src", i) for o in op.objects]
        else:
            boxes.append((op.box, op.kind, i))
            objects += [(o, op.box, op.kind, i) for o in op.objects]
    return sorted(boxes), sorted(objects)


@pytest.fixture(scope="module")
def toy_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """A small Metaspace BPE: " 3" is "▁" + "3" and many object words split into several pieces."""
    cfg = TaskConfig(num_samples=10, num_operations=5, seed=3)
    texts = [sequence_examples(s, cfg)[-1].sentence for s in generate_sequences(cfg)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    alphabet = "".join(sorted(set("".join(texts)) | set(ALT_BOX_NAMES) | set("Description: Statement:\n")))
    backend.train_from_iterator(texts + [alphabet], trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", name_or_path="bpe-test", add_bos_token=True, padding_side="left")


@pytest.mark.parametrize("cfg", [STANDARD, ALT, CONTENTS], ids=["standard", "altforms", "move-contents"])
def test_toy_tokens_match_roles(cfg, toy_tok):
    template = load_template("toy")
    for seq, ex in cases(cfg):
        query = build_query([ex], template)
        table = position_table(query, toy_tok)
        ids = toy_tok(query.prompt)["input_ids"]
        token = [toy_tok.convert_ids_to_tokens(ids[i]) for i in table["token_index"]]
        assert set(table["role"]) <= set(ROLES)
        for row, text in zip(table.itertuples(), token):
            if row.role in ("box_mention", "query_box"):
                assert text == label(row.box, cfg), row
            elif row.role in ("object_first", "object_last"):
                assert text == row.object, row
            elif row.role in ("state_end", "op_end"):
                assert text == ".", row
        last = positions_of(table, "query_last")["token_index"].tolist()
        assert last == [len(ids) - 1] and toy_tok.convert_ids_to_tokens(ids[-1]) == "contains"
        assert positions_of(table, "query_box")["box"].tolist() == [ex.box]

        n_ops = ex.num_operations
        boxes, objects = expected_mentions(seq, n_ops, cfg)
        got_boxes = positions_of(table, "box_mention")
        assert sorted(zip(got_boxes["box"], got_boxes["mention"], got_boxes["op_index"])) == boxes
        assert len(positions_of(got_boxes, "box_mention", mention="initial")) == cfg.num_boxes
        got_objects = positions_of(table, "object_first")
        assert sorted(zip(got_objects["object"], got_objects["box"], got_objects["mention"],
                          got_objects["op_index"])) == objects
        assert len(positions_of(table, "object_last")) == len(objects)
        assert positions_of(table, "op_end")["op_index"].tolist() == list(range(n_ops))
        assert len(positions_of(table, "state_end")) == 1


def test_move_contents_is_exercised():
    texts = [ex.context for _, ex in cases(ALT) + cases(CONTENTS)]
    assert any("Move the contents of Container" in t for t in texts)
    assert any("Move the contents of Box" in t for t in texts)


def test_parse_altforms_and_move_contents():
    text = ("the cup is in Container A, there is nothing in Container B, the hat and the pen are in Container C. "
            "Pick up the hat in Container C and place it into Container B. Take the cup out of Container A. "
            "Place the key inside Container A. Move the contents of Container B to Container C.")
    ms = parse_description(text)
    assert [text[m.char_start:m.char_end] for m in ms if m.kind == "box"] == list("ABCCBAAB" "C")
    assert [(m.box, m.mention, m.op_index) for m in ms if m.kind == "box"][3:5] == [(2, "move_src", 0),
                                                                                    (1, "move_dest", 0)]
    assert [(m.object, m.box, m.mention) for m in ms if m.kind == "object"] == [
        ("cup", 0, "initial"), ("hat", 2, "initial"), ("pen", 2, "initial"), ("hat", 2, "move_src"),
        ("cup", 0, "remove"), ("key", 0, "put")]
    ends = [m for m in ms if m.kind.endswith("_end")]
    assert all(text[m.char_start] == "." for m in ends) and [m.op_index for m in ends] == [-1, 0, 1, 2, 3]

    std = parse_description("Box 0 contains nothing, Box 12 contains the bag. Move the contents of Box 12 to Box 0.")
    assert [(m.box, m.mention) for m in std if m.kind == "box"] == [(0, "initial"), (12, "initial"),
                                                                   (12, "move_src"), (0, "move_dest")]
    assert [m.object for m in std if m.kind == "object"] == ["bag"]  # "the contents" is not an object
    with pytest.raises(PositionError, match="not a boxes-task phrasing"):
        parse_description("Box 0 contains the bag. Throw the bag at Box 1.")


def test_bpe_split_tokens(bpe_tok):
    pieces = bpe_tok.convert_ids_to_tokens(bpe_tok(" Box 3")["input_ids"])
    assert pieces[-2:] == ["▁", "3"]
    multi = 0
    for cfg in (STANDARD, ALT):
        for _, ex in cases(cfg):
            query = build_query([ex], load_template("default"))
            table = position_table(query, bpe_tok)
            ids = bpe_tok(query.prompt)["input_ids"]
            for row in positions_of(table, "box_mention").itertuples():
                assert label(row.box, cfg) in bpe_tok.convert_ids_to_tokens(ids[row.token_index])
            first = positions_of(table, "object_first").reset_index(drop=True)
            last = positions_of(table, "object_last").reset_index(drop=True)
            assert (first["object"] == last["object"]).all() and (first["token_index"] <= last["token_index"]).all()
            for obj, a, b in zip(first["object"], first["token_index"], last["token_index"]):
                assert obj in bpe_tok.decode(ids[a:b + 1])
                # the pieces before first / after last are not part of the word
                assert obj not in bpe_tok.decode(ids[a + 1:b + 1]) and obj not in bpe_tok.decode(ids[a:b])
                multi += b > a
            assert bpe_tok.decode(ids[-1:]).strip() == "contains"
    assert multi > 10  # the tokenizer really splits object words


@pytest.mark.parametrize("which", ["toy", "bpe"])
def test_left_padding(which, toy_tok, bpe_tok):
    tok = toy_tok if which == "toy" else bpe_tok
    queries = [build_query([ex], load_template("toy")) for _, ex in cases(STANDARD)]
    assert len({len(tok(q.prompt)["input_ids"]) for q in queries}) > 1
    table = batch_position_table(queries, tok, padding_side="left")
    padded = tok([q.prompt for q in queries], padding=True, padding_side="left")["input_ids"]
    assert table["item"].nunique() == len(queries)
    for item, query in enumerate(queries):
        ids = tok(query.prompt)["input_ids"]
        rows = table[table["item"] == item]
        assert (rows["padded_index"] >= len(padded[item]) - len(ids)).all()
        for tok_i, pad_i in zip(rows["token_index"], rows["padded_index"]):
            assert padded[item][pad_i] == ids[tok_i]
    right = batch_position_table(queries, tok, padding_side="right")
    assert (right["padded_index"] == right["token_index"]).all()


def test_demonstrations_are_skipped(toy_tok):
    template = load_template("default")
    assert template.demonstrations
    for _, ex in cases(STANDARD):
        query = build_query([ex], template)
        table = position_table(query, toy_tok)
        start = query.prompt.rfind(ex.context)
        assert start > 0 and query.prompt.count("Description: ") == len(template.demonstrations) + 1
        offsets = toy_tok(query.prompt, return_offsets_mapping=True)["offset_mapping"]
        first_token = next(i for i, (s, e) in enumerate(offsets) if s >= start and e > s)
        assert (table["token_index"] >= first_token).all()
        assert (table["char_start"] >= start).all()


def test_missing_description_is_a_clear_error(toy_tok):
    _, ex = cases(STANDARD)[0]
    query = build_query([ex], load_template("toy"))
    broken = type(query)(prompt=query.prompt.replace("Box 0 contains", "Box 0 holds", 1),
                         continuation=query.continuation, examples=query.examples)
    with pytest.raises(PositionError, match=rf"sample_id {ex.sample_id}.*box_mention"):
        position_table(broken, toy_tok)


def test_all_boxes_format(toy_tok):
    seq = generate_sequences(STANDARD)[0]
    state = [ex for ex in sequence_examples(seq, STANDARD) if ex.num_operations == 2]
    query = build_query(state, load_template("toy"), fmt="all-boxes")
    table = position_table(query, toy_tok)
    assert positions_of(table, "query_box")["box"].tolist() == [0]
    assert Counter(positions_of(table, "op_end")["op_index"]) == Counter([0, 1])
