"""Base model folders and adapter checkpoints for the export tests: tiny random models from tests/tiny_models.py
with a word tokenizer, adapters of any registered method randomised to non-trivial weights (as if trained)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from surgery.checkpoint import save_checkpoint
from surgery.config import parse_config
from surgery.model import load_model
from surgery.rewrite import AdaptedModel, apply_surgery
from tests.export.tiny_exports import word_tokenizer
from tests.method_configs import small_method
from tests.tiny_models import DECODERS, MORE_DECODERS, tiny_model

TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],  # Conv1D
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


def task_of(arch: str) -> str:
    return "causal-lm" if arch in DECODERS + MORE_DECODERS else "seq-cls"


def save_lively_base(arch: str, folder: Path, seed: int = 0) -> Path:
    """A tiny model whose weight matrices are ~N(0, 0.3), saved with a word tokenizer.

    The default init (std 0.02) makes near-uniform logits whose greedy argmax can flip on float rounding; with
    these weights the logits reach ~5, so a greedy mismatch means a real difference.
    """
    model = tiny_model(arch, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(encoder=arch not in DECODERS + MORE_DECODERS).save_pretrained(folder)
    return folder


def adapted_model(base: Path, method: str | dict, task: str, targets: list[str], seed: int = 3,
                  std: float = 0.2, out: Path | None = None, train: dict | None = None) -> AdaptedModel:
    """Surgery on ``base`` with every adapter parameter (and the trained head) randomised; ``train``, when given,
    is the config's train section (what export.quality reads the eval rows from)."""
    method_config = small_method(method) if isinstance(method, str) else method
    raw = {"model": {"name_or_path": str(base), "task": task}, "targets": targets, "method": method_config,
           "output_dir": str(out or base / "unused")}
    config = parse_config(raw if train is None else {**raw, "train": train})
    adapted = apply_surgery(load_model(config.model), config)
    generator = torch.Generator().manual_seed(seed)
    for layer in adapted.layers.values():
        layer.randomize_(generator, std=std)
    with torch.no_grad():
        for module in adapted.trained_modules.values():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return adapted


def make_checkpoint(base: Path, method: str | dict, out: Path, arch: str, **kwargs) -> Path:
    """A checkpoint folder of ``method`` on ``base`` (targets and task from the architecture)."""
    adapted = adapted_model(base, method, task_of(arch), TARGETS[arch], out=out, **kwargs)
    save_checkpoint(adapted, out)
    return out


def onnx_logits(path: Path, batch: int = 2, seq: int = 7, seed: int = 5) -> np.ndarray:
    """The first output of an exported graph on fixed random tokens (empty cache for decoders)."""
    from export.verify import onnx_feed, sample_inputs

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = onnx_feed(session, sample_inputs(128, batch, seq, seed))
    return session.run(None, feed)[0]


@pytest.fixture(scope="module", autouse=False)
def single_torch_thread() -> Iterator[None]:
    """PyTorch on one thread for the module: the tiny models gain nothing from two, and on a busy 2-core machine
    two spinning OpenMP threads make every export 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
