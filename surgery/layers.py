"""The layers surgery can adapt: ``nn.Linear`` and GPT-2's ``Conv1D``, seen through one (d_out, d_in) view.

GPT-2's ``Conv1D`` stores its weight as (d_in, d_out) (fan-in-fan-out). Every method works on the Linear view
``W0: (d_out, d_in)`` returned by :func:`weight_out_in`; only this file knows the difference.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types a method can wrap."""
    return isinstance(module, ADAPTABLE_TYPES)


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in), a view of the stored tensor (Conv1D's is transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if isinstance(layer, Conv1D):
        return layer.weight.t()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def layer_bias(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, "bias", None)


def build_like(
    layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A new frozen layer of ``layer``'s type holding ``weight`` (d_out, d_in) and ``bias``, cast to ``dtype``.

    Used by folds: a fully merged adapter becomes the same kind of layer it wrapped, so the exported graph
    has exactly the base model's nodes.
    """
    dtype = dtype or layer_dtype(layer)
    d_out, d_in = weight.shape
    with torch.device(weight.device):
        if isinstance(layer, Conv1D):
            new = Conv1D(d_out, d_in)
            new.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
            bias = bias if bias is not None else torch.zeros(d_out, device=weight.device)
            new.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
            return new
        new = nn.Linear(d_in, d_out, bias=bias is not None)
    new.weight = nn.Parameter(weight.contiguous().to(dtype), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return new


def layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a (d_out, d_in) weight: the Linear view of any adaptable layer."""
    return nn.functional.linear(x, weight, bias)
