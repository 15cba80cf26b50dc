"""Resume: N steps straight equal N/2 steps, an interruption, and ``resume=True`` for the rest, on a model rebuilt
from the untouched base (with a different adapter initialisation, so only the checkpoint can make them equal)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train.trainer
from surgery.checkpoint import CheckpointError
from tests.train.helpers import adapter_tensors, build, make_config
from train.trainer import train_adapters

METHODS = {
    # dropout draws from the global RNG; grad_accum 2 with 4 steps per epoch puts step 3 mid-epoch
    "lora": {"name": "lora", "r": 4, "dropout": 0.1},
    # one chain switch before the interruption (step 2), one after (step 4)
    "c3la": {"name": "c3la", "r": 4, "chain_length": 3, "chain_every": 2},
}


class Interrupted(Exception):
    pass


def _config(llama_lm: Path, lm_data: dict, method: str, out: Path):
    return make_config(llama_lm, "causal-lm", METHODS[method], lm_data, out, max_steps=6, grad_accum=2,
                       save_every=3, eval_before_training=False)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_equals_an_uninterrupted_run(method: str, llama_lm: Path, lm_data: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    straight_config = _config(llama_lm, lm_data, method, tmp_path / "straight")
    straight, tokenizer = build(straight_config)
    train_adapters(straight, tokenizer, tmp_path / "straight")

    config = _config(llama_lm, lm_data, method, tmp_path / "split")
    first, _ = build(config)
    real_save = train.trainer.save

    def save_then_stop(run):
        real_save(run)
        if run.step == 3:
            raise Interrupted

    monkeypatch.setattr(train.trainer, "save", save_then_stop)
    with pytest.raises(Interrupted):
        train_adapters(first, tokenizer, tmp_path / "split")
    monkeypatch.undo()

    resumed, _ = build(config, seed=123)  # fresh from the base, other random adapters
    metrics = train_adapters(resumed, tokenizer, tmp_path / "split", resume=True)

    assert metrics["steps"] == 6
    expected, got = adapter_tensors(straight), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=lambda m, k=key: f"{k}: {m}")
    if method == "c3la":
        layer = next(iter(resumed.layers.values()))
        reference = straight.layers[layer.layer_name]
        assert layer.n_links == 2 and torch.equal(layer.base_weight, reference.base_weight)


def test_resume_without_a_checkpoint_says_so(llama_lm: Path, lm_data: dict, tmp_path: Path):
    adapted, tokenizer = build(_config(llama_lm, lm_data, "lora", tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="no intact checkpoint under .*checkpoints; run without --resume"):
        train_adapters(adapted, tokenizer, tmp_path / "empty", resume=True)


def test_resume_with_another_batch_size_is_refused(llama_lm: Path, lm_data: dict, tmp_path: Path):
    adapted, tokenizer = build(_config(llama_lm, lm_data, "lora", tmp_path / "run"))
    train_adapters(adapted, tokenizer, tmp_path / "run")
    other = make_config(llama_lm, "causal-lm", METHODS["lora"], lm_data, tmp_path / "run", max_steps=6, batch_size=4)
    adapted, _ = build(other)
    with pytest.raises(CheckpointError, match=r"train.batch_size: 8 in the run, 4 in this config\n  "
                                              r"train.grad_accum: 2 in the run, 1 in this config\nRestore"):
        train_adapters(adapted, tokenizer, tmp_path / "run", resume=True)
