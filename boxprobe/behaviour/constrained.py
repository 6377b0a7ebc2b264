"""Regex-constrained greedy decoding: a token-level logits mask from a regular expression.

Kim, Schuster & Toshniwal (2024) decode with ``outlines.generate.regex(model, REGEX_EXPR,
sampler=GreedySampler())`` (najoungkim/code-models-entity-tracking ``src/main_autoregressive.py``
``main``, regex in ``src/constants.py`` ``REGEX_EXPR``): at every step only tokens that keep the text
generated so far a prefix of some match are allowed, and the argmax is taken over those. This
module does the same without outlines: the regex is parsed with Python's own parser
(``re._parser``), compiled to a Thompson NFA, determinised lazily, and for each DFA state reached
the allowed tokens and their successor states are computed once by walking every token's text.

Two differences from outlines, both documented in the evaluation summary: the statement opening
(``Statement: Box 0 contains``) is part of our prompt, so the automaton starts after it rather than
letting the model choose how to tokenize it; and a token's text is taken in context (decoded after
a plain word), which matches byte-level BPE, SentencePiece and word-level tokenizers alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

try:  # Python >= 3.11
    import re._constants as _c
    import re._parser as _p
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

# The paper's expression (najoungkim/code-models-entity-tracking, src/constants.py, REGEX_EXPR).
KST24_REGEX = (r"Statement: Box 0 contains( [a-zA-Z]+)*, Box 1 contains( [a-zA-Z]+)*, Box 2 contains( [a-zA-Z]+)*,"
               r" Box 3 contains( [a-zA-Z]+)*, Box 4 contains( [a-zA-Z]+)*, Box 5 contains( [a-zA-Z]+)*,"
               r" Box 6 contains( [a-zA-Z]+)*\.")
CONTENTS = r"( [a-zA-Z]+)*"


def statement_regex(statement_prefix: str, box_label: str, boxes: list[int] | None) -> str:
    """The paper's pattern generalised: one box (``boxes=None``: any number) or the listed boxes in order."""
    head = re.escape(statement_prefix)
    if boxes is None:
        return rf"{head}{re.escape(box_label)} [0-9]+ contains{CONTENTS}\."
    parts = [f"{re.escape(box_label)} {b} contains{CONTENTS}" for b in boxes]
    return head + ", ".join(parts) + r"\."


# -- regex -> NFA ---------------------------------------------------------------------------------


def _char_test(op, av):
    """A predicate on one character for an sre literal, class or ANY."""
    if op is _c.LITERAL:
        return lambda ch, c=chr(av): ch == c
    if op is _c.NOT_LITERAL:
        return lambda ch, c=chr(av): ch != c
    if op is _c.ANY:
        return lambda ch: ch != "\n"
    if op is _c.IN:
        negate = bool(av) and av[0][0] is _c.NEGATE
        tests = [_char_test(o, a) if o is not _c.RANGE else (lambda ch, lo=a[0], hi=a[1]: lo <= ord(ch) <= hi)
                 for o, a in (av[1:] if negate else av) if o is not _c.CATEGORY] + [
            _category(a) for o, a in av if o is _c.CATEGORY]
        return lambda ch: any(t(ch) for t in tests) != negate
    raise ValueError(f"unsupported regular-expression element {op}")


def _category(cat):
    known = {_c.CATEGORY_DIGIT: str.isdigit, _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdigit(),
             _c.CATEGORY_SPACE: str.isspace, _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
             _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
             _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_")}
    if cat not in known:
        raise ValueError(f"unsupported character category {cat}")
    return known[cat]


@dataclass
class _NFA:
    eps: list[list[int]] = field(default_factory=list)
    edges: list[list[tuple]] = field(default_factory=list)

    def new(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, seq, s: int) -> int:
        for op, av in seq:
            s = self.item(op, av, s)
        return s

    def item(self, op, av, s: int) -> int:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            t = self.new()
            self.edges[s].append((_char_test(op, av), t))
            return t
        if op is _c.SUBPATTERN:
            return self.build(av[-1], s)
        if op is _c.BRANCH:
            t = self.new()
            for alt in av[1]:
                a = self.new()
                self.eps[s].append(a)
                self.eps[self.build(alt, a)].append(t)
            return t
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # laziness is irrelevant for a language
            lo, hi, body = av
            for _ in range(lo):
                s = self.build(body, s)
            if hi is _c.MAXREPEAT:
                loop = self.new()
                self.eps[s].append(loop)
                self.eps[self.build(body, loop)].append(loop)
                return loop
            for _ in range(hi - lo):
                join = self.new()
                self.eps[s].append(join)
                self.eps[self.build(body, s)].append(join)
                s = join
            return s
        raise ValueError(f"unsupported regular-expression element {op}")


# -- lazy DFA over characters, then over tokens ----------------------------------------------------


class RegexConstraint:
    """Which tokens may follow, for a regex the whole continuation must match (``re.fullmatch`` semantics).

    States are small ints; ``None`` is the dead state. :meth:`start` feeds text the prompt already
    holds, :meth:`allowed` is a boolean mask over the vocabulary, :meth:`advance` moves by one token.
    """

    def __init__(self, pattern: str, token_texts: list[str | None], eos_ids: set[int]):
        self.pattern = pattern
        nfa = _NFA()
        start = nfa.new()
        self._final = nfa.build(_p.parse(pattern), start)
        self._nfa = nfa
        self._texts = token_texts
        self._eos = sorted(eos_ids)
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._char: dict[tuple[int, str], int | None] = {}
        self._tokens: dict[int, tuple[torch.Tensor, dict[int, int]]] = {}
        first: dict[str, list[int]] = {}  # tokens grouped by first character: most die there
        for i, t in enumerate(token_texts):
            if t:
                first.setdefault(t[0], []).append(i)
        self._by_first = first
        self.initial = self._state(self._closure({start}))

    def _closure(self, states: set[int]) -> frozenset[int]:
        stack, seen = list(states), set(states)
        while stack:
            for t in self._nfa.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    def _state(self, nfa_states: frozenset[int]) -> int | None:
        if not nfa_states:
            return None
        if nfa_states not in self._ids:
            self._ids[nfa_states] = len(self._sets)
            self._sets.append(nfa_states)
        return self._ids[nfa_states]

    def step_char(self, state: int | None, ch: str) -> int | None:
        if state is None:
            return None
        key = (state, ch)
        if key not in self._char:
            nxt = {t for s in self._sets[state] for test, t in self._nfa.edges[s] if test(ch)}
            self._char[key] = self._state(self._closure(nxt)) if nxt else None
        return self._char[key]

    def feed(self, state: int | None, text: str) -> int | None:
        for ch in text:
            state = self.step_char(state, ch)
        return state

    def start(self, text: str) -> int:
        state = self.feed(self.initial, text)
        if state is None:
            raise ValueError(f"The statement opening {text!r} cannot begin a match of the constraint {self.pattern!r}.")
        return state

    def accepting(self, state: int | None) -> bool:
        return state is not None and self._final in self._sets[state]

    def _table(self, state: int) -> tuple[torch.Tensor, dict[int, int]]:
        if state not in self._tokens:
            nexts: dict[int, int] = {}
            for ch, ids in self._by_first.items():
                s1 = self.step_char(state, ch)
                if s1 is None:
                    continue
                for i in ids:
                    s = self.feed(s1, self._texts[i][1:])
                    if s is not None:
                        nexts[i] = s
            mask = torch.zeros(len(self._texts), dtype=torch.bool)
            mask[list(nexts)] = True
            if self.accepting(state):
                mask[self._eos] = True
            self._tokens[state] = (mask, nexts)
        return self._tokens[state]

    def allowed(self, state: int | None) -> torch.Tensor:
        if state is None:
            return torch.zeros(len(self._texts), dtype=torch.bool)
        return self._table(state)[0]

    def advance(self, state: int | None, token: int) -> int | None:
        if state is None:
            return None
        return self._table(state)[1].get(token)

    def finished(self, state: int | None) -> bool:
        """Accepting with no token to extend the match: outlines stops here."""
        return state is None or (self.accepting(state) and not self._table(state)[1])


def token_texts(tokenizer) -> list[str | None]:
    """Each token's text as it reads after a word (None where it decodes to a broken byte sequence)."""
    ref = tokenizer("the", add_special_tokens=False)["input_ids"][-1:]
    base = tokenizer.decode(ref)
    texts = tokenizer.batch_decode([ref + [i] for i in range(len(tokenizer))])
    out: list[str | None] = []
    for t in texts:
        t = t[len(base):] if t.startswith(base) else None
        out.append(None if t is None or "\ufffd" in t else t)
    return out


@lru_cache(maxsize=8)
def _cached(pattern: str, tokenizer_key: int, tokenizer) -> RegexConstraint:
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return RegexConstraint(pattern, token_texts(tokenizer), eos)


def constraint_for(pattern: str, tokenizer) -> RegexConstraint:
    """One automaton per (pattern, tokenizer) in a process: its token tables are filled lazily and reused."""
    return _cached(pattern, id(tokenizer), tokenizer)
