"""Tiny learnable tasks, a word-level tokenizer for the tiny models, and a one-call training run.

The tasks (seeded, no downloads):
- seq-cls ``sentiment``: six filler words with ``good`` or ``bad`` at a random position; the label says which.
- causal-lm ``counting``: runs of 6 to 14 consecutive words ``w3 w4 w5 ...`` (wrapping at the end), so each token
  predicts the next; a random model is at ~ln(vocab) per token, a trained one far below.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from surgery.config import SurgeryConfig, parse_config
from surgery.model import load_model, load_tokenizer
from surgery.rewrite import AdaptedModel, apply_surgery
from tests.tiny_models import tiny_config

SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
WORDS = [f"w{i}" for i in range(40)]
SENTIMENT = ["good", "bad"]
VOCAB = SPECIAL + WORDS + SENTIMENT  # 45 ids, inside the tiny models' 128


def save_tokenizer(folder: Path, with_token_types: bool) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over VOCAB, saved next to a tiny model."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = ["input_ids", "token_type_ids", "attention_mask"] if with_token_types else ["input_ids", "attention_mask"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[EOS]", model_input_names=names)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_base(root: Path, arch: str, task: str, init_std: float = 0.3) -> Path:
    """A tiny random model of ``arch`` for ``task`` with the word-level tokenizer, in ``root/arch-task``.

    ``init_std`` replaces the usual 0.02: with it the frozen output head's logits span a useful range, so a
    task learned through the adapters alone shows in the loss within a few dozen steps.
    """
    folder = root / f"{arch}-{task}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = tiny_config(arch)
        config.initializer_range = init_std
        auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        auto.from_config(config, attn_implementation="eager").save_pretrained(folder, safe_serialization=True)
        save_tokenizer(folder, with_token_types=arch in ("bert", "roberta"))
    return folder


def sentiment_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=6)
        label = rng.randrange(2)
        words.insert(rng.randrange(7), SENTIMENT[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def counting_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Runs of 6 to 14 consecutive words: batches hold different token counts (tests the loss normalisation)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(len(WORDS)), rng.randint(6, 14)
        rows.append({"text": " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length))})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def task_files(root: Path, task: str, n_train: int = 64, n_eval: int = 32) -> dict[str, str]:
    """train/eval JSONL files of the tiny task for ``task`` under ``root``."""
    make = sentiment_rows if task == "seq-cls" else counting_rows
    return {
        "train": str(write_jsonl(root / f"{task}-train.jsonl", make(n_train, seed=1))),
        "eval": str(write_jsonl(root / f"{task}-eval.jsonl", make(n_eval, seed=2))),
    }


def make_config(base: Path, task: str, method: dict[str, Any], data: dict[str, Any], output_dir: Path,
                targets: Any = "all-linear", **train: Any) -> SurgeryConfig:
    model = {"name_or_path": str(base), "task": task, **({"num_labels": 2} if task == "seq-cls" else {})}
    settings = {"data": data, "batch_size": 8, "lr": 1e-2, "seed": 0, "log_every": 1000,
                "eval_before_training": True, **train}
    return parse_config({"model": model, "targets": targets, "method": method, "train": settings,
                         "output_dir": str(output_dir)})


def build(config: SurgeryConfig, seed: int = 0) -> tuple[AdaptedModel, PreTrainedTokenizerFast]:
    """Load and rewrite the model as ``surgery.apply`` does, with the adapter initialisation seeded."""
    torch.manual_seed(seed)
    adapted = apply_surgery(load_model(config.model), config)
    return adapted, load_tokenizer(config.model)


def adapter_tensors(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    """Every trained tensor (adapters, heads, c3LA links) as saved in a checkpoint, detached copies."""
    from surgery.checkpoint import checkpoint_tensors

    return {k: v.clone() for k, v in checkpoint_tensors(adapted).items()}
