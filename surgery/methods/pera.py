"""PERA (pera.txt, eq. 2-5): LoRA with second-order products of the factors' rank directions.

Over the pairs ``p = (i, j), i <= j`` (row-major upper triangle, diagonal included):

    A^ = [A ; h_p (a_i * a_j)]      (r + r(r+1)/2, d_in)     a_i: row i of A
    B^ = [B , (b_i * b_j)]          (d_out, r + r(r+1)/2)    b_i: column i of B
    delta(x) = s B^ A^ drop(x)

``terms: square`` (i = j) or ``cross`` (i < j) keeps ``h`` of the other pairs frozen at zero. Fully mergeable:
``W' = W0 + s B^ A^``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from surgery.methods.base import AdapterLayer, Fold, Macs, MethodConfig, kaiming_


class PERAConfig(MethodConfig):
    name: Literal["pera"] = "pera"
    terms: Literal["all", "square", "cross"] = Field(
        "all", description="which pair coefficients h train: all pairs i <= j, square (i = j) or cross (i < j)"
    )

    default_alpha: ClassVar[str] = "r"  # s = 1, as the paper's code


def num_pairs(rank: int) -> int:
    """r (r + 1) / 2: the pairs i <= j."""
    return rank * (rank + 1) // 2


def expanded_rank(rank: int) -> int:
    """Rows of A^ (columns of B^): r + r (r + 1) / 2."""
    return rank + num_pairs(rank)


def dense_is_cheaper(n_tokens: int, d_in: int, d_out: int, rank: int) -> bool:
    """Forming B^ A^ once (k d_in d_out, then d_in d_out per token) beats the per-token path (k (d_in + d_out)
    per token) for this many tokens; k = r + r(r+1)/2. Forming A^ and B^ themselves costs both paths the same."""
    k = expanded_rank(rank)
    per_token = n_tokens * k * (d_in + d_out)
    dense = k * d_in * d_out + n_tokens * d_in * d_out
    return dense < per_token


class PERALayer(AdapterLayer):
    config_class = PERAConfig
    noop_params = ("lora_B",)  # B = 0: B^ = [B, b_i * b_j] = 0

    def __init__(self, base: nn.Module, config: PERAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.lora_A = self.new_param(config.r, self.d_in)  # A: (r, d_in)
        self.lora_B = self.new_param(self.d_out, config.r)  # B: (d_out, r)
        self.pera_h = self.new_param(num_pairs(config.r))  # h: (r(r+1)/2,), one per pair i <= j
        rows, cols = torch.triu_indices(config.r, config.r, device=self.device)  # row-major, diagonal included
        self.register_buffer("pair_rows", rows, persistent=False)  # i of each pair: (r(r+1)/2,)
        self.register_buffer("pair_cols", cols, persistent=False)  # j of each pair: (r(r+1)/2,)
        self.register_buffer("term_mask", term_mask(rows, cols, config.terms), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.lora_B.zero_()
            self.pera_h.zero_()

    @torch.no_grad()
    def randomize_(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random A, B and h, keeping h of the pairs ``terms`` excludes at zero."""
        super().randomize_(generator, std)
        self.pera_h.masked_fill_(~self.term_mask, 0.0)

    # ---- forward -----------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        x_drop = self.dropout(x)
        a_hat, b_hat = self.expanded_factors()  # (k, d_in), (d_out, k)
        n_tokens = x.numel() // self.d_in
        if dense_is_cheaper(n_tokens, self.d_in, self.d_out, self.config.r):
            return self.scaling * (x_drop @ (b_hat @ a_hat).t())
        return self.scaling * ((x_drop @ a_hat.t()) @ b_hat.t())

    def coefficients(self) -> torch.Tensor:
        """h with the excluded pairs held at zero (their gradient is zero too). (r(r+1)/2,)"""
        return self.pera_h.masked_fill(~self.term_mask, 0.0)

    def expanded_factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A^: (r + r(r+1)/2, d_in) and B^: (d_out, r + r(r+1)/2), computed in ``dtype`` (default: the adapter's)."""
        rows, cols = self.pair_rows, self.pair_cols
        lora_A, lora_B, h = (t.to(dtype or t.dtype) for t in (self.lora_A, self.lora_B, self.coefficients()))
        a_pairs = h.unsqueeze(1) * lora_A[rows] * lora_A[cols]  # (pairs, d_in)
        b_pairs = lora_B[:, rows] * lora_B[:, cols]  # (d_out, pairs)
        return torch.cat([lora_A, a_pairs], dim=0), torch.cat([lora_B, b_pairs], dim=1)

    # ---- trainable parameters ----------------------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "pera_h": self.pera_h}

    # ---- costs -------------------------------------------------------------------------------------
    @classmethod
    def count_params(cls, d_in: int, d_out: int, config: MethodConfig) -> int:
        # METHODS.md's count for every `terms`: h keeps all r(r+1)/2 entries; `square`/`cross` only hold some
        # of them at zero (masked), they stay declared so checkpoints of every variant have one layout.
        return config.r * (d_in + d_out) + num_pairs(config.r)

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        # Per token, the cheaper path as the token count grows: k (d_in + d_out) through A^ then B^, or d_in d_out
        # through B^ A^ formed once per call (its k d_in d_out and forming A^, B^ amortise over the tokens).
        k = expanded_rank(config.r)
        return Macs(base=d_in * d_out, adapter=min(k * (d_in + d_out), d_in * d_out))

    # ---- fold --------------------------------------------------------------------------------------
    def static_update(self, dtype: torch.dtype) -> torch.Tensor:
        """s B^ A^: (d_out, d_in) in ``dtype``."""
        with torch.no_grad():
            a_hat, b_hat = self.expanded_factors(dtype)
            return self.scaling * (b_hat @ a_hat)

    def fold(self) -> Fold:
        return Fold(
            module=self.merged_layer(self.static_update(self.fold_dtype())),
            residual=None,
            note="dense",
            macs_per_token=self.d_in * self.d_out,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, terms={self.config.terms}"


def term_mask(rows: torch.Tensor, cols: torch.Tensor, terms: str) -> torch.Tensor:
    """True for the pairs whose h trains: all, square (i = j) or cross (i < j). (pairs,) bool"""
    if terms == "square":
        return rows == cols
    if terms == "cross":
        return rows < cols
    return torch.ones_like(rows, dtype=torch.bool)
