"""Circuit discovery as Prakash et al. do it: from the logits back, one head group per stage.

Follows Nix07/finetuning ``path_patching/path_patching.py`` / ``pp_utils.py`` (``compute_topk_components``)
and the four groups of ``circuit_heads.json``. Each stage path-patches every candidate sender head
(corrupt into clean: ``noising``, random-query pairs) into the previous stage's heads at that stage's
receiver position, scores it with ``prob_change`` (the relative change of the correct object's
probability), and keeps the top-k heads with the most negative mean effect (below ``-min_effect``; Prakash
takes a plain top-k, which on a small model pads a group with heads of no effect):

=====================  ================================  =====================  ==================
group                  receivers (component)             receiver position      Prakash's name
=====================  ================================  =====================  ==================
value_fetcher          the logits                        ``answer_prefix``      direct_logit_heads
position_transmitter   value fetchers (q)                ``answer_prefix``      heads_affecting_...
position_detector      position transmitters (v)         ``query_box``          head_at_query_box
structure_reader       position detectors (v)            ``box_mention``        heads_at_prev_box
=====================  ================================  =====================  ==================

``box_mention`` is the queried box's label in the initial description: the previous occurrence of the
query label. A head already in the circuit is not a candidate again, so groups are disjoint. A stage
with no receivers, or no head whose mean effect is below ``-min_effect``, ends the search.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from boxprobe.causal.patching import PairBatch, prob_change
from boxprobe.causal.path import VARIANTS, path_patch
from boxprobe.config import check_choice, from_dict
from boxprobe.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)

STAGES = (("value_fetcher", "logits", "logits", "answer_prefix"),
          ("position_transmitter", "value_fetcher", "q", "answer_prefix"),
          ("position_detector", "position_transmitter", "v", "query_box"),
          ("structure_reader", "position_detector", "v", "box_mention"))
GROUPS = tuple(s[0] for s in STAGES)


@dataclass(frozen=True)
class CircuitConfig:
    """How the circuit is searched."""

    top_k: tuple[int, ...] = (4, 4, 4, 2)
    """Heads kept per stage, in the order value_fetcher, position_transmitter, position_detector,
    structure_reader (a shorter tuple stops earlier)."""
    variant: str = "freeze"
    """Path patching variant: "freeze" (Prakash: other heads frozen, MLPs recomputed) or "direct"."""
    min_effect: float = 0.01
    """A head joins a group only if its mean prob_change is below -min_effect (it removes at least this
    share of the correct object's probability); the top-k are drawn from those."""
    max_batch: int = 64
    """Rows per forward pass."""

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        if not self.top_k or any(k < 1 for k in self.top_k) or len(self.top_k) > len(STAGES):
            raise ConfigError(f"top_k takes 1 to {len(STAGES)} positive counts, one per stage; got {self.top_k}.")

    @classmethod
    def from_dict(cls, data: dict) -> "CircuitConfig":
        return from_dict(cls, data)


@dataclass
class Circuit:
    """Head groups -> [(layer, head)], the receiver position of each group, and the evidence."""

    model: str
    groups: dict[str, list[tuple[int, int]]]
    positions: dict[str, str]
    """Each group's position (where its heads are kept when the circuit is evaluated)."""
    n_pairs: int
    variant: str
    metric: str = "prob_change"
    faithfulness: float | None = None
    evaluation: dict = field(default_factory=dict)
    """Completeness, minimality and the head-set table, once evaluated (JSON-friendly)."""
    scores: pd.DataFrame | None = field(default=None, repr=False)
    """Every stage's path-patching table (a ``stage`` column added)."""
    batch: object = field(default=None, repr=False)
    """The PairBatch the circuit was found on (not saved)."""

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [h for hs in self.groups.values() for h in hs]

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("model", "groups", "positions", "n_pairs", "variant", "metric",
                                           "faithfulness", "evaluation")}
        d["groups"] = {g: [list(map(int, h)) for h in hs] for g, hs in self.groups.items()}
        return d

    def save(self, out_dir: str | Path) -> Path:
        """Write ``circuit.json`` (and ``circuit_scores.csv``) into ``out_dir``; returns the JSON path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "circuit.json").write_text(json.dumps(self.to_json(), indent=2, default=float) + "\n")
        if self.scores is not None:
            self.scores.to_csv(out / "circuit_scores.csv", index=False)
        return out / "circuit.json"

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        path = Path(path)
        if path.is_dir():
            path = path / "circuit.json"
        if not path.exists():
            raise MissingFileError(f"No circuit at {path}; run `boxprobe circuit` first.")
        d = json.loads(path.read_text())
        d["groups"] = {g: [tuple(h) for h in hs] for g, hs in d["groups"].items()}
        return cls(**d)


def discover_circuit(model, batch: PairBatch, cfg: CircuitConfig = CircuitConfig(), *, progress: bool = False) -> Circuit:
    """Run the stages of the module docstring on ``batch`` (random-query pairs) and return the circuit."""
    groups: dict[str, list[tuple[int, int]]] = {}
    positions: dict[str, str] = {}
    tables = []
    loop = {"max_batch": cfg.max_batch, "progress": progress}
    for (group, source, component, position), k in zip(STAGES, cfg.top_k):
        taken = {h for hs in groups.values() for h in hs}
        if source == "logits":
            receivers, top = "logits", model.cfg.n_layers
        else:
            receivers = groups.get(source, [])
            if not receivers:
                logger.info("stage %s: no %s heads to receive; stopping", group, source)
                break
            top = max(layer for layer, _ in receivers)
        senders = {f"L{l}H{h}": [(l, h)] for l in range(top) for h in range(model.cfg.n_heads) if (l, h) not in taken}
        if not senders:
            break
        table = path_patch(model, batch, senders, receivers, components=(component,) if source != "logits" else ("q",),
                           receiver_positions=position, variant=cfg.variant, metric=prob_change, direction="noising",
                           **loop)
        table.insert(1, "stage", group)
        tables.append(table)
        chosen = table[table["value"] < -cfg.min_effect].nsmallest(k, "value")
        if chosen.empty:
            logger.info("stage %s: no head lowers the correct object's probability; stopping", group)
            break
        groups[group] = [(int(r.layer), int(r.head_index)) for r in chosen.itertuples()]
        positions[group] = position
        logger.info("stage %s: %s", group, groups[group])
    scores = pd.concat(tables, ignore_index=True) if tables else None
    from boxprobe.models.loading import model_id

    return Circuit(model_id(model), groups, positions, len(batch), cfg.variant, scores=scores, batch=batch)
