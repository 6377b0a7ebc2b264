"""The probe experiment runs end to end on a tiny checkpoint and writes the dashboard's files."""

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

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
    cfg = ProbeExperimentConfig(models=tuple(dirs), data=data, out_dir=str(root / "run"), train_limit=40,
                                targets=("empty", "first_object", "prior_1"), Cs=(1.0,), n_boot=50)
    run = ProbeExperiment(cfg).run()
    acc = run.probe_accuracy
    assert {"model", "probe", "metric", "kind", "layer", "value", "ci_low", "ci_high"} <= set(acc.columns)
    assert set(acc.kind) == {"task", "majority", "initial_state", "embedding", "random_init", "permutation",
                             "model_argmax"}
    assert set(acc.probe) == {"empty", "first_object", "prior_1"} and "accuracy" in set(acc.metric)
    assert {"all", "numops>=1", "differs_from_initial"} <= set(acc.subset)
    task = acc[(acc.metric == "accuracy") & (acc.kind == "task")]
    assert set(task.layer) == {0, 1} and acc.value.between(0, 1).all()
    assert (acc.ci_low >= 0).all() and (acc.ci_high <= 1).all()  # bounded intervals
    assert (acc.ci_low <= acc.value + 1e-9).all() and (acc.value <= acc.ci_high + 1e-9).all()
    # The sanity flag sits on the last-layer first_object task row of each model.
    flagged = acc[acc.sanity != ""]
    assert set(flagged.probe) == {"first_object"} and set(flagged.kind) == {"task"} and set(flagged.layer) == {1}
    # Majority on exactly what is scored: the initial-state heuristic beats it on numops-0 boxes.
    first = acc[(acc.probe == "first_object") & (acc.metric == "accuracy") & (acc.subset == "all")]
    assert first[first.kind == "initial_state"].value.iloc[0] > first[first.kind == "majority"].value.iloc[0]
    a, b = sorted(set(acc.model))
    assert a.startswith("toy-a@") and b.startswith("toy-b@")  # name plus content hash, never the bare dir name
    assert set(run.model_difference.model_a) == {b} and set(run.model_difference.model_b) == {a}
    assert run.selectivity.empty  # no token-level target: no Hewitt-Liang control
    for name in ("probe_accuracy.csv", "probe_heatmap.csv", "model_difference.csv"):
        assert (root / "run" / name).exists()
    assert not (root / "run" / "selectivity.csv").exists()
    assert isinstance(run.plot_probe_accuracy(), go.Figure)
    assert isinstance(run.plot_heatmap(a), go.Figure)
    assert isinstance(run.plot_difference(), go.Figure)
    html = dashboard_from_run(root / "run")
    assert html.read_text().count("plotly-graph-div") >= 4

    # A second run reuses the caches (same request) and gives the same numbers.
    again = ProbeExperiment(cfg).run()
    pd.testing.assert_frame_equal(again.probe_accuracy, run.probe_accuracy)

    # Loaded models and prepared query sets stand in for the names: only the random-init twin is loaded.
    models = [load_model(d, device="cpu") for d in dirs]
    queries = [prepare(m, read_examples(data), resolve_spec(m, format="per-box")) for m in models]
    loads = []
    real = experiment_mod.load_model
    monkeypatch.setattr(experiment_mod, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    given = ProbeExperiment(cfg, models=models, queries=queries).run()
    assert len(loads) == 1
    pd.testing.assert_frame_equal(given.probe_accuracy, run.probe_accuracy)


def test_probe_experiment_config_rejects_typos_and_missing_train_data(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'targets'"):
        ProbeExperimentConfig.from_dict({"models": ["x"], "data": "d.jsonl", "targetz": ["first_object"]})
    with pytest.raises(ConfigError, match="target"):
        ProbeExperimentConfig(models=("x",), data="d.jsonl", targets=("colour",))
    with pytest.raises(ConfigError, match="per-box"):
        ProbeExperimentConfig(models=("x",), data="d.jsonl", format="all-boxes")
    from boxprobe.errors import MissingFileError
    with pytest.raises(MissingFileError, match="train.jsonl"):
        ProbeExperimentConfig(models=("x",), data=str(tmp_path / "test.jsonl")).train_path()


def test_global_state_reads_the_last_period_once_per_context():
    from boxprobe.probing.targets import global_target

    contexts = ["Box 0 contains nothing, Box 1 contains the apple. Move the apple from Box 1 to Box 0.",
                "Box 0 contains nothing, Box 1 contains the apple. Move the apple from Box 1 to Box 0.",
                "Box 0 contains the cup, Box 1 contains the pen."]
    state_a, state_c = [["apple"], []], [["cup"], ["pen"]]

    def row(q, op, state, initial, mentioned):
        return {"query_index": q, "op_index": op, "state": state, "initial_state": initial, "sample_id": q // 2,
                "mentioned": mentioned, "num_operations": 0 if q == 2 else 1, "numops": 0, "query_box": q % 2,
                "token_index": 0}

    ends = pd.DataFrame([row(0, -1, state_a, [[], ["apple"]], ["apple"]), row(0, 0, state_a, [[], ["apple"]], ["apple"]),
                         row(1, -1, state_a, [[], ["apple"]], ["apple"]), row(1, 0, state_a, [[], ["apple"]], ["apple"]),
                         row(2, -1, state_c, state_c, ["cup", "pen"])])
    target = global_target(ends, contexts, ["apple", "cup", "pen"])
    assert list(target.rows) == [1, 4]  # query 0's last operation; query 1 shares its context; query 2 has none
    assert target.y.tolist() == [[0, 2, 2], [2, 0, 1]]  # a box per object, 2 = in no box
    assert target.initial.tolist() == [[1, 2, 2], [2, 0, 1]]  # the first sentence put the apple in Box 1
    assert target.mask.tolist() == [[True, False, False], [False, True, True]]  # only mentioned objects count
    assert list(target.numops) == [1, 0]


def test_layer_blocks_give_the_same_results_and_read_the_stored_dtype_per_block(toy_pair, monkeypatch):
    """Probing one layer at a time equals probing all at once, and a bfloat16 cache is read as bfloat16, one
    block of layers per read (the upcast to float32 happens per block)."""
    from boxprobe.activations.cache import CacheReader

    dirs, data, root = toy_pair
    base = dict(models=(dirs[0],), data=data, train_limit=30, targets=("empty", "first_object"), Cs=(0.1, 1.0),
                n_boot=30, dtype="bfloat16", random_init="none", baselines=("majority", "permutation"),
                causal_check=True, causal_layers=(0, 1), causal_n=8, causal_random=1)
    reads = []
    real = CacheReader.activations

    def spy(self, hook, role, layers=None):
        t = real(self, hook, role, layers)
        reads.append((hook, t.dtype, t.shape[1]))
        return t

    monkeypatch.setattr(CacheReader, "activations", spy)
    whole = ProbeExperiment(ProbeExperimentConfig(**base, out_dir=str(root / "blocks-all"))).run()
    assert {(d, w) for h, d, w in reads if h == "resid_post"} == {(torch.bfloat16, 2)}
    reads.clear()
    one = ProbeExperiment(ProbeExperimentConfig(**base, out_dir=str(root / "blocks-1"), layer_block=1)).run()
    assert {(d, w) for h, d, w in reads if h == "resid_post"} == {(torch.bfloat16, 1)}
    pd.testing.assert_frame_equal(one.probe_accuracy, whole.probe_accuracy)
    pd.testing.assert_frame_equal(one.probe_heatmap, whole.probe_heatmap)
    pd.testing.assert_frame_equal(one.causal_check, whole.causal_check)  # the causal check reads the joined probe
    with pytest.raises(ConfigError, match="layer_block"):
        ProbeExperimentConfig(**base, out_dir=str(root / "x"), layer_block=0)


def test_the_model_s_own_answer_is_read_from_cached_unembedding_inputs(toy_pair):
    """``model_argmax`` unembeds the cached unembedding input at " the" (no second pass over the prompts); those
    logits must be the ones a full forward pass of each query's own prompt gives at that token."""
    from boxprobe.activations.cache import CacheConfig, build_cache

    dirs, data, root = toy_pair
    model = load_model(dirs[0])
    queries = prepare(model, read_examples(data)[:3], resolve_spec(model, None, "per-box", None))
    reader = build_cache(model, queries, root / "own-answer",
                         CacheConfig(hooks=(experiment_mod.FINAL_HOOK,), roles=("answer_prefix",)))
    meta = reader.metadata("answer_prefix")
    final = reader.activations(experiment_mod.FINAL_HOOK, "answer_prefix")[:, 0]
    assert len(meta) >= 3
    with torch.inference_mode():
        ours = model.unembed(final[:, None])[:, 0]
        for row, (q, pos) in enumerate(zip(meta.query_index, meta.token_index)):
            full = model(torch.tensor([queries.items[int(q)].ids]))[0, int(pos)]
            torch.testing.assert_close(ours[row], full, atol=1e-4, rtol=1e-4)
