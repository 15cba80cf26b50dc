"""export/tensorrt.py: op coverage against onnx-tensorrt's table, profiles, the trtexec line, the fp16 variant."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export.tensorrt import TRT_ONNX_OPS, fp16_variant, op_types, suggest_profile, trt_readiness
from surgery.tolerances import MODEL
from tests.export.tiny_exports import labelled_bert, lively_gpt2, project_export, uncached_decoder_export
from tests.tiny_models import random_ids


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt_bert")
    return project_export(labelled_bert(), folder, encoder=True) / "model.onnx"


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory):
    """(with KV cache, without) exports of one lively tiny GPT-2."""
    model = lively_gpt2()
    with_past = project_export(model, tmp_path_factory.mktemp("gpt2_past"), encoder=False)
    no_past = uncached_decoder_export(model, tmp_path_factory.mktemp("gpt2"))
    return with_past, no_past


def _save(graph: onnx.GraphProto, path, opsets=(("", 17),), functions=()) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              functions=list(functions))
    onnx.save(model, str(path))
    return path


def _matrix(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", 4])


def test_contrib_op_is_flagged(tmp_path):
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft", alpha=1.0)
    graph = helper.make_graph([node], "fused", [_matrix("a"), _matrix("b")], [_matrix("y")])
    path = _save(graph, tmp_path / "fused.onnx", opsets=(("", 17), ("com.microsoft", 1)))
    profile = {name: {"min": [1, 4], "opt": [2, 4], "max": [8, 4]} for name in ("a", "b")}
    readiness = trt_readiness(path, 17, sparse_2_4=False, profile=profile)
    assert readiness["unsupported_ops"] == ["com.microsoft.FusedMatMul"]
    assert readiness["opset_ok"] and not readiness["ready"]
    assert readiness["dynamic_axes"] == {"a": {0: "batch_size"}, "b": {0: "batch_size"}, "y": {0: "batch_size"}}


def test_ops_inside_subgraphs_and_functions_are_seen(tmp_path):
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "then", [],
                               [helper.make_tensor_value_info("u", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["v"])], "else", [],
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    function = helper.make_function("local", "Twice", ["t"], ["r"], [helper.make_node("Mish", ["t"], ["r"])],
                                    opset_imports=[helper.make_opsetid("", 18)])
    nodes = [helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=other),
             helper.make_node("Twice", ["x"], ["w"], domain="local")]
    graph = helper.make_graph(nodes, "nested", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                                helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])])
    path = _save(graph, tmp_path / "nested.onnx", opsets=(("", 18), ("local", 1)), functions=[function])
    assert op_types(onnx.load(path)) == {"If", "Unique", "Identity", "Mish"}  # the function call is inlined
    assert trt_readiness(path, 18, False, {})["unsupported_ops"] == ["Unique"]  # "N" in operators.md


def test_table_has_the_transformer_ops_and_no_contrib_ops():
    transformer_ops = {"Add", "Mul", "MatMul", "Gemm", "Softmax", "LayerNormalization", "Gather", "Reshape",
                       "Transpose", "Concat", "Slice", "Cast", "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Where",
                       "Expand", "Shape", "Unsqueeze", "Squeeze", "ReduceMean", "Pow", "Sqrt", "Div", "Sub", "Equal",
                       "Range", "Trilu", "ConstantOfShape", "ScatterND"}
    assert transformer_ops <= TRT_ONNX_OPS
    assert not {"FusedMatMul", "SkipLayerNormalization", "Attention", "Unique", "Compress"} & TRT_ONNX_OPS
    assert len(TRT_ONNX_OPS) == 150  # the "Y" rows of operators.md at the onnx-tensorrt 10.1 GA commit


def test_clean_opset17_export_is_ready(bert_onnx):
    profile = suggest_profile(bert_onnx)
    readiness = trt_readiness(bert_onnx, 17, sparse_2_4=False, profile=profile)
    assert readiness["unsupported_ops"] == []
    assert readiness["opset_ok"] and readiness["ready"], readiness["problems"]
    assert readiness["dynamic_axes"]["input_ids"] == {0: "batch_size", 1: "sequence_length"}
    assert profile["input_ids"] == {"min": [1, 1], "opt": [1, 128], "max": [8, 512]}


def test_opset_below_17_is_not_ready(bert_onnx):
    readiness = trt_readiness(bert_onnx, 16, sparse_2_4=False, profile=suggest_profile(bert_onnx))
    assert not readiness["opset_ok"] and not readiness["ready"]


@pytest.mark.parametrize("sparse", [False, True])
def test_trtexec_names_every_dynamic_input(gpt2_folders, sparse):
    path = gpt2_folders[0] / "model.onnx"
    profile = suggest_profile(path, max_batch=4, opt_seq=16, max_seq=64)
    readiness = trt_readiness(path, 17, sparse_2_4=sparse, profile=profile)
    command = readiness["trtexec"]
    assert command.startswith(f"trtexec --onnx={path} ") and "--fp16" in command
    assert ("--sparsity=enable" in command) == sparse
    dynamic_inputs = {i.name for i in ort.InferenceSession(str(path)).get_inputs()}
    assert "past_key_values.0.key" in dynamic_inputs and set(profile) == dynamic_inputs
    flags = dict(part.split("=", 1) for part in command.split() if "Shapes=" in part)
    for flag, key in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
        named = dict(entry.rsplit(":", 1) for entry in flags[flag].split(","))
        assert set(named) == dynamic_inputs
        assert all(named[name] == "x".join(map(str, profile[name][key])) for name in named)
    assert profile["past_key_values.0.key"]["min"] == [1, 4, 0, 8]  # empty cache on the first step
    assert profile["attention_mask"]["max"] == [4, 128]  # past_sequence_length + sequence_length
    assert readiness["ready"], readiness["problems"]


def test_profile_missing_an_input_is_not_ready(bert_onnx):
    profile = suggest_profile(bert_onnx)
    del profile["token_type_ids"]
    readiness = trt_readiness(bert_onnx, 17, False, profile)
    assert not readiness["ready"] and any("token_type_ids" in p for p in readiness["problems"])


def test_unnamed_dynamic_axis_asks_for_a_hand_written_profile(tmp_path):
    odd = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n_points", 3])
    path = _save(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "odd", [odd], [odd]), tmp_path / "o.onnx")
    with pytest.raises(ValueError, match="'x' axis 0 .*by hand"):
        suggest_profile(path)


def _fp16_check(fp32_path, fp16_path):
    """fp16 and fp32 logits on one left-padded batch of the no-cache GPT-2, within the float16 model tolerance, at
    the real tokens (a padding position attends to nothing: its logits are undefined in both)."""
    ids = random_ids(2, 12).numpy()
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    values = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}
    feed = {arg.name: values[arg.name] for arg in ort.InferenceSession(str(fp32_path)).get_inputs()}
    reference = ort.InferenceSession(str(fp32_path)).run(["logits"], feed)[0]
    half = ort.InferenceSession(str(fp16_path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    tolerance = MODEL[torch.float16]
    real = mask.astype(bool)
    assert np.abs(reference[real]).max() > 20 * tolerance.atol  # logits large enough for the check to mean much
    assert half.dtype == np.float32  # keep_io_types
    np.testing.assert_allclose(half[real], reference[real], atol=tolerance.atol, rtol=tolerance.rtol)


def test_fp16_variant_runs_on_cpu_and_matches_fp32(gpt2_folders, tmp_path):
    source = gpt2_folders[1] / "model.onnx"
    out = fp16_variant(source, tmp_path / "model_fp16.onnx")
    converted = onnx.load(out)
    assert any(init.data_type == TensorProto.FLOAT16 for init in converted.graph.initializer)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in converted.graph.output)
    _fp16_check(source, out)


def test_fp16_variant_keeps_external_data(gpt2_folders, tmp_path):
    source = tmp_path / "external" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(gpt2_folders[1] / "model.onnx"), str(source), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    out = fp16_variant(source, tmp_path / "half" / "model.onnx")
    assert (out.parent / "model.onnx.data").is_file()
    assert any(init.data_location == TensorProto.EXTERNAL for init in onnx.load(out, load_external_data=False)
               .graph.initializer)
    _fp16_check(source, out)


def test_fp16_op_without_cpu_kernel_stays_float32(gpt2_folders, tmp_path, monkeypatch):
    """If the CPU provider lacks a float16 kernel, the op joins the block list and the conversion is redone."""
    import export.tensorrt as tensorrt

    errors = iter(["[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                   "LayerNormalization(17) node with name '/ln_f/LayerNormalization'", None])
    monkeypatch.setattr(tensorrt, "_cpu_session_error", lambda path: next(errors))
    converted = onnx.load(fp16_variant(gpt2_folders[1] / "model.onnx", tmp_path / "blocked.onnx"))
    inferred = onnx.shape_inference.infer_shapes(converted).graph
    dtypes = {value.name: value.type.tensor_type.elem_type for value in inferred.value_info}
    norms = [node for node in inferred.node if node.op_type == "LayerNormalization"]
    assert norms and all(dtypes[node.output[0]] == TensorProto.FLOAT for node in norms)  # computes in float32
    assert any(dtypes[node.output[0]] == TensorProto.FLOAT16 for node in inferred.node if node.op_type == "MatMul")
