"""Issue 12, data and training state: every bad input is a clear error naming the fault, every run is resumable,
and nothing of the user's is lost (the output folder's files are hashed before and after where it matters)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.train.helpers import build, make_config, task_files, tiny_base, write_jsonl
from train.data import DataError
from train.trainer import train_adapters

LORA = {"name": "lora", "r": 4}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("bases"), "llama", "causal-lm")


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return task_files(tmp_path_factory.mktemp("data"), "causal-lm", n_train=32, n_eval=8)


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. causal-lm examples whose prompt fills max_length --------------------------------------------------
LONG_PROMPT = {"prompt": "w1 w2 w3 w4 w5 w6", "completion": "w7 w8"}  # 6 prompt tokens: max_length 6 leaves none
SHORT_PROMPT = {"prompt": "w1 w2", "completion": "w3 w4"}


def test_prompts_that_fill_max_length_leave_nothing_to_learn(llama_lm: Path, tmp_path: Path):
    train = write_jsonl(tmp_path / "prompts.jsonl", [LONG_PROMPT] * 12)
    data = {"train": str(train), "eval": str(write_jsonl(tmp_path / "eval.jsonl", [SHORT_PROMPT] * 4)),
            "max_length": 6}
    out = tmp_path / "run"
    adapted, tokenizer = build(make_config(llama_lm, "causal-lm", LORA, data, out, max_steps=2))
    with pytest.raises(DataError) as caught:
        train_adapters(adapted, tokenizer, out)
    message = str(caught.value)
    for part in ("train.data.train", "prompts.jsonl", "12 of 12 row(s)", "max_length=6", "line 1, line 2, line 3",
                 "raise train.data.max_length or shorten the prompts"):
        assert part in message, f"{part!r} missing from: {message}"
    assert not out.exists(), "refused before anything was written"


def test_an_eval_split_without_targets_is_refused_too(llama_lm: Path, tmp_path: Path):
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", [SHORT_PROMPT] * 8)),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", [LONG_PROMPT] * 3)), "max_length": 6}
    adapted, tokenizer = build(make_config(llama_lm, "causal-lm", LORA, data, tmp_path / "run", max_steps=2))
    with pytest.raises(DataError, match=r"train.data.eval: 3 of 3 row\(s\) of .*eval.jsonl keep no target token"):
        train_adapters(adapted, tokenizer, tmp_path / "run")


def test_some_rows_without_targets_are_left_out_with_a_warning(llama_lm: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture):
    rows = [LONG_PROMPT, SHORT_PROMPT] * 8  # lines 1, 3, 5, ... keep no target
    data = {"train": str(write_jsonl(tmp_path / "mixed.jsonl", rows)),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", [SHORT_PROMPT] * 4)), "max_length": 6}
    out = tmp_path / "run"
    adapted, tokenizer = build(make_config(llama_lm, "causal-lm", LORA, data, out, max_steps=2))
    with caplog.at_level(logging.INFO, logger="train"):
        metrics = train_adapters(adapted, tokenizer, out)
    assert ("train.data.train: 8 of 16 row(s) of " in caplog.text and "line 1, line 3, line 5, ..." in caplog.text
            and "they are left out: raise train.data.max_length" in caplog.text)
    assert "data: 8 training and 4 evaluation examples" in caplog.text
    assert metrics["eval_perplexity"] > 1.0 and metrics["train_loss"] > 0.0
