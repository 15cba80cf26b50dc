"""Shared checks for one method against its dense reference from METHODS.md.

A method's test supplies ``reference(layer, x)``: the formula for delta(x), computed densely in float64 from the
layer's own parameters (materialising the matrices the module never forms). The harness wraps a Linear and a
GPT-2 Conv1D, randomises every adapter parameter (never the zero init), and checks forward, fold, identity at
init and the parameter count at several input shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgery.layers import weight_out_in
from surgery.methods.base import AdapterLayer, MethodConfig
from surgery.tolerances import layer_tolerance

Reference = Callable[[AdapterLayer, torch.Tensor], torch.Tensor]
INPUT_SHAPES = ((3,), (2, 5), (1, 7))


def base_layers(d_in: int, d_out: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, nn.Module]:
    """A Linear with bias and a Conv1D (fan-in-fan-out) with random weights of the same shape."""
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out).to(dtype)
    conv = Conv1D(d_out, d_in).to(dtype)
    with torch.no_grad():
        conv.weight.normal_(0, 0.5)
        conv.bias.normal_(0, 0.5)
    return {"linear": linear, "conv1d": conv}


def dense_base(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ weight_out_in(layer).t() + layer.bias


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    tol = layer_tolerance(expected.dtype)
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"{what}: {m}")


def randomized(layer_cls: type[AdapterLayer], base: nn.Module, config: MethodConfig, seed: int = 1) -> AdapterLayer:
    layer = layer_cls(base, config, layer_name="layer")
    layer.randomize_(torch.Generator().manual_seed(seed), std=0.1)
    return layer.eval()


def check_forward(layer_cls: type[AdapterLayer], config: MethodConfig, reference: Reference,
                  d_in: int = 24, d_out: int = 20) -> None:
    """Module output == dense base + reference delta, for Linear and Conv1D, at several input shapes."""
    for kind, base in base_layers(d_in, d_out).items():
        layer = randomized(layer_cls, base, config)
        for shape in INPUT_SHAPES:
            x = torch.randn(*shape, d_in, dtype=torch.float64)
            expected = layer.base_forward(x) + reference(layer, x)
            assert_close(layer(x), expected, f"{config.name} forward on {kind} {tuple(x.shape)}")
            delta = reference(layer, x)
            assert delta.abs().max() > 1e-6, f"{config.name}: randomised adapter gives a zero delta on {kind}"


def check_fold(layer_cls: type[AdapterLayer], config: MethodConfig, d_in: int = 24, d_out: int = 20) -> None:
    """The folded module reproduces the unfolded layer at several shapes; it trains nothing."""
    for kind, base in base_layers(d_in, d_out).items():
        layer = randomized(layer_cls, base, config)
        fold = layer.fold()
        for shape in INPUT_SHAPES:
            x = torch.randn(*shape, d_in, dtype=torch.float64)
            assert_close(fold.module(x), layer(x), f"{config.name} fold on {kind} {tuple(x.shape)}")
        assert not any(p.requires_grad for p in fold.module.parameters()), "a folded module must be frozen"


def check_identity_at_init(layer_cls: type[AdapterLayer], config: MethodConfig,
                           d_in: int = 24, d_out: int = 20) -> None:
    """A fresh adapter leaves the base layer's output exactly unchanged."""
    for kind, base in base_layers(d_in, d_out).items():
        layer = layer_cls(base, config, layer_name="layer").eval()
        x = torch.randn(4, d_in, dtype=torch.float64)
        torch.testing.assert_close(layer(x), layer.base_forward(x), atol=0, rtol=0,
                                   msg=lambda m: f"{config.name} at init on {kind}: {m}")


def check_param_count(layer_cls: type[AdapterLayer], config: MethodConfig, d_in: int = 24, d_out: int = 20) -> None:
    for base in base_layers(d_in, d_out).values():
        layer = layer_cls(base, config, layer_name="layer")
        declared = sum(p.numel() for p in layer.adapter_params().values())
        assert declared == layer_cls.count_params(d_in, d_out, config)
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert trainable == declared, "only declared adapter parameters may require grad"


def check_all(layer_cls: type[AdapterLayer], config: MethodConfig, reference: Reference,
              d_in: int = 24, d_out: int = 20) -> None:
    """Forward against the reference, fold, identity at init and the parameter count, at one layer shape."""
    check_forward(layer_cls, config, reference, d_in, d_out)
    check_fold(layer_cls, config, d_in, d_out)
    check_identity_at_init(layer_cls, config, d_in, d_out)
    check_param_count(layer_cls, config, d_in, d_out)
