"""The task losses, as per-example sums so that any grouping (micro-batches, processes) can be normalised by the
global number of targets: gradient accumulation and data parallelism then give the gradient of one big batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from train.encode import IGNORE

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ExampleLosses:
    """Per example: summed cross-entropy, number of targets and (seq-cls) whether the prediction is right."""

    loss: torch.Tensor  # (batch,) float32
    targets: torch.Tensor  # (batch,) int64
    correct: torch.Tensor | None = None  # (batch,) int64, seq-cls only


def example_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], task: str, label_smoothing: float = 0.0
) -> ExampleLosses:
    logits = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits.float()
    labels = batch["labels"]
    if task == "seq-cls":
        # logits: (batch, num_labels), labels: (batch,)
        loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
        return ExampleLosses(loss, torch.ones_like(labels), (logits.argmax(-1) == labels).long())
    # causal-lm: logits at position t predict the token at t + 1. logits: (batch, seq, vocab), labels: (batch, seq)
    shifted = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), shifted, reduction="none", ignore_index=IGNORE, label_smoothing=label_smoothing
    )  # (batch, seq - 1), zero where ignored
    return ExampleLosses(token_loss.sum(-1), (shifted != IGNORE).sum(-1))


def target_count(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """How many targets a batch holds, known before the forward pass: examples for seq-cls, target tokens
    (after the shift) for causal-lm."""
    labels = batch["labels"]
    if task == "seq-cls":
        return torch.tensor(labels.shape[0], device=labels.device)
    return (labels[:, 1:] != IGNORE).sum()
