"""Tiny exported folders for the export tests: random models from tests/tiny_models.py exported with the project's
exporter (decoders with their KV cache), a decoder without cache, optimum's export (the [optimum] extra) or plain
torch.onnx.export, plus a 128-word WordLevel tokenizer (the tiny models' vocabulary size)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertModel, PreTrainedTokenizerFast

from tests.tiny_models import tiny_config, tiny_model

OPSET = 17
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = ("the a cat dog sat on mat ran to home and it was good bad very not is in of").split()
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(128 - len(SPECIALS) - len(WORDS))]
LABELS = {0: "negative", 1: "positive"}


def word_tokenizer(encoder: bool) -> PreTrainedTokenizerFast:
    """Whitespace WordLevel over VOCAB; an encoder's wraps text as [CLS] a [SEP] (b [SEP]) with segment ids."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   model_input_names=["input_ids", "attention_mask"])


def labelled_bert() -> torch.nn.Module:
    """Tiny seq-cls BERT whose labels have names (LABELS), so a test can tell id2label was used."""
    model = tiny_model("bert")
    model.config.id2label, model.config.label2id = LABELS, {v: k for k, v in LABELS.items()}
    return model


def bert_encoder(seed: int = 0) -> torch.nn.Module:
    """Tiny BERT without a head (feature extraction: last_hidden_state)."""
    torch.manual_seed(seed)
    config = tiny_config("bert")
    config._attn_implementation = "eager"
    return BertModel(config, add_pooling_layer=False).eval()


def lively_gpt2(seed: int = 0) -> torch.nn.Module:
    """Tiny GPT-2 with weight matrices ~N(0, 0.3): the default init (std 0.02) makes greedy decoding repeat one
    token, which cannot tell a right decoding loop from a wrong one; these logits reach ~5."""
    model = tiny_model("gpt2", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def auto_backend() -> str:
    """The backend ``--backend auto`` picks for the tiny architectures here: optimum where the [optimum] extra is
    installed (the compat job), else the torch exporter."""
    from export.exporters import OptimumBackend

    return "torch" if OptimumBackend.missing() else "optimum"


def project_export(model: torch.nn.Module, folder: Path, encoder: bool) -> Path:
    """``export.exporters.export_model`` (torch backend: decoders with the KV cache) of ``model`` into ``folder``,
    with the word tokenizer."""
    from export.exporters import export_model

    export_model(model, folder, opset=OPSET, backend="torch", log=lambda _: None)
    word_tokenizer(encoder).save_pretrained(folder)
    return folder


def uncached_decoder_export(model: torch.nn.Module, folder: Path) -> Path:
    """A decoder graph without cache inputs (input_ids, attention_mask -> logits), as exporters without KV-cache
    support write them, with config.json and the word tokenizer."""
    from export.exporters import main_output_spec

    spec = main_output_spec(model, "causal-lm")
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(spec.module, spec.example, str(folder / "model.onnx"), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes, opset_version=OPSET,
                          dynamo=False)
    model.config.save_pretrained(folder)
    word_tokenizer(encoder=False).save_pretrained(folder)
    return folder


def optimum_export(model: torch.nn.Module, folder: Path, task: str, encoder: bool) -> Path:
    """optimum's ONNX export of ``model`` into ``folder`` (model.onnx, config.json), with the word tokenizer; only
    where the [optimum] extra is installed (the compat job)."""
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_export_from_model(model, output=folder, task=task, opset=OPSET, do_validation=False)
    word_tokenizer(encoder).save_pretrained(folder)
    return folder


def plain_bert_export(model: torch.nn.Module, path: Path) -> Path:
    """torch.onnx.export (TorchScript exporter) of a seq-cls BERT with only input_ids and attention_mask."""
    ids = torch.ones(1, 4, dtype=torch.long)
    dynamic = {0: "batch_size", 1: "sequence_length"}
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic},
                      opset_version=OPSET, dynamo=False)
    return path
