"""export/run.py against the PyTorch models it was exported from: classification, greedy generation, embeddings;
inputs longer than the model's positions (truncated for encoders, refused for decoders)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.latency import ProviderError
from transformers import GPT2Config, LlamaConfig, PretrainedConfig, RobertaConfig

from export.run import (
    ExportFolderError,
    InputTooLongError,
    Limit,
    OnnxPipeline,
    TruncationWarning,
    encoder_limit,
    main,
    position_limit,
)
from surgery.tolerances import MODEL
from tests.fs import tree_digest
from tests.tiny_models import tiny_model
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
    assert config["architectures"] == ["BertForSequenceClassification"]  # the export names its class
    assert OnnxPipeline.from_dir(folder).task == "seq-cls"
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
    with pytest.raises(ExportFolderError, match=r"no model.onnx for task seq-cls \(found: none\)"):
        OnnxPipeline.from_dir(folder)  # config.json names the class, so the task is known and the file missing
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


# -- inputs longer than the model's positions ------------------------------------------------------------------------


def words(count: int) -> str:
    """``count`` vocabulary words: the word tokenizer gives one token per word."""
    return " ".join(itertools.islice(itertools.cycle("the cat sat on the mat a dog ran home".split()), count))


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    """A tiny seq-cls RoBERTa: positions numbered from pad_token_id + 1, so fewer tokens fit than it has positions."""
    model = tiny_model("roberta")
    return model, project_export(model, tmp_path_factory.mktemp("roberta"), encoder=True)


def encoder_tokens(config) -> int:
    """The most tokens the encoder can read: RoBERTa's first pad_token_id + 1 positions are never used."""
    offset = config.pad_token_id + 1 if config.model_type == "roberta" else 0
    return config.max_position_embeddings - offset


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_an_over_long_encoder_text_is_truncated_like_by_hand(arch: str, request) -> None:
    model, folder = request.getfixturevalue(arch)
    limit = encoder_tokens(model.config)
    pipeline = OnnxPipeline.from_dir(folder)
    long_text, by_hand = words(limit + 10), words(limit - 2)  # + [CLS] ... [SEP]: 12 tokens over; exactly the limit
    with pytest.warns(TruncationWarning) as caught:
        results = pipeline.classify([TEXTS[0], long_text])
    assert [str(w.message) for w in caught] == [  # the short text 1 is not cut
        f"text 2 is {limit + 12} tokens, over the model's limit of {limit} ({pipeline.positions.source}): "
        f"truncated to {limit}, 12 tokens cut"
    ]
    expected = pipeline.classify([by_hand])[0]
    assert results[1]["label"] == expected["label"]
    np.testing.assert_allclose(list(results[1]["probs"].values()), list(expected["probs"].values()),
                               atol=TOL.atol, rtol=TOL.rtol)


def test_cli_warns_of_a_truncated_text_in_one_line(bert, capsys) -> None:
    model, folder = bert
    limit = model.config.max_position_embeddings
    before = tree_digest(folder)
    for _ in range(2):  # every run warns, not only the first in the process
        assert main([str(folder), "--text", words(limit + 3)]) == 0
        captured = capsys.readouterr()
        assert captured.err == (f"warning: text 1 is {limit + 5} tokens, over the model's limit of {limit} "
                                f"(max_position_embeddings in config.json): truncated to {limit}, 5 tokens cut\n")
        assert any(label in captured.out for label in LABELS.values())
    assert tree_digest(folder) == before


@pytest.mark.parametrize("extra", [0, 10])  # exactly the positions: no room for a first new token either
def test_cli_refuses_a_prompt_that_leaves_no_room(extra: int, gpt2, capsys) -> None:
    model, folder, _ = gpt2
    limit = model.config.n_positions
    before = tree_digest(folder)
    assert main([str(folder), "--text", PROMPT, "--text", words(limit + extra)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before generating for the first --text
    assert captured.err == (f"error: the prompt is {limit + extra} tokens and the model has {limit} positions "
                            f"(n_positions in config.json), which leaves no room to generate; shorten the text to "
                            f"fewer than {limit} tokens\n")
    assert tree_digest(folder) == before


def test_cli_refuses_prompt_plus_new_tokens_over_the_positions(gpt2, capsys) -> None:
    model, folder, _ = gpt2
    limit = model.config.n_positions
    before = tree_digest(folder)
    assert main([str(folder), "--text", words(limit - 4), "--max-new-tokens", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: the prompt's {limit - 4} tokens + 5 new tokens (--max-new-tokens) exceed the "
                            f"model's {limit} positions (n_positions in config.json); shorten the text or lower "
                            f"--max-new-tokens to 4\n")
    assert tree_digest(folder) == before


@pytest.mark.parametrize("cache", ["with_past", "no_past"])
def test_generation_api_refuses_past_the_positions(cache: str, gpt2) -> None:
    model, with_past, no_past = gpt2
    limit = model.config.n_positions
    pipeline = OnnxPipeline.from_dir(with_past if cache == "with_past" else no_past)
    with pytest.raises(InputTooLongError, match=f"the prompt is {limit + 1} tokens and the model has {limit} "):
        pipeline.generate(words(limit + 1))
    prompt_ids = pipeline.tokenizer(words(limit - 4), return_tensors="np")["input_ids"]
    with pytest.raises(InputTooLongError, match=f"the prompt's {limit - 4} tokens \\+ 5 new tokens"):
        pipeline.generate_ids(prompt_ids, 5)


@pytest.mark.parametrize("cache", ["with_past", "no_past"])
def test_a_prompt_filling_the_positions_exactly_equals_transformers(cache: str, gpt2, capsys) -> None:
    model, with_past, no_past = gpt2
    folder = with_past if cache == "with_past" else no_past
    limit = model.config.n_positions
    pipeline = OnnxPipeline.from_dir(folder)
    prompt_ids = pipeline.tokenizer(words(limit - 4), return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(pipeline.generate_ids(prompt_ids, 4), _torch_greedy(model, prompt_ids, 4))
    assert main([str(folder), "--text", words(limit - 4), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("config", "expected"), [
    (GPT2Config(n_positions=64), Limit(64, "n_positions in config.json")),
    (LlamaConfig(max_position_embeddings=96), Limit(96, "max_position_embeddings in config.json")),
    (RobertaConfig(max_position_embeddings=514, pad_token_id=1), Limit(
        512, "max_position_embeddings = 514 in config.json, less pad_token_id + 1 = 2: positions start after the "
             "padding index")),
    (PretrainedConfig(), None),  # nothing names a limit: nothing is checked
])
def test_position_limit_names_the_field(config, expected: Limit | None) -> None:
    assert position_limit(config) == expected


def test_encoder_limit_is_the_smaller_of_positions_and_tokenizer() -> None:
    positions = Limit(64, "max_position_embeddings in config.json")
    tokenizer = word_tokenizer(encoder=True)  # model_max_length unset: only the positions bound it
    assert encoder_limit(positions, tokenizer) == positions
    tokenizer.model_max_length = 32
    assert encoder_limit(positions, tokenizer) == Limit(32, "model_max_length in tokenizer_config.json")
    assert encoder_limit(None, tokenizer) == Limit(32, "model_max_length in tokenizer_config.json")
    tokenizer.model_max_length = 128
    assert encoder_limit(positions, tokenizer) == positions
