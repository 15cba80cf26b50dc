import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgery.layers import weight_out_in
from surgery.methods import method_class
from surgery.methods.proda import ProDAConfig, ProDAFolded, ProDALayer
from tests.surgery.method_harness import (
    assert_close,
    base_layers,
    check_all,
    randomized,
)

D_IN, D_OUT = 24, 20
CONFIGS = [
    ProDAConfig(),
    ProDAConfig(r=4, d_b=3),
    ProDAConfig(r=2, alpha=3.0, rslora=True, d_b=1),
    ProDAConfig(r=5, alpha=None, d_b=16, dropout=0.0),
]


def scaling(cfg: ProDAConfig) -> float:
    alpha = cfg.alpha if cfg.alpha is not None else 2 * cfg.r
    return alpha / (cfg.r ** 0.5 if cfg.rslora else cfg.r)


def dense_factors(layer: ProDALayer) -> dict[str, torch.Tensor]:
    """Every ProDA tensor in float64, with P and B A (.) P materialised (METHODS.md, ProDA)."""
    f = {name: p.detach().double() for name, p in layer.adapter_params().items()}
    ones_in, ones_out = torch.ones(layer.d_in, dtype=torch.float64), torch.ones(layer.d_out, dtype=torch.float64)
    f["P"] = torch.outer(f["profile_col"], ones_in) + torch.outer(ones_out, f["profile_row"])  # (d_out, d_in)
    f["BA"] = f["lora_B"] @ f["lora_A"]
    f["BA_P"] = f["BA"] * f["P"]
    return f


def dense_gate(f: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """sigmoid(W_up relu(W_down x)) per token: (..., 1)."""
    return torch.sigmoid(torch.relu(x @ f["controller_down"].t()) @ f["controller_up"].t())


def proda_reference(layer: ProDALayer, x: torch.Tensor, x_drop: torch.Tensor | None = None) -> torch.Tensor:
    """delta(x) = s B A x~ + P x + gamma(x) s (B A (.) P) x~, gamma(x) = gamma_g + gate(x); x~ = x in eval."""
    f, s = dense_factors(layer), scaling(layer.config)
    x_drop = x if x_drop is None else x_drop
    gamma = f["gamma_global"] + dense_gate(f, x)
    return s * x_drop @ f["BA"].t() + x @ f["P"].t() + gamma * s * (x_drop @ f["BA_P"].t())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"r{c.r}-db{c.d_b}-rs{c.rslora}")
def test_proda_matches_dense_reference(config: ProDAConfig) -> None:
    check_all(ProDALayer, config, proda_reference)


def test_proda_defaults_follow_the_paper() -> None:
    cfg = ProDAConfig()
    assert (cfg.r, cfg.resolved_alpha, cfg.dropout, cfg.d_b) == (8, 16.0, 0.05, 8)
    assert cfg.scaling == 2.0
    assert method_class("proda") is ProDALayer


def test_proda_param_count_formula() -> None:
    # r(d_in + d_out) + (d_in + d_out) + d_b d_in + d_b + 1 with r = 8, d_b = 8, d_in = 24, d_out = 20
    assert ProDALayer.count_params(D_IN, D_OUT, ProDAConfig()) == 8 * 44 + 44 + 8 * 24 + 8 + 1


class FixedMask(nn.Module):
    """A deterministic stand-in for dropout, so the reference knows x~."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_proda_macs_follow_the_methods_formula() -> None:
    # METHODS.md, ProDA: "(2r + d_b) d_in + 2r d_out + d_b MACs" per token. With r=4, d_b=3, d_in=16, d_out=24:
    # (8 + 3) 16 + 8 24 + 3 = 176 + 192 + 3 = 371 (the count before issue 16 said 475: it added 2 d_in + 3 d_out
    # for the element-wise profile and gate products, which the formula does not count).
    macs = ProDALayer.macs_per_token(16, 24, ProDAConfig(r=4, d_b=3))
    assert (macs.base, macs.adapter) == (16 * 24, 371)


def test_proda_dropout_reaches_only_the_low_rank_paths() -> None:
    # P x and the controller see x; B A x~ and (B A (.) P) x~ see the dropped input.
    layer = randomized(ProDALayer, base_layers(D_IN, D_OUT)["linear"], ProDAConfig(r=4, d_b=3, dropout=0.5))
    mask = (torch.rand(D_IN, generator=torch.Generator().manual_seed(3)) > 0.5).double() * 2.0
    layer.dropout = FixedMask(mask)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    expected = layer.base_forward(x) + proda_reference(layer, x, x_drop=x * mask)
    assert_close(layer(x), expected, "proda with a fixed dropout mask")


def test_proda_fold_is_static_weight_plus_fused_residual() -> None:
    cfg = ProDAConfig(r=4, d_b=3)
    for kind, base in base_layers(D_IN, D_OUT).items():
        layer = randomized(ProDALayer, base, cfg)
        fold = layer.fold()
        f, s = dense_factors(layer), scaling(cfg)
        folded = fold.module
        assert isinstance(folded, ProDAFolded) and fold.residual, kind
        # static: W0 + s B A + P + gamma_g s (B A (.) P), and the base bias
        w0 = weight_out_in(base).detach()
        expected_w = w0 + s * f["BA"] + f["P"] + f["gamma_global"] * s * f["BA_P"]
        assert_close(folded.static_weight, expected_w, f"proda static weight on {kind}")
        assert_close(folded.bias, base.bias.detach(), f"proda bias on {kind}")
        # what the static weight does not hold: sigmoid(W_up relu(W_down x)) s (B A (.) P) x
        x = torch.randn(3, 7, D_IN, dtype=torch.float64)
        residual = folded(x) - (x @ expected_w.t() + base.bias.detach())
        assert_close(residual, dense_gate(f, x) * s * (x @ f["BA_P"].t()), f"proda residual on {kind}")


def test_proda_residual_is_fused() -> None:
    r, d_b = 4, 3
    fold = randomized(ProDALayer, base_layers(D_IN, D_OUT)["conv1d"], ProDAConfig(r=r, d_b=d_b)).fold()
    weights = {name: p.shape for name, p in fold.module.named_parameters()}
    assert weights == {
        "down.weight": (2 * r + d_b, D_IN),  # [A ; A diag(b_r) ; W_down]: one down-projection
        "gate_up.weight": (1, d_b),
        "weight": (D_OUT, D_IN + 2 * r),  # [W' | s [diag(b_c) B | B]]: the up-projection in the static matmul
        "bias": (D_OUT,),
    }
    assert fold.macs_per_token == D_IN * D_OUT + (2 * r + d_b) * D_IN + 2 * r * D_OUT + d_b
    assert fold.note == "dense"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_proda_fold_keeps_the_base_dtype(dtype: torch.dtype) -> None:
    for kind, base in base_layers(D_IN, D_OUT, dtype=dtype).items():
        layer = randomized(ProDALayer, base, ProDAConfig(r=4, d_b=3))
        assert layer.lora_A.dtype == torch.float32, "adapter tensors train in float32 on half-precision bases"
        fold = layer.fold()
        assert {p.dtype for p in fold.module.parameters()} == {dtype}, kind
        assert not any(p.requires_grad for p in fold.module.parameters())
        x = torch.randn(2, 5, D_IN).to(dtype)
        assert_close(fold.module(x), layer(x), f"proda fold in {dtype} on {kind}")


def test_proda_gradient_reaches_every_declared_param() -> None:
    layer = randomized(ProDALayer, Conv1D(D_OUT, D_IN).double(), ProDAConfig(r=4, d_b=3))
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    for name, param in layer.adapter_params().items():
        assert param.grad is not None and param.grad.abs().max() > 0, f"no gradient reaches {name}"
    assert all(p.grad is None for p in layer.base.parameters()), "the base layer must stay frozen"
