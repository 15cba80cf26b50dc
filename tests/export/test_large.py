"""A model past protobuf's 2 GiB: the export keeps its weights in one external file, model.onnx_data, and still
verifies (parity, a cached step and greedy decoding on the KV cache). Slow: ~2.1 GiB of random weights."""

from __future__ import annotations

import gc
from pathlib import Path

import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from export.exporters import EXTERNAL_DATA_FILE, PROTOBUF_LIMIT
from export.onnx import export_checkpoint
from tests.export.checkpoints import make_checkpoint
from tests.export.tiny_exports import word_tokenizer

# 2 x 1.1M x 256 float32 weights (embedding and untied head) = 2.25e9 bytes, just over 2 GiB; one thin layer.
VOCAB, HIDDEN = 1_100_000, 256


def save_large_llama(folder: Path) -> Path:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    # Random weights, std 1 in the head so the greedy argmax over 1.1M tokens has clear winners.
    state = {name: torch.randn(p.shape, generator=generator) * (1.0 if "lm_head" in name else 0.05)
             for name, p in model.named_parameters()}
    state.update({name: torch.ones(p.shape) for name, p in model.named_parameters() if name.endswith("norm.weight")})
    model.load_state_dict(state, assign=True)
    model.eval().save_pretrained(folder, safe_serialization=True)
    word_tokenizer(encoder=False).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_model_over_2_gib_exports_with_external_data(tmp_path: Path) -> None:
    base = save_large_llama(tmp_path / "base")
    ckpt = make_checkpoint(base, "lora", tmp_path / "ckpt", "llama")
    gc.collect()
    out = tmp_path / "onnx"
    report = export_checkpoint(ckpt, out, merge=True, latency=False, fp16_check=False, log=print)
    assert report["passed"] and report["parity"]["greedy_match"] is True
    assert report["files"] == {"model": "model.onnx", "external_data": EXTERNAL_DATA_FILE}
    assert (out / EXTERNAL_DATA_FILE).stat().st_size > PROTOBUF_LIMIT
    assert (out / "model.onnx").stat().st_size < 10 * 2**20, "the graph file holds no weights"
    assert sorted(p.name for p in out.iterdir() if "onnx" in p.name) == ["model.onnx", EXTERNAL_DATA_FILE]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    locations = {entry.value for init in graph.initializer for entry in init.external_data if entry.key == "location"}
    assert locations == {EXTERNAL_DATA_FILE}
