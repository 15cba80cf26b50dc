"""export/exporters.py: which backend each architecture takes, the torch exporter's parity with and without the KV
cache on every supported architecture, the folders that optimum's ORTModel classes load (where the [optimum] extra is
installed), and external data in one file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    OpenAIGPTConfig,
    RobertaPreLayerNormConfig,
)

from export.exporters import (
    EXTERNAL_DATA_FILE,
    ExportError,
    OptimumBackend,
    choose_backend,
    export_model,
    model_task,
    save_single_file,
    uses_external_data,
)
from export.reference import record_reference
from export.verify import verify_export
from surgery.tolerances import MODEL
from tests.export.checkpoints import single_torch_thread  # noqa: F401  (fixture)
from tests.export.checkpoints import save_lively_base
from tests.export.tiny_exports import auto_backend, bert_encoder, lively_gpt2
from tests.tiny_models import ARCHITECTURES, DECODERS, MORE_DECODERS, random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOL = MODEL[torch.float32]


def quiet(_: str) -> None:
    pass


def encoder_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = random_ids(batch, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def unknown_encoder() -> torch.nn.Module:
    """A seq-cls model type optimum-onnx has no ONNX config for."""
    torch.manual_seed(0)
    config = RobertaPreLayerNormConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                       intermediate_size=64, max_position_embeddings=80, pad_token_id=1)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()


def unknown_decoder() -> torch.nn.Module:
    """A causal LM (Conv1D layers) optimum-onnx has no ONNX config for."""
    torch.manual_seed(0)
    config = OpenAIGPTConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # logits of a few units, so greedy decoding has clear winners
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(15)
    return model


def test_the_exported_config_names_the_exported_class(tmp_path: Path) -> None:
    """A base saved as BertModel and loaded for seq-cls keeps architectures ["BertModel"] in its config; the export's
    config.json must say BertForSequenceClassification, or export.run (without a report) takes it for features."""
    import json

    from export.run import SEQ_CLS, declared_task
    from transformers import AutoConfig

    model = tiny_model("bert")
    model.config.architectures = ["BertModel"]
    graph = export_model(model, tmp_path, backend="torch", log=quiet)
    written = json.loads((graph.folder / "config.json").read_text())
    assert written["architectures"] == [type(model).__name__] == ["BertForSequenceClassification"]
    assert declared_task(graph.folder, AutoConfig.from_pretrained(graph.folder)) == SEQ_CLS


@pytest.mark.compat
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_optimum_takes_every_tiny_architecture_where_installed(arch: str) -> None:
    pytest.importorskip("optimum.exporters.onnx", reason="the [optimum] extra (compat job)")
    model = tiny_model(arch)
    assert choose_backend(model, model_task(model), log=quiet).name == "optimum"


def test_auto_takes_the_torch_exporter_without_optimum(monkeypatch) -> None:
    monkeypatch.setattr(OptimumBackend, "missing", staticmethod(lambda: "optimum-onnx is not installed (test)"))
    said: list[str] = []
    assert choose_backend(tiny_model("llama"), "causal-lm", log=said.append).name == "torch"
    assert said == []  # nothing to fall back from
    with pytest.raises(ExportError, match=r"optimum-onnx is not installed \(test\).*--backend torch"):
        choose_backend(tiny_model("llama"), "causal-lm", backend="optimum", log=quiet)


@pytest.mark.parametrize("make", [unknown_encoder, unknown_decoder])
def test_unknown_architectures_export_with_torch_and_verify(make, tmp_path: Path) -> None:
    model, said = make(), []
    graph = export_model(model, tmp_path, log=said.append)
    assert graph.backend == "torch" and not graph.with_past  # OpenAI GPT returns no cache
    if auto_backend() == "optimum":
        assert "no ONNX config" in said[0] and "exporting with torch.onnx" in said[0]
    parity = verify_export(graph, record_reference(model, graph.task), TOL)
    assert parity.passed, parity.failure()
    assert parity.greedy_match is (True if graph.task == "causal-lm" else None)
    assert (tmp_path / "config.json").is_file()


def test_optimum_without_fallback_names_the_architecture(tmp_path: Path) -> None:
    why = "optimum-onnx is not installed" if OptimumBackend.missing() else (
        "no ONNX config for model type 'roberta-prelayernorm'")
    with pytest.raises(ExportError, match=f"{why}.*--backend auto"):
        export_model(unknown_encoder(), tmp_path, backend="optimum", log=quiet)
    with pytest.raises(ExportError, match="unknown backend 'tvm'"):
        export_model(unknown_encoder(), tmp_path, backend="tvm", log=quiet)


@pytest.mark.compat
@pytest.mark.parametrize("arch", DECODERS + MORE_DECODERS)
def test_decoders_export_with_the_kv_cache(arch: str, tmp_path: Path) -> None:
    """Parity at two shapes, a cached step on each, and 20 greedy tokens on the cache equal to generate()."""
    model = AutoModelForCausalLM.from_pretrained(save_lively_base(arch, tmp_path / "base")).eval()
    graph = export_model(model, tmp_path / "onnx", backend="torch", log=quiet)
    assert graph.with_past
    inputs = [arg.name for arg in ort.InferenceSession(str(graph.model_file)).get_inputs()]
    layers = model.config.num_hidden_layers
    assert inputs == ["input_ids", "attention_mask", "position_ids",
                      *[f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]]
    parity = verify_export(graph, record_reference(model, graph.task), TOL)
    assert parity.passed, parity.failure()
    assert [case.case.startswith("cached step") for case in parity.cases] == [False, True, False, True]
    assert parity.greedy_match is True and len(set(parity.greedy["expected"])) > 2, parity.greedy


@pytest.mark.compat
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_encoders_export_with_torch(arch: str, tmp_path: Path) -> None:
    model = tiny_model(arch)
    graph = export_model(model, tmp_path, backend="torch", log=quiet)
    parity = verify_export(graph, record_reference(model, graph.task), TOL)
    assert parity.passed, parity.failure()
    assert len(parity.cases) == 2 and not graph.with_past  # batch 1 and 3, two sequence lengths


@pytest.mark.compat
def test_seq_cls_folder_loads_in_ort_sequence_classification(tmp_path: Path) -> None:
    ort_model = pytest.importorskip("optimum.onnxruntime", reason="the [optimum] extra (compat job)")
    model = tiny_model("bert")
    export_model(model, tmp_path, backend="torch", log=quiet)
    inputs = encoder_inputs(2, 6)
    ort_logits = ort_model.ORTModelForSequenceClassification.from_pretrained(tmp_path)(**inputs).logits
    with torch.no_grad():
        torch.testing.assert_close(ort_logits, model(**inputs).logits, atol=TOL.atol, rtol=TOL.rtol)


@pytest.mark.compat
def test_feature_extraction_folder_loads_in_ort_feature_extraction(tmp_path: Path) -> None:
    ort_model = pytest.importorskip("optimum.onnxruntime", reason="the [optimum] extra (compat job)")
    model = bert_encoder()
    graph = export_model(model, tmp_path, log=quiet)
    assert graph.task == "feature-extraction" and graph.backend == "optimum"
    inputs = encoder_inputs(3, 5)
    hidden = ort_model.ORTModelForFeatureExtraction.from_pretrained(tmp_path)(**inputs).last_hidden_state
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=TOL.atol, rtol=TOL.rtol)
    assert verify_export(graph, record_reference(model, graph.task), TOL).passed


@pytest.mark.compat
def test_feature_extraction_with_torch(tmp_path: Path) -> None:
    model = bert_encoder()
    graph = export_model(model, tmp_path, backend="torch", log=quiet)
    assert graph.task == "feature-extraction"
    assert verify_export(graph, record_reference(model, graph.task), TOL).passed


def test_external_data_is_gathered_into_model_onnx_data(tmp_path: Path) -> None:
    """A graph whose exporter kept one file per tensor comes out as model.onnx + model.onnx_data."""
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    scattered = tmp_path / "scattered"
    scattered.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(scattered / "model.onnx"),
              save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    save_single_file(scattered / "model.onnx", target)
    assert uses_external_data(target) and (target.parent / EXTERNAL_DATA_FILE).is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", EXTERNAL_DATA_FILE]
    x = np.ones((2, 64), np.float32)
    y = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5)
