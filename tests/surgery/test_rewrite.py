"""Surgery on whole models: identity at initialisation, what trains, and the layer checks."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from surgery.config import parse_config
from surgery.methods import METHODS
from surgery.methods.base import AdapterLayer
from surgery.model import load_model
from surgery.rewrite import apply_surgery
from tests.method_configs import registered_methods, small_method
from tests.tiny_models import ARCHITECTURES, DECODERS, minilm_path, random_ids, tiny_model

TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "gpt2": ["c_attn", "c_fc"],
           "llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"]}


def surgery_config(arch: str, method: str, **extra):
    task = "causal-lm" if arch in DECODERS else "seq-cls"
    return parse_config({"model": {"name_or_path": "unused", "task": task}, "targets": TARGETS[arch],
                         "method": small_method(method), **extra})


def approximates(model: torch.nn.Module) -> bool:
    """R-/S-LoDA replace W0 by an approximation: their reference is the approximated base, delta = 0."""
    return any(layer.derived_tensors() for layer in model.modules() if isinstance(layer, AdapterLayer))


def zero_delta(self, x):
    return torch.zeros(*x.shape[:-1], self.d_out, dtype=x.dtype)


@pytest.mark.parametrize("method", registered_methods())
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_surgery_keeps_output_at_init(arch: str, method: str) -> None:
    model = tiny_model(arch)
    ids = random_ids(2, 7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        adapted = apply_surgery(model, surgery_config(arch, method))
        after = model(input_ids=ids).logits
        with mock.patch.object(AdapterLayer, "delta", zero_delta):
            without_delta = model(input_ids=ids).logits
    assert len(adapted.layers) >= 4
    torch.testing.assert_close(after, without_delta, atol=0, rtol=0)  # delta == 0 at init
    if not approximates(model):
        torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("method", registered_methods())
def test_surgery_keeps_minilm_output_at_init(method: str) -> None:
    config = parse_config({"model": {"name_or_path": str(minilm_path()), "task": "seq-cls"},
                           "targets": ["query", "value", "intermediate.dense"], "method": small_method(method)})
    model = load_model(config.model)
    ids = random_ids(2, 9, vocab=30000)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_surgery(model, config)
        after = model(input_ids=ids).logits
        with mock.patch.object(AdapterLayer, "delta", zero_delta):
            without_delta = model(input_ids=ids).logits
    torch.testing.assert_close(after, without_delta, atol=0, rtol=0)
    if not approximates(model):
        torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("method", registered_methods())
def test_only_declared_parameters_train(method: str) -> None:
    adapted = apply_surgery(tiny_model("bert"), surgery_config("bert", method))
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    declared = {f"{name}.{p}" for name, layer in adapted.layers.items() for p in layer.adapter_params()}
    head = {n for n in trainable if n.startswith("classifier.")}
    assert trainable == declared | head and head == {"classifier.weight", "classifier.bias"}
    assert set(adapted.trainable_parameters()) == trainable


def test_head_can_stay_frozen_and_modules_to_train_adds_more() -> None:
    adapted = apply_surgery(tiny_model("bert"), surgery_config(
        "bert", "lora", train_head=False, modules_to_train=["bert.pooler.dense"]))
    assert list(adapted.trained_modules) == ["bert.pooler.dense"]
    assert not adapted.model.classifier.weight.requires_grad


def test_rank_larger_than_layer_is_refused_with_its_name() -> None:
    config = parse_config({"model": {"name_or_path": "x", "task": "seq-cls"}, "targets": ["query"],
                           "method": {"name": "lora", "r": 64}})
    with pytest.raises(ValueError, match=r"layer 'bert.encoder.layer.0.attention.self.query': r=64 is larger"):
        apply_surgery(tiny_model("bert"), config)


def test_surgery_twice_is_refused() -> None:
    model = tiny_model("bert")
    apply_surgery(model, surgery_config("bert", "lora"))
    with pytest.raises(ValueError, match="already holds adapter layers"):
        apply_surgery(model, surgery_config("bert", "lora"))


def test_every_method_is_registered() -> None:
    expected = {"lora", "proda", "loda", "loda_plus", "r_loda", "r_loda_plus", "s_loda", "s_loda_plus",
                "cla", "c3la", "pera"}
    assert set(METHODS) == expected
