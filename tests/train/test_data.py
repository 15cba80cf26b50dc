"""Data loading: every supported source, the prompt mask, the seeded split, and a clear error (file, row, what to
do) for each kind of bad data, raised before training starts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml

from surgery.apply import main as apply_main
from surgery.config import ModelConfig
from surgery.model import load_tokenizer
from tests.train.helpers import build, make_config, sentiment_rows, write_jsonl
from train.config import DataConfig
from train.data import DataError, check_rows, load_splits, read_rows, split_rows
from train.encode import IGNORE, encode_rows
from train.trainer import train_adapters


def _check(path: Path, task: str = "seq-cls", num_labels: int = 2) -> None:
    check_rows(read_rows(path, "train.data.train"), "train.data.train", task, num_labels)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "a", "label": 0}, {"text": "b"}], r"train.jsonl line 2: missing field 'label'"),
        ([{"text": "a", "label": 5}], r"line 1: label 5 is outside 0..1 \(model.num_labels=2\)"),
        ([{"text": "a", "label": "pos"}], r"line 1: label must be an integer class index, got 'pos'"),
        ([{"text": 3, "label": 1}], r"line 1: text must be a string"),
        ([{"label": 1}] * 7, r"7 unusable row\(s\)(.|\n)*and 2 more"),
    ],
)
def test_bad_seq_cls_rows_are_named(rows: list, message: str, tmp_path: Path):
    with pytest.raises(DataError, match=message):
        _check(write_jsonl(tmp_path / "train.jsonl", rows))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "q"}], r"line 1: missing field 'completion'"),
        ([{"body": "x"}], r"line 1: missing field 'text' \(or 'prompt' \+ 'completion'\) \(has \['body'\]\)"),
    ],
)
def test_bad_causal_lm_rows_are_named(rows: list, message: str, tmp_path: Path):
    with pytest.raises(DataError, match=message):
        _check(write_jsonl(tmp_path / "train.jsonl", rows), task="causal-lm")


def test_file_level_errors(tmp_path: Path):
    with pytest.raises(DataError, match=r"train.data.train: .*nope.jsonl does not exist; fix the path"):
        read_rows(tmp_path / "nope.jsonl", "train.data.train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"suffix '.txt'; use one of .jsonl"):
        read_rows(tmp_path / "notes.txt", "train.data.train")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 0}\n\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl line 3: not valid JSON"):
        read_rows(tmp_path / "broken.jsonl", "train.data.train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl holds no rows"):
        _check(tmp_path / "empty.jsonl")


def test_every_source_reads_the_same_rows(tmp_path: Path):
    rows = sentiment_rows(6, seed=0)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(tmp_path / "dict"))
    sources = ["rows.json", "rows.csv", "rows.parquet", "saved", "dict"]
    for name in sources:
        read = read_rows(tmp_path / name, "train.data.train", split="eval" if name == "dict" else "train")
        check_rows(read, "train.data.train", "seq-cls", 2)  # CSV labels arrive as strings: still accepted
        assert [r["text"] for r in read.records] == [r["text"] for r in rows], name


def test_the_eval_split_is_seeded_disjoint_and_complete(tmp_path: Path):
    rows = read_rows(write_jsonl(tmp_path / "t.jsonl", sentiment_rows(50, seed=0)), "train.data.train")
    train_a, eval_a = split_rows(rows, 0.2, seed=3)
    train_b, eval_b = split_rows(rows, 0.2, seed=3)
    assert eval_a.records == eval_b.records and len(eval_a) == 10
    assert sorted(train_a.locations + eval_a.locations, key=lambda s: int(s.split()[1])) == rows.locations
    assert split_rows(rows, 0.2, seed=4)[1].records != eval_a.records
    tiny = read_rows(write_jsonl(tmp_path / "one.jsonl", sentiment_rows(1, seed=0)), "train.data.train")
    with pytest.raises(DataError, match="too few to hold out"):
        split_rows(tiny, 0.1, seed=0)
    data = DataConfig(train=tmp_path / "t.jsonl")
    assert len(load_splits(data, "seq-cls", 2, seed=3)[1]) == 5


def test_prompt_tokens_are_masked_out_of_the_loss(llama_lm: Path, tmp_path: Path):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(llama_lm)))
    rows = read_rows(write_jsonl(tmp_path / "lm.jsonl", [{"prompt": "w1 w2 w3", "completion": "w4 w5"},
                                                        {"text": "w7 w8"}]), "train.data.train")
    prompted, plain = encode_rows(rows, tokenizer, "causal-lm", max_length=32)
    eos = tokenizer.eos_token_id
    assert prompted["input_ids"] == tokenizer("w1 w2 w3 w4 w5")["input_ids"] + [eos]
    assert prompted["labels"] == [IGNORE] * 3 + tokenizer("w4 w5")["input_ids"] + [eos]
    assert plain["labels"] == plain["input_ids"] == tokenizer("w7 w8")["input_ids"] + [eos]


def test_bad_data_stops_training_before_it_starts(bert_cls: Path, tmp_path: Path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "w1 good", "label": 0}, {"text": "w2 bad", "label": 2}])
    config = make_config(bert_cls, "seq-cls", {"name": "lora", "r": 4}, {"train": str(bad)}, tmp_path / "run",
                         max_steps=2, targets=["query"])
    adapted, tokenizer = build(config)
    with pytest.raises(DataError, match=r"bad.jsonl line 2: label 2 is outside 0..1"):
        train_adapters(adapted, tokenizer, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_cli_prints_the_data_error(bert_cls: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    config = make_config(bert_cls, "seq-cls", {"name": "lora", "r": 4}, {"train": str(tmp_path / "missing.csv")},
                         tmp_path / "run", max_steps=2, targets=["query"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert apply_main([str(path)]) == 2
    assert "error: train.data.train:" in capsys.readouterr().err
