"""Plan mode: a config-only folder, meta weights, and the report's numbers from each method's formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from surgery.apply import main
from surgery.methods import METHODS
from tests.method_configs import registered_methods, small_method
from tests.tiny_models import tiny_config


def config_only_folder(tmp_path: Path, arch: str = "llama") -> Path:
    folder = tmp_path / f"{arch}-config-only"
    tiny_config(arch).save_pretrained(folder)
    assert not any(folder.glob("*.safetensors"))
    return folder


def write_cfg(tmp_path: Path, model: Path, method: dict, targets=("q_proj", "v_proj")) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(model)}, "targets": list(targets),
                                    "method": method, "output_dir": str(tmp_path / "out")}))
    return path


@pytest.mark.parametrize("method", registered_methods())
def test_dry_run_on_config_only_folder(method: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path, config_only_folder(tmp_path), small_method(method))
    assert main([str(cfg), "--dry-run", "--report", str(tmp_path / "plan.json")]) == 0
    report = json.loads((tmp_path / "plan.json").read_text())
    out = capsys.readouterr().out
    assert "total" in out
    assert ("schedule: c3LA chain of 2 links: 1 switch (never after the last step), every 2 optimizer steps" in out) == (method == "c3la"), "the plan prints the schedule"
    assert len(report["modules"]) == 4
    cls = METHODS[method]
    config = cls.config_class(**small_method(method))
    for row in report["modules"]:
        assert row["trainable_params"] == cls.count_params(row["d_in"], row["d_out"], config)
        macs = cls.macs_per_token(row["d_in"], row["d_out"], config)
        assert (row["base_macs_per_token"], row["adapter_macs_per_token"]) == (macs.base, macs.adapter)
    assert report["trainable_params"] == sum(r["trainable_params"] for r in report["modules"])
    assert not (tmp_path / "out").exists(), "a dry run writes no checkpoint"


def test_dry_run_plans_the_qkv_group_with_its_unadapted_k(tmp_path: Path) -> None:
    """R-LoDA, approx_scope: qkv on meta weights: the plan lists k (approximated, no adapter) and counts the group's
    V_R x once: R (d_in + d_q + d_k + d_v) per attention (tiny Llama: d_in 32; q 32, k 16, v 16)."""
    method = {"name": "r_loda", "r": 2, "approx_rank": 6, "approx_scope": "qkv"}
    cfg = write_cfg(tmp_path, config_only_folder(tmp_path), method)
    assert main([str(cfg), "--dry-run", "--report", str(tmp_path / "plan.json")]) == 0
    rows = json.loads((tmp_path / "plan.json").read_text())["modules"]
    assert [(row["name"].rsplit(".", 1)[-1], row["adapter"]) for row in rows[:3]] == [
        ("q_proj", True), ("k_proj", False), ("v_proj", True)]
    assert len(rows) == 6 and rows[1]["trainable_params"] == rows[1]["adapter_macs_per_token"] == 0
    assert sum(row["base_macs_per_token"] for row in rows) == 2 * 6 * (32 + 32 + 16 + 16)


def test_dry_run_allocates_no_weights(tmp_path: Path) -> None:
    from surgery.apply import plan
    from surgery.config import load_config

    cfg = write_cfg(tmp_path, config_only_folder(tmp_path), {"name": "lora", "r": 4})
    adapted = plan(load_config(cfg), dry_run=True)
    tensors = list(adapted.model.parameters()) + list(adapted.model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert adapted.base_fingerprint == "meta"


def test_real_run_on_config_only_folder_says_dry_run_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path, config_only_folder(tmp_path), {"name": "lora", "r": 4})
    assert main([str(cfg)]) == 2
    assert "holds no weights" in capsys.readouterr().err


def plan_llama_7b_lora(tmp_path: Path) -> dict:
    """The dry-run report of LoRA r=16 on q, v of a config-only LLaMA-7B-shape folder."""
    from transformers import LlamaConfig

    folder = tmp_path / "llama-7b"
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000).save_pretrained(folder)
    cfg = write_cfg(tmp_path, folder, {"name": "lora", "r": 16}, targets=("q_proj", "v_proj"))
    assert main([str(cfg), "--dry-run", "--report", str(tmp_path / "p.json")]) == 0
    return json.loads((tmp_path / "p.json").read_text())


def test_large_config_plans_on_meta(tmp_path: Path) -> None:
    report = plan_llama_7b_lora(tmp_path)
    assert report["trainable_params"] == 32 * 2 * 16 * (4096 + 4096)
    assert report["base_params"] > 6_000_000_000


def test_percent_of_the_model_is_over_base_plus_trainable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """METHODS.md: "% of the model" is trainable / (base + trainable), base = every pretrained parameter (embeddings
    and head included). LLaMA-7B shapes, LoRA r = 16 on q, v: 8,388,608 / (6,738,415,616 + 8,388,608) = 0.1243 %
    (over base alone, as before issue 16: 0.1245 %)."""
    report = plan_llama_7b_lora(tmp_path)
    trainable, base = 32 * 2 * 16 * (4096 + 4096), report["base_params"]
    embeddings_and_head = 2 * 32000 * 4096  # untied: embed_tokens and lm_head
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two RMSNorms
    assert base == embeddings_and_head + 32 * per_layer + 4096 == 6_738_415_616  # + the final norm
    assert report["percent_of_model"] == pytest.approx(100 * trainable / (base + trainable))
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert total.split()[3] == "0.1243"


def test_layer_check_errors_come_before_any_weight(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path, config_only_folder(tmp_path), {"name": "lora", "r": 64})
    assert main([str(cfg), "--dry-run"]) == 2
    assert "r=64 is larger than the layer's dimensions" in capsys.readouterr().err
