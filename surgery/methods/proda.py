"""ProDA (proda.txt, eq. 2-6): LoRA plus an additive profile P and a gated interaction with BA.

    P        = b_c 1^T + 1 b_r^T                                  (never materialised in the forward)
    gamma(x) = gamma_g + sigmoid(W_up relu(W_down x))             one scalar per token
    delta(x) = s B A x~ + P x + gamma(x) s (B A (.) P) x~,        x~ = drop(x)

with ``P x = b_c sum(x) + (b_r . x) 1`` and ``(B A (.) P) x = b_c (B A x) + B A (b_r x)``. The profile and the
controller see the undropped ``x``; only the low-rank paths see ``x~``. Fold: ``W' = W0 + s B A + P +
gamma_g s (B A (.) P)``; the input-dependent part of gamma stays, fused into the static matmul, as
:class:`ProDAFolded`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.layers import weight_out_in
from surgery.methods.base import AdapterLayer, Fold, Macs, MethodConfig, kaiming_


class ProDAConfig(MethodConfig):
    name: Literal["proda"] = "proda"
    r: int = Field(8, gt=0, description="adapter rank (the paper's default 8)")
    alpha: float | None = Field(16.0, gt=0, description="scaling numerator (the paper's 16); 2r when null")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the low-rank paths' input, training only")
    d_b: int = Field(8, gt=0, description="bottleneck width of the gate controller W_up relu(W_down x)")


class ProDALayer(AdapterLayer):
    config_class = ProDAConfig
    noop_params = ("lora_B", "profile_col", "profile_row")  # B = 0 and P = 0: every term of delta is 0

    def __init__(self, base: nn.Module, config: ProDAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.lora_A = self.new_param(config.r, self.d_in)  # A: (r, d_in)
        self.lora_B = self.new_param(self.d_out, config.r)  # B: (d_out, r)
        self.profile_col = self.new_param(self.d_out)  # b_c: (d_out,)
        self.profile_row = self.new_param(self.d_in)  # b_r: (d_in,)
        self.gamma_global = self.new_param(1)  # gamma_g: (1,), broadcasts against the (..., 1) gate
        self.controller_down = self.new_param(config.d_b, self.d_in)  # W_down: (d_b, d_in)
        self.controller_up = self.new_param(1, config.d_b)  # W_up: (1, d_b)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.lora_B.zero_()
            self.profile_col.zero_()
            self.profile_row.zero_()
            self.gamma_global.zero_()
            kaiming_(self.controller_down)
            kaiming_(self.controller_up)

    # ---- forward -----------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        x_drop = self.dropout(x)
        low_rank, row_scaled = (x_drop @ self.stacked_down().t()).chunk(2, dim=-1)  # A x~, A (b_r x~): (..., r)
        ba_x = low_rank @ self.lora_B.t()  # B A x~: (..., d_out)
        interaction = self.profile_col * ba_x + row_scaled @ self.lora_B.t()  # (B A (.) P) x~: (..., d_out)
        gamma = self.gamma_global + self.gate(x)  # (..., 1)
        return self.scaling * (ba_x + gamma * interaction) + self.profile(x)

    def stacked_down(self) -> torch.Tensor:
        """[A ; A diag(b_r)]: (2r, d_in), formed once per call, not per token."""
        return torch.cat([self.lora_A, self.lora_A * self.profile_row], dim=0)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(W_up relu(W_down x)), the input-dependent part of gamma. x: (..., d_in) -> (..., 1)"""
        return torch.sigmoid(torch.relu(x @ self.controller_down.t()) @ self.controller_up.t())

    def profile(self, x: torch.Tensor) -> torch.Tensor:
        """P x = b_c sum(x) + (b_r . x) 1 without forming P. x: (..., d_in) -> (..., d_out)"""
        return self.profile_col * x.sum(dim=-1, keepdim=True) + (x @ self.profile_row).unsqueeze(-1)

    # ---- trainable parameters ----------------------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {
            "lora_A": self.lora_A,
            "lora_B": self.lora_B,
            "profile_col": self.profile_col,
            "profile_row": self.profile_row,
            "gamma_global": self.gamma_global,
            "controller_down": self.controller_down,
            "controller_up": self.controller_up,
        }

    # ---- costs -------------------------------------------------------------------------------------
    @classmethod
    def count_params(cls, d_in: int, d_out: int, config: MethodConfig) -> int:
        assert isinstance(config, ProDAConfig)
        # A, B; b_c, b_r; W_down, W_up, gamma_g
        return config.r * (d_in + d_out) + (d_in + d_out) + config.d_b * d_in + config.d_b + 1

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        assert isinstance(config, ProDAConfig)
        r, d_b = config.r, config.d_b
        # METHODS.md's per-token cost: one down-projection d_in -> 2r + d_b ([A ; A diag(b_r) ; W_down]), the gate's
        # W_up (d_b), one up-projection 2r -> d_out. Element-wise products with vectors and the scalar gate are not
        # counted (as in LoRA's count), so the unmerged adapter and the fold's residual cost the same.
        return Macs(base=d_in * d_out, adapter=(2 * r + d_b) * d_in + 2 * r * d_out + d_b)

    # ---- fold --------------------------------------------------------------------------------------
    def static_update(self, dtype: torch.dtype) -> torch.Tensor:
        """s B A + P + gamma_g s (B A (.) P): (d_out, d_in) in ``dtype``, the static part of gamma included."""
        lora_A, lora_B = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        col, row = self.profile_col.detach().to(dtype), self.profile_row.detach().to(dtype)
        ba = lora_B @ lora_A  # (d_out, d_in)
        profile = col.unsqueeze(1) + row.unsqueeze(0)  # P: (d_out, d_in); the fold forms W' anyway
        gamma_global = self.gamma_global.detach().to(dtype)
        return self.scaling * ba + profile + gamma_global * self.scaling * (ba * profile)

    def fold(self) -> Fold:
        dtype = self.fold_dtype()
        lora_A, lora_B = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        col, row = self.profile_col.detach().to(dtype), self.profile_row.detach().to(dtype)
        static = self.merged_layer(self.static_update(dtype))
        folded = ProDAFolded.from_factors(
            weight_out_in(static).detach(), self.base_bias, lora_A, lora_B, col, row,
            self.controller_down.detach().to(dtype), self.controller_up.detach().to(dtype), self.scaling,
        )
        r, d_b = self.config.r, folded.d_b
        macs = self.macs_per_token(self.d_in, self.d_out, self.config)  # the residual costs what the adapter did
        return Fold(
            module=folded,
            residual=f"sigmoid(W_up relu(W_down x)) * s (BA (.) P) x, fused: d_in -> 2r+d_b={2 * r + d_b}, gate, "
                     f"then [W' | up] [x ; gate * low_rank] in the static matmul (K = d_in + {2 * r})",
            note="dense",
            macs_per_token=macs.base + macs.adapter,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_b={self.config.d_b}"


class ProDAFolded(nn.Module):
    """ProDA after the fold: ``W' x + b + sigmoid(W_up relu(W_down x)) * s [diag(b_c) B | B] [A ; A diag(b_r)] x``.

    Fused as METHODS.md asks, one step further: one down-projection ``d_in -> 2r + d_b`` (rows ``A``,
    ``A diag(b_r)``, ``W_down``), a split, the gate on the ``d_b`` part, the scalar gate times the ``2r`` low-rank
    part, and the up-projection ``s [diag(b_c) B | B]`` rides in the static matmul as ``K`` columns:
    ``[W' | up] [x ; gate * low_rank] + b``. So the export adds no ``d_out``-wide matmul, multiply or add to the
    base layer (measured: 2 points less latency over the base on MiniLM than a separate up-projection and add).
    x: (..., d_in) -> (..., d_out). Frozen, in the base layer's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, gate_up: torch.Tensor,
                 rank: int) -> None:
        super().__init__()
        d_b, d_in = gate_up.shape[1], down.shape[1]
        if down.shape[0] != 2 * rank + d_b or weight.shape[1] != d_in + 2 * rank or gate_up.shape[0] != 1:
            raise ValueError(f"ProDAFolded: weight {tuple(weight.shape)}, down {tuple(down.shape)} and gate "
                             f"{tuple(gate_up.shape)} do not fit r={rank}, d_b={d_b}")
        self.rank, self.d_b, self.d_in = rank, d_b, d_in
        self.down = frozen_linear(down)  # (2r + d_b, d_in)
        self.gate_up = frozen_linear(gate_up)  # (1, d_b)
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)  # (d_out, d_in + 2r)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_factors(cls, static_weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, profile_col: torch.Tensor, profile_row: torch.Tensor,
                     controller_down: torch.Tensor, controller_up: torch.Tensor, scaling: float) -> ProDAFolded:
        """Stack the factors (all in one accumulation dtype), round them once to the static weight's dtype."""
        dtype = static_weight.dtype
        down = torch.cat([lora_A, lora_A * profile_row, controller_down], dim=0)  # (2r + d_b, d_in)
        up = scaling * torch.cat([profile_col.unsqueeze(1) * lora_B, lora_B], dim=1)  # (d_out, 2r)
        weight = torch.cat([static_weight, up.to(dtype)], dim=1)  # (d_out, d_in + 2r)
        bias = None if bias is None else bias.detach().to(dtype)
        return cls(weight, bias, down.to(dtype), controller_up.to(dtype), rank=lora_A.shape[0])

    @property
    def static_weight(self) -> torch.Tensor:
        """``W'`` (d_out, d_in): what the fold merged."""
        return self.weight[:, : self.d_in]

    def gated_low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``gate(x) * [A ; A diag(b_r)] x``: x (..., d_in) -> (..., 2r)."""
        low_rank, hidden = self.down(x).split([2 * self.rank, self.d_b], dim=-1)  # (..., 2r), (..., d_b)
        gate = torch.sigmoid(self.gate_up(torch.relu(hidden)))  # (..., 1)
        return gate * low_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        return F.linear(torch.cat([x, self.gated_low_rank(x)], dim=-1), self.weight, self.bias)


def frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free frozen nn.Linear holding ``weight`` (d_out, d_in) as is (its dtype and device)."""
    d_out, d_in = weight.shape
    layer = nn.Linear(d_in, d_out, bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    return layer
