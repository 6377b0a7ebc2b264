"""The probe experiment runs end to end on a tiny checkpoint and writes the dashboard's files."""

import pandas as pd
import plotly.graph_objects as go
import pytest

import boxprobe.probing.experiment as experiment_mod
from boxprobe.config import ConfigError
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.models.loading import load_model
from boxprobe.report.dashboard import dashboard_from_run
from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig
from boxprobe.data.task import TaskConfig, generate_dataset, read_examples
from helpers import make_toy_checkpoint


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_exp")
    dirs = [str(make_toy_checkpoint(root / name, n_heads=2, d_mlp=64, n_ctx=512, seed=seed))
            for name, seed in (("toy-a", 0), ("toy-b", 1))]
    data = generate_dataset(TaskConfig(num_samples=60, num_operations=3, seed=4), root / "data", subsample_per_numops=6)
    return dirs, str(data["test-subsample"]), root


def test_probe_experiment_writes_tidy_results_and_plots(toy_pair, monkeypatch):
    dirs, data, root = toy_pair
    cfg = ProbeExperimentConfig(models=tuple(dirs), data=data, out_dir=str(root / "run"), targets=("contents", "prior_1"),
                                Cs=(0.1, 1.0), n_boot=50, causal_check_layer=1)
    run = ProbeExperiment(cfg).run()
    acc = run.probe_accuracy
    assert set(acc.kind) == {"task", "control", "majority", "random-init"}
    assert set(acc.probe) == {"contents", "prior_1"}
    nt = acc[(acc.metric == "non_trivial") & (acc.kind == "task")]
    assert set(nt.layer) == {0, 1} and nt.value.between(0, 1).all()
    assert (nt.ci_low <= nt.value + 1e-9).all() and (nt.value <= nt.ci_high + 1e-9).all()
    assert {"exact_set", "full"} <= set(acc.metric)
    a, b = sorted(set(acc.model))
    assert a.startswith("toy-a@") and b.startswith("toy-b@")  # name plus content hash, never the bare dir name
    assert set(run.model_difference.model_a) == {b} and set(run.model_difference.model_b) == {a}
    assert len(run.selectivity) == 2 * 2 * 2  # models x probes x layers
    for name in ("probe_accuracy.csv", "probe_heatmap.csv", "selectivity.csv", "model_difference.csv"):
        assert (root / "run" / name).exists()
    causal = pd.read_csv(root / "run" / "causal_check.csv")
    assert set(causal.condition) == {"none", "probe", "random"} and set(causal.model) == {a, b}
    assert isinstance(run.plot_probe_accuracy(), go.Figure)
    assert isinstance(run.plot_heatmap(a), go.Figure)
    assert isinstance(run.plot_difference(), go.Figure)
    html = dashboard_from_run(root / "run")
    assert html.read_text().count("plotly-graph-div") >= 4

    # A second run reuses the caches (same request) and gives the same numbers.
    again = ProbeExperiment(cfg).run()
    assert again.probe_accuracy.equals(run.probe_accuracy)

    # Loaded models and prepared query sets stand in for the names: only the random-init twin is loaded.
    models = [load_model(d, device="cpu") for d in dirs]
    queries = [prepare(m, read_examples(data), resolve_spec(m, format="per-box")) for m in models]
    loads = []
    real = experiment_mod.load_model
    monkeypatch.setattr(experiment_mod, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    given = ProbeExperiment(cfg, models=models, queries=queries).run()
    assert len(loads) == 1 and given.probe_accuracy.equals(run.probe_accuracy)


def test_probe_experiment_config_rejects_typos():
    with pytest.raises(ConfigError, match="did you mean 'targets'"):
        ProbeExperimentConfig.from_dict({"models": ["x"], "data": "d.jsonl", "targetz": ["contents"]})
    with pytest.raises(ConfigError, match="target"):
        ProbeExperimentConfig(models=("x",), data="d.jsonl", targets=("colour",))


def test_global_state_end_reads_the_last_period_once_per_context():
    from boxprobe.probing.experiment import _global_end_target

    contexts = ["Box 0 contains nothing, Box 1 contains the apple. Move the apple from Box 1 to Box 0.",
                "Box 0 contains nothing, Box 1 contains the apple. Move the apple from Box 1 to Box 0.",
                "Box 0 contains the cup, Box 1 contains the pen."]
    state_a, state_c = [["apple"], []], [["cup"], ["pen"]]

    def row(q, op, state, mentioned):
        return {"query_index": q, "op_index": op, "state": state, "sample_id": q // 2, "mentioned": mentioned,
                "num_operations": 0 if q == 2 else 1, "numops": 0, "query_box": q % 2}

    ends = pd.DataFrame([row(0, -1, state_a, ["apple"]), row(0, 0, state_a, ["apple"]),
                         row(1, -1, state_a, ["apple"]), row(1, 0, state_a, ["apple"]),
                         row(2, -1, state_c, ["cup", "pen"])])
    target = _global_end_target(ends, contexts, ["apple", "cup", "pen"])
    assert list(target.rows) == [1, 4]  # query 0's last operation; query 1 shares its context; query 2 has none
    blocks = target.Y.reshape(2, 3, 3)  # [items, objects, 2 boxes + none]
    assert blocks[0, 0].argmax() == 0 and blocks[1, 1].argmax() == 0 and blocks[1, 2].argmax() == 1
    assert not target.mask.reshape(2, 3, 3)[0, 1:].any()  # only mentioned objects count
    assert target.query_types == [1, "initial"]  # the box the last sentence (not the context) names first
    assert list(target.numops) == [1, 0]


def test_global_state_targets_run_with_block_baselines(toy_pair):
    from boxprobe.probing.experiment import _global_target
    from boxprobe.probing.metrics import majority_state_baseline, split_by_group

    dirs, data, root = toy_pair
    cfg = ProbeExperimentConfig(models=(dirs[0],), data=data, out_dir=str(root / "run_global"),
                                targets=("global_state", "global_state_end"), Cs=(1.0,), n_boot=20, random_init="none")
    run = ProbeExperiment(cfg).run()
    acc = run.probe_accuracy
    assert set(acc.probe) == {"global_state", "global_state_end"}
    assert set(acc.kind) == {"task", "control", "majority"} and acc.value.between(0, 1).all()
    # The majority line is each object's most frequent box, on the same split as the probe.
    from boxprobe.activations.cache import open_cache
    from boxprobe.data.task import load_vocabulary

    (cache_dir,) = (root / "run_global" / "cache").glob("toy-a@*")
    meta = open_cache(cache_dir).metadata("query_last").reset_index(drop=True)
    target = _global_target(meta, load_vocabulary("objects"))
    train, _, test = split_by_group(target.groups, cfg.split, seed=cfg.seed)
    expected = majority_state_baseline(target.Y[train], target.Y[test], target.mask[train], target.mask[test],
                                       target.n_classes)
    got = acc[(acc.probe == "global_state") & (acc.kind == "majority")].value
    assert got.round(9).eq(round(expected, 9)).all()
