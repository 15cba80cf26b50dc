import pytest
import torch
from transformers.pytorch_utils import Conv1D

from surgery.config import ConfigError, parse_config
from surgery.methods import METHODS
from surgery.methods.base import AdapterLayer, MethodConfig, ResidualLayer
from surgery.methods.loda import LoDAConfig, LoDALayer, LoDAPlusConfig, LoDAPlusLayer, LoDAResidual, apply_f2
from surgery.tolerances import layer_tolerance
from tests.surgery.method_harness import (
    base_layers,
    check_all,
)

# METHODS.md and loda.txt section 3.1: LeakyReLU slope 0.8, LayerNorm without affine (eps as nn.LayerNorm's).
SLOPE, EPS = 0.8, 1e-5

CONFIGS = [
    LoDAConfig(r=4),
    LoDAConfig(r=4, alpha=3.0, rslora=True),
    LoDAPlusConfig(r=4),
    LoDAPlusConfig(r=4, f2="ln_leaky"),
    LoDAPlusConfig(r=6, alpha=5.0, f2="ln_leaky"),
]


def config_id(config: MethodConfig) -> str:
    """The keys a test id needs: the name and every non-default field."""
    return "-".join([config.name] + [f"{k}={v}" for k, v in config.model_dump(exclude_defaults=True).items()])


def leaky_ref(h: torch.Tensor) -> torch.Tensor:
    return torch.where(h >= 0, h, SLOPE * h)


def layer_norm_ref(h: torch.Tensor) -> torch.Tensor:
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    return (h - mean) / torch.sqrt(var + EPS)


def scaling_ref(cfg: MethodConfig) -> float:
    alpha = cfg.alpha if cfg.alpha is not None else 2 * cfg.r  # MethodConfig's default alpha = 2r
    return alpha / (cfg.r ** 0.5 if cfg.rslora else cfg.r)


def loda_reference(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """METHODS.md: u = A x, f1(u) = M2 LN(leaky(M1 u)); LoDA: s B (u + f1(u)); LoDA+: s (B u + f2(B f1(u)))."""
    A, M1, M2, B = (p.detach().double() for p in (layer.loda_A, layer.loda_M1, layer.loda_M2, layer.loda_B))
    cfg, s = layer.config, scaling_ref(layer.config)
    u = x @ A.t()
    f1 = layer_norm_ref(leaky_ref(u @ M1.t())) @ M2.t()
    f2 = getattr(cfg, "f2", None)
    if f2 is None:
        return s * (u + f1) @ B.t()
    h = f1 @ B.t()
    return s * (u @ B.t() + (leaky_ref(layer_norm_ref(h)) if f2 == "ln_leaky" else leaky_ref(h)))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_loda_matches_dense_reference(config: MethodConfig) -> None:
    layer_cls = METHODS[config.name]
    check_all(layer_cls, config, loda_reference)


def test_registry_and_param_formula() -> None:
    assert METHODS["loda"] is LoDALayer and METHODS["loda_plus"] is LoDAPlusLayer
    # METHODS.md: r (d_in + d_out) + 2 r^2
    assert LoDALayer.count_params(24, 20, LoDAConfig(r=4)) == 4 * 44 + 32
    assert LoDAPlusLayer.count_params(24, 20, LoDAPlusConfig(r=4)) == 4 * 44 + 32


def test_f2_of_zero_is_zero_and_finite() -> None:
    zeros = torch.zeros(3, 5, dtype=torch.float64)
    for kind in ("leaky", "ln_leaky"):
        out = apply_f2(zeros, kind)
        assert torch.isfinite(out).all() and torch.equal(out, zeros), kind


def test_f2_key_only_for_loda_plus() -> None:
    with pytest.raises(ConfigError, match=r"method\.f2: unknown key for method 'loda'"):
        parse_config({"model": {"name_or_path": "m"}, "targets": ["q"], "method": {"name": "loda", "f2": "leaky"}})
    with pytest.raises(ConfigError, match=r"method\.f2"):
        parse_config({"model": {"name_or_path": "m"}, "targets": ["q"],
                      "method": {"name": "loda_plus", "f2": "relu"}})
    config = parse_config({"model": {"name_or_path": "m"}, "targets": ["q"],
                           "method": {"name": "loda_plus", "f2": "ln_leaky"}})
    assert isinstance(config.method, LoDAPlusConfig) and config.method.f2 == "ln_leaky"


@pytest.mark.parametrize("config", [LoDAConfig(r=3), LoDAPlusConfig(r=3, f2="ln_leaky")], ids=lambda c: c.name)
def test_fold_is_merged_layer_plus_nonlinear_residual(config: MethodConfig) -> None:
    for kind, base in base_layers(24, 20).items():
        layer = METHODS[config.name](base, config, layer_name="layer")
        layer.randomize_(torch.Generator().manual_seed(3), std=0.1)
        fold = layer.fold()
        assert isinstance(fold.module, ResidualLayer) and type(fold.module.static) is type(base), kind
        assert isinstance(fold.module.residual, LoDAResidual) and fold.residual and fold.note == "dense"
        x = torch.randn(5, 24, dtype=torch.float64)
        # the static part is exactly W0 + s B A: the residual alone is what stays non-linear
        B, A = layer.loda_B.detach(), layer.loda_A.detach()
        static_ref = x @ (layer.base_weight.detach() + layer.scaling * B @ A).t() + base.bias
        tol = layer_tolerance(torch.float64)
        torch.testing.assert_close(fold.module.static(x), static_ref, atol=tol.atol, rtol=tol.rtol)
        assert fold.macs_per_token == 24 * 20 + 3 * 24 + 2 * 9 + 3 * 20


def test_macs_per_token() -> None:
    # LoDA: A, M1, M2, B once; LoDA+: B twice (B u and B f1(u)); element-wise ops are not counted
    assert LoDALayer.macs_per_token(24, 20, LoDAConfig(r=4)).adapter == 4 * 24 + 2 * 16 + 4 * 20
    assert LoDAPlusLayer.macs_per_token(24, 20, LoDAPlusConfig(r=4)).adapter == 4 * 24 + 2 * 16 + 2 * 4 * 20
    assert LoDALayer.macs_per_token(24, 20, LoDAConfig(r=4)).base == 24 * 20


@pytest.mark.parametrize("config", [LoDAConfig(r=4), LoDAPlusConfig(r=4, f2="ln_leaky")], ids=lambda c: c.name)
def test_half_precision_base_keeps_float32_adapter_and_folds(config: MethodConfig) -> None:
    torch.manual_seed(0)
    base = Conv1D(20, 24).to(torch.bfloat16)
    layer = METHODS[config.name](base, config, layer_name="layer")
    layer.randomize_(torch.Generator().manual_seed(1), std=0.1)
    assert all(p.dtype == torch.float32 for p in layer.adapter_params().values())
    x = torch.randn(3, 24).to(torch.bfloat16)
    out, folded = layer(x), layer.fold().module(x)
    assert out.dtype == folded.dtype == torch.bfloat16
    tol = layer_tolerance(torch.bfloat16)
    torch.testing.assert_close(folded.float(), out.float(), atol=tol.atol, rtol=tol.rtol)


def test_only_declared_params_train() -> None:
    layer = LoDAPlusLayer(torch.nn.Linear(8, 6), LoDAPlusConfig(r=2))
    assert set(layer.adapter_params()) == {"loda_A", "loda_M1", "loda_M2", "loda_B"}
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(layer.adapter_params())
    assert torch.count_nonzero(layer.loda_B) == 0 and torch.count_nonzero(layer.loda_M1) > 0


@pytest.mark.parametrize("config", [LoDAConfig(r=4), LoDAPlusConfig(r=4, f2="ln_leaky")], ids=config_id)
def test_layer_norms_have_no_affine_and_eps_1e_5(config: MethodConfig) -> None:
    """METHODS.md, LoDA: LN over r with no trainable affine, epsilon 1e-5 (LoDA+'s ln_leaky: the same over d_out).
    Inputs near 0 make the hidden activations' variance (~1e-8) far below eps, where the epsilon decides the output:
    eps 1e-6 instead of 1e-5 would change it by a factor of about 3, an affine would add parameters."""
    layer = METHODS[config.name](base_layers(24, 20)["linear"], config, layer_name="layer")
    layer.randomize_(torch.Generator().manual_seed(0), std=0.3)
    assert set(layer.adapter_params()) == {"loda_A", "loda_M1", "loda_M2", "loda_B"}
    assert set(dict(layer.named_parameters())) == {"base.weight", "base.bias", *layer.adapter_params()}
    x = 1e-4 * torch.randn(5, 24, dtype=torch.float64)
    hidden = leaky_ref(x @ layer.loda_A.detach().t() @ layer.loda_M1.detach().t())
    assert float(hidden.var(dim=-1, unbiased=False).max()) < 1e-6, "the case where eps decides"
    F64 = layer_tolerance(torch.float64)
    torch.testing.assert_close(layer.delta(x), loda_reference(layer, x), atol=F64.atol, rtol=F64.rtol)
    folded = layer.fold().module
    assert not [name for name, _ in folded.named_parameters() if "norm" in name or "ln" in name.split(".")]
    torch.testing.assert_close(folded(x), layer(x), atol=F64.atol, rtol=F64.rtol)
