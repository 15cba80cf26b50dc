"""Issue 12, data and training state: every bad input is a clear error naming the fault, every run is resumable,
and nothing of the user's is lost (the output folder's files are hashed before and after where it matters)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import train.trainer
from surgery.checkpoint import load_checkpoint
from tests.train.helpers import build, make_config, task_files, tiny_base, write_jsonl
from train.data import DataError
from train.report import METRICS_FILE
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


# ---- 2. --resume finishes what was pending; a finished run is left as it is --------------------------------
class Interrupted(Exception):
    pass


def _resume_config(llama_lm: Path, lm_data: dict, out: Path, **train):
    # 32 rows / batch 8: 4 steps per epoch; a checkpoint at step 4 is written before the epoch's evaluation
    settings = {"max_steps": 8, "save_every": 4, "eval_before_training": False, **train}
    return make_config(llama_lm, "causal-lm", LORA, lm_data, out, **settings)


def _results(out: Path) -> dict:
    metrics = json.loads((out / METRICS_FILE).read_text())
    metrics.pop("train_runtime_s")
    return metrics


def _straight(llama_lm: Path, lm_data: dict, out: Path, **train) -> dict:
    adapted, tokenizer = build(_resume_config(llama_lm, lm_data, out, **train))
    train_adapters(adapted, tokenizer, out)
    return _results(out)


def test_resume_records_the_evaluation_the_interrupted_run_had_pending(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    expected = _straight(llama_lm, lm_data, tmp_path / "straight")
    assert [row["step"] for row in expected["history"]] == [4, 8]

    out = tmp_path / "split"
    adapted, tokenizer = build(_resume_config(llama_lm, lm_data, out))
    real_save = train.trainer.save

    def killed_after_saving_step_4(run):
        real_save(run)
        if run.step == 4:
            raise Interrupted  # before the end of epoch 1 was evaluated

    monkeypatch.setattr(train.trainer, "save", killed_after_saving_step_4)
    with pytest.raises(Interrupted):
        train_adapters(adapted, tokenizer, out)
    monkeypatch.undo()

    resumed, _ = build(_resume_config(llama_lm, lm_data, out), seed=1)
    train_adapters(resumed, tokenizer, out, resume=True)
    assert _results(out) == expected, "the same history (step 4 evaluated) and the same final figures"


def test_resume_writes_the_final_checkpoint_and_metrics_a_killed_run_had_left(llama_lm: Path, lm_data: dict,
                                                                              tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    expected = _straight(llama_lm, lm_data, tmp_path / "straight")
    out = tmp_path / "split"
    adapted, tokenizer = build(_resume_config(llama_lm, lm_data, out))

    def killed_before_the_final_checkpoint(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(train.trainer, "save_checkpoint", killed_before_the_final_checkpoint)
    with pytest.raises(Interrupted):
        train_adapters(adapted, tokenizer, out)
    monkeypatch.undo()
    assert not (out / METRICS_FILE).exists() and (out / "checkpoints" / "step-8").is_dir()

    resumed, _ = build(_resume_config(llama_lm, lm_data, out), seed=1)
    assert train_adapters(resumed, tokenizer, out, resume=True)["steps"] == 8
    assert _results(out) == expected
    load_checkpoint(out)


def test_resuming_a_finished_run_changes_nothing(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture):
    out = tmp_path / "run"
    _straight(llama_lm, lm_data, out)
    before = file_hashes(out)
    saved = json.loads((out / METRICS_FILE).read_text())

    resumed, tokenizer = build(_resume_config(llama_lm, lm_data, out), seed=1)
    with caplog.at_level(logging.INFO, logger="train"):
        metrics = train_adapters(resumed, tokenizer, out, resume=True)
    assert "finished at step 8; nothing to do" in caplog.text
    assert file_hashes(out) == before, "metrics.json and every checkpoint file unchanged byte for byte"
    assert metrics == {key: value for key, value in saved.items() if key != "history"}
