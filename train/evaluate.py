"""Evaluation over the held-out split: loss per target, plus accuracy (seq-cls) or perplexity (causal-lm)."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from train.loss import example_losses


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader, task: str) -> dict[str, float]:
    """Metrics over the whole eval split, gathered from every process (padding duplicates dropped)."""
    was_training = model.training
    model.eval()
    loss_sum, targets, correct = 0.0, 0, 0
    for batch in loader:
        losses = example_losses(model, batch, task)
        gathered = accelerator.gather_for_metrics((losses.loss, losses.targets))
        loss_sum += gathered[0].sum().item()
        targets += int(gathered[1].sum().item())
        if losses.correct is not None:
            correct += int(accelerator.gather_for_metrics(losses.correct).sum().item())
    model.train(was_training)
    eval_loss = loss_sum / max(targets, 1)
    if task == "seq-cls":
        return {"eval_loss": eval_loss, "eval_accuracy": correct / max(targets, 1)}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}
