"""Tests for boxprobe.report.dashboard: one self-contained HTML file, built from a run directory, that a
real (headless) browser renders without JavaScript errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from boxprobe.errors import DataError
from boxprobe.report import plots
from boxprobe.report.dashboard import Section, dashboard_from_run, write_dashboard

FIG_DIV = re.compile(r'<div id="bp-fig-\d+" class="plotly-graph-div')
SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=", re.IGNORECASE)


def make_run_dir(root: Path) -> tuple[Path, int]:
    """A run directory with most result files; returns it and the number of figures expected."""
    run = root / "run"
    run.mkdir()
    beh = [dict(model=m, numops=k, accuracy=max(0.05, 0.9 - 0.1 * k), ci_low=max(0, 0.85 - 0.1 * k),
                ci_high=min(1, 0.95 - 0.1 * k), n=50) for m in ("CodeLlama-7b", "Llama-2-7b")
           for k in range(8)]
    pd.DataFrame(beh).to_csv(run / "behaviour.csv", index=False)
    probe = [dict(model=m, layer=l, value=v, kind=kind, ci_low=v - 0.05, ci_high=v + 0.05,
                  probe="linear", metric=metric)
             for metric in ("accuracy", "balanced_accuracy") for m in ("CodeLlama-7b", "Llama-2-7b")
             for kind, v0 in (("task", 0.5), ("control", 0.3)) for l in range(4)
             for v in [v0 + 0.05 * l]]
    pd.DataFrame(probe).to_csv(run / "probe_accuracy.csv", index=False)
    heat = [dict(model=m, layer=l, numops=k, value=(l + k) / 12)
            for m in ("CodeLlama-7b", "Llama-2-7b") for l in range(4) for k in range(8)]
    pd.DataFrame(heat).to_csv(run / "probe_heatmap.csv", index=False)
    pd.DataFrame(dict(layer=range(4), diff=[0.1, 0.0, 0.2, 0.1], ci_low=[0.0, -0.1, 0.1, 0.0],
                      ci_high=[0.2, 0.1, 0.3, 0.2], model_a="CodeLlama-7b", model_b="Llama-2-7b")
                 ).to_csv(run / "model_difference.csv", index=False)
    tokens = ["<s>", "Box", "A", "contains", "the", "apple", "."]
    pd.DataFrame([dict(model="CodeLlama-7b", layer=l, position_index=p, position_role="", token=t, value=np.sin(l + p))
                  for l in range(4) for p, t in enumerate(tokens)]
                 ).to_csv(run / "patching_resid.csv", index=False)
    pd.DataFrame([dict(group=g, metric=m, stage=s, value=v)
                  for m in ("accuracy", "logit_diff") for g in ("all heads", "MLPs") for s, v in (("before", 0.3), ("after", 0.5))]
                 ).to_csv(run / "cmap.csv", index=False)
    (run / "circuit.json").write_text(json.dumps({"groups": {"value_fetcher": [[3, 1]]},
                                                  "positions": {"value_fetcher": "answer_prefix"},
                                                  "faithfulness": 0.8, "n_pairs": 10, "variant": "freeze"}))
    (run / "run.json").write_text(json.dumps(
        {"models": ["CodeLlama-7b", "Llama-2-7b"], "weight_mode": "random", "date": "2025-01-02"}))
    # behaviour 1 + probe accuracy 1 (the headline metric; the CSV keeps the others) + heatmap 2 models
    # + difference 1 + patching 1 + circuit 1 + cmap 1
    return run, 8


def small_sections() -> tuple[list[Section], int]:
    df = pd.DataFrame(dict(model="m", layer=[0, 1, 2], value=[0.2, 0.5, 0.9], kind="task"))
    figs = [(plots.probe_accuracy_by_layer(df), "probe <accuracy> & more"),
            (go.Figure(go.Bar(x=["a", "b"], y=[1, 2])), "a bar chart")]
    return [Section("Probes", figs), Section("Patching", [])], len(figs)


# -- static checks of the HTML -------------------------------------------------------------------

def test_write_dashboard_is_self_contained(tmp_path):
    sections, n = small_sections()
    out = write_dashboard(sections, tmp_path / "d.html", run_info={"models": ["m1", "m2"],
                                                                    "weight_mode": "pretrained"})
    assert out == tmp_path / "d.html"
    page = out.read_text(encoding="utf-8")
    js = get_plotlyjs()
    # A piece from the middle of the library: present exactly once, i.e. inlined once.
    marker = js[len(js) // 2: len(js) // 2 + 200]
    assert page.count(marker) == 1
    assert page.count(js[:60]) == 1
    assert not SCRIPT_SRC.search(page), "the page must not load scripts from the network"
    assert len(FIG_DIV.findall(page)) == n
    assert page.count("<figcaption>") == n
    assert "probe &lt;accuracy&gt; &amp; more" in page  # captions are escaped
    assert "m1, m2" in page and "pretrained" in page and "generated" in page
    assert re.search(r"<h2>Patching</h2>\s*<p class=\"not-run\">not run</p>", page)


def test_write_dashboard_rejects_non_figures_and_missing_folder(tmp_path):
    with pytest.raises(TypeError, match="plotly Figure"):
        write_dashboard([Section("x", [("not a figure", "c")])], tmp_path / "d.html")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_dashboard([], tmp_path / "missing" / "d.html")


def test_dashboard_from_run(tmp_path):
    run, n = make_run_dir(tmp_path)
    out = dashboard_from_run(run)
    assert out == run / "dashboard.html"
    page = out.read_text(encoding="utf-8")
    assert len(FIG_DIV.findall(page)) == n
    assert "weight_mode" in page and "2025-01-02" in page
    # Sections without files say so instead of vanishing silently.
    assert "not run (no attention_heads.csv in the run directory)" in page
    assert "Model comparison" in page and "not run (no model_difference.csv" not in page


def test_dashboard_from_run_lists_models_when_run_json_is_absent(tmp_path):
    run, _ = make_run_dir(tmp_path)
    (run / "run.json").unlink()
    page = dashboard_from_run(run, tmp_path / "elsewhere.html").read_text(encoding="utf-8")
    assert "CodeLlama-7b, Llama-2-7b" in page
    assert not (run / "dashboard.html").exists()


def test_dashboard_from_run_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        dashboard_from_run(tmp_path / "nope")
    run, _ = make_run_dir(tmp_path)
    pd.read_csv(run / "behaviour.csv").drop(columns="ci_low").to_csv(run / "behaviour.csv")
    with pytest.raises(ValueError, match=r"behaviour\.csv.*ci_low"):
        dashboard_from_run(run)
    (run / "behaviour.csv").unlink()
    (run / "cmap.csv").write_bytes(b"group,metric,before,after\n\"unterminated,1,2\n")
    with pytest.raises(ValueError, match=r"cmap\.csv"):
        dashboard_from_run(run)
    (run / "cmap.csv").unlink()
    (run / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json"):
        dashboard_from_run(run)


def test_dashboard_from_run_plot_errors_name_the_file(tmp_path):
    run, _ = make_run_dir(tmp_path)
    df = pd.read_csv(run / "probe_heatmap.csv")
    pd.concat([df, df]).to_csv(run / "probe_heatmap.csv", index=False)  # duplicate cells
    with pytest.raises(ValueError, match=r"probe_heatmap\.csv.*several rows"):
        dashboard_from_run(run)


# -- a real browser ------------------------------------------------------------------------------

def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return exe


def render(page: Path, tmp_path: Path) -> tuple[str, str]:
    """Load `page` from disk in headless chromium; return (DOM after scripts ran, console log)."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout, proc.stderr


def js_errors(dom: str, log: str) -> list[str]:
    errors = [line for line in log.splitlines() if "Uncaught" in line]
    if 'data-js-errors="' in dom:  # set by the page's own window error hook
        errors.append(re.search(r'data-js-errors="([^"]*)"', dom).group(1))
    return errors


def test_browser_renders_every_figure_without_errors(tmp_path):
    _chromium()
    run, n = make_run_dir(tmp_path)
    # The patching and attention head maps too: one figure per model, and per model and role.
    pd.DataFrame([dict(model="CodeLlama-7b", layer=l, head_index=h, value=0.1 * (l - h)) for l in range(4) for h in range(8)]
                 ).to_csv(run / "patching_heads.csv", index=False)
    pd.DataFrame([dict(model="CodeLlama-7b", layer=l, head_index=h, role=r, mean=0.05 * (l + h))
                  for r in ("queried_box_label", "correct_objects") for l in range(4) for h in range(8)]
                 ).to_csv(run / "attention_heads.csv", index=False)
    n += 3
    dom, log = render(dashboard_from_run(run), tmp_path)
    assert js_errors(dom, log) == []
    # plotly adds js-plotly-plot to a graph div once it has drawn it.
    rendered = re.findall(r'class="plotly-graph-div js-plotly-plot"', dom)
    assert len(rendered) == n
    assert dom.count('class="main-svg"') >= n
    # Each figure drew its data: scatter/bar traces or a heatmap image.
    for part in re.split(r'<div id="bp-fig-\d+"', dom)[1:]:
        fig = part.split("</figure>")[0]
        assert 'class="trace' in fig or 'class="hm"' in fig


def test_browser_check_catches_a_broken_page(tmp_path):
    # The same checks must fail on a page whose script throws, or they prove nothing.
    sections, _ = small_sections()
    page = write_dashboard(sections, tmp_path / "d.html")
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", '<script>throw new Error("boom-42")</script></body>'), encoding="utf-8")
    dom, log = render(broken, tmp_path)
    errors = js_errors(dom, log)
    assert errors and any("boom-42" in e for e in errors)
    assert "JavaScript errors: Uncaught Error: boom-42" in dom


def test_dashboard_refuses_a_csv_cut_mid_row_or_a_non_numeric_layer(tmp_path):
    run, _ = make_run_dir(tmp_path)
    path = run / "probe_accuracy.csv"
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 8])  # the last row cut after a few characters
    with pytest.raises(DataError, match=r"probe_accuracy\.csv:\d+: \d fields where the header has \d+; the file is cut"):
        dashboard_from_run(run)
    path.write_text(text)
    df = pd.read_csv(path)
    df["layer"] = df["layer"].astype(object)
    df.loc[3, "layer"] = "five"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"probe_accuracy\.csv:5: column 'layer' must be a number, got 'five'"):
        dashboard_from_run(run)
