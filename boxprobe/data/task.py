"""The boxes task of Kim & Schuster (2023), "Entity Tracking in Language Models".

A world of boxes holding objects, an initial description, a sequence of move / remove / put
operations, and for every prefix of the sequence and every box the question "Box k contains ___".

The generator follows the reference generator's distributions, with one deliberate difference: it
never iterates over an unordered set, so the same seed gives byte-identical files whatever
``PYTHONHASHSEED`` is.

>>> cfg = TaskConfig(num_samples=3, num_operations=2, seed=0)
>>> seq = generate_sequences(cfg)[0]
>>> len(seq.states) == len(seq.operations) + 1
True
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from boxprobe.config import ConfigError, check_choice, from_dict
from boxprobe.errors import ArgumentError, DataError, MissingFileError

DATA_DIR = Path(__file__).resolve().parent
"""Package data: ``vocab/`` and ``templates/`` travel inside the wheel."""
MASK = "<extra_id_0>"
OPERATION_KINDS = ("move", "remove", "put")
SPLITS = ("train", "dev", "test")
ALT_BOX_NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

State = tuple[tuple[str, ...], ...]


@cache
def load_vocabulary(name: str = "objects") -> tuple[str, ...]:
    """The bundled object vocabulary: ``"objects"`` (common nouns) or ``"objects_rare"``."""
    path = DATA_DIR / "vocab" / f"{name}.txt"
    if not path.exists():
        raise MissingFileError(f"No vocabulary {name!r}: expected a word list at {path}.")
    words = [w.strip() for w in path.read_text().splitlines()]
    return tuple(w for w in words if w and not w.startswith("#"))


@dataclass(frozen=True)
class TaskConfig:
    """How boxes data is generated. Defaults reproduce the standard 7-box, 12-operation set."""

    num_boxes: int = 7
    """Number of boxes in the world."""
    expected_items_per_box: int = 2
    """Mean of the Poisson draw for each box's initial contents; puts use max(1, this // 2)."""
    max_items_per_box: int = 3
    """No box ever holds more objects than this."""
    num_operations: int = 12
    """Operations per sequence; every prefix of 0..num_operations operations is an example."""
    num_samples: int = 2200
    """Number of distinct initial states (sequences) to generate over all splits."""
    seed: int = 2255
    """Seed of the generator; the same seed gives byte-identical output."""
    alt_forms: bool = False
    """AltForms variant: "Container A".. names and other phrasings of states and operations."""
    disjoint_vocab_splits: tuple[str, ...] = ()
    """Splits whose objects come from the rare vocabulary (disjoint from the training vocabulary)."""
    numops_split: bool = False
    """NumOps split: train sequences have 2 operations, dev/test have ``num_operations``."""
    move_contents: bool = False
    """Render a move of all of a box's contents as "Move the contents of Box a to Box b."."""
    output_format: Literal["in-context", "seq2seq"] = "in-context"
    """Answer statement format: ``Box 1 contains <extra_id_0> .`` or the older ``Box 1 <extra_id_0> .``."""

    def __post_init__(self) -> None:
        check_choice("output_format", self.output_format, ("in-context", "seq2seq"))
        for split in self.disjoint_vocab_splits:
            check_choice("disjoint_vocab_splits", split, SPLITS)
        if not 1 <= self.num_boxes <= len(ALT_BOX_NAMES):
            raise ConfigError(f"num_boxes must be in 1..{len(ALT_BOX_NAMES)}, got {self.num_boxes}")
        if self.max_items_per_box < 1 or self.expected_items_per_box < 0:
            raise ConfigError("max_items_per_box must be >= 1 and expected_items_per_box >= 0")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_operations < 0:
            raise ConfigError(f"num_operations must be >= 0, got {self.num_operations}")

    @classmethod
    def from_dict(cls, data: dict) -> "TaskConfig":
        return from_dict(cls, data)


@dataclass(frozen=True)
class Operation:
    """One state-changing operation. ``objects`` are sorted; ``dest`` is set for moves only."""

    kind: Literal["move", "remove", "put"]
    objects: tuple[str, ...]
    box: int
    dest: int | None = None
    all_contents: bool = False

    def boxes_changed(self) -> tuple[int, ...]:
        return (self.box, self.dest) if self.kind == "move" else (self.box,)


def apply_operation(state: State, op: Operation) -> State:
    """The state after ``op``; contents stay sorted."""
    boxes = [list(b) for b in state]
    if op.kind in ("move", "remove"):
        missing = [o for o in op.objects if o not in boxes[op.box]]
        if missing:
            raise ArgumentError(f"{op} removes {missing}, which are not in box {op.box}")
        boxes[op.box] = [o for o in boxes[op.box] if o not in op.objects]
    if op.kind == "move":
        boxes[op.dest] = boxes[op.dest] + list(op.objects)
    elif op.kind == "put":
        boxes[op.box] = boxes[op.box] + list(op.objects)
    return tuple(tuple(sorted(b)) for b in boxes)


@dataclass(frozen=True)
class BoxSequence:
    """An initial state and its operations; ``states[i]`` is the state after ``i`` operations."""

    sample_id: int
    split: str
    operations: tuple[Operation, ...]
    states: tuple[State, ...]

    @property
    def initial(self) -> State:
        return self.states[0]

    @property
    def signature(self) -> tuple[int, ...]:
        return tuple(len(b) for b in self.initial)


# -- sampling -----------------------------------------------------------------------------------


def _nonempty_subset(rng: np.random.Generator, items: Sequence[str]) -> tuple[str, ...]:
    # An independent coin flip per object; redraw the whole subset if it comes out empty.
    while True:
        chosen = tuple(o for o in items if rng.random() < 0.5)
        if chosen:
            return tuple(sorted(chosen))


def sample_initial_state(rng: np.random.Generator, vocab: Sequence[str], cfg: TaskConfig) -> State:
    unused = list(vocab)
    boxes = []
    for _ in range(cfg.num_boxes):
        n = min(int(rng.poisson(cfg.expected_items_per_box)), cfg.max_items_per_box, len(unused))
        picked = [unused[i] for i in rng.choice(len(unused), size=n, replace=False)]
        unused = [o for o in unused if o not in picked]
        boxes.append(tuple(sorted(picked)))
    return tuple(boxes)


def sample_operation(rng: np.random.Generator, state: State, vocab: Sequence[str], cfg: TaskConfig) -> Operation:
    """Draw an operation and a box uniformly; redraw both while the choice is invalid."""
    in_boxes = {o for b in state for o in b}
    free = [o for o in vocab if o not in in_boxes]
    for _ in range(10_000):
        kind = OPERATION_KINDS[int(rng.integers(len(OPERATION_KINDS)))]
        box = int(rng.integers(cfg.num_boxes))
        contents = state[box]
        if kind == "put":
            n = int(rng.poisson(max(1, cfg.expected_items_per_box // 2)))
            if n == 0 or len(contents) + n > cfg.max_items_per_box or n > len(free):
                continue
            picked = [free[i] for i in rng.choice(len(free), size=n, replace=False)]
            return Operation("put", tuple(sorted(picked)), box)
        if not contents:
            continue
        if kind == "remove":
            return Operation("remove", _nonempty_subset(rng, contents), box)
        dest = int(rng.choice([b for b in range(cfg.num_boxes) if b != box]))
        moved = _nonempty_subset(rng, contents)
        if len(state[dest]) + len(moved) > cfg.max_items_per_box:
            continue
        return Operation("move", moved, box, dest, all_contents=len(moved) == len(contents))
    raise ConfigError(f"No valid operation could be drawn from state {state}; check the task config.")


def sample_sequence(
    rng: np.random.Generator, vocab: Sequence[str], cfg: TaskConfig, num_operations: int, initial: State | None = None
) -> tuple[tuple[Operation, ...], tuple[State, ...]]:
    states = [initial if initial is not None else sample_initial_state(rng, vocab, cfg)]
    ops = []
    for _ in range(num_operations):
        op = sample_operation(rng, states[-1], vocab, cfg)
        ops.append(op)
        states.append(apply_operation(states[-1], op))
    return tuple(ops), tuple(states)


def generate_sequences(cfg: TaskConfig) -> list[BoxSequence]:
    """Generate ``cfg.num_samples`` sequences with distinct initial states, split by signature.

    Signatures (per-box item counts of the initial state) are shuffled and split 45/10/45 into
    train/dev/test, so no signature appears in two splits.
    """
    rng = np.random.default_rng(cfg.seed)
    common = load_vocabulary("objects")
    initials: list[State] = []
    seen: set[State] = set()
    for _ in range(cfg.num_samples * 1000):
        if len(initials) == cfg.num_samples:
            break
        state = sample_initial_state(rng, common, cfg)
        if state not in seen:  # membership only; iteration order comes from the list
            seen.add(state)
            initials.append(state)
    else:
        raise ConfigError(f"Could not draw {cfg.num_samples} distinct initial states; lower num_samples.")

    signatures = sorted({tuple(len(b) for b in s) for s in initials})
    order = rng.permutation(len(signatures))
    n_train, n_dev = round(0.45 * len(signatures)), round(0.10 * len(signatures))
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[signatures[idx]] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"

    rare = load_vocabulary("objects_rare")
    sequences = []
    for sample_id, initial in enumerate(initials):
        split = split_of[tuple(len(b) for b in initial)]
        if split in cfg.disjoint_vocab_splits:
            initial = _translate_state(initial, common, rare)
        vocab = rare if split in cfg.disjoint_vocab_splits else common
        n_ops = 2 if (cfg.numops_split and split == "train") else cfg.num_operations
        ops, states = sample_sequence(rng, vocab, cfg, n_ops, initial=initial)
        sequences.append(BoxSequence(sample_id, split, ops, states))
    return sequences


def _translate_state(state: State, source: Sequence[str], target: Sequence[str]) -> State:
    # Map objects by vocabulary rank, so the disjoint split keeps the same state structure.
    if len(target) < len(source):
        raise ConfigError(f"The disjoint vocabulary has {len(target)} words; it needs at least {len(source)}.")
    mapping = dict(zip(source, target))
    return tuple(tuple(sorted(mapping[o] for o in box)) for box in state)


# -- numops ---------------------------------------------------------------------------------


def count_numops(operations: Sequence[Operation], num_boxes: int) -> list[dict[str, int]]:
    """Per box, how many operations changed its contents, by kind (a move counts for both boxes)."""
    counts = [{k: 0 for k in OPERATION_KINDS} for _ in range(num_boxes)]
    for op in operations:
        for box in op.boxes_changed():
            counts[box][op.kind] += 1
    return counts


# -- rendering -------------------------------------------------------------------------------


def box_name(box: int, cfg: TaskConfig) -> str:
    return f"Container {ALT_BOX_NAMES[box]}" if cfg.alt_forms else f"Box {box}"


def render_objects(objects: Iterable[str]) -> str:
    """``('bag', 'cup')`` -> ``"the bag and the cup"``; ``()`` -> ``"nothing"``."""
    objects = sorted(objects)
    return " and ".join(f"the {o}" for o in objects) if objects else "nothing"


def render_initial_state(state: State, cfg: TaskConfig) -> str:
    parts = []
    for box, contents in enumerate(state):
        name = box_name(box, cfg)
        if not cfg.alt_forms:
            parts.append(f"{name} contains {render_objects(contents)}")
        elif not contents:
            parts.append(f"there is nothing in {name}")
        else:
            verb = "is" if len(contents) == 1 else "are"
            parts.append(f"{render_objects(contents)} {verb} in {name}")
    return ", ".join(parts) + "."


def render_operation(op: Operation, cfg: TaskConfig) -> str:
    things, src = render_objects(op.objects), box_name(op.box, cfg)
    if op.kind == "move":
        dest = box_name(op.dest, cfg)
        if cfg.move_contents and op.all_contents:
            return f"Move the contents of {src} to {dest}."
        if cfg.alt_forms:
            pronoun = "it" if len(op.objects) == 1 else "them"
            return f"Pick up {things} in {src} and place {pronoun} into {dest}."
        return f"Move {things} from {src} to {dest}."
    if op.kind == "remove":
        return f"Take {things} out of {src}." if cfg.alt_forms else f"Remove {things} from {src}."
    return f"Place {things} inside {src}." if cfg.alt_forms else f"Put {things} into {src}."


def render_description(seq: BoxSequence, num_operations: int, cfg: TaskConfig) -> str:
    """The initial state and the first ``num_operations`` operations as one paragraph."""
    parts = [render_initial_state(seq.initial, cfg)]
    parts += [render_operation(op, cfg) for op in seq.operations[:num_operations]]
    return " ".join(parts)


def answer_statement(box: int, contents: Sequence[str], cfg: TaskConfig) -> tuple[str, str]:
    """(masked statement, masked_content) for one box in the configured output format."""
    name = box_name(box, cfg)
    if cfg.output_format == "in-context":
        return f"{name} contains {MASK} .", f"{MASK} {render_objects(contents)}"
    answer = f"contains {render_objects(contents)}" if contents else "is empty"
    return f"{name} {MASK} .", f"{MASK} {answer}"


# -- examples and files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One (prefix, box) query in the released JSONL format, plus the fields boxprobe derives."""

    sentence: str
    sentence_masked: str
    masked_content: str
    sample_id: int
    numops: int
    numops_by_op: dict[str, int] = field(default_factory=dict)
    num_operations: int | None = None
    box: int | None = None

    @property
    def context(self) -> str:
        """The description before the answer statement."""
        return self.sentence_masked.rsplit(". ", 1)[0] + "."

    @property
    def statement_prefix(self) -> str:
        """The answer statement up to the mask, e.g. ``"Box 3 contains"``."""
        return self.sentence_masked.rsplit(". ", 1)[1].split(MASK)[0].strip()

    @property
    def answer_text(self) -> str:
        """The answer as the statement writes it: ``"the bag"``, ``"nothing"`` or ``"is empty"``."""
        return self.masked_content.replace(MASK, "").strip()

    @property
    def state_key(self) -> tuple[int, int | None]:
        """Identifies the state (sequence prefix) the example queries."""
        return (self.sample_id, self.num_operations)

    @property
    def gold(self) -> str:
        """The gold content string, e.g. ``"the bag and the cup"`` or ``"nothing"``."""
        answer = self.answer_text
        if answer == "is empty":
            return "nothing"
        return answer.removeprefix("contains ").strip()

    def to_json(self) -> str:
        # A shallow dict: dataclasses.asdict deep-copies every field, most of the cost of writing a dataset.
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, ensure_ascii=False)


def sequence_examples(seq: BoxSequence, cfg: TaskConfig) -> list[Example]:
    """Every (prefix, box) example of one sequence, prefixes in order, boxes in order."""
    out = []
    for n_ops in range(len(seq.operations) + 1):
        description = render_description(seq, n_ops, cfg)
        counts = count_numops(seq.operations[:n_ops], cfg.num_boxes)
        for box in range(cfg.num_boxes):
            masked, content = answer_statement(box, seq.states[n_ops][box], cfg)
            answer = content.replace(MASK, "").strip()
            out.append(Example(
                sentence=f"{description} {masked.replace(f'{MASK} .', answer + '.')}",
                sentence_masked=f"{description} {masked}",
                masked_content=content,
                sample_id=seq.sample_id,
                numops=sum(counts[box].values()),
                numops_by_op=counts[box],
                num_operations=n_ops,
                box=box,
            ))
    return out


REQUIRED_FIELDS = ("sentence", "sentence_masked", "masked_content", "sample_id", "numops")


_FIELD_TYPES = {"sentence": str, "sentence_masked": str, "masked_content": str, "sample_id": int, "numops": int,
                "numops_by_op": dict, "num_operations": int, "box": int}
_OPTIONAL = ("num_operations", "box")
_BOX_LABEL = re.compile(r"\b(?:Box (\d+)|Container ([A-Z]))\b")


def _field_problem(record: dict) -> str | None:
    """What is wrong with the types or ranges of a record's fields, or None."""
    for key, kind in _FIELD_TYPES.items():
        if key not in record or (record[key] is None and key in _OPTIONAL):
            continue
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            name = {str: "a string", int: "an integer", dict: "an object"}[kind]
            return f"field {key!r} must be {name}, got {value!r} ({type(value).__name__})"
        if kind is int and key != "sample_id" and value < 0:
            return f"field {key!r} must be >= 0, got {value}"
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in record.get("numops_by_op", {}).values()):
        return f"field 'numops_by_op' must map operation kinds to integers >= 0, got {record['numops_by_op']!r}"
    if record.get("box") is not None:
        initial = record["sentence_masked"].split(". ", 1)[0]
        n_boxes = len({m.group(0) for m in _BOX_LABEL.finditer(initial)})
        if n_boxes and record["box"] >= n_boxes:
            return f"field 'box' is {record['box']}, but the description names {n_boxes} boxes (0..{n_boxes - 1})"
    return None


def read_examples(path: str | Path) -> list[Example]:
    """Read a boxes JSONL file, checking every line before returning any.

    A malformed line, a missing field, a field of the wrong type or range (``numops: "2"``, ``box: 99``),
    or two lines that give one ``sample_id`` different initial states (or one query different contents)
    is a :class:`DataError` naming ``file:line``.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"No data file at {path}. Generate one with `boxprobe generate --out DIR`.")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a boxes JSONL file (e.g. {path}/test-subsample.jsonl).")
    examples = []
    known = {f.name for f in dataclasses.fields(Example)}
    first_line: dict[int, tuple[int, str]] = {}  # sample_id -> (line, initial state)
    query_line: dict[tuple, tuple[int, str]] = {}  # (sample_id, num_operations, box) -> (line, sentence)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}). Each line must be one JSON object.") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}.")
            missing = [k for k in REQUIRED_FIELDS if k not in record]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}; "
                                 f"each line needs {', '.join(REQUIRED_FIELDS)}.")
            if (problem := _field_problem(record)) is not None:
                raise DataError(f"{path}:{lineno}: {problem}.")
            if MASK not in record["sentence_masked"]:
                raise DataError(f"{path}:{lineno}: sentence_masked has no {MASK} mask.")
            sid, initial = record["sample_id"], record["sentence_masked"].split(". ", 1)[0]
            seen, _ = first_line.setdefault(sid, (lineno, initial))
            if first_line[sid][1] != initial:
                raise DataError(f"{path}:{lineno}: sample_id {sid} has another initial state than on line {seen}; "
                                "each sample_id must name one sequence (give the other sequence its own id).")
            key = (sid, record.get("num_operations"), record.get("box"))
            if key[1] is not None and key[2] is not None:
                seen, sentence = query_line.setdefault(key, (lineno, record["sentence"]))
                if sentence != record["sentence"]:
                    raise DataError(f"{path}:{lineno}: sample_id {sid}, num_operations {key[1]}, box {key[2]} is also "
                                    f"on line {seen} with other content; remove one of them.")
            examples.append(Example(**{k: v for k, v in record.items() if k in known}))
    if not examples:
        raise DataError(f"{path} holds no examples (the file is empty).")
    return examples


def write_examples(path: str | Path, examples: Iterable[Example]) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(ex.to_json() + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def subsample_by_numops(examples: Sequence[Example], per_numops: int = 100, seed: int = 42,
                        numops_values: Iterable[int] = range(8)) -> list[Example]:
    """Sample up to ``per_numops`` states per numops value, keeping all boxes of each state.

    A state is a (sample_id, num_operations) prefix. For each numops value in turn, states having a
    box with that numops and not yet chosen are candidates; chosen states keep every box, so the
    all-boxes format can be scored on them.
    """
    rng = np.random.default_rng(seed)
    by_state: dict[tuple[int, int | None], list[Example]] = {}
    for ex in examples:
        by_state.setdefault((ex.sample_id, ex.num_operations), []).append(ex)
    states = list(by_state)
    chosen: list[tuple[int, int | None]] = []
    taken: set[tuple[int, int | None]] = set()
    for n in numops_values:
        candidates = [s for s in states if s not in taken and any(e.numops == n for e in by_state[s])]
        picks = rng.permutation(len(candidates))[:per_numops]
        for i in sorted(picks):
            chosen.append(candidates[i])
            taken.add(candidates[i])
    return [ex for s in chosen for ex in by_state[s]]


def generate_dataset(cfg: TaskConfig, out_dir: str | Path, subsample_per_numops: int = 100) -> dict[str, Path]:
    """Write ``train/dev/test.jsonl`` and ``test-subsample.jsonl`` to ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sequences = generate_sequences(cfg)
    paths = {}
    for split in SPLITS:
        examples = [ex for seq in sequences if seq.split == split for ex in sequence_examples(seq, cfg)]
        paths[split] = out_dir / f"{split}.jsonl"
        write_examples(paths[split], examples)
        if split == "test":
            paths["test-subsample"] = out_dir / "test-subsample.jsonl"
            write_examples(paths["test-subsample"], subsample_by_numops(examples, subsample_per_numops))
    return paths
