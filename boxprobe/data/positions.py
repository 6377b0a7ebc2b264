"""Token positions of the entities in a boxes prompt: box labels, objects, sentence ends, the query.

The test description is parsed from its text alone (regular expressions over the phrasings that
``boxprobe.data.task`` renders), giving character spans; the fast tokenizer's offset mapping turns those
into token indices, so the table holds for word-level, BPE and SentencePiece-style tokenizers alike.

>>> from boxprobe.data.task import Example
>>> ms = parse_description("Box 0 contains the cup, Box 1 contains nothing. Put the hat into Box 1.")
>>> [(m.kind, m.box, m.object, m.mention, m.op_index) for m in ms if m.kind != "box"]
[('object', 0, 'cup', 'initial', -1), ('state_end', None, None, '', -1), ('object', 1, 'hat', 'put', 0), ('op_end', None, None, '', 0)]
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from boxprobe.data.prompts import Query
from boxprobe.data.task import ALT_BOX_NAMES
from boxprobe.errors import ArgumentError, BoxprobeError, ConfigError

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("query_last", "query_box", "box_mention", "object_first", "object_last", "state_end", "op_end")
COLUMNS = ("role", "token_index", "box", "object", "op_index", "mention", "char_start", "char_end")

# A box name; group 1 holds a standard box number, group 2 an AltForms container letter.
LABEL_RE = re.compile(r"\b(?:Box (\d+)|Container ([A-Z]))\b")
OBJECT_RE = re.compile(r"\bthe (\w+)")
_L = r"(?:Box \d+|Container [A-Z])"
_T = r"the \w+(?: and the \w+)*"
_INITIAL_CLAUSE = re.compile(rf"{_L} contains (?:nothing|{_T})|(?:there is nothing|{_T} (?:is|are)) in {_L}")
# Operation sentences (without their final period) -> kind; moves name the source box first.
_OPERATIONS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), k) for p, k in (
    (rf"Move the contents of {_L} to {_L}", "move_contents"),
    (rf"Move {_T} from {_L} to {_L}", "move"),
    (rf"Pick up {_T} in {_L} and place (?:it|them) into {_L}", "move"),
    (rf"Remove {_T} from {_L}", "remove"),
    (rf"Take {_T} out of {_L}", "remove"),
    (rf"Put {_T} into {_L}", "put"),
    (rf"Place {_T} inside {_L}", "put"),
))


class PositionError(BoxprobeError, ValueError):
    """A prompt in which an expected mention or token cannot be found."""


@dataclass(frozen=True)
class Mention:
    """One located piece of a description; ``char_start``/``char_end`` index the parsed text."""

    kind: Literal["box", "object", "state_end", "op_end"]
    char_start: int
    char_end: int
    op_index: int
    """-1 for the initial state, else the operation's index."""
    box: int | None = None
    """The box named (kind ``box``) or the box an object mention is about (a move's source)."""
    object: str | None = None
    mention: str = ""
    """One of initial, move_src, move_dest, remove, put (empty for sentence ends)."""


def label_box(match: re.Match) -> int:
    """The box index of a ``LABEL_RE`` match (``Box 3`` -> 3, ``Container C`` -> 2)."""
    return int(match.group(1)) if match.group(1) is not None else ALT_BOX_NAMES.index(match.group(2))


def _label_span(match: re.Match) -> tuple[int, int]:
    return match.span(1) if match.group(1) is not None else match.span(2)


def _sentences(context: str) -> list[tuple[int, int]]:
    # (start, end) of each sentence body, leading spaces dropped, end at the period (exclusive).
    spans = []
    for m in re.finditer(r"[^.]+\.", context):
        start = m.start() + len(m.group()) - len(m.group().lstrip())
        spans.append((start, m.end() - 1))
    if not spans or context[spans[-1][1] + 1:].strip():
        raise PositionError(f"Cannot split {context!r} into sentences ending with '.'.")
    return spans


def _mentions_in(text: str, offset: int, op_index: int, boxes: list[str], object_mention: str,
                 with_objects: bool = True) -> list[Mention]:
    # Objects are about the first box named: the clause's box, or a move's source.
    out = []
    labels = list(LABEL_RE.finditer(text))
    for m, role in zip(labels, boxes):
        s, e = _label_span(m)
        out.append(Mention("box", offset + s, offset + e, op_index, label_box(m), None, role))
    if with_objects:
        box = label_box(labels[0])
        for m in OBJECT_RE.finditer(text):
            s, e = m.span(1)
            out.append(Mention("object", offset + s, offset + e, op_index, box, m.group(1), object_mention))
    return out


def parse_description(context: str) -> list[Mention]:
    """Every box label, object mention and sentence end of a description, in text order.

    Understands the standard phrasing, the AltForms phrasing and "Move the contents of Box a to
    Box b." (which names no object). Raises ``PositionError`` on a sentence of another form.
    """
    spans = _sentences(context)
    mentions: list[Mention] = []
    s0, e0 = spans[0]
    pos = s0
    for clause in context[s0:e0].split(", "):
        if not _INITIAL_CLAUSE.fullmatch(clause):
            raise PositionError(f"Initial-state clause {clause!r} of {context[s0:e0 + 1]!r} is not a boxes-task phrasing.")
        mentions += _mentions_in(clause, pos, -1, ["initial"], "initial")
        pos += len(clause) + 2
    mentions.append(Mention("state_end", e0, e0 + 1, -1))
    for i, (s, e) in enumerate(spans[1:]):
        sentence = context[s:e]
        kind = next((k for p, k in _OPERATIONS if p.fullmatch(sentence)), None)
        if kind is None:
            raise PositionError(f"Operation {i} {sentence + '.'!r} is not a boxes-task phrasing.")
        if kind.startswith("move"):
            mentions += _mentions_in(sentence, s, i, ["move_src", "move_dest"], "move_src",
                                     with_objects=kind == "move")
        else:
            mentions += _mentions_in(sentence, s, i, [kind], kind)
        mentions.append(Mention("op_end", e, e + 1, i))
    return sorted(mentions, key=lambda m: m.char_start)


# -- token mapping ----------------------------------------------------------------------------------


def encode_with_offsets(tokenizer, texts: Sequence[str],
                        add_special_tokens: bool = True) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Ids, character offsets and special-token mask of each text, tokenised as the tokenizer itself does."""
    if not getattr(tokenizer, "is_fast", False):
        raise PositionError(f"Token positions need a fast tokenizer (offset mappings); {type(tokenizer).__name__} of "
                        f"{getattr(tokenizer, 'name_or_path', '?')!r} is not one. Load it with use_fast=True.")
    enc = tokenizer(list(texts), return_offsets_mapping=True, return_special_tokens_mask=True, padding=False,
                    add_special_tokens=add_special_tokens)
    return [(list(ids), np.asarray(offs, dtype=np.int64).reshape(-1, 2), np.asarray(special, dtype=bool))
            for ids, offs, special in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"])]


def _sample_id(query: Query):
    return query.examples[0].sample_id if query.examples else None


def prompt_role_rows(query: Query, offsets: np.ndarray, special: np.ndarray) -> list[tuple]:
    """The rows (``COLUMNS``) of every prompt role of ``query``, from its prompt's offsets and special-token mask."""
    prompt, sid = query.prompt, _sample_id(query)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ~special & (ends > starts)  # special tokens and BOS carry empty spans

    def missing(role: str, what: str) -> PositionError:
        return PositionError(f"Prompt of sample_id {sid}: no token for role {role!r} ({what}). "
                             "Check that the tokenizer's offset mapping covers the prompt text.")

    def covering(char: int, role: str) -> int:
        hit = np.flatnonzero(real & (starts <= char) & (char < ends))
        if not len(hit):
            raise missing(role, f"character {char} {prompt[char:char + 1]!r}")
        return int(hit[-1])

    def overlapping(s: int, e: int, role: str) -> np.ndarray:
        hit = np.flatnonzero(real & (starts < e) & (ends > s))
        if not len(hit):
            raise missing(role, f"{prompt[s:e]!r} at characters {s}..{e}")
        return hit

    rows = []

    def add(role, tok, s, e, box=None, obj=None, op=None, mention=""):
        rows.append((role, tok, box, obj, op, mention, s, e))

    nonempty = np.flatnonzero(real)
    if not len(nonempty):
        raise missing("query_last", "the prompt has no text tokens")
    last = int(nonempty[-1])
    add("query_last", last, int(starts[last]), int(ends[last]))

    statement = query.examples[0].statement_prefix
    at = prompt.rfind(statement)
    label = list(LABEL_RE.finditer(prompt, at)) if at >= 0 else []
    if not label:
        raise missing("query_box", f"statement {statement!r} not found in the prompt")
    s, e = _label_span(label[0])
    add("query_box", covering(e - 1, "query_box"), s, e, box=label_box(label[0]))

    context = query.examples[0].context
    base = prompt.rfind(context)
    if base < 0:
        raise missing("box_mention", f"test description {context[:60]!r}... not found in the prompt")
    try:
        mentions = _parsed(context)
    except PositionError as err:
        raise PositionError(f"Prompt of sample_id {sid}: {err}") from None
    for m in mentions:
        s, e = base + m.char_start, base + m.char_end
        if m.kind == "box":
            add("box_mention", covering(e - 1, "box_mention"), s, e, m.box, None, m.op_index, m.mention)
        elif m.kind == "object":
            hit = overlapping(s, e, "object_first")
            add("object_first", int(hit[0]), s, e, m.box, m.object, m.op_index, m.mention)
            add("object_last", int(hit[-1]), s, e, m.box, m.object, m.op_index, m.mention)
        else:
            add(m.kind, covering(s, m.kind), s, e, None, None, m.op_index)
    return rows


@lru_cache(maxsize=4096)
def _parsed(context: str) -> tuple[Mention, ...]:
    # The queries of one context share its description: parse it once.
    return tuple(parse_description(context))


def frame_rows(rows: list[tuple], with_k: bool = False) -> pd.DataFrame:
    """A typed position table from rows of ``COLUMNS`` (plus ``k``, the answer object's rank, if ``with_k``)."""
    table = pd.DataFrame(rows, columns=list(COLUMNS) + (["k"] if with_k else []))
    if with_k:
        table["k"] = table["k"].astype("Int64")
    table["token_index"] = table["token_index"].astype("int64")
    table["box"] = table["box"].astype("Int64")
    table["op_index"] = table["op_index"].astype("Int64")
    table["object"] = table["object"].astype(object).where(table["object"].notna(), None)
    return table


def position_table(query: Query, tokenizer) -> pd.DataFrame:
    """Token index of every role in one prompt (indices into its unpadded ids, BOS included).

    Columns: role, token_index, box (Int64), object, op_index (Int64), mention, char_start, char_end
    (character span of the mention in ``query.prompt``). Box labels map to the token holding the
    label's last character (the digit or letter), objects to their first and last overlapping token.
    """
    (_, offsets, special), = encode_with_offsets(tokenizer, [query.prompt])
    return frame_rows(prompt_role_rows(query, offsets, special))


def batch_position_table(queries: Sequence[Query], tokenizer, padding_side: str = "left") -> pd.DataFrame:
    """Position tables of a batch, with ``item`` and ``padded_index`` for padding to the longest prompt."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    encoded = encode_with_offsets(tokenizer, [q.prompt for q in queries])
    width = max((len(ids) for ids, _, _ in encoded), default=0)
    rows, items, shifts = [], [], []
    for item, (query, (ids, offsets, special)) in enumerate(zip(queries, encoded)):
        query_rows = prompt_role_rows(query, offsets, special)
        rows += query_rows
        items += [item] * len(query_rows)
        shifts += [width - len(ids) if padding_side == "left" else 0] * len(query_rows)
    table = frame_rows(rows)  # one frame for the batch: building one per query dominated caching time
    table.insert(0, "item", np.asarray(items, dtype=np.int64))
    table["padded_index"] = table["token_index"] + np.asarray(shifts, dtype=np.int64)
    return table


def positions_of(table: pd.DataFrame, role: str, **filters) -> pd.DataFrame:
    """Rows of ``table`` with ``role`` whose columns equal the filters (a list/tuple/set means any of).

    For example ``positions_of(t, "box_mention", box=3, mention=["move_src", "move_dest"])``.
    """
    if role not in ROLES:
        raise ConfigError(f"Unknown role {role!r}; roles are {', '.join(ROLES)}.")
    keep = table["role"] == role
    for col, value in filters.items():
        if col not in table.columns:
            raise ArgumentError(f"Unknown column {col!r} to filter on; columns are {', '.join(table.columns)}.")
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        keep &= table[col].isin(values)
    return table[keep]

