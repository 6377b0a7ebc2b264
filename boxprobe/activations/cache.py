"""Activation caches: chosen hooks at chosen token roles, written to disk in resumable shards.

Forward hooks copy out only the rows of the requested positions (``positions.ROLES``), so no
all-position cache ever exists: memory is bounded by one batch's selected rows on the device and
one shard on the host. Shard ``k`` holds queries ``[k*shard_size, (k+1)*shard_size)`` in two files
written atomically: ``shard-0000k.safetensors`` (a tensor ``"{group}/{role}"`` per hook group and
role, ``[rows, n_layers, *activation]``) and ``shard-0000k.jsonl`` (one metadata row per activation
row). ``manifest.json`` records the request: a rerun resumes, and a different request is refused.

Integrity: the manifest records each shard's sha256 (of both files, hashed from the bytes in memory
as they are written) and its rows per role. A reader checks a shard's hashes, row counts and that every
activation is finite before it returns any of it, and names the shard, model, layer, role and rows
that fail. A rerun of ``build_cache`` rebuilds shards that fail the check; ``repair=True`` (``--repair``)
also rebuilds a cache whose manifest is unreadable.

Rows: one per (query, role position). The description's roles (``CONTEXT_ROLES``: box mentions, objects,
sentence ends), which all queries of a context share, are stored once per context, under its first query.

Groups: ``blocks.{l}.hook_resid_post`` over ``l`` is ``resid_post``, rows ``[n, n_layers, d_model]``;
``attn.hook_z`` keeps its heads, ``[n, n_layers, n_heads, d_head]``; ``hook_embed`` has one layer, -1.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm
from transformer_lens.model_bridge.exceptions import StopAtLayerException

import boxprobe
from boxprobe.activations.packing import pack, packing_works
from boxprobe.behaviour.decoding import cache_keyword_fix, pad_rows
from boxprobe.config import ConfigError, check_choice, from_dict
from boxprobe.data.queries import ALL_ROLES, EncodedQuery, QuerySet
from boxprobe.models.batching import BatchSizer, join_rows_by_item
from boxprobe.errors import ArgumentError, BoxprobeError, DataError, MissingFileError, MissingKeyError
from boxprobe.files import file_sha256  # noqa: F401  (re-exported: callers hash data files)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Manifest fields that must agree before a directory's shards are reused.
COMPARED = ("model", "revision", "weight_mode", "model_dtype", "dtype", "hooks", "roles", "data_sha256",
            "queries_sha256", "n_queries", "spec", "layers", "shard_size", "context_rows")
_NOT_A_ROW = ("hook_pattern", "hook_attn_scores")
# Packing shared prefixes pays when it computes less than this fraction of the tokens a plain pass would
# (packed rows are padded to the longest, and their masks are quadratic in its length).
REUSE_WORTH = 0.7
# Roles of the description, which every query of a context shares: their rows are stored once per context,
# under the context's first query (``first_of_context``), not once per query.
CONTEXT_ROLES = ("box_mention", "object_first", "object_last", "state_end", "op_end")


class CacheMismatchError(BoxprobeError, ValueError):
    """An existing cache directory was made for another model, dataset or setting."""


@dataclass(frozen=True)
class CacheConfig:
    """What ``build_cache`` keeps and how it writes it."""

    hooks: tuple[str, ...] = ("resid_post",)
    """Hook names: explicit (``blocks.3.hook_resid_post``), a pattern over layers (``blocks.*.hook_resid_post``)
    or a shorthand over every layer (``resid_post``, ``resid_pre``, ``attn_out``, ``mlp_out``, ``attn.hook_z``)."""
    roles: tuple[str, ...] = ("query_last",)
    """Token roles whose rows are kept (``boxprobe.data.queries.ALL_ROLES``, answer-prefix roles included)."""
    layers: tuple[int, ...] | None = None
    """Block indices to keep of per-layer hooks (None: every layer); hooks outside the blocks are always kept."""
    dtype: str = "float32"
    """Storage dtype: float32, bfloat16 or float16 (activations are cast after the forward pass)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    shard_size: int = 1024
    """Queries per shard; the unit of resumption (a killed run loses at most one shard)."""
    reuse_context: bool = True
    """Run each context's shared prefix once, packed with its queries' suffixes (when that gives the same logits)."""

    def __post_init__(self) -> None:
        for name in ("hooks", "roles"):  # a bare string means one name, not its characters
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(x) for x in self.layers))))
        if re.search(r"int8|float8|fp8|8.?bit", str(self.dtype).lower()):
            raise ConfigError(f"dtype {self.dtype!r}: 8-bit activation caches are not offered, because quantising "
                              "activations to 8 bits is known to ruin linear probes; use float32, bfloat16 or float16.")
        check_choice("dtype", self.dtype, STORE_DTYPES)
        for role in self.roles:
            check_choice("role", role, ALL_ROLES)
        if not self.hooks or not self.roles:
            raise ConfigError("CacheConfig needs at least one hook and one role.")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError(f"batch_size and shard_size must be >= 1, got {self.batch_size} and {self.shard_size}.")

    @classmethod
    def from_dict(cls, data: dict) -> "CacheConfig":
        return from_dict(cls, data)


@dataclass(frozen=True)
class HookGroup:
    """Hooks stacked along one layer axis of a cached tensor."""

    name: str
    """Group key, e.g. ``resid_post`` or ``attn.z``."""
    hooks: tuple[str, ...]
    layers: tuple[int, ...]
    """Block index of each hook (-1 for hooks outside the blocks)."""


def _split_name(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"blocks\.(\d+|\*)\.(.+)", name)
    rest, layer = (m.group(2), -1 if m.group(1) == "*" else int(m.group(1))) if m else (name, -1)
    return re.sub(r"(^|\.)hook_", r"\1", rest), layer


def resolve_hooks(model, patterns: Sequence[str], layers: Sequence[int] | None = None) -> list[HookGroup]:
    """Expand hook patterns and shorthands against ``model.hook_dict`` and group them by kind.

    ``layers`` keeps only those blocks of per-layer hooks (hooks outside the blocks stay).
    """
    names, n_layers = model.hook_dict, int(model.cfg.n_layers)
    if layers is not None and (bad := [l for l in layers if not 0 <= l < n_layers]):
        raise ConfigError(f"layers {bad} do not exist in model {model.cfg.model_name!r}, which has layers "
                          f"0..{n_layers - 1}.")
    found: dict[str, None] = {}
    for pattern in patterns:
        head, _, last = pattern.rpartition(".")
        hooked = (head + "." if head else "") + ("" if last.startswith("hook_") else "hook_") + last
        stems = dict.fromkeys([pattern, hooked])  # "resid_post" -> "hook_resid_post", "attn.z" -> "attn.hook_z"
        if "*" in pattern:
            expanded = [pattern.replace("*", str(layer)) for layer in range(n_layers)]
        else:
            expanded = next(([s] if s in names else [f"blocks.{l}.{s}" for l in range(n_layers)]
                             for s in stems if s in names or f"blocks.0.{s}" in names), [])
        missing = [e for e in expanded if e not in names] or ([] if expanded else [pattern])
        if missing:
            close = difflib.get_close_matches(_split_name(pattern)[0], sorted({_split_name(n)[0] for n in names}), 5)
            raise ConfigError(f"Hook {pattern!r} does not exist in model {model.cfg.model_name!r} ({missing[0]!r} "
                              f"missing). Use e.g. resid_post, attn_out, mlp_out, attn.hook_z"
                              + (f"; similar: {', '.join(close)}" if close else "") + ".")
        if any(e.endswith(_NOT_A_ROW) for e in expanded):
            raise ConfigError(f"Hook {pattern!r} holds [head, query, key] scores whose key length varies by prompt; "
                              "it cannot be cached per position. Use run_with_cache on a few prompts instead.")
        found.update(dict.fromkeys(expanded))
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in found:
        key, layer = _split_name(name)
        if layers is None or layer == -1 or layer in layers:
            groups.setdefault(key, []).append((layer, name))
    return [HookGroup(k, tuple(n for _, n in sorted(v)), tuple(l for l, _ in sorted(v))) for k, v in groups.items()]


def queries_sha256(queries: QuerySet) -> str:
    """A hash of everything that determines the token ids and labels of ``queries``."""
    h = hashlib.sha256()
    for it in queries:
        q = it.query
        h.update(json.dumps([it.ids, q.prompt, q.continuation, q.prompt_format, [e.to_json() for e in q.examples]])
                 .encode())
    return h.hexdigest()


# -- running ------------------------------------------------------------------------------------


def _gather(act: torch.Tensor, batch_idx: Int[torch.Tensor, "rows"], pos_idx: Int[torch.Tensor, "rows"],
            shape: tuple[int, int], name: str) -> torch.Tensor:
    if act.dim() < 2 or tuple(act.shape[:2]) != shape:
        raise ConfigError(f"Hook {name!r} gives shape {tuple(act.shape)}, not [batch, pos, ...] = {list(shape)}; "
                         "it cannot be cached per position. Pick a hook on the residual stream or per-head outputs.")
    return act[batch_idx.to(act.device), pos_idx.to(act.device)]


def run_selected(model, tokens: Int[torch.Tensor, "batch pos"], attention_mask: Int[torch.Tensor, "batch pos"],
                 batch_idx: Int[torch.Tensor, "rows"], pos_idx: Int[torch.Tensor, "rows"],
                 groups: Sequence[HookGroup], dtype: torch.dtype, *,
                 position_ids: Int[torch.Tensor, "batch pos"] | None = None,
                 ) -> dict[str, Float[torch.Tensor, "rows layer ..."]]:
    """One forward pass keeping rows ``(batch_idx, pos_idx)`` of every hook, per group on the host.

    The pass stops once every hook has fired, so layers (and the unembedding) past the last requested
    hook are skipped. ``attention_mask`` may be a 4D additive mask, with explicit ``position_ids``
    (packed rows, :mod:`boxprobe.activations.packing`). Hooks live only inside ``run_with_hooks`` and
    are removed on error.
    """
    buffers: dict[str, torch.Tensor] = {}
    fired: set[str] = set()
    total = sum(len(g.hooks) for g in groups)

    def make_hook(group: HookGroup, slot: int):
        def hook(act: torch.Tensor, hook) -> None:
            rows = _gather(act, batch_idx, pos_idx, tuple(tokens.shape), group.hooks[slot])
            if group.name not in buffers:
                buffers[group.name] = rows.new_empty((rows.shape[0], len(group.hooks), *rows.shape[1:]), dtype=dtype)
            buffers[group.name][:, slot] = rows.to(buffers[group.name].device)  # blocks may sit on several devices
            fired.add(group.hooks[slot])
            if len(fired) == total:
                raise StopAtLayerException(None)  # caught by the bridge's forward: skip the rest of the model
        return hook

    fwd_hooks = [(name, make_hook(g, slot)) for g in groups for slot, name in enumerate(g.hooks)]
    extra = {} if position_ids is None else {"position_ids": position_ids}
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, attention_mask=attention_mask, return_type=None, **extra)
    if len(fired) != total:
        never = sorted({n for g in groups for n in g.hooks} - fired)
        raise ConfigError(f"Hook(s) {', '.join(never)} never fired in model {model.cfg.model_name!r}; "
                           "they may need enabling (e.g. model.set_use_attn_result(True)).")
    buffers = {name: buf.cpu() for name, buf in buffers.items()}
    return buffers


def first_of_context(queries: QuerySet) -> np.ndarray:
    """Whether each query is the first of its context in the set (the one that stores the context's rows)."""
    seen: set[str] = set()
    first = np.zeros(len(queries), dtype=bool)
    for i, item in enumerate(queries.items):
        context = item.query.examples[0].context
        first[i] = context not in seen
        seen.add(context)
    return first


def _selection(queries: QuerySet, start: int, end: int, roles: Sequence[str], first: np.ndarray) -> pd.DataFrame:
    """Position rows of queries ``start..end-1`` at ``roles``, grouped by role in ``roles`` order; rows of
    ``CONTEXT_ROLES`` only for queries that are ``first`` of their context."""
    pos = queries.positions
    table = pos[(pos["item"] >= start) & (pos["item"] < end) & pos["role"].isin(roles)]
    table = table[~table["role"].isin(CONTEXT_ROLES).to_numpy() | first[table["item"].to_numpy()]]
    order = table["role"].map({r: i for i, r in enumerate(roles)}).to_numpy()
    return table.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)


def _metadata(queries: QuerySet, table: pd.DataFrame) -> pd.DataFrame:
    labels = queries.labels.iloc[table["item"].to_numpy()].reset_index(drop=True)
    meta = table.drop(columns=["char_start", "char_end"]).rename(columns={"item": "query_index"})
    cols = ["role", "query_index"] + [c for c in meta.columns if c not in ("role", "query_index")]
    return pd.concat([meta[cols].reset_index(drop=True), labels], axis=1)


def _shared_prefixes(items: Sequence[EncodedQuery], lengths: Sequence[int]) -> list[tuple[list[int], int]]:
    """Runs of two or more consecutive items of one context, with the token prefix they share."""
    runs: list[list[int]] = []
    for i, it in enumerate(items):
        if runs and items[runs[-1][0]].query.examples[0].context == it.query.examples[0].context:
            runs[-1].append(i)
        else:
            runs.append([i])
    out = []
    for members in runs:
        seqs = [items[i].ids[:lengths[i]] for i in members]
        n = min(map(len, seqs)) - 1  # every item keeps at least one token for the suffix pass
        for seq in seqs[1:]:
            n = next((j for j, (a, b) in enumerate(zip(seqs[0][:n], seq)) if a != b), n)
        if len(members) > 1 and n > 0:
            out.append((members, n))
    return out


def _run_batch(model, items: Sequence[EncodedQuery], table: pd.DataFrame, groups, store, pad_id: int,
               reuse: bool) -> dict[str, torch.Tensor]:
    """Activations of ``table``'s rows (``item`` relative to ``items``).

    Queries whose context others in the batch share run packed: one row per context holding the shared
    prefix once and then every member's suffix (:func:`boxprobe.activations.packing.pack`), so no
    per-layer key-value state is held and memory does not grow with depth. The rest run in one plain
    left-padded pass. Keeping the two apart matters: a long unshared prompt would pad every packed row.
    """
    device = next(model.parameters()).device
    rel, tok_idx = table["item"].to_numpy(), table["token_index"].to_numpy()
    lengths = np.ones(len(items), dtype=np.int64)
    np.maximum.at(lengths, rel, tok_idx + 1)
    chunks = _shared_prefixes(items, lengths) if reuse else []
    saved = sum(n * (len(m) - 1) for m, n in chunks)
    if saved < (1 - REUSE_WORTH) * lengths.sum():  # too little shared for packing to pay
        chunks = []
    shared = np.zeros(len(items), dtype=np.int64)
    chunk_of = np.full(len(items), -1, dtype=np.int64)
    for c, (members, n) in enumerate(chunks):
        shared[members], chunk_of[members] = n, c
    out: dict[str, torch.Tensor] = {}

    def run(rows: np.ndarray, batch_rows: np.ndarray, positions: np.ndarray, ids, mask, **kw) -> None:
        acts = run_selected(model, ids, mask, torch.from_numpy(batch_rows).to(device),
                            torch.from_numpy(positions).to(device), groups, store, **kw)
        for g, a in acts.items():
            if g not in out:
                out[g] = a.new_empty((len(table), *a.shape[1:]))
            out[g][torch.from_numpy(rows)] = a

    plain = np.flatnonzero(chunk_of[rel] < 0)  # rows of queries without a shared prefix
    if len(plain):
        members = np.flatnonzero(chunk_of < 0)
        slot = np.zeros(len(items), dtype=np.int64)
        slot[members] = np.arange(len(members))
        ids, mask = pad_rows([items[i].ids[:lengths[i]] for i in members], pad_id, "left", device)
        run(plain, slot[rel[plain]], tok_idx[plain] + ids.shape[1] - lengths[rel[plain]], ids, mask)
    if chunks:
        packed = pack([items[m[0]].ids[:n] for m, n in chunks],
                      [[items[i].ids[n:lengths[i]] for i in m] for m, n in chunks], pad_id, device,
                      next(model.parameters()).dtype)
        start = np.zeros(len(items), dtype=np.int64)  # where each member's suffix begins in its packed row
        for c, (members, _) in enumerate(chunks):
            start[members] = packed.starts[c]
        rows = np.flatnonzero(chunk_of[rel] >= 0)
        i, tok = rel[rows], tok_idx[rows]
        # A prefix token (read by any member) sits where it is; a suffix token after its member's start.
        where = np.where(tok < shared[i], tok, start[i] + tok - shared[i])
        run(rows, chunk_of[i], where, packed.ids, packed.mask, position_ids=packed.positions)
    return out


def _manifest_request(model, queries: QuerySet, cfg: CacheConfig, groups, data_hash: str | None) -> dict:
    info = getattr(model, "boxprobe_info", None)
    q_hash = queries_sha256(queries)
    return {
        "model": info.path_or_id if info else str(model.cfg.model_name),
        "model_name": info.name if info else str(model.cfg.model_name),
        "revision": info.revision if info else None,
        "weight_mode": info.weight_mode if info else ("compatibility" if model.compatibility_mode else "raw"),
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dtype": cfg.dtype, "hooks": [h for g in groups for h in g.hooks], "roles": list(cfg.roles),
        "groups": {g.name: {"hooks": list(g.hooks), "layers": list(g.layers)} for g in groups},
        "data_sha256": data_hash or q_hash, "queries_sha256": q_hash, "n_queries": len(queries),
        "spec": queries.spec.describe(), "layers": None if cfg.layers is None else list(cfg.layers),
        "shard_size": cfg.shard_size, "context_rows": "once per context",
        "batch_size": cfg.batch_size, "boxprobe_version": boxprobe.__version__,
    }


def _shard_paths(directory: Path, k: int) -> tuple[Path, Path]:
    return directory / f"shard-{k:05d}.safetensors", directory / f"shard-{k:05d}.jsonl"


def _damaged_message(directory: Path, what: str) -> str:
    return (f"{what}. It is not used: rerun the same command to rebuild the shards that fail the check, or pass "
            f"--repair (build_cache(..., repair=True)); or delete {directory}.")


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a cache directory; a truncated or unreadable one is a DataError naming the file."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is damaged (not valid JSON: {getattr(err, 'msg', err)}); rerun with --repair "
                        f"(build_cache(..., repair=True)) to rebuild the cache, or delete {Path(directory)}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("completed_shards"), list):
        raise DataError(f"{path} is damaged (no list of completed shards); rerun with --repair "
                        f"(build_cache(..., repair=True)) to rebuild the cache, or delete {Path(directory)}.")
    return data


def shard_problem(directory: Path, k: int, record: dict | None) -> str | None:
    """Why shard ``k`` cannot be trusted (missing, no checksum, checksum or row mismatch), or None."""
    st_path, meta_path = _shard_paths(directory, k)
    if not st_path.exists() or not meta_path.exists():
        return f"shard {st_path.name} is listed as complete in {directory / MANIFEST} but its files are missing"
    if not record or "sha256" not in record:
        return f"shard {st_path.name} in {directory} has no checksum in the manifest (written by an older boxprobe)"
    if file_sha256(st_path) != record["sha256"] or file_sha256(meta_path) != record.get("meta_sha256"):
        return f"shard {st_path.name} in {directory} fails its sha256 checksum (the file is damaged or truncated)"
    return None


def _complete_shards(directory: Path) -> set[int]:
    """Shards with both files; drops tmp files and lone metadata files left by a killed run."""
    for tmp in directory.glob("shard-*.tmp"):
        tmp.unlink()
    for meta in directory.glob("shard-*.jsonl"):
        if not meta.with_suffix(".safetensors").exists():
            meta.unlink()  # the safetensors file is renamed last, so this shard never finished
    return {int(p.stem.split("-")[1]) for p in directory.glob("shard-*.jsonl")}


def build_cache(model, queries: QuerySet, out_dir: str | Path, cfg: CacheConfig, data_hash: str | None = None,
                progress: bool = True, on_batch: Callable[[int, int], None] | None = None,
                on_shard: Callable[[int], None] | None = None, repair: bool = False) -> "CacheReader":
    """Cache ``cfg.hooks`` at ``cfg.roles`` over ``queries`` (:func:`boxprobe.data.queries.prepare`) into
    ``out_dir``, resuming a previous run there.

    Each context's shared prefix runs once, packed with its queries' suffixes into one row
    (``cfg.reuse_context``, when :func:`boxprobe.activations.packing.packing_works` for the model).

    ``data_hash`` is the sha256 of the data file the queries came from (default: a hash of the
    queries). ``on_batch(shard, batch)`` runs after each forward pass and ``on_shard(shard)`` after
    each shard is written. Raises ``CacheMismatchError`` if ``out_dir`` holds another cache.
    Shards that fail their checksum are rebuilt (with a warning); ``repair`` also rebuilds the whole
    cache when its manifest is unreadable (otherwise a DataError naming it).
    """
    out = Path(out_dir)
    if not isinstance(queries, QuerySet):
        raise ConfigError("build_cache takes a query set: queries = boxprobe.prepare(model, examples, spec).")
    queries.check_model(model)
    groups = resolve_hooks(model, cfg.hooks, cfg.layers)
    request = _manifest_request(model, queries, cfg, groups, data_hash)
    path, tok = out / MANIFEST, model.tokenizer
    if tok is None or tok.pad_token_id is None:
        raise ArgumentError(f"Model {model.cfg.model_name!r} needs a tokenizer with a pad token to batch prompts; "
                         "load it with boxprobe.models.load_model, which sets one.")
    records: dict[str, dict] = {}
    if path.exists():
        try:
            old = read_manifest(out)
        except DataError:
            if not repair:
                raise
            logger.warning("%s is damaged; rebuilding the cache in %s (--repair).", path, out)
            for stale in [path, *out.glob("shard-*")]:
                stale.unlink()
            old = request
        records = dict(old.get("shards") or {})
        if diff := [k for k in COMPARED if old.get(k) != request[k]]:
            details = "; ".join(f"{k}: cached {old.get(k)!r}, requested {request[k]!r}" for k in diff)
            raise CacheMismatchError(f"{path} was written for another request ({details}). Pick another "
                                     "directory, or delete this one to rebuild it; shards are never mixed.")
    if not path.exists() and out.exists() and any(out.glob("shard-*")):
        raise CacheMismatchError(f"{out} holds shard files but no {MANIFEST}; delete them or pick another directory.")
    out.mkdir(parents=True, exist_ok=True)
    done, n, size = _complete_shards(out), len(queries), cfg.shard_size
    n_shards = -(-n // size)
    for k in sorted(done):
        if (problem := shard_problem(out, k, records.get(str(k)))) is not None:
            logger.warning("%s; rebuilding it.", problem)
            for file in _shard_paths(out, k):
                file.unlink(missing_ok=True)
            done.discard(k)
            records.pop(str(k), None)

    def save_manifest() -> None:
        finished = sorted(k for k in done if k < n_shards)
        items = sum(min(n, (k + 1) * size) - k * size for k in finished)
        status = {"n_items": items, "completed_shards": finished, "complete": len(finished) == n_shards,
                  "shards": {str(k): records[str(k)] for k in finished}}
        path.with_name(MANIFEST + ".tmp").write_text(json.dumps({**request, **status}, indent=1))
        os.replace(path.with_name(MANIFEST + ".tmp"), path)

    save_manifest()
    store = STORE_DTYPES[cfg.dtype]
    jobs = [(k, b, s, min(s + cfg.batch_size, n, (k + 1) * size)) for k in range(n_shards) if k not in done
            for b, s in enumerate(range(k * size, min(n, (k + 1) * size), cfg.batch_size))]
    bar = tqdm(total=n, initial=n - sum(e - s for _, _, s, e in jobs), unit="item", desc="caching",
               disable=not progress)
    parts: dict[str, list[torch.Tensor]] = {}
    tables: list[pd.DataFrame] = []
    sizer = BatchSizer(cfg.batch_size, "cache")
    first = first_of_context(queries)
    with cache_keyword_fix(model):
        reuse = cfg.reuse_context and bool(len(queries)) and packing_works(model, queries[0].ids)
        if cfg.reuse_context and not reuse:
            logger.warning("%s does not take packed prompts (a 4D attention mask); caching without prefix reuse.",
                           model.cfg.model_name)
        with bar:
            for j, (k, b, start, end) in enumerate(jobs):
                table = _selection(queries, start, end, cfg.roles, first)
                rel = table.assign(item=table["item"] - start)
                # halves the batch on out-of-memory (boxprobe.models.batching); pieces keep their rows' order
                acts = sizer.run_range(end - start, lambda lo, hi: _run_batch(
                    model, queries.items[start + lo:start + hi], rel[rel["item"].between(lo, hi - 1)].assign(
                        item=lambda t: t["item"] - lo), groups, store, tok.pad_token_id, reuse),
                    join_rows_by_item(rel["item"].to_numpy()))
                for role in cfg.roles:
                    keep = torch.tensor((table["role"] == role).to_numpy())
                    for g, a in acts.items():
                        parts.setdefault(f"{g}/{role}", []).append(a[keep])
                tables.append(_metadata(queries, table))
                bar.update(end - start)
                if on_batch is not None:
                    on_batch(k, b)
                if j + 1 == len(jobs) or jobs[j + 1][0] != k:
                    records[str(k)] = _write_shard(out, k, parts, pd.concat(tables, ignore_index=True))
                    parts, tables = {}, []
                    done.add(k)
                    save_manifest()
                    if on_shard is not None:
                        on_shard(k)
    return open_cache(out)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write_shard(out: Path, k: int, parts: dict[str, list[torch.Tensor]], meta: pd.DataFrame) -> dict:
    """Write shard ``k``'s two files atomically; returns its manifest record (checksums, rows per role)."""
    tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    if any(t.dtype == torch.float16 and bool(torch.isinf(t).any()) for t in tensors.values()):
        logger.warning("shard %d: activations overflow float16 (inf); cache as bfloat16 or float32 instead.", k)
    meta.insert(1, "shard", k)
    meta.insert(2, "row", meta.groupby("role").cumcount())
    st_path, meta_path = _shard_paths(out, k)
    # Hashed from the bytes in memory: no second read of the files.
    meta_bytes = meta.to_json(orient="records", lines=True).encode()
    st_bytes = save_bytes(tensors, metadata={"shard": str(k)})
    for target, data in ((meta_path, meta_bytes), (st_path, st_bytes)):
        _write_file(str(target) + ".tmp", data)
    os.replace(meta_path.with_name(meta_path.name + ".tmp"), meta_path)
    os.replace(str(st_path) + ".tmp", st_path)  # last: a shard counts as complete once this file exists
    return {"sha256": hashlib.sha256(st_bytes).hexdigest(), "meta_sha256": hashlib.sha256(meta_bytes).hexdigest(),
            "rows": {str(r): int(c) for r, c in meta["role"].value_counts(sort=False).items()}}


# -- reading ------------------------------------------------------------------------------------


class CacheReader:
    """Lazy access to a cache directory: tensors are read per shard, and only those asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.exists():
            raise MissingFileError(f"No {MANIFEST} in {self.directory}; is it a cache written by build_cache?")
        self.manifest: dict = read_manifest(self.directory)
        self.shards = list(self.manifest["completed_shards"])
        self._checked: set[int] = set()
        for k in self.shards:  # a missing shard is an error here, not a silent loss of rows
            if not all(p.exists() for p in _shard_paths(self.directory, k)):
                raise DataError(_damaged_message(self.directory, shard_problem(self.directory, k, None)))
        self.groups = {name: HookGroup(name, tuple(g["hooks"]), tuple(g["layers"]))
                       for name, g in self.manifest["groups"].items()}
        self.roles: tuple[str, ...] = tuple(self.manifest["roles"])
        if not self.complete:
            logger.warning("cache %s is incomplete: %d of %d queries", self.directory, self.manifest["n_items"],
                           self.manifest["n_queries"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _key(self, hook: str, role: str) -> tuple[str, int | None]:
        if not self.shards:
            raise DataError(f"Cache {self.directory} has no complete shard yet; run build_cache to fill it.")
        key, layer = _split_name(hook)
        if key not in self.groups:
            raise MissingKeyError(f"Hook {hook!r} is not in cache {self.directory}; cached: {', '.join(self.groups)}.")
        if role not in self.roles:
            raise MissingKeyError(f"Role {role!r} is not in cache {self.directory}; cached: {', '.join(self.roles)}.")
        explicit = re.fullmatch(r"blocks\.\d+\..+", hook) is not None
        if explicit and layer not in self.groups[key].layers:
            raise MissingKeyError(f"Layer {layer} of {key!r} is not in cache {self.directory}; "
                           f"layers: {self.groups[key].layers}.")
        return key, self.groups[key].layers.index(layer) if explicit else None

    def layers(self, hook: str) -> tuple[int, ...]:
        return self.groups[self._key(hook, self.roles[0])[0]].layers

    def _check(self, k: int) -> dict:
        """Shard ``k``'s manifest record, once its checksums match (checked once per reader)."""
        record = (self.manifest.get("shards") or {}).get(str(k))
        if k not in self._checked:
            if (problem := shard_problem(self.directory, k, record)) is not None:
                raise DataError(_damaged_message(self.directory, problem))
            self._checked.add(k)
        return record

    def _read(self, k: int, key: str, role: str, slot: int | slice | None) -> torch.Tensor:
        expected = self._check(k)["rows"].get(role, 0)
        if isinstance(slot, int):
            slot = slice(slot, slot + 1)
        with safe_open(_shard_paths(self.directory, k)[0], framework="pt") as f:
            # a slice reads only those layers' bytes, in the stored dtype
            t = f.get_tensor(f"{key}/{role}") if slot is None else f.get_slice(f"{key}/{role}")[:, slot]
        if t.shape[0] != expected:
            raise DataError(_damaged_message(self.directory, f"shard {_shard_paths(self.directory, k)[0].name} holds "
                                             f"{t.shape[0]} rows of {key}/{role}, the manifest {expected}"))
        finite = torch.isfinite(t.reshape(t.shape[0], t.shape[1], -1)).all(-1)  # [rows, layers]
        if not bool(finite.all()):
            rows, cols = (~finite).nonzero(as_tuple=True)
            layers = self.groups[key].layers if slot is None else self.groups[key].layers[slot]
            queries = self._meta(k, role)["query_index"].to_numpy()[rows.unique().numpy()]
            raise DataError(
                f"Cache {self.directory}: non-finite activations (NaN or inf) of model "
                f"{self.manifest.get('model_name')!r}, {key} layer(s) {sorted({layers[c] for c in cols.tolist()})}, "
                f"role {role}, {len(queries)} row(s) of shard {k} (query_index {queries[:5].tolist()}). They are not "
                "used: for float16 overflow cache as bfloat16 or float32; otherwise check the model's weights.")
        return t

    def _meta(self, k: int, role: str) -> pd.DataFrame:
        expected = self._check(k)["rows"].get(role, 0)
        with _shard_paths(self.directory, k)[1].open() as f:
            df = pd.DataFrame([r for r in map(json.loads, f) if r["role"] == role])
        if len(df) != expected:
            raise DataError(_damaged_message(self.directory, f"shard {_shard_paths(self.directory, k)[1].name} holds "
                                             f"{len(df)} metadata rows of role {role}, the manifest {expected}"))
        return df.astype({c: "Int64" for c in ("box", "op_index") if c in df})

    def iter_shards(self, hook: str, role: str) -> Iterator[tuple[torch.Tensor, pd.DataFrame]]:
        """(activations ``[rows, n_layers, ...]``, metadata rows) of each shard in order."""
        key, slot, offset = *self._key(hook, role), 0
        for k in self.shards:
            meta = self._meta(k, role)
            meta.insert(0, "item", range(offset, offset + len(meta)))
            offset += len(meta)
            yield self._read(k, key, role, slot), meta

    def activations(self, hook: str, role: str, layers: slice | None = None) -> Float[torch.Tensor, "item layer ..."]:
        """All rows of one hook group (or one explicit layer) at one role, in metadata order and the stored
        dtype. ``layers``: only these cached slots of a group (``slice(a, b)``), read from disk alone."""
        key, slot = self._key(hook, role)
        if layers is not None:
            if slot is not None:
                raise ArgumentError(f"{hook!r} names one layer; pass the group's name to read a block of layers.")
            start, stop, step = layers.indices(len(self.groups[key].layers))
            if step != 1 or stop <= start:
                raise ArgumentError(f"layers must be a non-empty contiguous slice of the cached slots, got {layers}.")
            slot = slice(start, stop)
        return torch.cat([self._read(k, key, role, slot) for k in self.shards])

    def metadata(self, role: str) -> pd.DataFrame:
        """Metadata rows of ``role``; ``item`` is the row index into ``activations(..., role)``."""
        self._key(next(iter(self.groups)), role)
        df = pd.concat([self._meta(k, role) for k in self.shards], ignore_index=True)
        df.insert(0, "item", range(len(df)))
        return df


def open_cache(directory: str | Path) -> CacheReader:
    """A reader over a cache directory written by ``build_cache``."""
    return CacheReader(directory)
