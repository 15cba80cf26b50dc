"""S-LoDA(+) (loda.txt, section 2.2): LoDA(+) trained on a frozen magnitude-pruned copy of W0.

    W_s = W0 (.) mask,   y = W_s x + b + delta(x),        delta as LoDA(+) in ``loda.py``

``pattern: unstructured`` keeps the ``round(keep d_in d_out)`` entries of largest magnitude; ``pattern: "2:4"``
keeps the 2 largest of every 4 consecutive inputs of each output row (the layout of sparse tensor cores and
TensorRT's sparse weights), so ``keep`` is 0.5. Ties go to the lower index (stable sort), so the mask is
reproducible; it is computed on the CPU from |W0| in float64 and hashed in the checkpoint. ``approx_scope: qkv``
prunes the stacked ``[Wq; Wk; Wv]`` with one global threshold (2:4 is per row, so stacking changes nothing);
a sibling that is not a target becomes a :class:`PrunedLayer` without adapter.

Fold: ``unstructured`` merges densely (``W_s + s B A``, sparsity lost) and keeps LoDA's residual; ``2:4`` keeps
``W_s`` as the static layer and the whole adapter unmerged beside it, so the pattern survives for sparse kernels.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from surgery.layers import build_like, layer_bias, weight_out_in
from surgery.methods.base import ApproximatedLayer, Fold, Macs, MethodConfig, ResidualLayer, require
from surgery.methods.loda import (
    Approximation,
    ApproxLoDALayer,
    ApproxScope,
    LoDAConfig,
    LoDAPlusConfig,
    adapter_macs,
    residual_macs,
)

Pattern = Literal["unstructured", "2:4"]


class PruneFields(MethodConfig):
    keep: float = Field(0.5, gt=0, le=1, description="fraction of W0's entries kept (2:4 implies 0.5)")
    pattern: Pattern = Field("unstructured", description='unstructured, or "2:4" (2 largest of every 4 inputs)')
    approx_scope: ApproxScope = Field("layer", description="layer: each target alone; qkv: q, k, v jointly")

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_is_text(cls, value: Any) -> Any:
        if isinstance(value, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
            raise ValueError(f'method.pattern is the number {value}; YAML reads an unquoted 2:4 as base 60, '
                             f'write pattern: "2:4"')
        return value

    @model_validator(mode="after")
    def _two_four_keeps_half(self) -> PruneFields:
        if self.pattern == "2:4" and self.keep != 0.5:
            raise ValueError(f'method.keep={self.keep} contradicts pattern: "2:4", which keeps 2 of every 4 '
                             f'inputs (keep = 0.5); remove keep or use pattern: unstructured')
        return self


class SLoDAConfig(PruneFields, LoDAConfig):
    name: Literal["s_loda"] = "s_loda"


class SLoDAPlusConfig(PruneFields, LoDAPlusConfig):
    name: Literal["s_loda_plus"] = "s_loda_plus"


def kept_count(numel: int, keep: float) -> int:
    """How many entries an unstructured mask keeps: round(keep numel)."""
    return round(keep * numel)


def kept_entries(pruned_weight: torch.Tensor, keep: float) -> int:
    """Entries a pruned weight (d_out, d_in) keeps, counted: under ``approx_scope: qkv`` one threshold over the stack
    gives each layer its own share, not ``keep`` of it. An entry of W0 that was exactly 0 counts as dropped (a sparse
    kernel skips it too). On the meta device (dry run) nothing is known but the nominal ``round(keep d_in d_out)``."""
    if pruned_weight.is_meta:
        return kept_count(pruned_weight.numel(), keep)
    return int(torch.count_nonzero(pruned_weight))


def magnitude_mask(weight: torch.Tensor, keep: float, pattern: Pattern) -> torch.Tensor:
    """Boolean mask (m, n) of the entries of weight (m, n) to keep; ties go to the lower index."""
    magnitude = weight.detach().to("cpu", torch.float64).abs()
    if pattern == "2:4":
        groups = magnitude.reshape(weight.shape[0], -1, 4)  # (m, n / 4, 4): 4 consecutive inputs
        top = groups.argsort(dim=-1, descending=True, stable=True)[..., :2]  # (m, n / 4, 2)
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(weight.shape)
    order = magnitude.flatten().argsort(descending=True, stable=True)
    mask = torch.zeros(magnitude.numel(), dtype=torch.bool)
    mask[order[: kept_count(magnitude.numel(), keep)]] = True
    return mask.reshape(weight.shape)


class PrunedLayer(ApproximatedLayer):
    """A frozen layer replaced by its pruned weight, without adapter (approx_scope: qkv's untargeted sibling).
    x: (..., d_in) -> (..., d_out). ``base`` is kept frozen for its bias and the model's state_dict layout."""

    def __init__(self, base: nn.Module, pruned_weight: torch.Tensor, keep: float) -> None:
        super().__init__(base)
        self.keep = keep
        self.register_buffer("pruned_weight", pruned_weight, persistent=False)  # (d_out, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.pruned_weight, layer_bias(self.base))

    def layer_macs(self) -> Macs:
        return Macs(base=kept_entries(self.pruned_weight, self.keep), adapter=0)

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        return {"pruned_weight": self.pruned_weight}

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, keep={self.keep}"


class SLoDALayer(ApproxLoDALayer):
    """S-LoDA, or S-LoDA+ (:class:`SLoDAPlusLayer`) when the config has ``f2``."""

    config_class = SLoDAConfig

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.pruned_weight, self.base_bias)

    @classmethod
    def check_approximation(cls, d_in: int, d_out: int, config: MethodConfig, layer_name: str) -> None:
        if config.pattern == "2:4":
            require(d_in % 4 == 0, layer_name,
                    f'pattern: "2:4" needs d_in divisible by 4, got d_in={d_in}; use pattern: unstructured or '
                    f"exclude this layer")
        else:
            require(kept_count(d_in * d_out, config.keep) > 0, layer_name,
                    f"keep={config.keep} keeps no entry of a {d_out} x {d_in} weight; raise method.keep")

    @classmethod
    def approximate(cls, layers: dict[str, nn.Module], config: MethodConfig) -> dict[str, Approximation]:
        weights = [weight_out_in(layer).detach() for layer in layers.values()]  # each (d_out_i, d_in)
        rows = [w.shape[0] for w in weights]
        if any(w.is_meta for w in weights):  # dry run: shapes only
            pruned = [torch.empty_like(w, device="meta") for w in weights]
        else:
            stacked = torch.cat([w.to("cpu", torch.float64) for w in weights])  # (sum d_out_i, d_in)
            mask = magnitude_mask(stacked, config.keep, config.pattern)
            pruned = [w * m.to(w.device) for w, m in zip(weights, mask.split(rows), strict=True)]
        return {name: {"pruned_weight": w.contiguous()} for name, w in zip(layers, pruned, strict=True)}

    @classmethod
    def approximated_layer(cls, base: nn.Module, approximation: Approximation, config: MethodConfig) -> PrunedLayer:
        return PrunedLayer(base, approximation["pruned_weight"], config.keep)

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        """A layer pruned alone: ``round(keep d_in d_out)``; :meth:`layer_macs` counts what this layer's mask kept."""
        return Macs(base=kept_count(d_in * d_out, config.keep), adapter=adapter_macs(d_in, d_out, config))

    def layer_macs(self) -> Macs:
        return Macs(base=kept_entries(self.pruned_weight, self.config.keep),
                    adapter=adapter_macs(self.d_in, self.d_out, self.config))

    def fold(self) -> Fold:
        if self.config.pattern == "2:4":
            return self._fold_sparse()
        residual = self.frozen_adapter(with_linear=False)
        return Fold(
            module=ResidualLayer(self.merged_layer(self.static_update(self.fold_dtype())), residual),  # W_s + s B A
            residual=residual.describe(),
            note="dense",
            macs_per_token=self.d_in * self.d_out + residual_macs(self.d_in, self.d_out, self.config),
        )

    @property
    def merge_base(self) -> torch.Tensor:
        """W_s: the dense fold adds s B A to the pruned weight, not to W0."""
        return self.pruned_weight

    def static_update(self, dtype: torch.dtype) -> torch.Tensor | None:
        """s B A (unstructured); None with 2:4, whose fold keeps W_s sparse and the adapter unmerged."""
        return None if self.config.pattern == "2:4" else super().static_update(dtype)

    def _fold_sparse(self) -> Fold:
        """W_s stays a static 2:4-sparse layer; the adapter runs beside it unmerged."""
        adapter = self.frozen_adapter(with_linear=True)
        static = build_like(self.base, self.pruned_weight, self.base_bias, dtype=self.base_weight.dtype)
        return Fold(
            module=ResidualLayer(static, adapter),
            residual=adapter.describe(),
            note="2:4 sparse + low-rank",
            macs_per_token=kept_count(self.d_in * self.d_out, 0.5) + adapter_macs(self.d_in, self.d_out, self.config),
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return f"{super().extra_repr()}, keep={cfg.keep}, pattern={cfg.pattern}, scope={cfg.approx_scope}"


class SLoDAPlusLayer(SLoDALayer):
    config_class = SLoDAPlusConfig
