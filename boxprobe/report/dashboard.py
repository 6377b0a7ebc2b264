"""One self-contained HTML dashboard of a boxprobe run.

``write_dashboard`` puts figures, grouped into sections and each with a short caption, into ONE
HTML file that opens offline: the plotly JavaScript is inlined exactly once in the page head and
every figure is embedded without its own copy. ``dashboard_from_run`` builds
``RUN_DIR/dashboard.html`` from the tidy CSV files of a run directory.

Run-directory layout read by ``dashboard_from_run`` (every file is optional; a figure is built
when its file exists, a section with no files shows a one-line "not run" note):

==========================  ==================================================================
``run.json``                free-form run info (e.g. models, weight_mode, date, seed, commit)
``behaviour.csv``           model, numops, accuracy (fraction), ci_low, ci_high[, n]
``probe_accuracy.csv``      model, layer, value, kind[, ci_low, ci_high, probe, metric]
                            (kind: task / control / random-init / majority; one figure per metric)
``probe_heatmap.csv``       model, layer, numops, value (one figure per model)
``selectivity.csv``         model, layer, selectivity[, ci_low, ci_high, probe]
``causal_check.csv``        model, layer, condition, metric, value, ci_low, ci_high[, n] (one figure per model)
``model_difference.csv``    layer, diff, ci_low, ci_high[, model_a, model_b] (one figure per pair)
``patching_resid.csv``      model, layer, position_index, value[, token] (one figure per model)
``patching_heads.csv``      model, layer, head_index, value (one figure per model)
``attention_heads.csv``     model, layer, head, role, mean (one figure per model and role)
``cmap.csv``                group, metric, stage ("before" | "after" | "donor"), value[, ci_low, ci_high]
``circuit.json``            groups, positions, faithfulness, n_pairs (``boxprobe circuit``; drawn per group)
==========================  ==================================================================
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from boxprobe.report import plots
from boxprobe.models.registry import PAPER_CITATION
from boxprobe.errors import DataError, MissingFileError

logger = logging.getLogger(__name__)

__all__ = ["Section", "write_dashboard", "dashboard_from_run", "RUN_FILES"]


@dataclass
class Section:
    """A titled group of (figure, caption) pairs; ``note`` replaces the figures when empty."""

    title: str
    figures: list[tuple[go.Figure, str]] = field(default_factory=list)
    note: str = "not run"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 0 24px 48px; color: #222; }
header { border-bottom: 1px solid #ddd; margin-bottom: 16px; }
table.run-info { border-collapse: collapse; font-size: 14px; margin: 8px 0 16px; }
table.run-info th { text-align: left; padding: 2px 16px 2px 0; color: #555; font-weight: 600; }
table.run-info td { padding: 2px 0; }
nav a { margin-right: 16px; }
figure { margin: 12px 0 32px; }
figcaption { font-size: 14px; color: #444; margin-top: 4px; max-width: 900px; }
p.not-run { color: #888; font-style: italic; }
#bp-js-errors { color: #b00; white-space: pre-wrap; }
"""

# Registered before plotly loads, so a figure that fails to render shows its error on the page
# (and tests can read it from the DOM) instead of leaving a silent blank box.
_ERROR_HOOK = """
window.__bpErrors = [];
window.addEventListener("error", function (e) {
  window.__bpErrors.push(String(e.message || e));
  document.documentElement.setAttribute("data-js-errors", JSON.stringify(window.__bpErrors));
  var box = document.getElementById("bp-js-errors");
  if (box) { box.textContent = "JavaScript errors: " + window.__bpErrors.join("; "); }
});
"""


def _format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _run_info_html(run_info: dict | None) -> str:
    info = dict(run_info or {})
    info.setdefault("generated", _dt.datetime.now().isoformat(timespec="seconds"))
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_format_value(v))}</td></tr>"
                   for k, v in info.items())
    return f'<table class="run-info">{rows}</table>'


def _anchor(i: int, title: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    return f"s{i}-{slug}"


def write_dashboard(sections: list[Section], path: str | Path, title: str = "boxprobe dashboard",
                    run_info: dict | None = None) -> Path:
    """Write ``sections`` as one self-contained HTML file at ``path`` and return the path.

    The plotly JavaScript is inlined once in the head (the file opens offline); each figure is
    followed by its caption. A header shows ``run_info`` (e.g. models, weight mode, date) and
    when the file was generated; a section without figures shows its one-line ``note``.
    """
    path = Path(path)
    if not path.parent.exists():
        raise MissingFileError(f"cannot write dashboard {path}: folder {path.parent} does not exist")
    body, toc, n_fig = [], [], 0
    for i, section in enumerate(sections):
        anchor = _anchor(i, section.title)
        toc.append(f'<a href="#{anchor}">{html.escape(section.title)}</a>')
        body.append(f'<section id="{anchor}"><h2>{html.escape(section.title)}</h2>')
        if not section.figures:
            body.append(f'<p class="not-run">{html.escape(section.note)}</p>')
        for fig, caption in section.figures:
            if not isinstance(fig, go.Figure):
                raise TypeError(f"section {section.title!r}: expected a plotly Figure, "
                                f"got {type(fig).__name__}")
            div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"bp-fig-{n_fig}",
                              config={"displaylogo": False, "responsive": True})
            body.append(f'<figure class="bp-figure">{div}'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            n_fig += 1
        body.append("</section>")
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>",
        f"<script>{_ERROR_HOOK}</script>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head>", "<body>",
        f"<header><h1>{html.escape(title)}</h1>{_run_info_html(run_info)}",
        f"<nav>{''.join(toc)}</nav></header>", '<div id="bp-js-errors"></div>',
        *body, "</body>", "</html>",
    ])
    from boxprobe.pipeline.rundir import atomic_write_text

    atomic_write_text(path, page)
    logger.info("wrote dashboard with %d figures to %s", n_fig, path)
    return path


# ---------------------------------------------------------------------------------------------
# Building a dashboard from a run directory

RUN_FILES: dict[str, list[str]] = {
    "behaviour.csv": ["model", "numops", "accuracy", "ci_low", "ci_high"],
    "probe_accuracy.csv": ["model", "layer", "value", "kind"],
    "probe_heatmap.csv": ["model", "layer", "numops", "value"],
    "selectivity.csv": ["model", "layer", "selectivity"],
    "causal_check.csv": ["model", "layer", "condition", "metric", "value", "ci_low", "ci_high"],
    "model_difference.csv": ["layer", "diff", "ci_low", "ci_high"],
    "patching_resid.csv": ["model", "layer", "position_index", "value"],
    "patching_heads.csv": ["model", "layer", "head_index", "value"],
    "attention_heads.csv": ["model", "layer", "head_index", "role", "mean"],
    "cmap.csv": ["group", "metric", "stage", "value"],
}


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err}); re-export it or delete it") from err
    missing = [c for c in RUN_FILES[path.name] if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected at least "
                         f"{', '.join(RUN_FILES[path.name])} (see boxprobe.report.dashboard docstring)")
    if df.empty:
        raise DataError(f"{path}: the file has a header but no rows; delete it or re-run the step")
    # pandas pads a short row with NaN, so a file cut mid-row would plot silently: count the fields.
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if row and len(row) != len(df.columns):
                raise DataError(f"{path}:{lineno}: {len(row)} fields where the header has {len(df.columns)}; the file "
                                "is cut or malformed. Re-run the step that writes it, or delete it.")
    for col in ("layer", "head"):
        if col in df.columns:
            bad = df[col].notna() & pd.to_numeric(df[col], errors="coerce").isna()
            if bad.any():
                row = int(bad.to_numpy().nonzero()[0][0])
                raise DataError(f"{path}:{row + 2}: column {col!r} must be a number, got {df[col].iloc[row]!r}.")
    return df


def _split(df: pd.DataFrame, cols: list[str]):
    """Yield (key, sub-frame) per combination of the ``cols`` present in ``df``."""
    cols = [c for c in cols if c in df.columns]
    if not cols:
        yield (), df
        return
    for key, d in df.groupby(cols, sort=False, dropna=False):
        yield (key if isinstance(key, tuple) else (key,)), d


def _figures(run_dir: Path, name: str, build: Callable[[pd.DataFrame], list]) -> list:
    path = run_dir / name
    if not path.is_file():
        return []
    df = _read_csv(path)
    try:
        return build(df)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from err


def _behaviour(df):
    cap = ("Behavioural accuracy (fraction of queries answered exactly right) by the number of "
           "operations that affected the queried box; error bars are confidence intervals. "
           f"Dashed lines (registered models only): accuracies reported by {PAPER_CITATION}; "
           "dotted: its random baseline.")
    return [(plots.behaviour_accuracy(df), cap)]


_PROBE_VIEWS = {"all": "all test items", "numops>=1": "queried box changed at least once",
                "differs_from_initial": "answer differs from the first sentence's"}


def _probe_accuracy(df):
    # One figure per probe and view; the headline metric only (the CSV holds the others).
    if "subset" not in df.columns:
        df = df.assign(subset="all")
    out = []
    metric = df[df.metric == "accuracy"] if "metric" in df.columns and (df.metric == "accuracy").any() else df
    for key, d in _split(metric, ["probe", "subset"]):
        probe, subset = (list(key) + ["all"])[:2]
        view = _PROBE_VIEWS.get(str(subset), str(subset))
        out.append((plots.probe_accuracy_by_layer(d, title=f"Probe: {probe} ({view})"), (
            f"{probe} probe accuracy on the residual stream by layer, {view}. Solid: the probe; dashed/dotted: "
            "what would explain it without tracking: the majority answer, the first sentence's answer "
            "(initial_state), the same probe on token embeddings and on a random-init model, and on shuffled "
            "labels (permutation); model_argmax: the model's own answer at that token. Bands: 95% intervals, "
            "clustered by sample_id.")))
    return out


def _probe_heatmap(df):
    return [(plots.probe_heatmap(d), f"{', '.join(map(str, k))}: probe accuracy by layer (x) and number of "
             "operations on the queried box (y).") for k, d in _split(df, ["model", "probe"])]


def _selectivity(df):
    return [(plots.selectivity_by_layer(d), f"Selectivity ({', '.join(map(str, k)) or 'probe'}): task-probe "
             "accuracy minus Hewitt–Liang control-task accuracy (labels keyed on the probed token's type), for "
             "token-level probes only. Above zero the probe does better than one that memorises a label per "
             "token type; it says nothing about tracking, which the baselines in the accuracy plots test.")
            for k, d in _split(df, ["probe"])]


def _causal_check(df):
    out = []
    for key, d in _split(df[df["metric"] == "p_object"], ["model"]):
        n = int(d["n"].max()) if "n" in d.columns else None
        out.append((plots.causal_check_bars(d, title=f"Causal check: {', '.join(map(str, key))}"), (
            "The model's probability of the correct first object at the appended ' the' (teacher-forced), with "
            "nothing removed, with the first_object probe's decision subspace among that query's candidates "
            "projected out of the residual stream at ' the', and with random direction sets of the same count "
            "and norms projected out (averaged over seeds), at layers where the probe beats every baseline"
            + (f"; n = {n} queries" if n else "") + ". Bars: 95% cluster-bootstrap intervals over sample_ids. "
            "A drop under the probe's directions well beyond the random drop says the model uses what the "
            "probe reads; a drop no larger says it does not.")))
    return out


def _difference(df):
    out = []
    for key, d in _split(df, ["probe", "model_a", "model_b"]):
        label = f"{key[-2]} − {key[-1]}" if len(key) >= 2 else "model A − model B"
        out.append((plots.model_difference(d), f"Probe accuracy difference {label} by layer "
                    "with a shaded 95% interval; the line at zero means no difference."))
    return out


def _patching_resid(df):
    # Role sites (position_index -1) are drawn by role, index sites by padded index.
    x = "position_role" if "position_role" in df.columns and (df["position_index"] < 0).all() else "position_index"
    metric = df["metric"].iloc[0] if "metric" in df.columns and len(df) else "the metric"
    return [(plots.patching_heatmap(d, x=x), f"{k[0]}: {metric} when the residual stream at each layer and "
             "position is patched between the clean and the corrupt run.")
            for k, d in _split(df, ["model"])]


def _patching_heads(df):
    return [(plots.head_heatmap(d), f"{k[0]}: effect of patching each attention head's output.")
            for k, d in _split(df, ["model"])]


def _attention(df):
    out = []
    for (model, role), d in _split(df, ["model", "role"]):
        out.append((plots.head_heatmap(d, value="mean", title=f"Mean attention ({role}): {model}"),
                    f"{model}: mean attention of each head to the {role} token(s)."))
    return out


def _cmap(df):
    n = int(df["n_pairs"].max()) if "n_pairs" in df.columns and len(df) else None
    return [(plots.cmap_bars(df), "Cross-model activation patching: each circuit group's heads of the base model "
             "receive the fine-tuned model's outputs at the group's position, on pairs the base model gets wrong"
             + (f" ({n} pairs)" if n else "") + "; before, after, and the donor's own run, with 95% intervals "
             "clustered by context.")]


def _circuit_figures(run_dir: Path) -> list:
    path = run_dir / "circuit.json"
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), dict):
        raise DataError(f"{path}: expected an object with 'groups'; rewrite it with `boxprobe circuit`")
    comp = doc.get("evaluation", {}).get("completeness") or []
    gaps = ", ".join(f"{c['group']} {c['gap']:.2f}" for c in comp)
    return [(plots.circuit_heads(doc), "Heads found stage by stage from the logits back (path patching, "
             f"{doc.get('variant', '?')} variant) and the position each is kept at. Faithfulness: accuracy with every "
             "other head mean-ablated over the full model's" + (f"; completeness gaps: {gaps}" if gaps else "") + ".")]


# Section title -> (file, figure builder) in display order.
_SECTIONS: list[tuple[str, list[tuple[str, Callable]]]] = [
    ("Behaviour", [("behaviour.csv", _behaviour)]),
    ("Probes", [("probe_accuracy.csv", _probe_accuracy), ("probe_heatmap.csv", _probe_heatmap),
                ("selectivity.csv", _selectivity), ("causal_check.csv", _causal_check)]),
    ("Model comparison", [("model_difference.csv", _difference)]),
    ("Activation patching", [("patching_resid.csv", _patching_resid),
                             ("patching_heads.csv", _patching_heads)]),
    ("Attention", [("attention_heads.csv", _attention)]),
    ("Circuit", [("circuit.json", None)]),
    ("Cross-model activation patching", [("cmap.csv", _cmap)]),
]


def _run_info(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def dashboard_from_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Build the dashboard of a run directory (layout in the module docstring).

    Writes ``RUN_DIR/dashboard.html`` (or ``path``) and returns its path. Raises
    FileNotFoundError when ``run_dir`` does not exist and ValueError naming the file when a CSV
    or ``run.json`` is malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run directory {run_dir} does not exist (or is not a folder); "
                                "pass the folder an experiment wrote its CSVs to")
    info = _run_info(run_dir)
    sections, models = [], []
    for title, sources in _SECTIONS:
        figures = []
        for name, build in sources:
            figures += _circuit_figures(run_dir) if name == "circuit.json" else _figures(run_dir, name, build)
        files = ", ".join(name for name, _ in sources)
        sections.append(Section(title, figures, note=f"not run (no {files} in the run directory)"))
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            df = pd.read_csv(run_dir / name)
            models += [m for m in df.get("model", pd.Series(dtype=str)).astype(str).unique()
                       if m not in models]
    if models and "models" not in info:
        info = {"models": models, **info}
    if not any(s.figures for s in sections):
        logger.warning("no result files in %s; the dashboard will only say 'not run'", run_dir)
    return write_dashboard(sections, Path(path) if path else run_dir / "dashboard.html",
                           title=f"boxprobe dashboard: {run_dir.name}", run_info=info)
