"""cLA and r-cLA (beyond-lora-cla.txt, section 2.3 and appendix C): delta(x) = s B drop(x)[..., idx].

``A`` is a fixed column selector, so the module never holds it: it gathers the ``r`` selected input columns
(the paper's s-cLA) and applies the trained ``B`` (d_out x r, zero at init). Nothing else trains.
``columns``: ``first`` (cLA, idx = [0, r)), ``random`` (r-cLA, r distinct columns without replacement) or
``random_block`` (r-cLA, one contiguous window at a random offset). Random choices come from a generator seeded
by ``seed`` and the layer's name (crc32, stable across processes), and ``idx`` is saved with the checkpoint.
Fully mergeable: ``W'[:, idx] += s B``.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.methods.base import AdapterLayer, Fold, Macs, MethodConfig, require

ColumnChoice = Literal["first", "random", "random_block"]


class CLAConfig(MethodConfig):
    name: Literal["cla"] = "cla"
    r: int = Field(16, gt=0, description="adapter rank: the number of input columns the adapter updates")
    columns: ColumnChoice = Field(
        "first", description="first: columns [0, r); random: r distinct random columns; random_block: one "
        "contiguous window at a random offset"
    )
    seed: int = Field(0, description="seed of the column generator (combined with each layer's name)")


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A CPU generator seeded from the config seed and the layer's name (crc32: stable across runs, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer_name}".encode()))


def select_columns(columns: ColumnChoice, d_in: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """The r input columns the adapter reads, (r,) int64 on the CPU."""
    if columns == "first":
        return torch.arange(r)
    if columns == "random":
        return torch.randperm(d_in, generator=generator)[:r].sort().values
    offset = int(torch.randint(0, d_in - r + 1, (1,), generator=generator))
    return torch.arange(offset, offset + r)


def gather_linear(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight @ x[..., idx]`` as a gather, never a GEMM with a 0/1 matrix.

    x: (..., d_in), idx: (r,), weight: (d_out, r) -> (..., d_out)
    """
    return nn.functional.linear(x.index_select(-1, idx), weight)


def column_update(idx: torch.Tensor, columns: torch.Tensor, d_in: int) -> torch.Tensor:
    """The dense (d_out, d_in) matrix that adds ``columns`` (d_out, r) at input columns ``idx`` (r,)."""
    dense = columns.new_zeros(columns.shape[0], d_in)
    return dense.index_add_(1, idx, columns)


class CLALayer(AdapterLayer):
    """x: (..., d_in) -> (..., d_out); the adapter reads only x[..., idx]."""

    config_class = CLAConfig
    noop_params = ("cla_B",)  # B = 0; the columns (cla_idx) are part of the graph and must agree between adapters

    def __init__(self, base: nn.Module, config: CLAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.check_layer(self.d_in, self.d_out, config, layer_name)
        self.cla_B = self.new_param(self.d_out, config.r)  # (d_out, r)
        self.register_buffer("cla_idx", self.initial_columns().to(self.device))  # (r,) int64, persistent
        self.reset_parameters()

    def initial_columns(self) -> torch.Tensor:
        """(r,) int64: the columns of the first (here: only) adapter."""
        generator = layer_generator(self.config.seed, self.layer_name)
        return select_columns(self.config.columns, self.d_in, self.config.r, generator)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.cla_B.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        # gather first (dropout then touches r columns, not d_in) and scale B (r d_out values, not the output)
        return nn.functional.linear(self.dropout(x.index_select(-1, self.cla_idx)), self.scaling * self.cla_B)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"cla_B": self.cla_B}

    @classmethod
    def check_layer(cls, d_in: int, d_out: int, config: MethodConfig, layer_name: str) -> None:
        # B is (d_out, r) and every entry is a free weight update, so only r <= d_in constrains the shape.
        require(
            config.r <= d_in,
            layer_name,
            f"{config.name} selects r={config.r} distinct input columns but the layer has d_in={d_in}; "
            f"lower method.r or exclude this layer",
        )

    @classmethod
    def count_params(cls, d_in: int, d_out: int, config: MethodConfig) -> int:
        return config.r * d_out

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        return Macs(base=d_in * d_out, adapter=config.r * d_out)  # the gather costs no MACs

    def fold(self) -> Fold:
        return Fold(
            module=self.merged_layer(self.static_update(self.fold_dtype())),
            residual=None,
            note="dense (W[:, idx] += s B)",
            macs_per_token=self.d_in * self.d_out,
        )

    def static_update(self, dtype: torch.dtype) -> torch.Tensor:
        """(d_out, d_in) in ``dtype``: what the fold adds to the current base weight, s B at the columns idx."""
        columns = self.scaling * self.cla_B.detach().to(dtype)  # (d_out, r)
        return column_update(self.cla_idx, columns, self.d_in)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, columns={self.config.columns}"
