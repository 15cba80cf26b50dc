import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from export.fold import fold_model, model_macs
from surgery.config import parse_config
from surgery.layers import weight_out_in
from surgery.methods import METHODS
from surgery.methods.base import AdapterLayer, MethodConfig
from surgery.methods.r_loda import (
    LowRankLayer,
    LowRankLoDAFold,
    RLoDAConfig,
    RLoDALayer,
    RLoDAPlusConfig,
    RLoDAPlusLayer,
)
from surgery.report import build_report
from surgery.rewrite import AdaptedModel, apply_surgery
from surgery.targets import resolve_targets
from surgery.tolerances import layer_tolerance
from tests.surgery.method_harness import (
    base_layers,
    check_all,
)
from tests.surgery.test_loda import config_id, loda_reference
from tests.tiny_models import tiny_model

CONFIGS = [
    RLoDAConfig(r=4, approx_rank=6),
    RLoDAConfig(r=3, approx_rank=1, alpha=2.0, rslora=True),
    RLoDAPlusConfig(r=4, approx_rank=6),
    RLoDAPlusConfig(r=4, approx_rank=19, f2="ln_leaky"),
]
F64 = layer_tolerance(torch.float64)


def best_rank_approx(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart-Young: the best rank-R approximation is the truncated SVD, U_R diag(S_R) V_R^T (dense, float64)."""
    U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def dense_base_reference(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    return x @ best_rank_approx(layer.base_weight, layer.config.approx_rank).t() + layer.base_bias.detach()


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_r_loda_matches_dense_reference(config: MethodConfig) -> None:
    layer_cls = METHODS[config.name]
    check_all(layer_cls, config, loda_reference)
    for kind, base in base_layers(24, 20).items():
        layer = layer_cls(base, config, layer_name="layer")
        x = torch.randn(2, 5, 24, dtype=torch.float64)
        torch.testing.assert_close(layer.base_forward(x), dense_base_reference(layer, x), atol=F64.atol,
                                   rtol=F64.rtol, msg=lambda m: f"{config.name} base on {kind}: {m}")


def test_registry() -> None:
    assert METHODS["r_loda"] is RLoDALayer and METHODS["r_loda_plus"] is RLoDAPlusLayer


@pytest.mark.parametrize("rank", [1, 5, 19])
def test_base_is_the_best_rank_r_approximation(rank: int) -> None:
    for kind, base in base_layers(24, 20).items():
        layer = RLoDALayer(base, RLoDAConfig(r=2, approx_rank=rank), layer_name="layer")
        weight = layer.base_weight.detach()
        assert layer.U_R.shape == (20, rank) and layer.V_R.shape == (rank, 24)
        singular = torch.linalg.svdvals(weight)
        error = torch.linalg.matrix_norm(weight - layer.U_R @ layer.V_R)
        torch.testing.assert_close(error, singular[rank:].square().sum().sqrt(), atol=1e-10, rtol=1e-9,
                                   msg=lambda m: f"Eckart-Young on {kind}: {m}")


@pytest.mark.parametrize("config", [RLoDAConfig(r=4, approx_rank=6), RLoDAPlusConfig(r=4, approx_rank=6)],
                         ids=lambda c: c.name)
def test_fold_is_two_thin_matmuls_of_inner_size_r_plus_r(config: MethodConfig) -> None:
    for base in base_layers(24, 20).values():
        layer = METHODS[config.name](base, config, layer_name="layer")
        layer.randomize_(torch.Generator().manual_seed(2), std=0.1)
        fold = layer.fold()
        module = fold.module
        assert isinstance(module, LowRankLoDAFold)
        assert module.down.weight.shape == (6 + 4, 24) and module.down.bias is None
        assert module.up.weight.shape == (20, 6 + 4) and module.up.bias is not None
        # [V_R ; A] and [U_R | s B]
        assert torch.equal(module.down.weight[:6], layer.V_R) and torch.equal(module.down.weight[6:], layer.loda_A)
        torch.testing.assert_close(module.up.weight[:, 6:], layer.scaling * layer.loda_B.detach())
        # no other matmul touches d_in; only LoDA+'s f2 path has another d_out-sized one
        wide = [m for m in module.modules() if isinstance(m, nn.Linear) and max(m.weight.shape) > 4]
        assert len(wide) == (3 if config.name == "r_loda_plus" else 2)
        extra = 4 * 20 if config.name == "r_loda_plus" else 0
        assert fold.macs_per_token == 10 * (24 + 20) + 2 * 16 + extra and "rank-6" in fold.note


def test_macs_base_is_rank_times_dims() -> None:
    macs = RLoDALayer.macs_per_token(24, 20, RLoDAConfig(r=4, approx_rank=6))
    assert macs.base == 6 * (24 + 20) and macs.adapter == 4 * 24 + 2 * 16 + 4 * 20


@pytest.mark.parametrize(("d_in", "d_out", "rank"), [(24, 20, 20), (24, 20, 30), (8, 16, 8)])
def test_approx_rank_must_be_below_min_dims(d_in: int, d_out: int, rank: int) -> None:
    config = RLoDAConfig(r=2, approx_rank=rank)
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.fc': approx_rank="):
        RLoDALayer.check_layer(d_in, d_out, config, "blocks.0.fc")
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.fc': approx_rank="):
        RLoDALayer(nn.Linear(d_in, d_out), config, layer_name="blocks.0.fc")


def test_approx_rank_is_a_required_positive_int() -> None:
    for method in ({"name": "r_loda"}, {"name": "r_loda", "approx_rank": 0}, {"name": "r_loda", "approx_rank": 2.5}):
        with pytest.raises(ValueError, match=r"method\.approx_rank"):
            parse_config({"model": {"name_or_path": "m"}, "targets": ["q"], "method": method})


def test_factors_are_deterministic_frozen_and_not_in_state_dict() -> None:
    config = RLoDAPlusConfig(r=2, approx_rank=5)
    first, second = (RLoDAPlusLayer(base_layers(24, 20)["conv1d"], config, "layer") for _ in range(2))
    derived = first.derived_tensors()
    assert set(derived) == {"U_R", "V_R"}
    assert all(torch.equal(derived[k], second.derived_tensors()[k]) for k in derived)
    assert not any(k in first.state_dict() for k in derived) and "U_R" not in first.adapter_state()
    assert not any(t.requires_grad for t in derived.values())


def test_meta_device_builds_shapes_without_computing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_svd(*args: object, **kwargs: object) -> None:
        raise AssertionError("the SVD must not run on the meta device")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    layer = RLoDALayer(nn.Linear(32, 24, device="meta"), RLoDAConfig(r=4, approx_rank=7), "layer")
    assert layer.U_R.is_meta and layer.U_R.shape == (24, 7) and layer.V_R.shape == (7, 32)
    assert layer(torch.empty(2, 32, device="meta")).shape == (2, 24)


def test_qkv_scope_on_llama_factors_the_stack_jointly() -> None:
    model = tiny_model("llama", dtype=torch.float64)
    config = RLoDAConfig(r=4, approx_rank=8, approx_scope="qkv")
    targets = resolve_targets(model, ["q_proj", "v_proj"])
    replacements = RLoDALayer.wrap_targets(targets, config, model=model)
    for block in ("model.layers.0.self_attn", "model.layers.1.self_attn"):
        q, k, v = (replacements[f"{block}.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
        assert isinstance(q, RLoDALayer) and isinstance(v, RLoDALayer)
        assert isinstance(k, LowRankLayer) and not isinstance(k, AdapterLayer)
        assert not any(p.requires_grad for p in k.parameters())
        assert torch.equal(q.V_R, k.V_R) and torch.equal(q.V_R, v.V_R)  # one shared V_R
        stacked = torch.cat([weight_out_in(m.base) for m in (q, k, v)]).detach()  # (32 + 16 + 16, 32)
        approx = torch.cat([q.U_R, k.U_R, v.U_R]) @ q.V_R
        singular = torch.linalg.svdvals(stacked)
        torch.testing.assert_close(torch.linalg.matrix_norm(stacked - approx), singular[8:].square().sum().sqrt(),
                                   atol=1e-10, rtol=1e-9)
        x = torch.randn(3, 32, dtype=torch.float64)
        torch.testing.assert_close(k(x), x @ best_rank_approx(stacked, 8)[32:48].t(), atol=F64.atol, rtol=F64.rtol)


def test_qkv_scope_through_surgery_replaces_k_and_runs() -> None:
    model = tiny_model("llama")
    adapted = apply_surgery(model, parse_config({
        "model": {"name_or_path": "tiny"}, "targets": ["q_proj", "v_proj"],
        "method": {"name": "r_loda_plus", "r": 2, "approx_rank": 6, "approx_scope": "qkv"},
    }))
    assert len(adapted.layers) == 4
    assert isinstance(model.get_submodule("model.layers.1.self_attn.k_proj"), LowRankLayer)
    logits = model(torch.randint(3, 128, (2, 5))).logits
    assert torch.isfinite(logits).all()


def test_qkv_scope_on_bert_and_gpt2() -> None:
    bert = tiny_model("bert", dtype=torch.float64)
    config = RLoDAConfig(r=2, approx_rank=6, approx_scope="qkv")
    replacements = RLoDALayer.wrap_targets(resolve_targets(bert, ["query", "value"]), config, model=bert)
    assert isinstance(replacements["bert.encoder.layer.0.attention.self.key"], LowRankLayer)
    # GPT-2's c_attn is already one fused q,k,v layer: qkv scope equals layer scope
    gpt2 = tiny_model("gpt2", dtype=torch.float64)
    targets = resolve_targets(gpt2, ["c_attn"])
    joint = RLoDALayer.wrap_targets(targets, config, model=gpt2)
    alone = RLoDALayer.wrap_targets(targets, RLoDAConfig(r=2, approx_rank=6), model=gpt2)
    assert set(joint) == set(targets)
    assert all(torch.equal(joint[n].U_R, alone[n].U_R) for n in targets)


def test_qkv_scope_checks_the_untargeted_sibling() -> None:
    model = tiny_model("llama", dtype=torch.float64)
    config = RLoDAConfig(r=4, approx_rank=16, approx_scope="qkv")  # k_proj is 16 x 32
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.k_proj': approx_rank=16"):
        RLoDALayer.wrap_targets(resolve_targets(model, ["q_proj"]), config, model=model)


# ---- approx_scope: qkv computes V_R x once for the group (METHODS.md: the stacked [Wq; Wk; Wv] costs
# R (d_in + d_out) MACs per token with d_out = d_q + d_k + d_v) -----------------------------------------------------
QKV = ("q_proj", "k_proj", "v_proj")


def qkv_llama(rank: int = 6, r: int = 2) -> tuple[nn.Module, AdaptedModel]:
    """Tiny Llama (d_in 32; q 32, k 16, v 16 outputs) in float64 with R-LoDA on q and v, q, k, v factored jointly,
    every adapter randomised so the group's outputs are not the base's."""
    model = tiny_model("llama", dtype=torch.float64)
    adapted = apply_surgery(model, parse_config({
        "model": {"name_or_path": "tiny"}, "targets": ["q_proj", "v_proj"],
        "method": {"name": "r_loda", "r": r, "approx_rank": rank, "approx_scope": "qkv"},
    }))
    generator = torch.Generator().manual_seed(0)
    for layer in adapted.layers.values():
        layer.randomize_(generator, std=0.3)
    return model, adapted


def test_qkv_group_computes_V_R_x_once_and_exactly_as_per_layer() -> None:
    model, adapted = qkv_llama()
    attention = model.model.layers[0].self_attn
    q, k, v = (getattr(attention, p) for p in QKV)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        shared = [m(x) for m in (q, k, v)]  # one input, as the attention calls them
    alone = [m(x.clone()) for m in (q, k, v)]  # equal values, another tensor: each computes its own V_R x
    assert all(torch.equal(a, b) for a, b in zip(shared, alone, strict=True)), "sharing V_R x changes no bit"
    # By hand from METHODS.md (R = 6, r = 2, d_in = 32; d_q, d_k, d_v = 32, 16, 16): the stacked approximation
    # R (d_in + d_q + d_k + d_v) = 6 (32 + 64) = 576, LoDA's A, M1, M2, B on q and v: r d_in + 2 r^2 + r d_out =
    # 64 + 8 + 64 = 136 and 64 + 8 + 32 = 104: 816 per token (before issue 16, V_R x once per layer: 1200).
    assert counter.get_total_flops() == 2 * 10 * 816  # FlopCounterMode counts 2 flops per MAC; 10 tokens
    rows = {row["name"].rsplit(".", 1)[-1]: row for row in build_report(adapted)["modules"]
            if row["name"].startswith("model.layers.0.")}
    assert sum(row["base_macs_per_token"] + row["adapter_macs_per_token"] for row in rows.values()) == 816


def test_qkv_group_gradients_match_per_layer() -> None:
    model, _ = qkv_llama()
    attention = model.model.layers[0].self_attn
    x_shared, x_alone = (torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                         .requires_grad_() for _ in range(2))
    sum(getattr(attention, p)(x_shared).square().sum() for p in QKV).backward()
    sum(getattr(attention, p)(x_alone.clone()).square().sum() for p in QKV).backward()
    torch.testing.assert_close(x_shared.grad, x_alone.grad, atol=F64.atol, rtol=F64.rtol)


def test_qkv_group_projection_recomputes_for_another_input() -> None:
    model, _ = qkv_llama()
    attention = model.model.layers[0].self_attn
    q, k, v = (getattr(attention, p) for p in QKV)
    x, memory = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    expected_k, expected_v = k(memory.clone()), v(memory.clone())
    q(x)  # cross-attention: q reads x, k and v another tensor
    assert torch.equal(k(memory), expected_k) and torch.equal(v(memory), expected_v)
    q(x)
    x.add_(1.0)  # changed in place after q read it
    assert torch.equal(k(x), k(x.clone()))
    copied = copy.deepcopy(q)
    assert copied.group_projection is not q.group_projection and copied.group_projection._entry is None
    assert pickle.loads(pickle.dumps(q.group_projection))._entry is None


def test_plan_and_export_count_the_group_once_and_k_approximated() -> None:
    model, adapted = qkv_llama()
    rank, r, d_in = 6, 2, 32
    rows = build_report(adapted)["modules"]
    assert [row["name"].rsplit(".", 1)[-1] for row in rows] == list(QKV) * 2, "the plan lists the unadapted k"
    group = [row for row in rows if row["name"].startswith("model.layers.0.")]
    assert [(row["adapter"], row["trainable_params"]) for row in group] == [(True, 2 * (32 + 32) + 8), (False, 0),
                                                                          (True, 2 * (32 + 16) + 8)]
    assert sum(row["base_macs_per_token"] for row in group) == rank * (d_in + 32 + 16 + 16)  # 576
    assert group[1]["base_macs_per_token"] == rank * (d_in + 16), "R d_in is counted by k, which stays unfolded"
    # the export: q and v fold to [U_R | s B] [V_R ; A] x (+ f1), each computing its own V_R x; k stays a LowRankLayer
    # computing R (d_in + d_k), not the dense d_in d_k it replaced (before issue 16: 512 instead of 288)
    folded = fold_model(adapted)
    deployed, base = model_macs(folded.model, folded.layers)
    fold = {record.name.rsplit(".", 1)[-1]: record.macs_per_token for record in folded.layers
            if record.name.startswith("model.layers.0.")}
    assert fold == {"q_proj": (rank + r) * (d_in + 32) + 2 * r * r, "v_proj": (rank + r) * (d_in + 16) + 2 * r * r}
    dense_qkv = d_in * (32 + 16 + 16)
    assert base - deployed == 2 * (dense_qkv - (fold["q_proj"] + fold["v_proj"] + rank * (d_in + 16)))
