"""export/run.py against the PyTorch models it was exported from: classification, greedy generation, embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export.latency import ProviderError
from export.run import ExportFolderError, OnnxPipeline, main
from surgery.tolerances import MODEL
from tests.export.tiny_exports import (
    LABELS,
    bert_encoder,
    labelled_bert,
    lively_gpt2,
    project_export,
    uncached_decoder_export,
    word_tokenizer,
)

TOL = MODEL[torch.float32]
TEXTS = ["the cat sat on the mat", "a dog ran home"]
PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    model = labelled_bert()
    return model, project_export(model, tmp_path_factory.mktemp("bert"), encoder=True)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(torch model, folder with KV cache, folder without) of one lively tiny GPT-2."""
    model = lively_gpt2(seed=2)  # greedy from PROMPT: 10 tokens, 9 distinct (seed 0 repeats one token)
    with_past = project_export(model, tmp_path_factory.mktemp("gpt2_past"), encoder=False)
    no_past = uncached_decoder_export(model, tmp_path_factory.mktemp("gpt2"))
    return model, with_past, no_past


def test_classify_matches_torch_and_names_labels(bert):
    model, folder = bert
    pipeline = OnnxPipeline.from_dir(folder)
    assert pipeline.task == "seq-cls"
    results = pipeline.classify(TEXTS, text_pairs=["it was good", "not very bad"])
    encoded = word_tokenizer(encoder=True)(TEXTS, ["it was good", "not very bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded).logits.softmax(-1).numpy()
    for result, row in zip(results, expected, strict=True):
        assert list(result["probs"]) == list(LABELS.values())
        probs = np.array(list(result["probs"].values()))
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(probs, row, atol=TOL.atol, rtol=TOL.rtol)
        assert result["label"] == LABELS[int(row.argmax())]


def _torch_greedy(model, prompt_ids: np.ndarray, new_tokens: int) -> np.ndarray:
    ids = torch.from_numpy(prompt_ids)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, num_beams=1)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("cache", ["with_past", "no_past"])
def test_greedy_generation_equals_transformers(gpt2, cache):
    model, with_past, no_past = gpt2
    pipeline = OnnxPipeline.from_dir(with_past if cache == "with_past" else no_past)
    assert pipeline.cached == (cache == "with_past")  # one token a step on the cache, else the whole sequence
    prompt_ids = pipeline.tokenizer(PROMPT, return_tensors="np")["input_ids"]
    expected = _torch_greedy(model, prompt_ids, 10)
    assert len(set(expected[0].tolist())) > 2  # a decoding that does not just repeat one token
    np.testing.assert_array_equal(pipeline.generate_ids(prompt_ids, 10), expected)
    assert pipeline.generate(PROMPT, 10) == pipeline.tokenizer.decode(expected[0])


def test_embed_is_masked_mean_of_hidden_states(tmp_path):
    model = bert_encoder()
    folder = project_export(model, tmp_path, encoder=True)
    pipeline = OnnxPipeline.from_dir(folder)
    assert pipeline.task == "feature-extraction"
    encoded = pipeline.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"][..., None].float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(pipeline.embed(TEXTS), expected, atol=TOL.atol, rtol=TOL.rtol)
    with pytest.raises(ExportFolderError, match="classify\\(\\) needs a seq-cls export"):
        pipeline.classify(TEXTS)


def test_task_from_architectures_then_report(bert, tmp_path):
    folder = shutil.copytree(bert[1], tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    assert "architectures" not in config or not config["architectures"]  # so far the graph's outputs told the task
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert OnnxPipeline.from_dir(folder).task == "feature-extraction"  # what config.json says wins over the graph
    (folder / "export_report.json").write_text(json.dumps({"task": "text-classification"}))
    assert OnnxPipeline.from_dir(folder).task == "seq-cls"
    (folder / "export_report.json").write_text(json.dumps({"task": "summarise"}))
    with pytest.raises(ExportFolderError, match="unknown task 'summarise'"):
        OnnxPipeline.from_dir(folder)


def test_unknown_provider_lists_available(bert, capsys):
    with pytest.raises(ProviderError, match=r"available.*'cpu'"):
        OnnxPipeline.from_dir(bert[1], provider="tpu")
    assert main([str(bert[1]), "--text", "a cat", "--provider", "tpu"]) == 2
    assert "'cpu'" in capsys.readouterr().err


def test_missing_folder_and_model_file(bert, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--text", "a cat"]) == 2
    assert "does not exist" in capsys.readouterr().err
    folder = shutil.copytree(bert[1], tmp_path / "no_model", ignore=shutil.ignore_patterns("*.onnx"))
    with pytest.raises(ExportFolderError, match="has no .onnx file"):
        OnnxPipeline.from_dir(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(ExportFolderError, match="no model.onnx for task seq-cls"):
        OnnxPipeline.from_dir(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert main([str(folder), "--text", "a cat"]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-3", "0", "many"])
def test_cli_refuses_a_max_new_tokens_below_1(value: str, gpt2, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(gpt2[1]), "--text", PROMPT, "--max-new-tokens", value])
    assert stop.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("texts", [[""], ["fine", "   "]])
def test_cli_refuses_empty_text_naming_it(texts: list[str], gpt2, capsys) -> None:
    argv = [str(gpt2[1])] + [arg for text in texts for arg in ("--text", text)]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"--text number {len(texts)} is empty" in capsys.readouterr().err


def test_cli_classifies_and_generates(bert, gpt2, capsys):
    assert main([str(bert[1]), "--text", "the cat sat", "--text-pair", "it was good"]) == 0
    out = capsys.readouterr().out
    assert "'the cat sat':" in out and any(label in out for label in LABELS.values())
    assert main([str(gpt2[1]), "--text", PROMPT, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith(f"{PROMPT!r} -> ")
