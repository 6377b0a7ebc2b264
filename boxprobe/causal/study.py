"""A whole circuit study in one call: pairs, discovery, evaluation, and optionally CMAP from a donor.

``boxprobe circuit`` and the demo's patching stage call :func:`circuit_study`. The random-query pairs
(:mod:`boxprobe.data.counterfactual`) are split by context: ``n_pairs`` discover and evaluate the
circuit, the next ``n_reference`` give the mean activations that faithfulness ablates to (a separate
random-label dataset, as Prakash et al. use).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from boxprobe.causal.circuit import Circuit, CircuitConfig, discover_circuit
from boxprobe.causal.cmap import cross_model_patch, wrong_pairs
from boxprobe.causal.faithfulness import evaluate_circuit
from boxprobe.config import from_dict
from boxprobe.data.pairs import build_pairs, collate_pairs
from boxprobe.data.queries import QuerySet
from boxprobe.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CircuitStudyConfig:
    """Sizes of a circuit study."""

    n_pairs: int = 100
    """Random-query pairs (one per context) for discovery and evaluation."""
    n_reference: int = 40
    """Further pairs whose corrupt (random-label) prompts give the ablation means."""
    top_k: tuple[int, ...] = (4, 4, 4, 2)
    """Heads per stage (see :class:`~boxprobe.causal.circuit.CircuitConfig`)."""
    variant: str = "freeze"
    """Path patching variant used for discovery: "freeze" or "direct"."""
    min_effect: float = 0.01
    """Smallest relative drop of the correct object's probability that admits a head."""
    n_random: int = 5
    """Random head sets of the circuit's size, as the faithfulness baseline."""
    minimality: bool = True
    """Also measure each head's minimality (one ablation run per head, two within a group)."""
    cmap_pairs: int = 100
    """With a donor: at most this many pairs the recipient gets wrong, for CMAP."""
    dcm_steps: int = 0
    """With > 0: also learn DCM head masks (this many steps) for the object-value and positional
    desiderata, on up to ``n_pairs`` pairs of each -> ``dcm.csv`` and ``evaluation["dcm"]``."""
    max_batch: int = 64
    """Rows per forward pass."""
    seed: int = 0
    """Seed of the pair sampling and the random head sets."""
    progress: bool = True
    """Progress bars on the patching passes (each stage and ablation set), and a log line per step."""

    def __post_init__(self) -> None:
        if self.n_pairs < 2 or self.n_reference < 1:
            raise ConfigError("n_pairs must be >= 2 and n_reference >= 1.")

    @classmethod
    def from_dict(cls, data: dict) -> "CircuitStudyConfig":
        return from_dict(cls, data)


def circuit_study(model, queries: QuerySet, out_dir: str | Path, cfg: CircuitStudyConfig = CircuitStudyConfig(),
                  donor=None) -> Circuit:
    """Discover and evaluate ``model``'s circuit on random-query pairs of ``queries``; write into ``out_dir``:
    ``circuit.json`` (groups, positions, faithfulness, completeness, minimality, n_pairs),
    ``circuit_scores.csv`` (every stage's path patching), ``circuit_sets.csv`` (every ablated head set)
    and, with a ``donor`` of the same family, ``cmap.csv`` (long; the donor's group outputs patched into
    ``model`` on pairs ``model`` gets wrong)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, stats = build_pairs(model, queries, "random-query", seed=cfg.seed, limit=cfg.n_pairs + cfg.n_reference)
    if len(pairs) < 3:
        raise DataError(f"Only {len(pairs)} random-query pairs could be built ({stats.rejected}); give more examples "
                        "(more contexts) in the data.")
    n_ref = min(cfg.n_reference, max(1, len(pairs) // 3))
    pad = model.tokenizer.pad_token_id
    batch = collate_pairs(pairs[: len(pairs) - n_ref][: cfg.n_pairs], pad, model.cfg.device)
    reference = collate_pairs(pairs[len(pairs) - n_ref:], pad, model.cfg.device)
    if len(batch) < cfg.n_pairs:
        logger.warning("circuit study: %d pairs (asked for %d); the data has too few usable contexts", len(batch),
                       cfg.n_pairs)
    logger.info("circuit study: %d discovery pairs, %d reference pairs; discovering (%s path patching)", len(batch),
                len(reference), cfg.variant)
    circuit = discover_circuit(model, batch, CircuitConfig(top_k=cfg.top_k, variant=cfg.variant,
                                                          min_effect=cfg.min_effect, max_batch=cfg.max_batch),
                               progress=cfg.progress)
    if circuit.groups:
        logger.info("circuit study: evaluating %s (faithfulness, completeness%s)", dict(circuit.groups),
                    ", minimality" if cfg.minimality else "")
        ev = evaluate_circuit(model, batch, circuit.groups, circuit.positions, reference, n_random=cfg.n_random,
                              seed=cfg.seed, minimality=cfg.minimality, max_batch=cfg.max_batch, progress=cfg.progress)
        circuit.faithfulness = ev["faithfulness"]
        circuit.evaluation = {
            "faithfulness_prob": ev["faithfulness_prob"], "n_reference": len(reference),
            "completeness": ev["completeness"].to_dict(orient="records"),
            "minimality": ev.get("minimality", pd.DataFrame()).to_dict(orient="records"),
            "pair_stats": {"kept": stats.n_pairs, "rejected": {k: v for k, v in stats.rejected.items() if v}},
        }
        ev["sets"].to_csv(out / "circuit_sets.csv", index=False)
    if cfg.dcm_steps:
        circuit.evaluation["dcm"] = dcm_study(model, queries, circuit, out, cfg)
    circuit.save(out)
    if donor is not None and circuit.groups:
        cmap_study(model, donor, queries, circuit, out, cfg)
    return circuit


def dcm_study(model, queries: QuerySet, circuit: Circuit, out_dir: str | Path, cfg: CircuitStudyConfig) -> dict:
    """DCM masks per desideratum (:mod:`boxprobe.causal.dcm`) -> ``dcm.csv``; returns, per desideratum, the
    selected heads, how many of them are circuit heads, and the binary mask's accuracy."""
    from boxprobe.causal.dcm import learn_head_mask

    frames, summary = [], {}
    in_circuit = {tuple(h) for h in circuit.heads}
    for kind in ("object-value", "positional"):
        pairs, _ = build_pairs(model, queries, kind, seed=cfg.seed, limit=cfg.n_pairs)
        if not pairs:
            continue
        batch = collate_pairs(pairs, model.tokenizer.pad_token_id, model.cfg.device)
        frame = learn_head_mask(model, batch, steps=cfg.dcm_steps, seed=cfg.seed)
        chosen = [(int(r.layer), int(r.head_index)) for r in frame[frame["selected"]].itertuples()]
        summary[kind] = {"heads": [list(h) for h in chosen], "in_circuit": sum(h in in_circuit for h in chosen),
                         "accuracy": frame.attrs["accuracy"], "n_pairs": len(batch)}
        frames.append(frame.assign(desideratum=kind, in_circuit=[(l, h) in in_circuit for l, h in
                                                                 zip(frame["layer"], frame["head_index"])]))
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(Path(out_dir) / "dcm.csv", index=False)
    return summary


def cmap_study(recipient, donor, queries: QuerySet, circuit: Circuit, out_dir: str | Path,
               cfg: CircuitStudyConfig = CircuitStudyConfig()) -> pd.DataFrame:
    """CMAP per circuit group, donor -> recipient, on random-query pairs the recipient gets wrong -> ``cmap.csv``.

    Beside the groups and the whole ``circuit`` (all positions), ``random_heads`` patches as many heads
    drawn (seeded) from outside the circuit, at all positions: the gain any heads of that number give."""
    pairs, _ = build_pairs(recipient, queries, "random-query", seed=cfg.seed + 1, limit=None, correct_only=False,
                           wrong_only=True)
    if not pairs:
        raise DataError("No pairs for CMAP.")
    batch = wrong_pairs(recipient, collate_pairs(pairs, recipient.tokenizer.pad_token_id, recipient.cfg.device))
    batch = batch.select(range(min(len(batch), cfg.cmap_pairs))) if len(batch) else batch
    if not len(batch):
        logger.warning("CMAP: the recipient answers every pair correctly; nothing to repair")
        return pd.DataFrame()
    groups = dict(circuit.groups)
    groups["circuit"] = circuit.heads
    positions = dict(circuit.positions)
    positions["circuit"] = "all"
    inside = {tuple(h) for h in circuit.heads}
    outside = [(l, h) for l in range(recipient.cfg.n_layers) for h in range(recipient.cfg.n_heads) if (l, h) not in inside]
    pick = np.random.default_rng(cfg.seed).choice(len(outside), size=min(len(inside), len(outside)), replace=False)
    groups["random_heads"] = [outside[int(i)] for i in sorted(pick)]
    positions["random_heads"] = "all"
    logger.info("CMAP: %d pairs the recipient gets wrong, groups %s", len(batch), list(groups))
    frame = cross_model_patch(recipient, donor, batch, groups, positions=positions, max_batch=cfg.max_batch,
                              progress=cfg.progress)
    frame.to_csv(Path(out_dir) / "cmap.csv", index=False)
    return frame
