import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from surgery.methods import METHODS
from surgery.methods.cla import CLAConfig, CLALayer
from tests.surgery.method_harness import (
    assert_close,
    base_layers,
    check_all,
    randomized,
)

COLUMNS = ("first", "random", "random_block")
CONFIGS = [CLAConfig(r=4, columns=c) for c in COLUMNS] + [CLAConfig(r=6, alpha=3.0, columns="random", seed=7)]


def selector(idx: torch.Tensor, d_in: int) -> torch.Tensor:
    """The paper's A = S (r x d_in), one-hot rows: S[i, idx[i]] = 1. Built in the reference only."""
    dense = torch.zeros(len(idx), d_in, dtype=torch.float64)
    dense[torch.arange(len(idx)), idx] = 1.0
    return dense


def cla_reference(layer: CLALayer, x: torch.Tensor) -> torch.Tensor:
    """METHODS.md: delta(x) = s B A x with A the 0/1 column selector of idx, s = alpha / r."""
    cfg = layer.config
    s = cfg.resolved_alpha / cfg.r
    a = selector(layer.cla_idx, layer.d_in)
    return s * x @ (layer.cla_B.detach().double() @ a).t()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"r{c.r}-{c.columns}-seed{c.seed}")
def test_cla_matches_dense_reference(config: CLAConfig) -> None:
    check_all(CLALayer, config, cla_reference)


def test_defaults_follow_the_paper() -> None:
    cfg = CLAConfig()
    assert (cfg.r, cfg.resolved_alpha, cfg.dropout, cfg.columns) == (16, 32.0, 0.0, "first")
    assert METHODS["cla"] is CLALayer


def make(columns: str, name: str, d_in: int = 24, r: int = 4, seed: int = 0) -> CLALayer:
    return CLALayer(nn.Linear(d_in, 5), CLAConfig(r=r, columns=columns, seed=seed), layer_name=name)


@pytest.mark.parametrize("columns", COLUMNS)
def test_columns_are_distinct_in_range_and_deterministic(columns: str) -> None:
    layer = make(columns, "h.0.attn")
    idx = layer.cla_idx
    assert idx.dtype == torch.long and idx.shape == (4,)
    assert len(set(idx.tolist())) == 4 and 0 <= int(idx.min()) and int(idx.max()) < 24
    assert torch.equal(idx, make(columns, "h.0.attn").cla_idx), "same seed and name must give the same columns"


def test_first_columns_are_the_leading_window() -> None:
    assert make("first", "any").cla_idx.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("columns", ["random", "random_block"])
def test_random_columns_depend_on_layer_name_and_seed(columns: str) -> None:
    names = [f"h.{i}.mlp" for i in range(8)]
    by_name = {tuple(make(columns, n).cla_idx.tolist()) for n in names}
    by_seed = {tuple(make(columns, "h.0.mlp", seed=s).cla_idx.tolist()) for s in range(8)}
    assert len(by_name) > 1 and len(by_seed) > 1


def test_random_block_is_one_contiguous_window() -> None:
    for i in range(10):
        idx = make("random_block", f"layer{i}").cla_idx
        assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + 4))


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def test_delta_is_a_gather_not_a_selector_matmul() -> None:
    d_in, r = 24, 4
    layer = randomized(CLALayer, nn.Linear(d_in, 20).double(), CLAConfig(r=r, columns="random"))
    assert not any(t.shape == (r, d_in) for t in layer.state_dict().values()), "no dense selector is stored"
    with OpRecorder() as recorder:
        layer.delta(torch.randn(3, 5, d_in, dtype=torch.float64))
    ops = [name for name, _ in recorder.calls]
    assert any("index_select" in op or "gather" in op or "index.Tensor" in op for op in ops), ops
    matmuls = [(name, shapes) for name, shapes in recorder.calls if any(k in name for k in ("mm", "matmul", "addmm"))]
    assert matmuls, "B must still be applied by a matmul"
    for name, shapes in matmuls:
        assert all(d_in not in shape for shape in shapes), f"{name} touches a d_in-wide operand: {shapes}"


def test_costs() -> None:
    cfg = CLAConfig(r=4)
    assert CLALayer.count_params(24, 20, cfg) == 80
    macs = CLALayer.macs_per_token(24, 20, cfg)
    assert (macs.base, macs.adapter) == (480, 80)


def test_r_larger_than_d_in_is_rejected_and_r_larger_than_d_out_is_fine() -> None:
    with pytest.raises(ValueError, match="d_in=8"):
        CLALayer(nn.Linear(8, 30), CLAConfig(r=10), layer_name="blocks.0.fc")
    with pytest.raises(ValueError, match="blocks.0.fc"):
        CLALayer.check_layer(8, 30, CLAConfig(r=10), "blocks.0.fc")
    CLALayer.check_layer(30, 8, CLAConfig(r=10), "blocks.0.fc")  # B is (d_out, r): every entry is a free weight


def test_fold_is_plain_layer_of_the_same_type() -> None:
    for base in (nn.Linear(24, 6), Conv1D(6, 24)):
        layer = CLALayer(base, CLAConfig(r=4, columns="random"), layer_name="x")
        layer.randomize_(torch.Generator().manual_seed(0))
        fold = layer.fold()
        assert type(fold.module) is type(base) and fold.residual is None
        assert fold.module.weight.dtype == base.weight.dtype


def test_fold_touches_only_the_selected_columns() -> None:
    layer = randomized(CLALayer, nn.Linear(24, 20).double(), CLAConfig(r=4, columns="random"))
    delta_weight = layer.fold().module.weight - layer.base.weight
    untouched = [c for c in range(24) if c not in layer.cla_idx.tolist()]
    assert torch.equal(delta_weight[:, untouched], torch.zeros(20, 20, dtype=torch.float64))
    expected = layer.base.weight[:, layer.cla_idx] + layer.scaling * layer.cla_B.detach()  # one rounding, as the fold
    torch.testing.assert_close(layer.fold().module.weight[:, layer.cla_idx], expected, atol=0, rtol=0)


def test_checkpoint_restores_idx_into_a_layer_with_other_columns() -> None:
    bases = base_layers(24, 20)
    trained = randomized(CLALayer, bases["conv1d"], CLAConfig(r=4, columns="random", seed=3))
    state = trained.adapter_state()
    assert set(state) == {"cla_B", "cla_idx"}
    fresh = CLALayer(base_layers(24, 20)["conv1d"], CLAConfig(r=4, columns="random", seed=4), layer_name="other")
    assert not torch.equal(fresh.cla_idx, trained.cla_idx)
    fresh.load_adapter_state(state)
    fresh.on_checkpoint_loaded()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(fresh.eval()(x), trained(x), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_and_single_precision_fold(dtype: torch.dtype) -> None:
    base = nn.Linear(24, 20).to(dtype)
    layer = randomized(CLALayer, base, CLAConfig(r=4, columns="random_block"))
    assert layer.cla_B.dtype == torch.float32, "adapter tensors stay float32 on a half-precision base"
    x = torch.randn(3, 24, dtype=dtype)
    assert_close(layer.fold().module(x), layer(x), f"cla fold in {dtype}")
