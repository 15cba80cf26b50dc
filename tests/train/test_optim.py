"""The optimizer set-up and the loss normalisation: LoRA+ groups, decay on matrices only, the state reset equals a
fresh AdamW, the warm-up schedule, and gradient accumulation equals one big batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from surgery.config import ConfigError, parse_config
from tests.train.helpers import adapter_tensors, build, make_config
from train.optim import build_optimizer, build_scheduler, reset_optimizer_state
from train.schedule import Plan
from train.trainer import train_adapters


def test_lora_plus_groups_and_decay_on_matrices_only(bert_cls: Path, cls_data: dict, tmp_path: Path):
    method = {"name": "lora", "r": 4, "lora_plus_ratio": 16}
    config = make_config(bert_cls, "seq-cls", method, cls_data, tmp_path, max_steps=1, lr=1e-3, weight_decay=0.1,
                         targets=["query"])
    adapted, _ = build(config)
    optimizer = build_optimizer(adapted, config.train)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in adapted.trainable_parameters().items():
        group = by_param[id(param)]
        assert group["lr"] == pytest.approx(1e-3 * (16 if name.endswith("lora_B") else 1)), name
        assert group["weight_decay"] == (0.1 if param.ndim >= 2 else 0.0), name  # the head's bias is not decayed
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(adapted.trainable_parameters())


def test_a_reset_parameter_steps_like_a_fresh_one():
    torch.manual_seed(0)
    trained, fresh = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([trained], lr=0.1)
    for _ in range(5):
        trained.grad = torch.randn(4, 3)
        optimizer.step()
    with torch.no_grad():
        fresh.copy_(trained)
    assert reset_optimizer_state(optimizer, [trained]) == 1
    reference = torch.optim.AdamW([fresh], lr=0.1)
    gradient = torch.randn(4, 3)
    trained.grad, fresh.grad = gradient.clone(), gradient.clone()
    optimizer.step()
    reference.step()
    torch.testing.assert_close(trained, fresh, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not train"):
        reset_optimizer_state(optimizer, [fresh])


def test_warmup_then_linear_decay(bert_cls: Path, cls_data: dict, tmp_path: Path):
    config = make_config(bert_cls, "seq-cls", {"name": "lora", "r": 4}, cls_data, tmp_path, max_steps=10, lr=1.0,
                         warmup_ratio=0.2, targets=["query"])
    adapted, _ = build(config)
    optimizer = build_optimizer(adapted, config.train)
    scheduler = build_scheduler(optimizer, config.train, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_plan_and_contradictions_in_the_config(bert_cls: Path, cls_data: dict, tmp_path: Path):
    config = make_config(bert_cls, "seq-cls", {"name": "lora", "r": 4}, cls_data, tmp_path, epochs=2.5, grad_accum=3)
    plan = Plan.from_config(config.train, batches_per_epoch=8)
    assert (plan.steps_per_epoch, plan.total_steps, plan.batches_done_in_epoch(4)) == (3, 8, 3)
    raw = config.model_dump(mode="json")
    with pytest.raises(ConfigError, match="warmup_steps and warmup_ratio are both set"):
        parse_config({**raw, "train": {**raw["train"], "warmup_steps": 10, "warmup_ratio": 0.1}})
    with pytest.raises(ConfigError, match="set `epochs` or `max_steps`"):
        parse_config({**raw, "train": {**raw["train"], "epochs": None}})
    with pytest.raises(ConfigError, match=r"train.mixed_precision: Input should be 'no', 'bf16' or 'fp16'"):
        parse_config({**raw, "train": {**raw["train"], "mixed_precision": "fp8"}})


def test_gradient_accumulation_equals_one_big_batch(llama_lm: Path, lm_data: dict, tmp_path: Path):
    """Rows of 6-14 tokens: per-micro-batch means would weight tokens unequally; the global count does not."""
    method = {"name": "lora", "r": 4}
    common = {"max_steps": 4, "eval_before_training": False}
    big = make_config(llama_lm, "causal-lm", method, lm_data, tmp_path / "big", batch_size=16, **common)
    small = make_config(llama_lm, "causal-lm", method, lm_data, tmp_path / "small", batch_size=4, grad_accum=4,
                        **common)
    results = []
    for config in (big, small):
        adapted, tokenizer = build(config)
        train_adapters(adapted, tokenizer, config.output_dir)
        results.append(adapter_tensors(adapted))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-4, atol=1e-5)


@pytest.fixture
def fresh_accelerator_state():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_autocast_trains(llama_lm: Path, lm_data: dict, tmp_path: Path, fresh_accelerator_state: None):
    config = make_config(llama_lm, "causal-lm", {"name": "lora", "r": 4}, lm_data, tmp_path / "run", max_steps=4,
                         mixed_precision="bf16")
    adapted, tokenizer = build(config)
    metrics = train_adapters(adapted, tokenizer, tmp_path / "run")
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert adapted.model.forward.__func__ is type(adapted.model).forward, "accelerate's autocast wrapper is removed"
