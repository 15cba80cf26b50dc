"""``python -m export.onnx CKPT --merge --quantize int8|int4``: the quantization stage (export.quantize), its
task-level verification (export.quality), the quantized folders export.run loads, and every refused combination."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export.quantize as quantize_module
from export.onnx import ExportFailed, export_checkpoint, main
from export.quality import BATCH, quality_error
from export.quantize import in_scope, residual_nodes
from export.report import REPORT_JSON, REPORT_MD
from export.run import OnnxPipeline
from tests.export.checkpoints import make_checkpoint, save_lively_base, single_torch_thread  # noqa: F401
from tests.export.tiny_exports import WORDS, word_tokenizer
from tests.fs import tree_digest

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FAST = dict(latency=False, fp16_check=False, log=lambda _: None)
EVAL_ROWS = 48


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) for _ in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def checkpoint(base: Path, arch: str, method: str, out: Path, data: dict | None) -> Path:
    """A checkpoint of ``method`` with every adapter tensor randomised (as if trained) and, with ``data``, a train
    section naming its data files (what export.quality reads the eval rows from)."""
    train = None if data is None else {"data": {**data, "max_length": 16}, "epochs": 1}
    return make_checkpoint(base, method, out, arch, train=train)


@torch.no_grad()
def pytorch_labels(ckpt: Path, texts: list[str]) -> list[int]:
    """The unfolded PyTorch model's predicted labels (what the fp32 export reproduces)."""
    from surgery.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt).model.eval()
    encoded = word_tokenizer(encoder=True)(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    return model(**encoded).logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def bert_ckpt(root: Path) -> Path:
    """ProDA (a gated residual path) on a lively BERT; eval labels = the PyTorch model's own predictions, so the fp32
    export's accuracy is 1 and the quantized export's is its agreement."""
    base = save_lively_base("bert", root / "base_bert")
    texts = sentences(EVAL_ROWS, seed=1)
    train = write_jsonl(root / "train.jsonl", [{"text": t, "label": 0} for t in sentences(8, seed=2)])
    placeholder = write_jsonl(root / "eval.jsonl", [{"text": t, "label": 0} for t in texts])
    ckpt = checkpoint(base, "bert", "proda", root / "ckpt_bert", {"train": str(train), "eval": str(placeholder)})
    write_jsonl(placeholder, [{"text": t, "label": y} for t, y in zip(texts, pytorch_labels(ckpt, texts),
                                                                      strict=True)])
    return ckpt


@pytest.fixture(scope="module")
def gpt2_ckpt(root: Path) -> Path:
    """LoDA (a non-linear residual path) on a lively GPT-2 (Conv1D layers), with eval texts."""
    base = save_lively_base("gpt2", root / "base_gpt2")
    train = write_jsonl(root / "lm.jsonl", [{"text": t} for t in sentences(24, seed=4)])
    return checkpoint(base, "gpt2", "loda", root / "ckpt_gpt2", {"train": str(train)})


@pytest.fixture(scope="module")
def bert_int8(root: Path, bert_ckpt: Path) -> dict:
    return export_checkpoint(bert_ckpt, root / "bert_int8", quantize="int8", **FAST)


@pytest.fixture(scope="module")
def gpt2_int4(root: Path, gpt2_ckpt: Path) -> dict:
    return export_checkpoint(gpt2_ckpt, root / "gpt2_int4", quantize="int4", block_size=16, **FAST)


def graph(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "model.onnx"))


# ---- int8 ---------------------------------------------------------------------------------------------------------
def test_int8_quantizes_the_merged_matmuls_and_keeps_the_residual_paths_float(root: Path, bert_int8: dict) -> None:
    model = graph(root / "bert_int8")
    ops = {node.name: node.op_type for node in model.graph.node}
    kept = bert_int8["quantization"]["float_nodes"]["layers"]
    assert sorted(kept) == sorted(layer["name"] for layer in bert_int8["layers"])  # every ProDA layer has a residual
    kept_names = {name for names in kept.values() for name in names}
    # ProDA's down-projection and gate (one per layer, or one shared by q and v) stay float32 MatMuls
    assert sum(ops[name] == "MatMul" for name in kept_names) >= 2 * len(kept) // 2
    for layer in kept:
        merged = [node.op_type for node in model.graph.node if in_scope(node.name, layer)
                  and node.name not in kept_names and node.op_type in ("MatMulInteger", "MatMul")]
        assert merged == ["MatMulInteger"], layer  # the merged [W' | up] matmul, and only it, is int8
    assert "MatMul" not in {ops[n] for n in ops if "intermediate/dense" in n}  # base layers outside: int8 too
    assert bert_int8["quantization"]["ops"]["MatMulInteger"] >= 6
    assert bert_int8["quantization"]["size"]["ratio"] < 1
    assert bert_int8["files"] == {"model": "model.onnx"}
    assert not list((root / "bert_int8").glob(".fp32_export.*"))  # the scratch fp32 graph is gone


def test_int8_quality_is_measured_on_the_checkpoint_eval_data(root: Path, bert_ckpt: Path, bert_int8: dict) -> None:
    quality = bert_int8["quantization"]["quality"]
    assert quality["data"].endswith(f"eval.jsonl ({EVAL_ROWS} rows)")
    assert quality["rows"] == EVAL_ROWS
    # labels are the PyTorch model's predictions: the verified fp32 export gets them all, the int8 one its agreement
    assert quality["accuracy_fp32"] == pytest.approx(1.0, abs=1.5 / EVAL_ROWS)
    assert quality["accuracy_quantized"] == pytest.approx(quality["label_agreement"], abs=1.5 / EVAL_ROWS)
    assert quality["accuracy_delta_points"] == pytest.approx(
        100 * (quality["accuracy_quantized"] - quality["accuracy_fp32"]))
    # the quantized folder's own predictions, run independently in the same batches, give the reported accuracy
    # (dynamic int8 scales each activation over the whole batch, so the batches must be the same ones)
    pipeline = OnnxPipeline.from_dir(root / "bert_int8")
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    predicted = [pipeline.config.label2id[r["label"]] for start in range(0, len(rows), BATCH)
                 for r in pipeline.classify([row["text"] for row in rows[start:start + BATCH]])]
    accuracy = float(np.mean([p == row["label"] for p, row in zip(predicted, rows, strict=True)]))
    assert accuracy == pytest.approx(quality["accuracy_quantized"], abs=1e-9)


def test_the_report_and_summary_name_the_quantization(root: Path, bert_int8: dict) -> None:
    on_disk = json.loads((root / "bert_int8" / REPORT_JSON).read_text())
    assert on_disk["passed"] and on_disk["quantization"]["settings"]["kind"] == "int8"
    markdown = (root / "bert_int8" / REPORT_MD).read_text()
    assert "## Quantization" in markdown and "residual paths stay float32" in markdown
    assert "labels agreeing with fp32" in markdown and "fp32 -> int8" in markdown
    from export.report import summary

    lines = summary(bert_int8).splitlines()
    assert "fp32 -> int8" in lines[0] and any(line.startswith("  quantized: size") for line in lines)


def test_export_run_classifies_with_the_int8_folder(root: Path, bert_int8: dict, capsys) -> None:
    from export.run import main as run_main

    assert run_main([str(root / "bert_int8"), "--text", "the cat sat on the mat"]) == 0
    assert "'the cat sat on the mat':" in capsys.readouterr().out


def test_latency_of_a_quantized_export_is_against_the_fp32_base(root: Path, bert_ckpt: Path) -> None:
    report = export_checkpoint(bert_ckpt, root / "bert_int8_latency", quantize="int8", fp16_check=False,
                               log=lambda _: None)
    assert report["latency"]["base_ort_ms"] > 0 and report["latency"]["ort_ms"] > 0
    assert report["tensorrt"]["fp16"] is None if "fp16" in report["tensorrt"] else True
    assert not (root / "bert_int8_latency" / "fp16").exists()  # a quantized export ships no fp16 variant


# ---- int4 decoders ------------------------------------------------------------------------------------------------
def test_int4_decoder_exports_verifies_and_generates(root: Path, gpt2_int4: dict) -> None:
    section = gpt2_int4["quantization"]
    assert section["ops"].get("MatMulNBits", 0) >= 4
    quality = section["quality"]
    assert quality["data"].startswith(str(root / "lm.jsonl")) and "held-out" in quality["data"]
    assert quality["perplexity_ratio"] == pytest.approx(quality["perplexity_quantized"] / quality["perplexity_fp32"])
    assert 0 <= quality["greedy_agreement"] <= 1 and quality["greedy_new_tokens"] == 20
    # LoDA's residual path (A, M1, M2, B around its non-linearity) stays float32 MatMuls
    ops = {node.name: node.op_type for node in graph(root / "gpt2_int4").graph.node}
    for names in section["float_nodes"]["layers"].values():
        assert [ops[n] for n in names if ops[n] in ("MatMul", "MatMulNBits")].count("MatMul") >= 2
        assert "MatMulNBits" not in {ops[n] for n in names}
    pipeline = OnnxPipeline.from_dir(root / "gpt2_int4")
    assert pipeline.cached
    new = pipeline.generate_ids(np.array([[4, 5, 6, 7]]), max_new_tokens=6)
    assert new.shape == (1, 6)


def test_export_run_generates_with_the_int4_folder(root: Path, gpt2_int4: dict, capsys) -> None:
    from export.run import main as run_main

    assert run_main([str(root / "gpt2_int4"), "--text", "the dog ran", "--max-new-tokens", "5"]) == 0
    assert "'the dog ran' ->" in capsys.readouterr().out


# ---- the gate -----------------------------------------------------------------------------------------------------
def test_max_quality_drop_fails_the_export_with_the_figures(root: Path, bert_ckpt: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import export.quality as quality_module

    real = quality_module.seq_cls_quality

    def two_points_lost(*args, **kwargs) -> dict:  # the measured figures, as if int8 had missed one row in 50
        measured = real(*args, **kwargs)
        return {**measured, "accuracy_quantized": measured["accuracy_fp32"] - 0.02, "accuracy_delta_points": -2.0,
                "drop": 2.0}

    monkeypatch.setattr(quality_module, "seq_cls_quality", two_points_lost)
    out = root / "gated"
    assert main([str(bert_ckpt), "--merge", "--quantize", "int8", "--max-quality-drop", "1", "--out", str(out),
                 "--no-latency", "--no-fp16-check"]) == 1
    err = capsys.readouterr().err
    assert "the quantized export loses 2 accuracy points against the fp32 export on" in err
    assert "eval.jsonl (48 rows), beyond --max-quality-drop 1" in err
    report = json.loads((out / REPORT_JSON).read_text())
    assert not report["passed"] and report["quantization"]["errors"] == report["errors"]
    assert quality_error({"drop": 0.5, "drop_unit": "accuracy points", "data": "x"}, 1.0) is None


def test_max_quality_drop_without_eval_data_says_so(root: Path, capsys) -> None:
    base = save_lively_base("bert", root / "base_bert_nodata", seed=2)
    ckpt = checkpoint(base, "bert", "lora", root / "ckpt_nodata", None)
    out = root / "nodata_int8"
    assert main([str(ckpt), "--merge", "--quantize", "int8", "--max-quality-drop", "1", "--out", str(out),
                 "--no-latency", "--no-fp16-check"]) == 1
    err = capsys.readouterr().err
    assert "--max-quality-drop 1: the quality drop needs the checkpoint's eval data" in err
    assert "no train.data section" in err
    report = json.loads((out / REPORT_JSON).read_text())
    assert not report["passed"] and report["quantization"]["quality"]["label_agreement"] is not None


def test_a_quantizer_failure_keeps_the_verified_fp32_export(root: Path, bert_ckpt: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(quantize_module, "quantize_int8", broken)
    out = root / "broken"
    with pytest.raises(ExportFailed, match="onnxruntime's int8 quantizer failed on .*no kernel for this; the fp32 "
                                           "export is kept"):
        export_checkpoint(bert_ckpt, out, quantize="int8", **FAST)
    ops = {node.op_type for node in graph(out).graph.node}
    assert "MatMulInteger" not in ops and "MatMul" in ops
    assert not json.loads((out / REPORT_JSON).read_text())["passed"]
    assert not list(out.glob(".fp32_export.*"))


def test_residual_nodes_keep_the_merged_weight_out() -> None:
    from onnx import TensorProto, helper

    from export.fold import LayerFold

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, [rows, cols], [0.0] * rows * cols)

    nodes = [helper.make_node("MatMul", ["x", "w_down"], ["d"], name="/m/enc/layer.0/q/down/MatMul"),
             helper.make_node("Relu", ["d"], ["r"], name="/m/enc/layer.0/q/Relu"),
             helper.make_node("MatMul", ["x", "w_merged"], ["y"], name="/m/enc/layer.0/q/MatMul"),
             helper.make_node("MatMul", ["x", "w_other"], ["z"], name="/m/enc/layer.0/qk/MatMul")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], [weight("w_down", 8, 4),
                                                                      weight("w_merged", 12, 8),
                                                                      weight("w_other", 8, 8)]))
    record = LayerFold(name="enc.layer.0.q", method="any", folded=True, residual="gate", note="dense",
                       fold_error=0.0, macs_per_token=0, base_macs_per_token=64, sparse_2_4=False)
    assert residual_nodes(model, [record]) == {"enc.layer.0.q": ["/m/enc/layer.0/q/down/MatMul",
                                                                 "/m/enc/layer.0/q/Relu"]}
    # a sibling group's stacked down-projection in the same scope, itself past d_in x d_out on a tiny model: float
    nodes.insert(0, helper.make_node("MatMul", ["x", "w_group"], ["s"], name="/m/enc/layer.0/q/group/down/MatMul"))
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], [weight("w_down", 8, 4), weight("w_group", 8, 9),
                                                                      weight("w_merged", 12, 8),
                                                                      weight("w_other", 8, 8)]))
    assert residual_nodes(model, [record]) == {"enc.layer.0.q": ["/m/enc/layer.0/q/group/down/MatMul",
                                                                 "/m/enc/layer.0/q/down/MatMul",
                                                                 "/m/enc/layer.0/q/Relu"]}
    missing = LayerFold(**{**record.as_dict(), "name": "enc.layer.1.q"})
    with pytest.raises(quantize_module.QuantizeError, match="layer 'enc.layer.1.q' .* no node of the exported graph"):
        residual_nodes(model, [missing])


# ---- refused before anything is written ---------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "message"), [
    (["--quantize", "int8"], "--quantize int8 needs --merge"),
    (["--merge", "--quantize", "int8", "--dtype", "fp16"], "--quantize int8 with --dtype fp16: the quantizers start "
                                                           "from the fp32 export"),
    (["--merge", "--max-quality-drop", "1"], "--max-quality-drop needs --quantize int8 or int4"),
    (["--merge", "--block-size", "32"], "--block-size needs --quantize int4"),
    (["--merge", "--quantize", "int8", "--block-size", "32"], "--block-size 32: only --quantize int4 has blocks"),
    (["--merge", "--quantize", "int4", "--block-size", "48"], "--block-size 48: MatMulNBits needs a power of two"),
    (["--merge", "--quantize", "int4", "--block-size", "8"], "--block-size 8: MatMulNBits needs a power of two >= 16"),
    (["--merge", "--quantize", "int8", "--max-quality-drop", "-1"], "--max-quality-drop -1.0: must be a finite"),
])
def test_bad_combinations_are_refused_before_anything_is_written(root: Path, bert_ckpt: Path, flags: list[str],
                                                                 message: str, capsys) -> None:
    before = tree_digest(bert_ckpt)
    out = root / "refused"
    assert main([str(bert_ckpt), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and tree_digest(bert_ckpt) == before


def test_an_unknown_quantization_is_refused_by_the_parser(bert_ckpt: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(bert_ckpt), "--merge", "--quantize", "int3"])
    assert exit_info.value.code == 2
    assert "--quantize: invalid choice: 'int3'" in capsys.readouterr().err


def test_int8_decoder_quantizes_gpt2_conv1d_layers(root: Path, gpt2_ckpt: Path) -> None:
    """GPT-2's Conv1D layers export as Gemm, which onnxruntime's dynamic int8 skips: they are rewritten as MatMul +
    Add first, so they are quantized like every other linear layer."""
    report = export_checkpoint(gpt2_ckpt, root / "gpt2_int8", quantize="int8", **FAST)
    ops = report["quantization"]["ops"]
    assert "Gemm" not in ops and ops["MatMulInteger"] >= 8  # 2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj)
    assert report["quantization"]["quality"]["perplexity_ratio"] > 0
    pipeline = OnnxPipeline.from_dir(root / "gpt2_int8")
    assert pipeline.generate_ids(np.array([[4, 5, 6]]), max_new_tokens=4).shape == (1, 4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_large_export_keeps_its_weights_in_model_onnx_data(root: Path, gpt2_ckpt: Path, kind: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Past protobuf's 2 GiB (here: any size) every intermediate and the quantized graph keep their weights in an
    external file, the exporter's ``model.onnx_data`` (onnxruntime's quantizers write ``model.onnx.data``)."""
    monkeypatch.setattr(quantize_module, "PROTOBUF_SAFE_BYTES", 0)
    out = root / f"gpt2_{kind}_external"
    report = export_checkpoint(gpt2_ckpt, out, quantize=kind, **FAST)
    assert report["files"] == {"model": "model.onnx", "external_data": "model.onnx_data"}
    assert sorted(p.name for p in out.glob("model.onnx*")) == ["model.onnx", "model.onnx_data"]
    assert (out / "model.onnx_data").stat().st_mode & 0o777 == (out / "model.onnx").stat().st_mode & 0o777
    size = report["quantization"]["size"]
    assert size["quantized_bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx_data").stat().st_size
    assert OnnxPipeline.from_dir(out).generate_ids(np.array([[4, 5, 6]]), max_new_tokens=3).shape == (1, 3)


def test_a_decoder_without_eval_data_is_checked_on_random_tokens_but_not_gated(root: Path) -> None:
    base = save_lively_base("gpt2", root / "base_gpt2_nodata", seed=5)
    ckpt = checkpoint(base, "gpt2", "lora", root / "ckpt_gpt2_nodata", None)
    report = export_checkpoint(ckpt, root / "gpt2_nodata_int4", quantize="int4", **FAST)
    quality = report["quantization"]["quality"]
    assert quality["data"].startswith("random tokens") and quality["perplexity_ratio"] > 0
    assert quality["drop"] is None  # random text has no quality to lose: nothing for --max-quality-drop to bound
    with pytest.raises(ExportFailed, match="the quality drop needs the checkpoint's eval data"):
        export_checkpoint(ckpt, root / "gpt2_nodata_gated", quantize="int4", max_quality_drop=5.0, **FAST)
