"""Training corpora of the toy lab: boxes-task text and Python programs that track containers.

Each document is a list of (text, loss weight) segments. Segments split at word boundaries, so
tokenising them one by one gives the same tokens as tokenising the joined text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from boxprobe.data.task import (
    BoxSequence,
    Operation,
    TaskConfig,
    box_name,
    load_vocabulary,
    render_description,
    render_objects,
    sample_sequence,
)

Segment = tuple[str, float]


@dataclass(frozen=True)
class CorpusWeights:
    """Loss weight of each kind of token in a training document."""

    answer: float = 1.0
    """Answer tokens: the contents after "Box k contains", and printed states in code."""
    context: float = 0.1
    """The description (initial state and operations), and program statements in code."""
    query: float = 0.0
    """The query prompt "Statement: Box k contains", which the model cannot predict."""


def boxes_document(rng: np.random.Generator, num_boxes: int, max_operations: int, *, alt_forms_prob: float = 0.0,
                   weights: CorpusWeights = CorpusWeights()) -> list[Segment]:
    """A boxes-task description followed by a statement for every box, in random order.

    The layout is the ``toy`` prompt template's: ``Description: ...`` then ``Statement: Box k
    contains ...`` lines, so a prompt built by :mod:`boxprobe.data.prompts` matches what was trained.
    """
    cfg = TaskConfig(num_boxes=num_boxes, alt_forms=bool(rng.random() < alt_forms_prob))
    n_ops = int(rng.integers(max_operations + 1))
    ops, states = sample_sequence(rng, load_vocabulary("objects"), cfg, n_ops)
    seq = BoxSequence(0, "train", ops, states)
    segments: list[Segment] = [(f"Description: {render_description(seq, n_ops, cfg)}", weights.context)]
    for box in rng.permutation(num_boxes):
        segments.append((f"\nStatement: {box_name(int(box), cfg)} contains", weights.query))
        segments.append((f" {render_objects(states[-1][box])}.", weights.answer))
    return segments


@dataclass
class _Program:
    lines: list[Segment]
    weights: CorpusWeights

    def code(self, text: str) -> None:
        self.lines.append((text + "\n", self.weights.context))

    def output(self, text: str) -> None:
        self.lines.append((text + "\n", self.weights.answer))


def _py_list(items) -> str:
    return "[" + ", ".join(f"'{o}'" for o in items) + "]"


def code_document(rng: np.random.Generator, num_boxes: int, max_operations: int, *,
                  weights: CorpusWeights = CorpusWeights()) -> list[Segment]:
    """A Python program that moves objects between containers and prints their states.

    Two styles: a dict of lists (``boxes[3].append('cup')``, moves by ``pop``) and one set per
    variable (``a.add('cup')``). The printed lines are exactly what Python would print, which the
    tests check by running the program.
    """
    cfg = TaskConfig(num_boxes=num_boxes)
    n_ops = int(rng.integers(max_operations + 1))
    ops, states = sample_sequence(rng, load_vocabulary("objects"), cfg, n_ops)
    prog = _Program([], weights)
    if rng.random() < 0.5:
        _dict_of_lists_program(rng, prog, ops, states[0])
    else:
        _sets_program(rng, prog, ops, states[0])
    return prog.lines


def _dict_of_lists_program(rng, prog: _Program, ops: tuple[Operation, ...], initial) -> None:
    boxes = [list(b) for b in initial]  # insertion order, as Python keeps it
    prog.code("boxes = {}")
    for i, contents in enumerate(boxes):
        prog.code(f"boxes[{i}] = {_py_list(contents)}")
    for op in ops:
        for obj in op.objects:
            if op.kind == "remove":
                prog.code(f"boxes[{op.box}].remove('{obj}')")
                boxes[op.box].remove(obj)
            elif op.kind == "put":
                prog.code(f"boxes[{op.box}].append('{obj}')")
                boxes[op.box].append(obj)
            elif boxes[op.box][-1] == obj:
                prog.code(f"boxes[{op.dest}].append(boxes[{op.box}].pop())")
                boxes[op.dest].append(boxes[op.box].pop())
            else:
                prog.code(f"boxes[{op.box}].remove('{obj}')")
                prog.code(f"boxes[{op.dest}].append('{obj}')")
                boxes[op.box].remove(obj)
                boxes[op.dest].append(obj)
        if rng.random() < 0.3:
            _print_box(rng, prog, boxes, "boxes[{}]")
    for _ in range(int(rng.integers(1, 4))):
        _print_box(rng, prog, boxes, "boxes[{}]")


def _sets_program(rng, prog: _Program, ops: tuple[Operation, ...], initial) -> None:
    names = "abcdefghijklmnopqrstuvwxyz"
    boxes = [set(b) for b in initial]
    for i, contents in enumerate(initial):
        prog.code(f"{names[i]} = set({_py_list(contents)})")
    for op in ops:
        for obj in op.objects:
            if op.kind in ("remove", "move"):
                prog.code(f"{names[op.box]}.discard('{obj}')")
                boxes[op.box].discard(obj)
            target = op.dest if op.kind == "move" else op.box
            if op.kind in ("put", "move"):
                prog.code(f"{names[target]}.add('{obj}')")
                boxes[target].add(obj)
        if rng.random() < 0.3:
            _print_box(rng, prog, boxes, "{}", names, always_sorted=True)
    for _ in range(int(rng.integers(1, 4))):
        _print_box(rng, prog, boxes, "{}", names, always_sorted=True)


def _print_box(rng, prog: _Program, boxes, pattern: str, names=None, always_sorted: bool = False) -> None:
    box = int(rng.integers(len(boxes)))
    ref = pattern.format(names[box] if names else box)
    if always_sorted or rng.random() < 0.5:
        prog.code(f"print(sorted({ref}))")
        prog.output(_py_list(sorted(boxes[box])))
    else:
        prog.code(f"print({ref})")
        prog.output(_py_list(boxes[box]))



@dataclass(frozen=True)
class CorpusConfig:
    """A sample of a toy corpus, written out for inspection or for training elsewhere."""

    kind: str = "boxes"
    """``boxes`` (natural language) or ``code`` (Python programs)."""
    n_documents: int = 100
    """Number of documents to write."""
    num_boxes: int = 7
    """Boxes (containers) per document."""
    max_operations: int = 12
    """Each document draws 0..max_operations operations."""
    alt_forms_prob: float = 0.1
    """Share of boxes documents in the AltForms phrasing."""
    seed: int = 0
    """Sampling seed."""


def sample_corpus(cfg: CorpusConfig) -> list[list[Segment]]:
    """``cfg.n_documents`` documents of the configured corpus."""
    if cfg.kind not in ("boxes", "code"):
        raise ValueError(f"corpus kind must be 'boxes' or 'code', got {cfg.kind!r}")
    rng = np.random.default_rng(cfg.seed)
    if cfg.kind == "code":
        return [code_document(rng, cfg.num_boxes, cfg.max_operations) for _ in range(cfg.n_documents)]
    return [boxes_document(rng, cfg.num_boxes, cfg.max_operations, alt_forms_prob=cfg.alt_forms_prob)
            for _ in range(cfg.n_documents)]
