"""Tests for boxprobe.report.plots: trace counts, axis ranges, column checks and the paper overlay."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from boxprobe.report import plots
from boxprobe.models.registry import PAPER_ACCURACY


def behaviour_frame(models=("CodeLlama-7b",), n=100):
    rows = []
    for i, model in enumerate(models):
        for k in range(8):
            acc = max(0.05, 0.9 - 0.1 * k - 0.05 * i)
            rows.append(dict(model=model, numops=k, accuracy=acc, ci_low=acc - 0.04,
                             ci_high=min(1.0, acc + 0.04), n=n))
    return pd.DataFrame(rows)


def layer_frame(models=("a", "b"), kinds=("task", "control"), layers=4, ci=True):
    rows = []
    for m in models:
        for kind in kinds:
            for layer in range(layers):
                v = 0.5 + 0.1 * layer if kind == "task" else 0.4
                row = dict(model=m, layer=layer, value=v, kind=kind)
                if ci:
                    row.update(ci_low=v - 0.05, ci_high=v + 0.05)
                rows.append(row)
    return pd.DataFrame(rows)


def names(fig):
    return [t.name for t in fig.data]


# -- behaviour -----------------------------------------------------------------------------------

def test_behaviour_overlay_for_registered_model():
    fig = plots.behaviour_accuracy(behaviour_frame(["CodeLlama-7b"]))
    assert isinstance(fig, go.Figure)
    assert names(fig) == ["CodeLlama-7b", "paper: CodeLlama-7b", "random baseline (paper)"]
    paper = fig.data[1]
    assert paper.line.dash == "dash" and fig.data[2].line.dash == "dot"
    # The overlay is the paper's table as fractions, not percent.
    np.testing.assert_allclose(paper.y, np.array(PAPER_ACCURACY["CodeLlama-7b"]) / 100, atol=1e-6)
    assert "2405.21068" in paper.hovertemplate
    assert any("2405.21068" in a.text for a in fig.layout.annotations)
    assert tuple(fig.layout.yaxis.range) == (0, 1)
    # Asymmetric error bars reach the CI bounds.
    np.testing.assert_allclose(np.asarray(fig.data[0].error_y.array), 0.04, atol=1e-9)


def test_behaviour_overlay_matches_hf_id_and_skips_unknown_models():
    df = behaviour_frame(["codellama/CodeLlama-13b-hf", "my-finetune"])
    fig = plots.behaviour_accuracy(df)
    paper = [n for n in names(fig) if n.startswith("paper: ")]
    assert paper == ["paper: CodeLlama-13b"]
    unknown = plots.behaviour_accuracy(behaviour_frame(["my-finetune"]))
    assert not [n for n in names(unknown) if n.startswith("paper: ")]


def test_behaviour_without_overlay_has_one_trace_per_model():
    fig = plots.behaviour_accuracy(behaviour_frame(["CodeLlama-7b", "x"]), overlay_paper=False)
    assert names(fig) == ["CodeLlama-7b", "x"]
    assert list(fig.data[0].x) == list(range(8))
    assert not fig.layout.annotations


def test_behaviour_missing_column_is_named():
    with pytest.raises(ValueError, match="ci_high"):
        plots.behaviour_accuracy(behaviour_frame().drop(columns="ci_high"))


# -- probes --------------------------------------------------------------------------------------

def test_probe_accuracy_lines_and_bands():
    fig = plots.probe_accuracy_by_layer(layer_frame())
    lines = [t for t in fig.data if t.fill is None]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(lines) == 4 and len(bands) == 4  # 2 models x (task, control)
    assert {t.line.dash for t in lines} == {"solid", "dash"}
    # A band goes out along ci_high and back along ci_low: 2 x layers points.
    assert len(bands[0].x) == 8 and bands[0].y[0] == pytest.approx(0.55)
    assert tuple(fig.layout.yaxis.range) == (0, 1)
    assert fig.layout.xaxis.dtick == 1  # whole layers, not plotly's 0.5 steps
    deep = plots.probe_accuracy_by_layer(layer_frame(layers=40, ci=False))
    assert deep.layout.xaxis.dtick == 3  # at most ~16 ticks


def test_probe_accuracy_without_ci_and_flat_baseline():
    df = layer_frame(models=("a",), kinds=("task",), ci=False)
    base = pd.DataFrame([dict(model="a", layer=np.nan, value=0.3, kind="majority")])
    fig = plots.probe_accuracy_by_layer(pd.concat([df, base], ignore_index=True))
    assert len(fig.data) == 2 and all(t.fill is None for t in fig.data)
    flat = fig.data[1]
    assert list(flat.x) == [0, 3] and list(flat.y) == [0.3, 0.3]
    assert flat.line.dash == "dashdot"


def test_probe_accuracy_rejects_mixed_metrics_and_missing_kind():
    df = layer_frame()
    df["metric"] = ["accuracy", "r2"] * (len(df) // 2)
    with pytest.raises(ValueError, match="metric"):
        plots.probe_accuracy_by_layer(df)
    with pytest.raises(ValueError, match="'kind'"):
        plots.probe_accuracy_by_layer(layer_frame().drop(columns="kind"))


def test_probe_accuracy_out_of_unit_range_autoscales():
    df = layer_frame(ci=False)
    df["value"] = df["value"] * 3  # e.g. a loss, not an accuracy
    fig = plots.probe_accuracy_by_layer(df)
    assert fig.layout.yaxis.range is None


def test_selectivity():
    df = layer_frame(kinds=("task",)).rename(columns={"value": "selectivity"})
    fig = plots.selectivity_by_layer(df)
    assert len(fig.data) == 4  # 2 models x (band + line)
    assert any(s.y0 == 0 and s.y1 == 0 for s in fig.layout.shapes)
    with pytest.raises(ValueError, match="selectivity"):
        plots.selectivity_by_layer(layer_frame())


def test_probe_heatmap_single_and_faceted():
    rows = [dict(model=m, layer=l, numops=k, value=(l + k) / 12)
            for m in ("a", "b") for l in range(5) for k in range(8)]
    df = pd.DataFrame(rows)
    one = plots.probe_heatmap(df, model="a")
    assert len(one.data) == 1
    z = np.asarray(one.data[0].z)
    assert z.shape == (8, 5) and z[7, 4] == pytest.approx(11 / 12)  # rows numops, cols layer
    assert (one.data[0].zmin, one.data[0].zmax) == (0, 1)
    both = plots.probe_heatmap(df)
    assert len(both.data) == 2 and [t.name for t in both.data] == ["a", "b"]
    with pytest.raises(ValueError, match="several rows"):
        plots.probe_heatmap(df.drop(columns="model"))
    with pytest.raises(ValueError, match="numops"):
        plots.probe_heatmap(df.drop(columns="numops"))


def test_model_difference():
    df = pd.DataFrame(dict(layer=range(4), diff=[0.1, -0.05, 0.2, 0.0],
                           ci_low=[0.0, -0.1, 0.1, -0.05], ci_high=[0.2, 0.0, 0.3, 0.05],
                           model_a="CodeLlama-7b", model_b="Llama-2-7b"))
    fig = plots.model_difference(df)
    assert len(fig.data) == 2 and fig.data[0].fill == "toself"
    assert "CodeLlama-7b" in fig.layout.title.text and "Llama-2-7b" in fig.layout.title.text
    assert any(s.y0 == 0 and s.y1 == 0 for s in fig.layout.shapes)
    with pytest.raises(ValueError, match="ci_low"):
        plots.model_difference(df.drop(columns="ci_low"))


# -- patching / attention / CMAP -----------------------------------------------------------------

def test_patching_heatmap_uses_tokens_as_ticks():
    tokens = ["<s>", "Box", "A", "contains", "A"]
    df = pd.DataFrame([dict(model="m", layer=l, position_index=p, position_role="", token=tokens[p], value=l - p)
                       for l in range(3) for p in range(5)])
    fig = plots.patching_heatmap(df)
    assert len(fig.data) == 1
    assert list(fig.layout.xaxis.tickvals) == list(range(5))
    # Special tokens are escaped so plotly does not read them as markup; repeats stay distinct.
    assert fig.layout.xaxis.ticktext[0] == "&lt;s&gt; (0)"
    assert fig.layout.xaxis.ticktext[2] != fig.layout.xaxis.ticktext[4]
    assert fig.data[0].zmid == 0  # signed effects get a diverging scale
    with pytest.raises(ValueError, match="position"):
        plots.patching_heatmap(df.drop(columns="position_index"))
    roles = df.assign(position_role=df["position_index"].map(dict(enumerate("abcde"))), position_index=-1)
    assert len(plots.patching_heatmap(roles, x="position_role").data) == 1


def test_head_heatmap_and_attention_example():
    df = pd.DataFrame([dict(layer=l, head=h, value=0.1 * h) for l in range(2) for h in range(4)])
    fig = plots.head_heatmap(df)
    assert np.asarray(fig.data[0].z).shape == (2, 4)
    with pytest.raises(ValueError, match="head"):
        plots.head_heatmap(df.drop(columns="head"))
    patched = df.rename(columns={"head": "head_index"})  # patching results name the column head_index
    assert np.asarray(plots.head_heatmap(patched).data[0].z).shape == (2, 4)
    att = np.full((3, 4), 0.25)
    fig = plots.attention_example(["a", "b", "a", "c"], att, title="ex")
    assert len(fig.data) == 1 and list(fig.layout.xaxis.ticktext) == ["a", "b", "a", "c"]
    assert fig.layout.title.text == "ex"
    with pytest.raises(ValueError, match="positions"):
        plots.attention_example(["a"], att, title="ex")


def test_cmap_bars():
    df = pd.DataFrame([dict(group=g, metric=m, stage=s, value=v, ci_low=v - 0.1, ci_high=v + 0.1)
                       for m in ("accuracy", "logit_diff") for g in ("heads", "mlp")
                       for s, v in (("before", 0.2), ("after", 0.6), ("donor", 0.7))])
    fig = plots.cmap_bars(df)
    assert len(fig.data) == 6 and all(isinstance(t, go.Bar) for t in fig.data)
    assert fig.layout.barmode == "group" and list(fig.data[1].error_y.array) == pytest.approx([0.1, 0.1])
    assert tuple(fig.layout.yaxis.range) == (0, 1) and fig.layout.yaxis2.range is None
    with pytest.raises(ValueError, match="stage"):
        plots.cmap_bars(df.drop(columns="stage"))


def test_circuit_heads():
    doc = {"groups": {"value_fetcher": [[3, 1], [3, 5]], "position_transmitter": [[1, 0]]},
           "positions": {"value_fetcher": "answer_prefix", "position_transmitter": "answer_prefix"},
           "faithfulness": 0.9, "n_pairs": 100, "model": "m"}
    fig = plots.circuit_heads(doc, n_layers=4, n_heads=8)
    assert [t.name for t in fig.data] == ["value_fetcher @ answer_prefix", "position_transmitter @ answer_prefix"]
    assert list(fig.data[0].x) == [1, 5] and list(fig.data[0].y) == [3, 3] and "0.90" in fig.layout.title.text


def test_plots_use_one_template():
    df = layer_frame()
    for fig in (plots.probe_accuracy_by_layer(df), plots.behaviour_accuracy(behaviour_frame())):
        assert fig.layout.template.layout.plot_bgcolor == "white"
