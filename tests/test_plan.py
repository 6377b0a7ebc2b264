"""Registry shapes and ``boxprobe plan``: parameter counts against real checkpoints, estimates that scale."""

import json

import pytest
from safetensors import safe_open

from boxprobe.cli import main
from boxprobe.errors import BoxprobeError
from boxprobe.models.registry import REGISTRY
from boxprobe.models.shapes import SHAPES, model_shape
from boxprobe.pipeline.plan import PlanConfig, make_plan

TOY = "assets/models/toy-base"


def _stored_params(directory) -> int:
    with safe_open(f"{directory}/model.safetensors", "pt") as f:
        total = 0
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def test_every_registry_model_has_a_shape_near_its_nominal_size():
    assert set(SHAPES) == set(REGISTRY)
    for name, shape in SHAPES.items():
        assert shape.source.startswith(f"https://huggingface.co/{REGISTRY[name].hf_id}/")
        # nominal sizes round down (gemma-7b has 8.5B parameters): within 25%
        assert abs(shape.params / 1e9 - REGISTRY[name].params_b) / REGISTRY[name].params_b < 0.25, name


@pytest.mark.parametrize("directory", [TOY, "smollm2"])
def test_parameter_formula_matches_stored_checkpoints(directory, request):
    if directory == "smollm2":
        directory = request.getfixturevalue("smollm2_dir")
    assert model_shape(directory).params == _stored_params(directory)


def test_plan_scales_with_the_model_and_the_workload():
    small = make_plan(PlanConfig(model="Llama-2-7b", n_queries=100)).frame.set_index("quantity")["value"]
    big = make_plan(PlanConfig(model="Llama-2-70b", n_queries=100)).frame.set_index("quantity")["value"]
    more = make_plan(PlanConfig(model="Llama-2-70b", n_queries=200)).frame.set_index("quantity")["value"]
    assert big["weights bfloat16"] == pytest.approx(68.977e9 * 2 / 2**30, rel=1e-3)
    assert small["h100-80gb needed"] == 1 and big["h100-80gb needed"] == 2
    assert more.filter(like="wall time").sum() > big.filter(like="wall time").sum()
    assert more["activation cache on disk"] == pytest.approx(2 * big["activation cache on disk"])
    assert big["activation peak, logits at read positions"] < big["activation peak, logits at every position"]


def test_plan_cli_prints_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    assert main(["plan", "--model", "CodeLlama-70b", "--stages", "eval,cache", "--layers", "0-39",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "80 layers" in text and "config.json" in text and out.is_file()
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "no shape for 'no-such-model'" in capsys.readouterr().err
    assert main(["plan", "--model", "CodeLlama-70b", "--stages", "eval,train"]) == 2


def test_local_config_without_a_field_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(BoxprobeError, match="num_attention_heads"):
        model_shape(tmp_path)
