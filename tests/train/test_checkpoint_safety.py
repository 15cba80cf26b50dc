"""Checkpoints survive failures: a save that dies half-way, a folder left by a killed process, a damaged newest
checkpoint, a non-finite loss. The previous good checkpoint always stays loadable and resumable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import train.state
import train.trainer
from surgery.checkpoint import ADAPTER_FILE, checkpoint_tensors, load_checkpoint, read_tensors
from tests.train.helpers import build, make_config
from train.state import STATE_FILE, check_folder, latest_checkpoint
from train.trainer import NonFiniteLossError, train_adapters

LORA = {"name": "lora", "r": 4}


def _config(llama_lm: Path, lm_data: dict, out: Path, **train):
    settings = {"max_steps": 6, "save_every": 2, "eval_before_training": False, **train}
    return make_config(llama_lm, "causal-lm", LORA, lm_data, out, **settings)


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_save_that_fails_half_way_keeps_the_previous_checkpoint(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "run"
    adapted, tokenizer = build(_config(llama_lm, lm_data, out))
    real_save = train.state.save_checkpoint

    def dies_on_step_4(adapted, folder, extra=None):
        if extra["step"] < 4:
            return real_save(adapted, folder, extra)
        save_file(checkpoint_tensors(adapted), Path(folder) / ADAPTER_FILE)  # the first file is written...
        raise OSError("No space left on device")  # ...then the process dies before the manifest

    monkeypatch.setattr(train.state, "save_checkpoint", dies_on_step_4)
    with pytest.raises(OSError, match="No space left"):
        train_adapters(adapted, tokenizer, out)
    monkeypatch.undo()

    assert _steps(out / "checkpoints") == ["step-2"], "no half-written step-4, no temporary folder"
    check_folder(out / "checkpoints" / "step-2")
    load_checkpoint(out / "checkpoints" / "step-2")
    resumed, _ = build(_config(llama_lm, lm_data, out))
    assert train_adapters(resumed, tokenizer, out, resume=True)["steps"] == 6


def test_a_killed_save_and_a_damaged_newest_checkpoint_are_skipped(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture):
    out = tmp_path / "run"
    adapted, tokenizer = build(_config(llama_lm, lm_data, out, max_steps=4, keep_checkpoints=3))
    train_adapters(adapted, tokenizer, out)
    checkpoints = out / "checkpoints"
    killed = checkpoints / ".step-6.x1y2.tmp"  # what SIGKILL during a save leaves behind
    killed.mkdir()
    (killed / STATE_FILE).write_bytes(b"partial")
    newest = checkpoints / "step-4" / ADAPTER_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # truncated after the fact (disk trouble)

    assert latest_checkpoint(checkpoints) == checkpoints / "step-2"
    assert "skipping damaged checkpoint" in caplog.text and "step-4" in caplog.text
    resumed, _ = build(_config(llama_lm, lm_data, out, max_steps=4, keep_checkpoints=3))
    assert train_adapters(resumed, tokenizer, out, resume=True)["steps"] == 4
    assert not killed.exists(), "the leftover of the killed save is removed"


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    llama_lm: Path, lm_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "run"
    adapted, tokenizer = build(_config(llama_lm, lm_data, out, save_every=1))
    real_losses = train.trainer.example_losses
    calls = {"n": 0}

    def nan_on_step_3(model, batch, task, label_smoothing=0.0):
        calls["n"] += 1
        losses = real_losses(model, batch, task, label_smoothing)
        if calls["n"] == 3:  # one micro-batch per step: the third step
            losses.loss = losses.loss * math.nan
        return losses

    monkeypatch.setattr(train.trainer, "example_losses", nan_on_step_3)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the training loss is nan.*step-2"):
        train_adapters(adapted, tokenizer, out)

    assert _steps(out / "checkpoints") == ["step-1", "step-2"]
    check_folder(out / "checkpoints" / "step-2")
    saved, current = read_tensors(out / "checkpoints" / "step-2"), checkpoint_tensors(adapted)
    assert all(torch.equal(current[k], saved[k]) for k in saved), "the NaN step was never applied"
    assert not (out / "metrics.json").exists()
