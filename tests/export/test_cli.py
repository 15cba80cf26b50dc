"""``python -m export.onnx``: the report, the folders optimum and export.run load, and every way it exits non-zero."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export.onnx as export_onnx
from export.onnx import main
from export.report import REPORT_JSON, REPORT_MD
from surgery.checkpoint import ADAPTER_FILE, load_checkpoint
from surgery.methods.base import Fold
from surgery.methods.lora import LoRALayer
from surgery.tolerances import MODEL
from tests.export.checkpoints import make_checkpoint, save_lively_base, single_torch_thread  # noqa: F401
from tests.export.test_exporters import unknown_encoder
from tests.export.tiny_exports import word_tokenizer
from tests.tiny_models import random_ids, save_tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOL = MODEL[torch.float32]
FAST = ["--no-latency", "--no-fp16-check"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def bases(root: Path) -> dict[str, Path]:
    unknown = root / "base_unknown"
    unknown_encoder().save_pretrained(unknown)
    word_tokenizer(encoder=True).save_pretrained(unknown)
    return {
        "bert": save_lively_base("bert", root / "base_bert"),
        "bert_other": save_lively_base("bert", root / "base_bert_other", seed=7),
        "gpt2": save_lively_base("gpt2", root / "base_gpt2"),
        "unknown": unknown,
    }


@pytest.fixture(scope="module")
def ckpts(root: Path, bases: dict[str, Path]) -> dict[str, Path]:
    return {
        "bert": make_checkpoint(bases["bert"], "lora", root / "ckpt_bert", "bert"),
        "gpt2": make_checkpoint(bases["gpt2"], "proda", root / "ckpt_gpt2", "gpt2"),
        "unknown": make_checkpoint(bases["unknown"], "lora", root / "ckpt_unknown", "bert"),
    }


def read_report(folder: Path) -> dict:
    return json.loads((folder / REPORT_JSON).read_text())


def test_merge_writes_the_report_and_a_folder_optimum_and_run_load(ckpts, tmp_path: Path, capsys) -> None:
    from optimum.onnxruntime import ORTModelForSequenceClassification

    from export.run import OnnxPipeline

    out = tmp_path / "onnx"
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/6] loading the checkpoint" in printed and "export passed" in printed
    report = read_report(out)
    assert report["passed"] and report["task"] == "seq-cls" and report["backend"] == "optimum"
    assert set(report["parity"]) >= {"max_abs_diff", "max_rel_diff", "tolerance", "greedy_match"}
    assert report["parity"]["greedy_match"] is None
    assert report["parity"]["tolerance"]["atol"] == TOL.atol
    latency = report["latency"]
    assert all(latency[key] > 0 for key in ("ort_ms", "base_ort_ms", "torch_unfolded_ms", "torch_folded_ms"))
    assert latency["overhead"] == pytest.approx(latency["ort_ms"] / latency["base_ort_ms"])
    assert [layer["name"].rsplit(".", 1)[1] for layer in report["layers"]] == ["query", "value"] * 2
    assert all({"name", "method", "folded", "residual", "fold_error"} <= set(layer) for layer in report["layers"])
    assert report["macs_per_token"] == report["base_macs_per_token"] > 0
    assert report["tensorrt"]["opset_ok"] and report["tensorrt"]["trtexec"].startswith("trtexec --onnx=")
    assert report["tensorrt"]["fp16"]["parity"]["passed"] and (out / "fp16" / "model.onnx").is_file()
    assert "# Export report: PASSED" in (out / REPORT_MD).read_text()
    for name in ("model.onnx", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name

    inputs = {"input_ids": random_ids(2, 7)}
    inputs.update(attention_mask=torch.ones_like(inputs["input_ids"]),
                  token_type_ids=torch.zeros_like(inputs["input_ids"]))
    with torch.no_grad():
        expected = load_checkpoint(ckpts["bert"]).model.eval()(**inputs).logits
    ort_logits = ORTModelForSequenceClassification.from_pretrained(out)(**inputs).logits
    torch.testing.assert_close(ort_logits, expected, atol=TOL.atol, rtol=TOL.rtol)
    assert OnnxPipeline.from_dir(out).classify(["the cat sat"])[0]["label"] in {"LABEL_0", "LABEL_1"}


def test_decoder_export_generates_in_optimum_and_run(ckpts, tmp_path: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    from export.run import OnnxPipeline

    out = tmp_path / "onnx"
    assert main([str(ckpts["gpt2"]), "--merge", "--out", str(out), *FAST]) == 0
    report = read_report(out)
    assert report["parity"]["greedy_match"] is True and report["with_past"]
    assert (out / "generation_config.json").is_file()
    prompt = random_ids(1, 5)
    with torch.no_grad():
        expected = load_checkpoint(ckpts["gpt2"]).model.eval().generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
    onnx_model = ORTModelForCausalLM.from_pretrained(out)
    actual = onnx_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
    torch.testing.assert_close(actual, expected)
    np.testing.assert_array_equal(OnnxPipeline.from_dir(out).generate_ids(prompt.numpy(), 8), expected[:, 5:].numpy())


def test_without_merge_the_unfolded_graph_goes_next_to_the_checkpoint(ckpts, root: Path) -> None:
    ckpt = shutil.copytree(ckpts["gpt2"], root / "ckpt_gpt2_copy")
    assert main([str(ckpt), *FAST]) == 0
    report = read_report(ckpt / "onnx_unfolded")
    assert report["passed"] and not report["merge"]
    assert not any(layer["folded"] for layer in report["layers"])
    assert report["macs_per_token"] > report["base_macs_per_token"]


def test_fp16_export_is_verified_at_the_float16_tolerance(ckpts, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    assert main([str(ckpts["gpt2"]), "--merge", "--dtype", "fp16", "--out", str(out), "--no-latency"]) == 0
    report = read_report(out)
    assert report["dtype"] == "fp16" and report["parity"]["tolerance"]["atol"] == MODEL[torch.float16].atol
    assert report["parity"]["greedy_match"] is True
    initializers = onnx.load(str(out / "model.onnx")).graph.initializer
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in initializers)


def test_unknown_architecture_falls_back_unless_a_backend_is_forced(ckpts, tmp_path: Path, capsys) -> None:
    assert main([str(ckpts["unknown"]), "--merge", "--out", str(tmp_path / "auto"), *FAST]) == 0
    assert read_report(tmp_path / "auto")["backend"] == "torch"
    assert "falling back to torch.onnx" in capsys.readouterr().out
    assert main([str(ckpts["unknown"]), "--merge", "--backend", "optimum", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "no ONNX config for model type 'roberta-prelayernorm'" in capsys.readouterr().err


def test_corrupted_checkpoint_exits_2(ckpts, tmp_path: Path, capsys) -> None:
    ckpt = shutil.copytree(ckpts["bert"], tmp_path / "ckpt")
    data = bytearray((ckpt / ADAPTER_FILE).read_bytes())
    data[-10] ^= 0xFF
    (ckpt / ADAPTER_FILE).write_bytes(bytes(data))
    assert main([str(ckpt), "--merge", *FAST]) == 2
    assert f"{ADAPTER_FILE}: corrupted or truncated" in capsys.readouterr().err


def test_wrong_base_model_exits_2(ckpts, bases, capsys) -> None:
    assert main([str(ckpts["bert"]), "--merge", "--model-path", str(bases["bert_other"]), *FAST]) == 2
    assert "saved against a different base model" in capsys.readouterr().err


def test_failed_parity_exits_1_with_the_report_written(ckpts, tmp_path: Path, capsys, monkeypatch) -> None:
    real_fold = export_onnx.fold_model

    def off_by_a_bit(adapted):  # a fold bug the per-layer check cannot see: the model is changed after it
        folded = real_fold(adapted)
        weight = folded.model.get_submodule(folded.layers[0].name).weight
        with torch.no_grad():  # random, not constant: a constant row offset vanishes on LayerNorm'd inputs
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        return folded

    monkeypatch.setattr(export_onnx, "fold_model", off_by_a_bit)
    out = tmp_path / "onnx"
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), *FAST]) == 1
    assert "onnxruntime differs from the unfolded PyTorch model at batch" in capsys.readouterr().err
    report = read_report(out)
    assert not report["passed"] and report["errors"] and report["parity"]["max_abs_diff"] > TOL.atol
    assert "# Export report: FAILED" in (out / REPORT_MD).read_text()


def test_a_fold_beyond_tolerance_exits_1_naming_the_layer(ckpts, tmp_path: Path, capsys, monkeypatch) -> None:
    def fold_without_adapter(self: LoRALayer) -> Fold:
        return Fold(module=self.merged_layer(torch.zeros_like(self.base_weight)), residual=None, note="dense",
                    macs_per_token=self.d_in * self.d_out)

    monkeypatch.setattr(LoRALayer, "fold", fold_without_adapter)
    assert main([str(ckpts["bert"]), "--merge", "--out", str(tmp_path / "onnx"), *FAST]) == 1
    assert "layer 'bert.encoder.layer.0.attention.self.query' (lora)" in capsys.readouterr().err
    assert not (tmp_path / "onnx" / "model.onnx").exists(), "nothing is exported after a failed fold"


def test_exceeded_max_overhead_exits_1(ckpts, tmp_path: Path, capsys) -> None:
    out = tmp_path / "onnx"
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), "--max-overhead", "1e-6", "--no-fp16-check"]) == 1
    assert "exceeds --max-overhead 1e-06" in capsys.readouterr().err
    report = read_report(out)
    assert not report["passed"] and report["latency"]["max_overhead"] == 1e-6


@pytest.mark.parametrize("argv, message", [
    (["--opset", "16"], "--opset 16: use 17 or later"),
    (["--max-overhead", "0"], "--max-overhead 0.0: must be a positive ratio"),
    (["--max-overhead", "2", "--no-latency"], "--max-overhead needs the latency measurement"),
])
def test_bad_options_exit_2(argv: list[str], message: str, ckpts, capsys) -> None:
    assert main([str(ckpts["bert"]), "--merge", *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nowhere"), "--merge"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_a_base_without_tokenizer_exports_with_a_warning(tmp_path: Path, capsys) -> None:
    base = save_tiny_model("bert", tmp_path / "base")
    ckpt = make_checkpoint(base, "cla", tmp_path / "ckpt", "bert")
    assert main([str(ckpt), "--merge", *FAST]) == 0
    assert f"warning: {base} has no tokenizer files" in capsys.readouterr().out
    assert (ckpt / "onnx" / "model.onnx").is_file() and not (ckpt / "onnx" / "tokenizer.json").exists()
