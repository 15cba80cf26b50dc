"""LoRA (the baseline): delta(x) = s B A drop(x); fully mergeable, W' = W0 + s B A.

LoRA+ (``lora_plus_ratio``) trains B with a learning rate ``ratio`` times A's; rsLoRA scales by alpha / sqrt(r).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.methods.base import AdapterLayer, Fold, Macs, MethodConfig, kaiming_


class LoRAConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    lora_plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of B over that of A (16 is the paper's choice); off when null"
    )


class LoRALayer(AdapterLayer):
    config_class = LoRAConfig
    noop_params = ("lora_B",)  # B = 0: s B A x = 0

    def __init__(self, base: nn.Module, config: LoRAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.lora_A = self.new_param(config.r, self.d_in)  # (r, d_in)
        self.lora_B = self.new_param(self.d_out, config.r)  # (d_out, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.lora_B.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        # scaling folded into B: r d_out multiplies instead of one per output element
        return nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.scaling * self.lora_B)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def lr_scale(self, param_name: str) -> float:
        ratio = self.config.lora_plus_ratio
        return ratio if (ratio is not None and param_name == "lora_B") else 1.0

    @classmethod
    def count_params(cls, d_in: int, d_out: int, config: MethodConfig) -> int:
        return config.r * (d_in + d_out)

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        return Macs(base=d_in * d_out, adapter=config.r * (d_in + d_out))

    def static_update(self, dtype: torch.dtype) -> torch.Tensor:
        """s B A: (d_out, d_in) in ``dtype``."""
        return self.scaling * (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype))

    def fold(self) -> Fold:
        return Fold(
            module=self.merged_layer(self.static_update(self.fold_dtype())),
            residual=None,
            note="dense",
            macs_per_token=self.d_in * self.d_out,
        )
