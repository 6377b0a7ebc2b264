"""Few-shot prompts for the boxes task, in the per-box (2023) and all-boxes (2024) formats.

Instruction wording and demonstrations live in a template file (``boxprobe/data/templates/*.json``), so a
user can load another, for example the exact template of a paper they reproduce:

>>> from boxprobe.data.task import Example
>>> ex = Example(sentence="", sentence_masked="Box 0 contains the cup, Box 1 contains nothing. "
...              "Box 0 contains <extra_id_0> .", masked_content="<extra_id_0> the cup", sample_id=0, numops=0)
>>> q = build_query([ex], load_template("toy"))
>>> q.prompt
'Description: Box 0 contains the cup, Box 1 contains nothing.\\nStatement: Box 0 contains'
>>> q.continuation
' the cup.'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from boxprobe.config import ConfigError, check_choice, from_dict
from boxprobe.data.task import DATA_DIR, Example
from boxprobe.errors import ArgumentError, MissingFileError

PromptFormat = Literal["per-box", "all-boxes"]
FORMATS = ("per-box", "all-boxes")


@dataclass(frozen=True)
class Demonstration:
    """A solved example shown before the test description."""

    description: str
    """Initial state and operations."""
    contents: tuple[str, ...]
    """The final contents of every box, e.g. ``"the apple and the cup"`` or ``"nothing"``."""
    query_box: int
    """The box whose statement the per-box format shows."""
    box_label: str = "Box"
    """How boxes are named in the statement (``Box`` or ``Container``)."""


@dataclass(frozen=True)
class PromptTemplate:
    """Instruction, demonstrations and the strings that lay a prompt out."""

    name: str
    """Identifier recorded with results."""
    instruction: str = ""
    """Opening instruction line; empty for none."""
    description_prefix: str = "Description: "
    """Text before each description."""
    statement_prefix: str = "Statement: "
    """Text before each statement."""
    line_separator: str = "\n"
    """Between a description and its statement."""
    block_separator: str = "\n\n"
    """Between the instruction and each demonstration."""
    demonstrations: tuple[Demonstration, ...] = ()
    """Solved examples, shown in order."""
    query_separator: str | None = None
    """Between the test description and its statement; None: ``line_separator``. Kim et al. (2024) render
    none (their outlines template ends at the description and the regex makes the model write ``Statement:``)."""
    answer_regex: str = ""
    """Regular expression the statement (from ``statement_prefix`` on) must match under constrained decoding;
    empty: derived from the format (one box, or every box in order, each ``( [a-zA-Z]+)*``)."""
    reference: str = ""
    """Where the wording comes from (repository, file, function), for the record."""

    def statement(self, demo: Demonstration, fmt: PromptFormat) -> str:
        if fmt == "per-box":
            return f"{demo.box_label} {demo.query_box} contains {demo.contents[demo.query_box]}."
        return ", ".join(f"{demo.box_label} {b} contains {c}" for b, c in enumerate(demo.contents)) + "."


def load_template(name_or_path: str | Path = "default") -> PromptTemplate:
    """A bundled template by name or a JSON template file.

    Bundled: ``default`` (ours: per-box 2-shot, our instruction), ``toy`` (no instruction, no demonstrations),
    ``kst24`` (Kim, Schuster & Toshniwal 2024, all-boxes 2-shot) and ``tang`` (Tang et al., per-box 2-shot).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = DATA_DIR / "templates" / f"{name_or_path}.json"
        if not path.exists():
            bundled = sorted(p.stem for p in (DATA_DIR / "templates").glob("*.json"))
            raise ConfigError(f"No bundled prompt template {name_or_path!r}; bundled: {', '.join(bundled)}, "
                              "or pass the path of a JSON template file.")
    if not path.exists():
        raise MissingFileError(f"No prompt template file at {path}.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}).") from None
    return from_dict(PromptTemplate, data, where=str(path))


@dataclass(frozen=True)
class Query:
    """One model input: the prompt, the gold continuation and the examples it answers."""

    prompt: str
    """Everything up to and including ``Box k contains``."""
    continuation: str
    """The gold completion, e.g. ``" the apple and the cup."``."""
    examples: tuple[Example, ...]
    """One example (per-box) or every box of the state in order (all-boxes)."""
    prompt_format: PromptFormat = "per-box"


def build_query(examples: Sequence[Example], template: PromptTemplate, fmt: PromptFormat = "per-box",
                tokenizer=None, chat: bool = False) -> Query:
    """The prompt for one example (per-box) or for all boxes of one state (all-boxes).

    With ``chat=True`` the instruction, demonstrations and description are wrapped in the
    tokenizer's chat template as a user turn, and the statement opens the assistant's reply.
    """
    check_choice("prompt format", fmt, FORMATS)
    first = examples[0]
    if fmt == "all-boxes":
        examples = sorted(examples, key=lambda e: e.box if e.box is not None else 0)
        if any(e.state_key != first.state_key for e in examples):
            raise ArgumentError("An all-boxes query needs the examples of one state (same sample_id and num_operations).")
        rest = "".join(f", {e.statement_prefix} {e.answer_text}" for e in examples[1:])
        continuation = f" {examples[0].answer_text}{rest}."
    elif len(examples) != 1:
        raise ArgumentError(f"A per-box query answers one example, got {len(examples)}.")
    else:
        continuation = f" {first.answer_text}."
    blocks = [template.instruction] if template.instruction else []
    for demo in template.demonstrations:
        blocks.append(f"{template.description_prefix}{demo.description}{template.line_separator}"
                      f"{template.statement_prefix}{template.statement(demo, fmt)}")
    blocks.append(f"{template.description_prefix}{first.context}")
    sep = template.line_separator if template.query_separator is None else template.query_separator
    head = template.block_separator.join(blocks) + sep
    statement = f"{template.statement_prefix}{examples[0].statement_prefix}"
    if chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat=True needs a tokenizer with a chat template; this one has none.")
        head = tokenizer.apply_chat_template([{"role": "user", "content": head.rstrip()}],
                                             tokenize=False, add_generation_prompt=True)
    return Query(prompt=head + statement, continuation=continuation, examples=tuple(examples), prompt_format=fmt)


def build_queries(examples: Sequence[Example], template: PromptTemplate, fmt: PromptFormat = "per-box",
                  tokenizer=None, chat: bool = False) -> list[Query]:
    """Queries for a dataset: one per example, or one per state for ``all-boxes``."""
    if fmt == "per-box":
        return [build_query([ex], template, fmt, tokenizer, chat) for ex in examples]
    states: dict[tuple, list[Example]] = {}
    for ex in examples:
        states.setdefault(ex.state_key, []).append(ex)
    return [build_query(group, template, fmt, tokenizer, chat) for group in states.values()]
