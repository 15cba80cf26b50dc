"""Every registered method learns the tiny counting task through its adapters alone, trains exactly the
parameters it declares, and leaves a checkpoint that rebuilds the trained model from the untouched base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import load_checkpoint
from surgery.methods import AdapterLayer
from tests.method_configs import registered_methods, small_method
from tests.tiny_models import random_ids
from tests.train.helpers import build, make_config
from train.trainer import train_adapters


def _frozen_outside_adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that no adapter layer owns (embeddings, norms, lm_head), copied."""
    owned = {name for name, m in model.named_modules() if isinstance(m, AdapterLayer)}
    return {k: v.clone() for k, v in model.state_dict().items() if not any(k.startswith(f"{o}.") for o in owned)}


@pytest.mark.parametrize("method", registered_methods())
def test_loss_falls_and_only_declared_parameters_train(method: str, llama_lm: Path, lm_data: dict, tmp_path: Path):
    config = make_config(llama_lm, "causal-lm", small_method(method), lm_data, tmp_path / "run", epochs=4)
    adapted, tokenizer = build(config)
    requires_grad = {id(p) for p in adapted.model.parameters() if p.requires_grad}
    assert requires_grad == {id(p) for p in adapted.trainable_parameters().values()}
    frozen_before = _frozen_outside_adapters(adapted.model)

    metrics = train_adapters(adapted, tokenizer, tmp_path / "run")

    # a random model is at ~6.7 nats per token here; every method gets well below within 32 steps
    assert metrics["eval_loss"] < 0.8 * metrics["initial_eval_loss"], metrics
    for key, before in frozen_before.items():
        assert torch.equal(adapted.model.state_dict()[key], before), f"{method} changed frozen {key}"
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["eval_loss"] == pytest.approx(metrics["eval_loss"]) and "eval_perplexity" in written


@pytest.mark.parametrize("method", ["lora", "proda", "c3la"])
def test_checkpoint_rebuilds_the_trained_model(method: str, llama_lm: Path, lm_data: dict, tmp_path: Path):
    config = make_config(llama_lm, "causal-lm", small_method(method), lm_data, tmp_path / "run", max_steps=6)
    adapted, tokenizer = build(config)
    train_adapters(adapted, tokenizer, tmp_path / "run")
    rebuilt = load_checkpoint(tmp_path / "run")
    ids = random_ids(2, 10, vocab=45)
    with torch.no_grad():
        expected = adapted.model.eval()(ids).logits
        got = rebuilt.model.eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same tensors, same replay order: bit for bit


def test_seq_cls_reports_accuracy_and_trains_the_head(bert_cls: Path, cls_data: dict, tmp_path: Path):
    config = make_config(bert_cls, "seq-cls", {"name": "lora", "r": 4}, cls_data, tmp_path / "run", epochs=3,
                         targets=["query", "value"])
    adapted, tokenizer = build(config)
    head = adapted.model.classifier.weight.clone()
    metrics = train_adapters(adapted, tokenizer, tmp_path / "run")
    assert {"eval_loss", "eval_accuracy", "initial_eval_accuracy"} <= set(metrics)
    assert not torch.equal(adapted.model.classifier.weight, head)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
