import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgery.targets import TargetError, resolve_targets
from tests.tiny_models import tiny_model


def test_names_match_full_name_or_suffix() -> None:
    model = tiny_model("llama")
    found = resolve_targets(model, ["q_proj", "model.layers.0.self_attn.v_proj"])
    assert sorted(found) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]


def test_regex_and_exclude() -> None:
    model = tiny_model("llama")
    found = resolve_targets(model, r".*\.(q|k)_proj", exclude=["model.layers.1.self_attn.k_proj"])
    assert sorted(found) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                             "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_all_linear_leaves_out_heads(arch: str) -> None:
    model = tiny_model(arch)
    found = resolve_targets(model, "all-linear")
    assert found and not any(n.split(".")[0] in ("lm_head", "classifier", "score") for n in found)
    assert all(isinstance(m, (nn.Linear, Conv1D)) for m in found.values())
    if arch == "gpt2":
        assert any(isinstance(m, Conv1D) for m in found.values())


def test_zero_matches_lists_closest_names() -> None:
    with pytest.raises(TargetError, match="closest layer names: q_proj"):
        resolve_targets(tiny_model("llama"), ["q_prj"])


def test_non_linear_target_is_refused() -> None:
    with pytest.raises(TargetError, match="only nn.Linear and Conv1D"):
        resolve_targets(tiny_model("llama"), ["input_layernorm"])
