"""Plotly figures for boxprobe results.

Every function takes a tidy pandas DataFrame (one row per measurement) and returns a
``plotly.graph_objects.Figure``; none of them shows a figure or writes a file. Required columns are
named in each docstring and checked up front, so a wrong frame fails with a ValueError that names
the missing columns. All figures share one look: the ``plotly_white`` template, axis titles that
say what is measured, and accuracy axes fixed to 0..1 so that figures can be compared by eye.
"""

from __future__ import annotations

import html
import logging
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from boxprobe.models.registry import PAPER_CITATION, RANDOM_BASELINE, paper_accuracy_frame
from boxprobe.errors import ArgumentError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "behaviour_accuracy", "probe_accuracy_by_layer", "selectivity_by_layer", "probe_heatmap",
    "model_difference", "patching_heatmap", "head_heatmap", "attention_example", "cmap_bars", "circuit_heads",
]

TEMPLATE = "plotly_white"
PALETTE = qualitative.Plotly
NUMOPS_TITLE = "number of operations on the queried box"
LAYER_TITLE = "layer"
# Line dash per probe-result kind: the task probe is solid, its reference lines are not.
KIND_DASH = {"task": "solid", "control": "dash", "random-init": "dot", "majority": "dashdot"}


def _require(df: pd.DataFrame, columns: Iterable[str], where: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{where} expects a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(map(repr, missing))}; "
            f"the frame has {', '.join(map(repr, df.columns)) or 'no columns'}"
        )
    if df.empty:
        raise DataError(f"{where}: the frame is empty; there is nothing to plot")


def _has_ci(df: pd.DataFrame) -> bool:
    return {"ci_low", "ci_high"} <= set(df.columns) and df[["ci_low", "ci_high"]].notna().any().any()


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _colors(names: Sequence) -> dict:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, *,
            accuracy: bool = False) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=title, legend_title_text="",
                      margin=dict(l=70, r=30, t=70, b=70))
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    if accuracy:
        fig.update_yaxes(range=[0, 1])
    return fig


def _int_ticks(fig: go.Figure, values, axis: str = "x") -> None:
    """Whole-number ticks (layers, heads, numops) instead of plotly's 0.5 steps, at most ~16."""
    vals = pd.to_numeric(pd.Series(list(values)), errors="coerce").dropna()
    if vals.empty or not np.allclose(vals, vals.round()):
        return
    dtick = max(1, int(np.ceil((vals.max() - vals.min() + 1) / 16)))
    getattr(fig, f"update_{axis}axes")(tickmode="linear", tick0=0, dtick=dtick)


def _band(x, low, high, color: str, group: str) -> go.Scatter:
    """A shaded interval: the upper edge left to right, then the lower edge back."""
    x = list(x)
    return go.Scatter(
        x=x + x[::-1], y=list(high) + list(low)[::-1], fill="toself", mode="lines",
        line=dict(width=0), fillcolor=_rgba(color, 0.18), hoverinfo="skip",
        showlegend=False, legendgroup=group, name=f"{group} interval",
    )


def _fits_unit(df: pd.DataFrame, cols: Sequence[str]) -> bool:
    vals = df[[c for c in cols if c in df.columns]].to_numpy(dtype=float)
    vals = vals[np.isfinite(vals)]
    return vals.size == 0 or (vals.min() >= 0 and vals.max() <= 1)


def _unique_pivot(df: pd.DataFrame, index: str, columns: str, value: str, where: str):
    dup = df.duplicated([index, columns])
    if dup.any():
        row = df[dup].iloc[0]
        raise DataError(
            f"{where}: several rows for {index}={row[index]!r}, {columns}={row[columns]!r}; "
            "filter the frame to one model/probe first (or pass model=...)"
        )
    return df.pivot(index=index, columns=columns, values=value).sort_index().sort_index(axis=1)


def behaviour_accuracy(df: pd.DataFrame, overlay_paper: bool = True,
                       title: str | None = None) -> go.Figure:
    """Behavioural accuracy by number of operations (0..7), one line per model, CI error bars.

    Columns: ``model``, ``numops``, ``accuracy`` (a fraction), ``ci_low``, ``ci_high``; ``n``
    is optional and shown on hover. With ``overlay_paper`` the accuracies reported by the paper
    (``registry.paper_accuracy_frame()``) are drawn as dashed lines ("paper: NAME") for every
    model whose name matches a registry name or Hugging Face id, and the paper's random
    baseline as a dotted line; the citation is in the hover text and a caption.
    """
    _require(df, ["model", "numops", "accuracy", "ci_low", "ci_high"], "behaviour_accuracy")
    models = list(dict.fromkeys(df["model"].astype(str)))
    colors = _colors(models)
    fig = go.Figure()
    for model in models:
        d = df[df["model"].astype(str) == model].sort_values("numops")
        n = d["n"].to_numpy() if "n" in d.columns else np.full(len(d), np.nan)
        n_line = "<br>n %{customdata[2]}" if "n" in d.columns else ""
        fig.add_trace(go.Scatter(
            x=d["numops"], y=d["accuracy"], mode="lines+markers", name=model,
            legendgroup=model, line=dict(color=colors[model]), cliponaxis=False,
            error_y=dict(type="data", symmetric=False,
                         array=(d["ci_high"] - d["accuracy"]).clip(lower=0),
                         arrayminus=(d["accuracy"] - d["ci_low"]).clip(lower=0)),
            customdata=np.stack([d["ci_low"], d["ci_high"], n], axis=-1),
            hovertemplate=(f"<b>{html.escape(model)}</b><br>numops %{{x}}<br>accuracy %{{y:.3f}}"
                           "<br>CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                           f"{n_line}<extra></extra>"),
        ))
    cited = False
    if overlay_paper:
        paper = paper_accuracy_frame()
        for model in models:
            rows = paper[(paper["model"] == model) | (paper["hf_id"] == model)]
            if rows.empty:
                continue
            name = rows["model"].iloc[0]
            rows = rows[rows["model"] == name].sort_values("numops")
            fig.add_trace(_paper_line(rows, f"paper: {name}", colors[model], "dash", model))
            cited = True
        base = paper[paper["model"] == RANDOM_BASELINE].sort_values("numops")
        fig.add_trace(_paper_line(base, "random baseline (paper)", "#555555", "dot", "baseline"))
        cited = True
    _layout(fig, title or "Behavioural accuracy by number of operations", NUMOPS_TITLE,
            "accuracy (fraction correct)", accuracy=True)
    fig.update_xaxes(tickmode="linear", dtick=1, range=[-0.3, 7.3])
    if cited:
        fig.add_annotation(text=f"Dashed/dotted: reported by {html.escape(PAPER_CITATION)}",
                           xref="paper", yref="paper", x=0, y=-0.2, showarrow=False,
                           font=dict(size=10), xanchor="left")
        fig.update_layout(margin=dict(b=100))
    return fig


def _paper_line(rows: pd.DataFrame, name: str, color: str, dash: str, group: str) -> go.Scatter:
    return go.Scatter(
        x=rows["numops"], y=rows["accuracy"], mode="lines", name=name, legendgroup=group,
        line=dict(color=color, dash=dash, width=1.5),
        hovertemplate=(f"<b>{html.escape(name)}</b><br>numops %{{x}}<br>accuracy %{{y:.3f}}"
                       f"<br>{html.escape(PAPER_CITATION)}<extra></extra>"),
    )


def _layer_lines(fig: go.Figure, df: pd.DataFrame, value: str, series: list[str],
                 color_by: str, dash_by: str | None) -> None:
    """One line per group of ``series`` columns, with a shaded CI band when the frame has one.

    A group whose layers are all missing is a layer-independent reference (e.g. a majority
    baseline) and is drawn flat across the layer range."""
    colors = _colors(list(dict.fromkeys(df[color_by].astype(str))))
    with_ci = _has_ci(df)
    layers = df["layer"].dropna()
    lo, hi = (layers.min(), layers.max()) if len(layers) else (0, 0)
    for key, d in df.groupby(series, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        name = " · ".join(str(k) for k in key)
        color = colors[str(d[color_by].iloc[0])]
        dash = KIND_DASH.get(str(d[dash_by].iloc[0]), "longdash") if dash_by else "solid"
        if d["layer"].isna().all():
            d = pd.concat([d.iloc[[0]].assign(layer=lo), d.iloc[[0]].assign(layer=hi)])
        d = d.sort_values("layer")
        if with_ci and d[["ci_low", "ci_high"]].notna().all().all():
            fig.add_trace(_band(d["layer"], d["ci_low"], d["ci_high"], color, name))
        fig.add_trace(go.Scatter(
            x=d["layer"], y=d[value], mode="lines+markers" if dash == "solid" else "lines",
            name=name, legendgroup=name, line=dict(color=color, dash=dash),
            hovertemplate=f"<b>{html.escape(name)}</b><br>layer %{{x}}<br>{value} %{{y:.3f}}"
                          "<extra></extra>",
        ))


def probe_accuracy_by_layer(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Probe accuracy by layer: one line per (model, kind[, probe]), shaded CI bands.

    Columns: ``model``, ``layer``, ``value``, ``kind`` ("task" solid; "control", "random-init",
    "majority" and other reference kinds dashed/dotted); optional ``ci_low``/``ci_high`` (shaded
    band), ``probe`` (added to the line name when several probes are present) and ``metric``
    (one metric per figure; its name becomes the y-axis title). Rows with a missing layer are
    layer-independent baselines and are drawn flat.
    """
    _require(df, ["model", "layer", "value", "kind"], "probe_accuracy_by_layer")
    metric = "accuracy"
    if "metric" in df.columns:
        metrics = df["metric"].dropna().unique()
        if len(metrics) > 1:
            raise DataError(f"probe_accuracy_by_layer: several metrics {list(metrics)}; "
                             "plot one metric per figure (filter on the 'metric' column)")
        metric = str(metrics[0]) if len(metrics) else metric
    series = ["model", "kind"] + (["probe"] if "probe" in df.columns
                                  and df["probe"].nunique() > 1 else [])
    fig = go.Figure()
    _layer_lines(fig, df, "value", series, color_by="model", dash_by="kind")
    _int_ticks(fig, df["layer"])
    _layout(fig, title or f"Probe {metric} by layer", LAYER_TITLE, f"probe {metric}",
            accuracy=_fits_unit(df, ["value", "ci_low", "ci_high"]))
    return fig


def selectivity_by_layer(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Probe selectivity (task minus control accuracy) by layer, one line per model.

    Columns: ``model``, ``layer``, ``selectivity``; optional ``ci_low``/``ci_high`` (shaded
    band) and ``probe`` (one line per model and probe). A zero line marks "no better than the
    control task".
    """
    _require(df, ["model", "layer", "selectivity"], "selectivity_by_layer")
    series = ["model"] + (["probe"] if "probe" in df.columns and df["probe"].nunique() > 1 else [])
    fig = go.Figure()
    _layer_lines(fig, df, "selectivity", series, color_by="model", dash_by=None)
    _int_ticks(fig, df["layer"])
    fig.add_hline(y=0, line=dict(color="#444444", width=1))
    return _layout(fig, title or "Probe selectivity by layer (task − control accuracy)",
                   LAYER_TITLE, "selectivity (accuracy difference)")


def _heatmap_facets(df: pd.DataFrame, x: str, y: str, value: str, where: str, *,
                    model: str | None, title: str, x_title: str, y_title: str,
                    colorbar: str, unit: bool, stack_rows: bool = False,
                    ticktext: dict | None = None) -> go.Figure:
    """A heatmap per model (subplots when the frame holds several models)."""
    if model is not None:
        if "model" not in df.columns:
            raise DataError(f"{where}: model={model!r} given but the frame has no 'model' column")
        df = df[df["model"].astype(str) == str(model)]
        if df.empty:
            raise DataError(f"{where}: no rows for model {model!r}")
    models = list(dict.fromkeys(df["model"].astype(str))) if "model" in df.columns else [None]
    n = len(models)
    rows, cols = (n, 1) if stack_rows else (1, n)
    # plotly rejects spacings that do not leave room for every panel.
    gap = 0.0 if n == 1 else min(0.12, 0.5 / (n - 1))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[m or "" for m in models],
                        horizontal_spacing=min(gap, 0.06), vertical_spacing=gap)
    vals = df[value].to_numpy(dtype=float)
    diverging = not unit and np.nanmin(vals) < 0 < np.nanmax(vals)
    scale = dict(zmin=0, zmax=1, colorscale="Viridis") if unit else (
        dict(zmid=0, colorscale="RdBu_r") if diverging else dict(colorscale="Viridis"))
    for i, m in enumerate(models):
        d = df if m is None else df[df["model"].astype(str) == m]
        grid = _unique_pivot(d, y, x, value, where)
        pos = dict(row=i + 1, col=1) if stack_rows else dict(row=1, col=i + 1)
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(dtype=float), x=list(grid.columns), y=list(grid.index),
            name=m or value, showscale=i == 0, colorbar=dict(title=colorbar), **scale,
            hovertemplate=f"{x_title} %{{x}}<br>{y_title} %{{y}}<br>{colorbar} %{{z:.3f}}"
                          "<extra></extra>"), **pos)
        if ticktext is not None:
            ticks = [c for c in grid.columns if c in ticktext]
            fig.update_xaxes(tickmode="array", tickvals=ticks, tickangle=-60,
                             ticktext=[ticktext[c] for c in ticks], **pos)
    fig.update_layout(template=TEMPLATE, title=title, height=max(420, 320 * rows))
    if ticktext is None:
        _int_ticks(fig, df[x], "x")
    _int_ticks(fig, df[y], "y")
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def probe_heatmap(df: pd.DataFrame, model: str | None = None,
                  title: str | None = None) -> go.Figure:
    """Heatmap of probe accuracy over layer (x) × number of operations (y).

    Columns: ``layer``, ``numops``, ``value`` (accuracy, colour scale fixed to 0..1); optional
    ``model``: pass ``model=`` to plot one model, otherwise each model gets its own panel.
    """
    _require(df, ["layer", "numops", "value"], "probe_heatmap")
    return _heatmap_facets(df, "layer", "numops", "value", "probe_heatmap", model=model,
                           title=title or "Probe accuracy by layer and number of operations"
                           + (f": {model}" if model else ""), x_title=LAYER_TITLE,
                           y_title=NUMOPS_TITLE, colorbar="accuracy", unit=True)


def model_difference(df: pd.DataFrame, model_a: str | None = None, model_b: str | None = None,
                     title: str | None = None, value_name: str = "probe accuracy") -> go.Figure:
    """Difference between two models by layer (A − B) with a shaded 95% interval and a zero line.

    Columns: ``layer``, ``diff``, ``ci_low``, ``ci_high``; optional ``model_a``/``model_b``
    (used for the title when the arguments are not given).
    """
    _require(df, ["layer", "diff", "ci_low", "ci_high"], "model_difference")
    for arg, col in ((model_a, "model_a"), (model_b, "model_b")):
        if arg is None and col in df.columns and df[col].nunique() > 1:
            raise DataError(f"model_difference: several {col} values {list(df[col].unique())}; "
                             "plot one pair per figure")
    model_a = model_a or (str(df["model_a"].iloc[0]) if "model_a" in df.columns else None)
    model_b = model_b or (str(df["model_b"].iloc[0]) if "model_b" in df.columns else None)
    label = f"{model_a} − {model_b}" if model_a and model_b else "difference"
    d = df.sort_values("layer")
    color = PALETTE[0]
    fig = go.Figure([
        _band(d["layer"], d["ci_low"], d["ci_high"], color, label),
        go.Scatter(x=d["layer"], y=d["diff"], mode="lines+markers", name=label,
                   legendgroup=label, line=dict(color=color),
                   hovertemplate="layer %{x}<br>difference %{y:.3f}<extra></extra>"),
    ])
    fig.add_hline(y=0, line=dict(color="#444444", width=1))
    _int_ticks(fig, d["layer"])
    return _layout(fig, title or f"{value_name.capitalize()} difference by layer: {label}",
                   LAYER_TITLE, f"{value_name} difference ({label})")


def causal_check_bars(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """p(correct first object) with no ablation, the probe's directions removed and random ones removed, per
    layer, with 95% error bars. Columns: ``layer``, ``condition``, ``value``, ``ci_low``, ``ci_high`` (the
    ``p_object`` rows of ``causal_check.csv``; difference rows are left out)."""
    _require(df, ["layer", "condition", "value", "ci_low", "ci_high"], "causal_check_bars")
    d = df[df["condition"].isin(["none", "probe", "random"])]
    colors = _colors(["none", "probe", "random"])
    names = {"none": "no ablation", "probe": "probe directions removed", "random": "random directions removed"}
    fig = go.Figure()
    for condition, rows in d.groupby("condition", sort=False):
        rows = rows.sort_values("layer")
        fig.add_trace(go.Bar(
            x=[f"layer {int(layer)}" for layer in rows["layer"]], y=rows["value"], name=names[condition],
            marker_color=colors[condition],
            error_y=dict(type="data", symmetric=False, array=rows["ci_high"] - rows["value"],
                         arrayminus=rows["value"] - rows["ci_low"]),
            hovertemplate="%{x}<br>p(correct) %{y:.3f}<extra></extra>"))
    fig.update_layout(barmode="group")
    return _layout(fig, title or "Causal check: p(correct first object) at ' the'", "layer",
                   "p(correct first object)", accuracy=True)


def patching_heatmap(df: pd.DataFrame, x: str = "position_index", y: str = "layer",
                     value: str = "value", model: str | None = None,
                     title: str | None = None) -> go.Figure:
    """Activation-patching effect over layer × token position.

    Columns: ``x`` (default ``position_index``), ``y`` (default ``layer``), ``value`` (default
    ``value``, e.g. normalised logit difference); optional ``token`` (shown as x tick labels)
    and ``model`` (one panel per model unless ``model=`` picks one).
    """
    _require(df, [x, y, value], "patching_heatmap")
    ticktext = None
    if "token" in df.columns:
        firsts = df.drop_duplicates(x).set_index(x)["token"]
        ticktext = {k: f"{html.escape(str(t))} ({k})" for k, t in firsts.items()}
    return _heatmap_facets(df, x, y, value, "patching_heatmap", model=model,
                           title=title or "Activation patching by layer and position"
                           + (f": {model}" if model else ""), x_title=f"token {x}",
                           y_title=y, colorbar=value, unit=False, stack_rows=True,
                           ticktext=ticktext)


def head_heatmap(df: pd.DataFrame, value: str = "value", model: str | None = None,
                 title: str | None = None) -> go.Figure:
    """Per-head scores over layer (y) × head (x), e.g. head patching effects or attention.

    Columns: ``layer``, ``head_index`` (patching results) or ``head``, ``value`` (or the column named
    by ``value``); optional ``model`` (one panel per model unless ``model=`` picks one).
    """
    head = "head_index" if "head_index" in df.columns else "head"
    _require(df, ["layer", head, value], "head_heatmap")
    return _heatmap_facets(df, head, "layer", value, "head_heatmap", model=model,
                           title=title or f"Per-head {value}" + (f": {model}" if model else ""),
                           x_title="head", y_title=LAYER_TITLE, colorbar=value, unit=False)


def attention_example(tokens: list[str], attention, title: str = "Attention",
                      row_labels: list[str] | None = None) -> go.Figure:
    """Attention of one example: rows (heads or layers) × key positions, tokens as x labels.

    ``attention`` is a 2D array-like (numpy or CPU tensor) of shape [rows, pos] with
    ``len(tokens) == pos``; ``row_labels`` names the rows (default "row 0", "row 1", ...).
    """
    if hasattr(attention, "detach"):
        attention = attention.detach().float().cpu().numpy()
    att = np.asarray(attention, dtype=float)
    if att.ndim != 2:
        raise ArgumentError(f"attention_example: attention must be 2D [rows, pos], got shape {att.shape}")
    if len(tokens) != att.shape[1]:
        raise ArgumentError(f"attention_example: {len(tokens)} tokens but attention has "
                         f"{att.shape[1]} positions; pass one token per key position")
    labels = list(row_labels) if row_labels is not None else [f"row {i}" for i in range(len(att))]
    if len(labels) != att.shape[0]:
        raise ArgumentError(f"attention_example: {len(labels)} row labels for {att.shape[0]} rows")
    # Numeric x with token tick labels: repeated tokens would otherwise merge into one column.
    pos = list(range(len(tokens)))
    fig = go.Figure(go.Heatmap(
        z=att, x=pos, y=labels, zmin=0, zmax=max(1e-9, float(np.nanmax(att))),
        colorscale="Blues", colorbar=dict(title="attention"),
        customdata=np.tile(np.array([html.escape(str(t)) for t in tokens], dtype=object),
                           (len(labels), 1)),
        hovertemplate="%{y}<br>key %{x}: %{customdata}<br>attention %{z:.3f}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=pos, tickangle=-60,
                     ticktext=[html.escape(str(t)) for t in tokens])
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, "key token", "")


def cmap_bars(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Cross-model activation patching: the recipient before and after patching, and the donor, per group.

    Long columns: ``group``, ``metric``, ``stage`` ("before" | "after" | "donor"), ``value``, optional
    ``ci_low`` / ``ci_high`` (error bars). Each metric gets its own panel (accuracy fixed to 0..1).
    """
    _require(df, ["group", "metric", "stage", "value"], "cmap_bars")
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    stages = [s for s in ("before", "after", "donor") if s in set(df["stage"].astype(str))]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, horizontal_spacing=0.1)
    for i, metric in enumerate(metrics, start=1):
        d = df[df["metric"].astype(str) == metric]
        for j, stage in enumerate(stages):
            e = d[d["stage"].astype(str) == stage]
            err = None
            if {"ci_low", "ci_high"} <= set(e.columns) and e["ci_low"].notna().any():
                err = dict(type="data", symmetric=False, array=(e["ci_high"] - e["value"]).to_numpy(),
                           arrayminus=(e["value"] - e["ci_low"]).to_numpy())
            fig.add_trace(go.Bar(x=e["group"].astype(str), y=e["value"], name=stage, error_y=err,
                                 marker_color=PALETTE[j], legendgroup=stage, showlegend=i == 1,
                                 hovertemplate=f"%{{x}}<br>{metric} {stage}: %{{y:.3f}}<extra></extra>"),
                          row=1, col=i)
        y_title = {"accuracy": "accuracy (fraction correct)", "logit_diff": "logit difference (nats)",
                   "logprob": "log-probability of the correct object"}.get(metric, metric)
        fig.update_yaxes(title_text=y_title, row=1, col=i)
        if metric == "accuracy":
            fig.update_yaxes(range=[0, 1], row=1, col=i)
    fig.update_layout(template=TEMPLATE, barmode="group",
                      title=title or "Cross-model activation patching (CMAP)")
    fig.update_xaxes(title_text="patched group")
    return fig


def circuit_heads(circuit: dict, n_layers: int | None = None, n_heads: int | None = None,
                  title: str | None = None) -> go.Figure:
    """A circuit (``circuit.json``): each group's heads on the layer (y) × head (x) grid, one colour per
    group, the group's position in the legend."""
    groups = circuit.get("groups") or {}
    positions = circuit.get("positions") or {}
    heads = [h for hs in groups.values() for h in hs]
    n_layers = n_layers or (max((h[0] for h in heads), default=0) + 1)
    n_heads = n_heads or (max((h[1] for h in heads), default=0) + 1)
    fig = go.Figure()
    for j, (group, hs) in enumerate(groups.items()):
        fig.add_trace(go.Scatter(x=[h[1] for h in hs], y=[h[0] for h in hs], mode="markers+text",
                                 text=[f"{h[0]}.{h[1]}" for h in hs], textposition="top center",
                                 marker=dict(size=14, color=PALETTE[j % len(PALETTE)], symbol="square"),
                                 name=f"{group} @ {positions.get(group, '?')}"))
    fig.update_xaxes(range=[-0.5, n_heads - 0.5], dtick=1)
    fig.update_yaxes(range=[-0.5, n_layers - 0.5], dtick=max(1, n_layers // 16))
    faith = circuit.get("faithfulness")
    sub = f" (faithfulness {faith:.2f}, {circuit.get('n_pairs')} pairs)" if isinstance(faith, (int, float)) else ""
    return _layout(fig, title or f"Circuit of {circuit.get('model', 'the model')}{sub}", "head", LAYER_TITLE)
