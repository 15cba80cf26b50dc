import pytest
import torch
from transformers.pytorch_utils import Conv1D

from surgery.methods import method_class
from surgery.methods.pera import PERAConfig, PERALayer, dense_is_cheaper
from tests.surgery.method_harness import (
    assert_close,
    base_layers,
    check_all,
    randomized,
)

D_IN, D_OUT = 24, 20
CONFIGS = [
    PERAConfig(r=4),
    PERAConfig(r=4, terms="square"),
    PERAConfig(r=4, terms="cross"),
    PERAConfig(r=3, alpha=2.0, rslora=True),
    PERAConfig(r=6, alpha=12.0, terms="cross", dropout=0.1),
    PERAConfig(r=1, terms="square"),
]


def pairs(rank: int) -> list[tuple[int, int]]:
    """METHODS.md's order: row-major upper triangle, diagonal included."""
    return [(i, j) for i in range(rank) for j in range(i, rank)]


def kept(i: int, j: int, terms: str) -> bool:
    return terms == "all" or (terms == "square" and i == j) or (terms == "cross" and i < j)


def dense_update(layer: PERALayer) -> torch.Tensor:
    """s B^ A^ in float64, with A^ and B^ built row by row from the pair list."""
    cfg = layer.config
    a, b, h = (p.detach().double() for p in (layer.lora_A, layer.lora_B, layer.pera_h))
    a_rows, b_cols = list(a), list(b.t())
    for p, (i, j) in enumerate(pairs(cfg.r)):
        coefficient = h[p] if kept(i, j, cfg.terms) else 0.0
        a_rows.append(coefficient * a[i] * a[j])
        b_cols.append(b[:, i] * b[:, j])
    a_hat, b_hat = torch.stack(a_rows), torch.stack(b_cols, dim=1)  # (r + pairs, d_in), (d_out, r + pairs)
    alpha = cfg.alpha if cfg.alpha is not None else cfg.r
    s = alpha / (cfg.r ** 0.5 if cfg.rslora else cfg.r)
    return s * b_hat @ a_hat


def pera_reference(layer: PERALayer, x: torch.Tensor) -> torch.Tensor:
    """delta(x) = s B^ A^ x (eval: no dropout)."""
    return x @ dense_update(layer).t()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"r{c.r}-{c.terms}-rs{c.rslora}")
def test_pera_matches_dense_reference(config: PERAConfig) -> None:
    check_all(PERALayer, config, pera_reference)


def test_pera_defaults() -> None:
    cfg = PERAConfig(r=4)
    assert cfg.terms == "all" and cfg.resolved_alpha == 4.0 and cfg.scaling == 1.0
    assert method_class("pera") is PERALayer


@pytest.mark.parametrize("terms", ["all", "square", "cross"])
def test_pera_param_count_ignores_terms(terms: str) -> None:
    # METHODS.md: r(d_in + d_out) + r(r+1)/2, whichever pairs train
    assert PERALayer.count_params(D_IN, D_OUT, PERAConfig(r=4, terms=terms)) == 4 * 44 + 10


@pytest.mark.parametrize("terms", ["square", "cross"])
def test_pera_masked_terms_stay_zero_after_a_step(terms: str) -> None:
    layer = randomized(PERALayer, base_layers(D_IN, D_OUT)["linear"], PERAConfig(r=4, terms=terms)).train()
    masked = torch.tensor([not kept(i, j, terms) for i, j in pairs(4)])
    assert torch.all(layer.pera_h.detach()[masked] == 0) and torch.all(layer.pera_h.detach()[~masked] != 0)
    before = layer.pera_h.detach().clone()
    optimizer = torch.optim.SGD(list(layer.adapter_params().values()), lr=0.5)
    layer(torch.randn(4, 6, D_IN, dtype=torch.float64)).pow(2).sum().backward()
    grad = layer.pera_h.grad
    assert torch.all(grad[masked] == 0), f"masked h entries got a gradient: {grad[masked]}"
    assert torch.all(grad[~masked] != 0), "the kept h entries must train"
    optimizer.step()
    assert torch.all(layer.pera_h.detach()[masked] == 0)
    assert torch.all(layer.pera_h.detach()[~masked] != before[~masked])


def test_pera_ignores_a_nonzero_masked_coefficient() -> None:
    # a checkpoint with a value in a frozen pair must not change the update
    layer = randomized(PERALayer, base_layers(D_IN, D_OUT)["linear"], PERAConfig(r=4, terms="cross"))
    x = torch.randn(3, D_IN, dtype=torch.float64)
    before = layer(x)
    with torch.no_grad():
        layer.pera_h[0] = 5.0  # pair (0, 0): a square term
    assert_close(layer(x), before, "pera with a value in a masked h entry")


def test_pera_fold_is_plain_layer_of_the_same_type() -> None:
    for kind, base in base_layers(D_IN, D_OUT).items():
        layer = randomized(PERALayer, base, PERAConfig(r=4))
        fold = layer.fold()
        assert type(fold.module) is type(base) and fold.residual is None, kind
        assert fold.macs_per_token == D_IN * D_OUT


@pytest.mark.parametrize("n_tokens", [3, 400])
def test_pera_both_paths_match_the_reference(n_tokens: int) -> None:
    # k = 8 + 36 = 44: the per-token path costs 44 * 44 per token, forming B^ A^ once 44 * 480 + 480 per token
    cfg = PERAConfig(r=8, alpha=3.0)
    assert dense_is_cheaper(n_tokens, D_IN, D_OUT, cfg.r) == (n_tokens > 14)
    layer = randomized(PERALayer, Conv1D(D_OUT, D_IN).double(), cfg)
    x = torch.randn(n_tokens, D_IN, dtype=torch.float64)
    assert_close(layer(x), layer.base_forward(x) + pera_reference(layer, x), f"pera with {n_tokens} tokens")


def test_pera_macs_take_the_cheaper_path() -> None:
    assert PERALayer.macs_per_token(D_IN, D_OUT, PERAConfig(r=2)).adapter == 5 * (D_IN + D_OUT)
    assert PERALayer.macs_per_token(D_IN, D_OUT, PERAConfig(r=8)).adapter == D_IN * D_OUT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pera_fold_keeps_the_base_dtype(dtype: torch.dtype) -> None:
    for kind, base in base_layers(D_IN, D_OUT, dtype=dtype).items():
        layer = randomized(PERALayer, base, PERAConfig(r=4))
        fold = layer.fold()
        assert {p.dtype for p in fold.module.parameters()} == {dtype}, kind
        x = torch.randn(2, 5, D_IN).to(dtype)
        assert_close(fold.module(x), layer(x), f"pera fold in {dtype} on {kind}")
