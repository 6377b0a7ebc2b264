"""The toy corpora: boxes documents answer correctly, and code documents print what Python prints."""

import contextlib
import io
import re

import numpy as np

from lab.corpus import CorpusWeights, boxes_document, code_document
from boxprobe.models.toy import build_tokenizer, toy_words


def test_code_documents_print_exactly_what_python_prints():
    rng = np.random.default_rng(0)
    for _ in range(200):
        doc = code_document(rng, num_boxes=7, max_operations=12)
        code = "".join(text for text, w in doc if w == CorpusWeights().context)
        expected = "".join(text for text, w in doc if w == CorpusWeights().answer)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<toy program>", "exec"), {})
        assert out.getvalue() == expected


def test_boxes_document_statements_cover_every_box_once():
    rng = np.random.default_rng(1)
    for _ in range(50):
        doc = boxes_document(rng, num_boxes=7, max_operations=12)
        assert doc[0][0].startswith("Description: ")
        queries = [t for t, w in doc if w == CorpusWeights().query]
        boxes = sorted(int(re.search(r"(\d) contains$", q).group(1)) for q in queries)
        assert boxes == list(range(7))
        answers = [t for t, w in doc if w == CorpusWeights().answer]
        assert all(a.endswith(".") and (a.startswith(" the ") or a == " nothing.") for a in answers)


def test_every_corpus_word_is_in_the_toy_vocabulary():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    rng = np.random.default_rng(2)
    docs = [boxes_document(rng, 7, 12, alt_forms_prob=0.5) for _ in range(30)]
    docs += [code_document(rng, 7, 12) for _ in range(30)]
    for doc in docs:
        for text, _ in doc:
            assert unk not in tok(text, add_special_tokens=False)["input_ids"], text
    assert len(toy_words()) == len(set(toy_words())) == len(tok)


def test_segment_tokenisation_equals_joined_tokenisation():
    tok = build_tokenizer()
    rng = np.random.default_rng(3)
    for maker in (lambda: boxes_document(rng, 7, 6), lambda: code_document(rng, 7, 6)):
        doc = maker()
        pieces = [i for text, _ in doc for i in tok(text, add_special_tokens=False)["input_ids"]]
        assert pieces == tok("".join(t for t, _ in doc), add_special_tokens=False)["input_ids"]
