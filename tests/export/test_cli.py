"""``python -m export.onnx``: the report, the folders export.run (and optimum, where installed) load, and every way it
exits non-zero."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export.onnx as export_onnx
from export.outdir import RECORD
from export.onnx import main
from export.report import REPORT_JSON, REPORT_MD
from surgery.checkpoint import ADAPTER_FILE, load_checkpoint
from surgery.methods.base import Fold
from surgery.methods.lora import LoRALayer
from surgery.tolerances import MODEL
from tests.export.checkpoints import make_checkpoint, save_lively_base, single_torch_thread  # noqa: F401
from tests.export.test_exporters import unknown_encoder
from tests.export.tiny_exports import auto_backend, word_tokenizer
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


@pytest.fixture(scope="module")
def bert_export(ckpts, root: Path) -> Path:
    """The merged export of the BERT checkpoint with every check on (latency and the fp16 variant included)."""
    out = root / "bert_onnx"
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out)]) == 0
    return out


def encoder_inputs() -> dict[str, torch.Tensor]:
    ids = random_ids(2, 7)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def test_merge_writes_the_report_and_a_folder_run_loads(ckpts, bert_export: Path) -> None:
    from export.run import OnnxPipeline

    out = bert_export
    report = read_report(out)
    assert report["passed"] and report["task"] == "seq-cls" and report["backend"] == auto_backend()
    assert set(report["parity"]) >= {"max_abs_diff", "max_rel_diff", "tolerance", "greedy_match"}
    assert report["parity"]["greedy_match"] is None
    assert report["parity"]["tolerance"]["atol"] == TOL.atol
    latency = report["latency"]
    assert all(latency[key] > 0 for key in ("ort_ms", "base_ort_ms"))
    assert latency["overhead"] == pytest.approx(latency["ort_ms"] / latency["base_ort_ms"])
    assert [layer["name"].rsplit(".", 1)[1] for layer in report["layers"]] == ["query", "value"] * 2
    assert all({"name", "method", "folded", "residual", "fold_error"} <= set(layer) for layer in report["layers"])
    assert report["macs_per_token"] == report["base_macs_per_token"] > 0
    assert report["tensorrt"]["opset_ok"] and report["tensorrt"]["trtexec"].startswith("trtexec --onnx=")
    assert report["tensorrt"]["fp16"]["parity"]["passed"] and (out / "fp16" / "model.onnx").is_file()
    assert "# Export report: PASSED" in (out / REPORT_MD).read_text()
    for name in ("model.onnx", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    pipeline = OnnxPipeline.from_dir(out)
    inputs = encoder_inputs()
    with torch.no_grad():
        expected = load_checkpoint(ckpts["bert"]).model.eval()(**inputs).logits.numpy()
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}
    np.testing.assert_allclose(pipeline.session.run(["logits"], pipeline._feed(feed))[0], expected, atol=TOL.atol,
                               rtol=TOL.rtol)
    assert pipeline.classify(["the cat sat"])[0]["label"] in {"LABEL_0", "LABEL_1"}


@pytest.mark.compat
def test_merged_encoder_folder_loads_in_optimum(ckpts, bert_export: Path) -> None:
    ort_model = pytest.importorskip("optimum.onnxruntime", reason="the [optimum] extra (compat job)")
    inputs = encoder_inputs()
    with torch.no_grad():
        expected = load_checkpoint(ckpts["bert"]).model.eval()(**inputs).logits
    ort_logits = ort_model.ORTModelForSequenceClassification.from_pretrained(bert_export)(**inputs).logits
    torch.testing.assert_close(ort_logits, expected, atol=TOL.atol, rtol=TOL.rtol)


@pytest.fixture(scope="module")
def gpt2_export(ckpts, root: Path) -> Path:
    out = root / "gpt2_onnx"
    assert main([str(ckpts["gpt2"]), "--merge", "--out", str(out), *FAST]) == 0
    return out


def test_a_decoder_with_its_kv_cache_measures_latency(ckpts, tmp_path: Path) -> None:
    """The latency step feeds a cache graph position_ids and an empty cache (a prefill); it fed only input_ids and
    attention_mask, and every decoder export with latency on (the default) failed."""
    out = tmp_path / "gpt2_latency"
    assert main([str(ckpts["gpt2"]), "--merge", "--out", str(out), "--no-fp16-check"]) == 0
    report = read_report(out)
    assert report["with_past"] and report["passed"]
    latency = report["latency"]
    assert latency["ort_ms"] > 0 and latency["base_ort_ms"] > 0 and "prefill, empty cache" in latency["input"]


def torch_greedy(ckpt: Path, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(ckpt).model.eval().generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, do_sample=False, pad_token_id=0)


def test_decoder_export_has_the_cache_and_generates_in_run(ckpts, gpt2_export: Path) -> None:
    from export.run import OnnxPipeline

    report = read_report(gpt2_export)
    assert report["parity"]["greedy_match"] is True and report["with_past"]
    assert any(case["case"].startswith("cached step") for case in report["parity"]["cases"])
    assert (gpt2_export / "generation_config.json").is_file()
    prompt = random_ids(1, 5)
    expected = torch_greedy(ckpts["gpt2"], prompt, 8)
    pipeline = OnnxPipeline.from_dir(gpt2_export)
    assert pipeline.cached
    np.testing.assert_array_equal(pipeline.generate_ids(prompt.numpy(), 8), expected[:, 5:].numpy())


@pytest.mark.compat
def test_decoder_folder_generates_in_optimum(ckpts, gpt2_export: Path) -> None:
    ort_model = pytest.importorskip("optimum.onnxruntime", reason="the [optimum] extra (compat job)")
    prompt = random_ids(1, 5)
    expected = torch_greedy(ckpts["gpt2"], prompt, 8)
    onnx_model = ort_model.ORTModelForCausalLM.from_pretrained(gpt2_export)
    actual = onnx_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
    torch.testing.assert_close(actual, expected)


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


def test_unknown_architecture_exports_with_torch_unless_optimum_is_forced(ckpts, tmp_path: Path, capsys) -> None:
    assert main([str(ckpts["unknown"]), "--merge", "--out", str(tmp_path / "auto"), *FAST]) == 0
    assert read_report(tmp_path / "auto")["backend"] == "torch"
    capsys.readouterr()
    assert main([str(ckpts["unknown"]), "--merge", "--backend", "optimum", "--out", str(tmp_path / "o"), *FAST]) == 2
    why = ("no ONNX config for model type 'roberta-prelayernorm'" if auto_backend() == "optimum"
           else "optimum-onnx is not installed")
    assert why in capsys.readouterr().err and not (tmp_path / "o" / "model.onnx").exists()


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
    real_fold = export_onnx.fold_in_place

    def off_by_a_bit(model, **options):  # a fold bug the per-layer check cannot see: the model is changed after it
        layers = real_fold(model, **options)
        weight = model.get_submodule(layers[0].name).weight
        with torch.no_grad():  # random, not constant: a constant row offset vanishes on LayerNorm'd inputs
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        return layers

    monkeypatch.setattr(export_onnx, "fold_in_place", off_by_a_bit)
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
    (["--max-overhead", "0"], "--max-overhead 0.0: must be a positive, finite ratio"),
    (["--max-overhead", "nan"], "--max-overhead nan: must be a positive, finite ratio"),
    (["--max-overhead", "inf"], "--max-overhead inf: must be a positive, finite ratio"),
    (["--opset", "99"], "--opset 99: the installed onnx knows opsets up to"),
    (["--max-overhead", "2", "--no-latency"], "--max-overhead needs the latency measurement"),
])
def test_bad_options_exit_2(argv: list[str], message: str, ckpts, capsys, tmp_path: Path) -> None:
    before = {path: path.read_bytes() for path in ckpts["bert"].rglob("*") if path.is_file()}
    assert main([str(ckpts["bert"]), "--merge", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert {path: path.read_bytes() for path in ckpts["bert"].rglob("*") if path.is_file()} == before
    assert not (tmp_path / "out").exists(), "nothing is written for unusable options"


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nowhere"), "--merge"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_a_base_without_tokenizer_exports_with_a_warning(tmp_path: Path, capsys) -> None:
    base = save_tiny_model("bert", tmp_path / "base")
    ckpt = make_checkpoint(base, "cla", tmp_path / "ckpt", "bert")
    assert main([str(ckpt), "--merge", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "[1/6] loading the checkpoint" in printed and "export passed" in printed
    assert f"warning: {base} has no tokenizer files" in printed
    assert (ckpt / "onnx" / "model.onnx").is_file() and not (ckpt / "onnx" / "tokenizer.json").exists()


# ---- the output folder: an export deletes only what an export wrote ------------------------------------------------
def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def users_folder(folder: Path) -> Path:
    (folder / "fp16").mkdir(parents=True)
    (folder / "notes.onnx").write_bytes(b"a user's own graph")
    (folder / "fp16" / "keep.txt").write_text("a user's file where the fp16 variant goes")
    return folder


def test_a_folder_of_someone_elses_files_is_refused_untouched(ckpts, tmp_path: Path, capsys) -> None:
    out = users_folder(tmp_path / "mine")
    before = tree(out)
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: the folder holds files no export wrote" in err and "--overwrite" in err
    assert "notes.onnx" in err and tree(out) == before


def test_overwrite_exports_into_it_and_deletes_none_of_its_files(ckpts, tmp_path: Path) -> None:
    out = users_folder(tmp_path / "mine")
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), "--overwrite", "--no-latency"]) == 0
    assert (out / "notes.onnx").read_bytes() == b"a user's own graph"
    assert (out / "fp16" / "keep.txt").is_file() and (out / "fp16" / "model.onnx").is_file()
    written = json.loads((out / RECORD).read_text())["files"]
    assert "model.onnx" in written and "fp16/model.onnx" in written
    assert "notes.onnx" not in written and "fp16/keep.txt" not in written


def test_a_second_export_replaces_the_first_exports_files_and_only_those(ckpts, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), "--no-latency"]) == 0  # with the fp16 variant
    (out / "mine.txt").write_text("added by the user after the export")
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), *FAST, "--overwrite"]) == 0
    assert not (out / "fp16").exists(), "the first export's fp16 variant is gone"
    assert (out / "mine.txt").read_text() == "added by the user after the export"
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), *FAST, "--overwrite"]) == 0
    assert (out / "mine.txt").is_file() and (out / "model.onnx").is_file()


def test_a_damaged_record_is_refused_naming_it(ckpts, tmp_path: Path, capsys) -> None:
    out = tmp_path / "onnx"
    out.mkdir()
    (out / RECORD).write_text('{"files": ["../../etc/passwd"]}')
    before = tree(out)
    assert main([str(ckpts["bert"]), "--merge", "--out", str(out), *FAST]) == 2
    assert "lists paths outside the folder" in capsys.readouterr().err and tree(out) == before
