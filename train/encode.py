"""Rows to token ids, padded batches, and the seeded per-epoch data order.

An example is a dict of lists: ``input_ids`` (and ``token_type_ids`` where the tokenizer makes them) plus
``labels``: the class index for seq-cls, or one target per token for causal-lm with ``IGNORE`` where a token is
not a target (the prompt, padding). The model shifts nothing: the loss pairs logits at t with labels at t + 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from train.data import DataError, Rows, as_label

IGNORE = -100
CHUNK = 1024  # rows per tokenizer call
log = logging.getLogger("train")

Example = dict[str, Any]


def encode_rows(rows: Rows, tokenizer: PreTrainedTokenizerBase, task: str, max_length: int,
                key: str = "train.data.train") -> list[Example]:
    """Token ids and labels for every row, truncated to ``max_length`` tokens. Causal-lm rows left without a
    target token are dropped with a warning, or refused when none is left (``key`` names the data in messages)."""
    encode_chunk = _seq_cls_chunk if task == "seq-cls" else _causal_lm_chunk
    examples: list[Example] = []
    for start in range(0, len(rows), CHUNK):
        examples += encode_chunk(rows.records[start:start + CHUNK], tokenizer, max_length)
    if task == "causal-lm":
        examples = _with_targets(examples, rows, max_length, key)
    return examples


def _with_targets(examples: list[Example], rows: Rows, max_length: int, key: str) -> list[Example]:
    """The examples that keep a target token. One whose prompt fills ``max_length`` has none: trained on, it adds
    nothing to the loss (a split of only such rows trains at loss 0 and reports perplexity 1.0)."""
    # the loss pairs logits at t with labels at t + 1: the first label is never a target
    empty = [i for i, e in enumerate(examples) if all(label == IGNORE for label in e["labels"][1:])]
    if not empty:
        return examples
    where = ", ".join(rows.locations[i] for i in empty[:3]) + (", ..." if len(empty) > 3 else "")
    problem = (f"{key}: {len(empty)} of {len(rows)} row(s) of {rows.source} keep no target token after truncation "
               f"to max_length={max_length}, their prompt filling it ({where})")
    remedy = "raise train.data.max_length or shorten the prompts"
    if len(empty) == len(examples):
        raise DataError(f"{problem}; nothing is left to learn from: {remedy}")
    log.warning("%s; they are left out: %s", problem, remedy)
    dropped = set(empty)
    return [e for i, e in enumerate(examples) if i not in dropped]


def _seq_cls_chunk(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    examples: list[Example | None] = [None] * len(records)
    for with_pair in (False, True):
        indices = [i for i, r in enumerate(records) if (r.get("text_pair") is not None) == with_pair]
        if not indices:
            continue
        texts = [records[i]["text"] for i in indices]
        pairs = [records[i]["text_pair"] for i in indices] if with_pair else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        for row, i in enumerate(indices):
            examples[i] = {**{k: encoded[k][row] for k in keys}, "labels": as_label(records[i]["label"])}
    return examples  # type: ignore[return-value]


def _causal_lm_chunk(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                     max_length: int) -> list[Example]:
    """``text`` rows: every token (plus EOS) is a target. ``prompt`` + ``completion`` rows: the prompt (with the
    tokenizer's special tokens) is masked, the completion (without them, plus EOS) is the target."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompted = [i for i, r in enumerate(records) if r.get("prompt") is not None]
    heads = tokenizer([r["prompt"] if r.get("prompt") is not None else r["text"] for r in records],
                      verbose=False)["input_ids"]
    tails = tokenizer([records[i]["completion"] for i in prompted], add_special_tokens=False,
                      verbose=False)["input_ids"] if prompted else []
    completion = dict(zip(prompted, tails))
    examples = []
    for i, head in enumerate(heads):
        if i in completion:
            target = completion[i] + eos
            ids, labels = head + target, [IGNORE] * len(head) + target
        else:
            ids = head + eos if eos and head[-1:] != eos else head
            labels = list(ids)
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return examples


@dataclass(frozen=True)
class Collator:
    """Right-pads a list of examples into tensors: ids with the pad token, labels with ``IGNORE``."""

    pad_id: int

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": _pad([e["input_ids"] for e in examples], length, self.pad_id),
            "attention_mask": _pad([[1] * len(e["input_ids"]) for e in examples], length, 0),
        }
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], length, 0)
        labels = [e["labels"] for e in examples]
        batch["labels"] = _pad(labels, length, IGNORE) if isinstance(labels[0], list) else torch.tensor(labels)
        return batch


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``: the same on every process and
    after a resume. ``set_epoch`` is called by accelerate's data loader and by the trainer."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n
