"""The first_object probe's causal check: layer choice, the candidate subspace, and an effect that could fail."""

import numpy as np
import pandas as pd
import pytest

from boxprobe.config import ConfigError
from boxprobe.data.task import TaskConfig, generate_dataset
from boxprobe.probing.causal_check import candidate_directions, layers_above_baselines
from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig
from boxprobe.probing.metrics import nullspace_projection
from boxprobe.probing.probes import LayerwiseLogisticProbe
from boxprobe.report.dashboard import dashboard_from_run

TOY_BASE = "assets/models/toy-base"


def test_layers_above_baselines_needs_the_interval_above_every_baseline():
    def row(kind, layer, low, high):
        return {"model": "m", "probe": "first_object", "metric": "accuracy", "subset": "all", "kind": kind,
                "layer": layer, "value": (low + high) / 2, "ci_low": low, "ci_high": high}

    acc = pd.DataFrame([row("task", 0, 0.3, 0.5), row("majority", 0, 0.1, 0.2), row("initial_state", 0, 0.3, 0.4),
                        row("task", 1, 0.7, 0.8), row("majority", 1, 0.1, 0.2), row("initial_state", 1, 0.3, 0.4),
                        row("permutation", 1, 0.0, 0.1), row("model_argmax", 1, 0.85, 0.9)])
    # Layer 0's task interval overlaps initial_state's; model_argmax is the model itself, not a baseline.
    assert layers_above_baselines(acc, "m") == [1]
    assert layers_above_baselines(acc.assign(model="other"), "m") == []


def test_candidate_directions_leave_the_probe_at_chance_among_candidates():
    rng = np.random.default_rng(0)
    n, d, n_classes = 300, 16, 6
    y = rng.integers(0, n_classes, n)
    X = rng.standard_normal((n, 2, d)) + 2 * np.eye(d)[y][:, None, :]  # class c shifts feature c
    probe = LayerwiseLogisticProbe(C=1.0).fit(X, y)
    mask = np.zeros((n, n_classes), bool)
    mask[:, [0, 2, 5]] = True
    mask[:5, 1] = True
    dirs = candidate_directions(probe, 1, mask)
    assert len(dirs) == n and dirs[0].shape == (3, d) and dirs[10].shape == (2, d)  # rank: candidates - 1
    W = probe.coef_[1]
    for i in (0, 10):
        cands = np.flatnonzero(mask[i])
        x = X[i, 1]
        after = W[cands] @ (x @ nullspace_projection(dirs[i]))
        # What the probe reads of x among the candidates differed; after the projection it is one number, so
        # the candidates' logits differ only by terms that do not depend on the activation.
        assert np.ptp(W[cands] @ x) > 1 and np.ptp(after) < 1e-8
        other = np.setdiff1d(np.arange(n_classes), cands)[0]
        assert np.ptp(W[np.append(cands, other)] @ (x @ nullspace_projection(dirs[i]))) > 1e-3  # only candidates


def test_causal_check_config_needs_first_object():
    with pytest.raises(ConfigError, match="first_object"):
        ProbeExperimentConfig(models=("x",), data="d.jsonl", targets=("empty",), causal_check=True)


def test_probe_directions_matter_more_than_random_ones_on_toy_base(tmp_path):
    # Could come out either way: a probe that reads a decodable but unused direction would leave p(correct)
    # where equal-sized random ablations leave it.
    data = generate_dataset(TaskConfig(num_samples=160, seed=7), tmp_path / "data", subsample_per_numops=10)
    cfg = ProbeExperimentConfig(models=(TOY_BASE,), data=str(data["test-subsample"]), out_dir=str(tmp_path / "run"),
                                targets=("first_object",), train_limit=80, Cs=(1.0,), baselines=("majority",),
                                random_init="none", causal_check=True, causal_layers=(3,), causal_n=100,
                                causal_random=2, n_boot=200)
    run = ProbeExperiment(cfg).run()
    c = run.causal_check
    assert (tmp_path / "run" / "causal_check.csv").exists()
    p = c[c.metric == "p_object"].set_index("condition")
    assert set(p.index) == {"none", "probe", "random", "probe - none", "random - none", "probe - random"}
    assert (p.n == 100).all() and p.loc["random", "n_seeds"] == 2
    means = c[~c.condition.str.contains(" - ")]
    assert ((means.ci_low >= 0) & (means.ci_high <= 1)).all()  # bounded intervals for probabilities
    assert (c.ci_low <= c.value + 1e-12).all() and (c.value <= c.ci_high + 1e-12).all()
    assert p.loc["probe - random", "ci_high"] < 0  # the probe's own subspace costs more than random ones
    assert p.loc["probe - none", "value"] < p.loc["random - none", "value"]
    assert "Causal check" in dashboard_from_run(tmp_path / "run").read_text()
