import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from surgery.layers import weight_out_in
from surgery.methods import METHODS
from surgery.methods.base import TrainProgress
from surgery.methods.c3la import C3LAConfig, C3LALayer, default_switch_period
from tests.surgery.method_harness import (
    INPUT_SHAPES,
    assert_close,
    base_layers,
    check_all,
)
from tests.surgery.test_cla import selector
from train.config import TrainConfig

D_IN, D_OUT = 24, 20
CONFIGS = [C3LAConfig(r=4, columns="first"), C3LAConfig(r=10, columns="first"), C3LAConfig(r=4, columns="random")]
ids = lambda c: f"r{c.r}-{c.columns}"  # noqa: E731


def c3la_reference(layer: C3LALayer, x: torch.Tensor) -> torch.Tensor:
    """METHODS.md: the current link s B S x, S the one-hot selector of idx (finished links live in the base)."""
    s = layer.config.resolved_alpha / layer.config.r
    return s * x @ (layer.cla_B.detach().double() @ selector(layer.cla_idx, layer.d_in)).t()


def chain_reference(w0: torch.Tensor, bias: torch.Tensor, layer: C3LALayer, x: torch.Tensor) -> torch.Tensor:
    """The whole chain on the untouched W0: W0 x + b + sum_j (s B_j) S_j x + s B S x."""
    weight = w0.double().clone()
    for idx, link in zip(layer.link_idx, layer.link_delta, strict=True):
        weight += link.double() @ selector(idx, layer.d_in)
    return x @ weight.t() + bias.double() + c3la_reference(layer, x)


def trained_layer(base: nn.Module, config: C3LAConfig, switches: int, seed: int = 1) -> C3LALayer:
    """A layer after ``switches`` link switches, each link trained to random non-zero values."""
    layer = C3LALayer(base, config, layer_name="h.0.attn.c_attn")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(switches):
        layer.randomize_(generator, std=0.1)
        layer.switch_link()
    layer.randomize_(generator, std=0.1)
    return layer.eval()


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_c3la_matches_dense_reference(config: C3LAConfig) -> None:
    check_all(C3LALayer, config, c3la_reference)


def test_registered_with_cla_defaults() -> None:
    cfg = C3LAConfig()
    assert METHODS["c3la"] is C3LALayer
    assert (cfg.r, cfg.resolved_alpha, cfg.dropout, cfg.chain_length) == (16, 32.0, 0.0, 4)
    assert C3LALayer.count_params(D_IN, D_OUT, cfg) == 16 * D_OUT


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_chain_matches_dense_reference_after_switches(config: C3LAConfig) -> None:
    for kind, base in base_layers(D_IN, D_OUT).items():
        w0, bias = weight_out_in(base).detach().clone(), base.bias.detach().clone()
        layer = trained_layer(base, config, switches=3)
        for shape in INPUT_SHAPES:
            x = torch.randn(*shape, D_IN, dtype=torch.float64)
            assert_close(layer(x), chain_reference(w0, bias, layer, x), f"c3la chain on {kind} {tuple(x.shape)}")
            assert_close(layer.fold().module(x), layer(x), f"c3la fold after switches on {kind}")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_switch_folds_s_b_into_the_base_in_place(kind: str) -> None:
    config = C3LAConfig(r=10, columns="first")
    base = base_layers(D_IN, D_OUT)[kind]
    layer = trained_layer(base, config, switches=0)
    stored = base.weight  # Conv1D stores (d_in, d_out): the switch must write through the transposed view
    w_before = weight_out_in(base).detach().clone()
    idx, s_b = layer.cla_idx.clone(), layer.scaling * layer.cla_B.detach().clone()
    x = torch.randn(6, D_IN, dtype=torch.float64)
    y_before = layer(x)

    layer.switch_link()

    w_after = weight_out_in(base)
    assert base.weight is stored
    expected = w_before.clone()
    expected[:, idx] += s_b
    torch.testing.assert_close(w_after, expected, atol=0, rtol=0)
    assert torch.equal(layer.cla_B, torch.zeros_like(layer.cla_B)), "B restarts at zero"
    assert layer.cla_idx.tolist() == list(range(10, 20)), "the window moves to the next r columns"
    assert layer.link_idx.tolist() == [list(range(10))]
    torch.testing.assert_close(layer.link_delta[0], s_b, atol=0, rtol=0)
    assert_close(layer(x), y_before, "a switch preserves the layer's function")


def test_c3la_windows_wrap_modulo_d_in() -> None:
    layer = trained_layer(nn.Linear(D_IN, D_OUT).double(), C3LAConfig(r=10, chain_length=5), switches=3)
    windows = layer.link_idx.tolist() + [layer.cla_idx.tolist()]
    assert windows == [
        list(range(0, 10)),
        list(range(10, 20)),
        [20, 21, 22, 23, 0, 1, 2, 3, 4, 5],
        list(range(6, 16)),
    ]


@pytest.mark.parametrize("r", [4, 10])
def test_r_c3la_windows_are_block_aligned_and_distinct_until_exhausted(r: int) -> None:
    layer = C3LALayer(nn.Linear(D_IN, D_OUT), C3LAConfig(r=r, columns="random"), layer_name="h.3.mlp.c_fc")
    n_blocks = -(-D_IN // r)
    windows = [layer.window(j) for j in range(2 * n_blocks)]
    starts = [int(w[0]) for w in windows]
    for w in windows:
        assert int(w[0]) % r == 0 and torch.equal(w, (w[0] + torch.arange(r)) % D_IN)
    assert sorted(starts[:n_blocks]) == [b * r for b in range(n_blocks)], "every block once before any repeats"
    assert starts[n_blocks:] == starts[:n_blocks], "then the same order cycles"
    assert torch.equal(layer.cla_idx, windows[0])
    again = C3LALayer(nn.Linear(D_IN, D_OUT), C3LAConfig(r=r, columns="random"), layer_name="h.3.mlp.c_fc")
    assert [int(again.window(j)[0]) for j in range(n_blocks)] == starts[:n_blocks], "deterministic"


def test_r_c3la_order_depends_on_layer_name() -> None:
    orders = {
        tuple(int(C3LALayer(nn.Linear(D_IN, 4), C3LAConfig(r=4, columns="random"), f"l{i}").window(j)[0])
              for j in range(6))
        for i in range(6)
    }
    assert len(orders) > 1


def switch_steps(config: C3LAConfig, steps_per_epoch: int, total_steps: int) -> list[int]:
    """The optimizer steps after which the hook switched; checks it hands back B each time."""
    layer = C3LALayer(nn.Linear(D_IN, D_OUT), config, layer_name="layer")
    switched = []
    for step in range(1, total_steps + 1):
        progress = TrainProgress(step, steps_per_epoch, total_steps, total_steps / steps_per_epoch)
        reset = layer.after_optimizer_step(progress)
        if reset:
            assert len(reset) == 1 and reset[0] is layer.cla_B
            switched.append(step)
    assert layer.n_links == len(switched)
    return switched


def test_hook_switches_every_chain_every_steps_at_most_k_minus_1_times() -> None:
    assert switch_steps(C3LAConfig(r=4, chain_every=3, chain_length=4), 5, 20) == [3, 6, 9]
    assert switch_steps(C3LAConfig(r=4, chain_every=5, chain_length=4), 5, 10) == [5], "never after the last step"
    assert switch_steps(C3LAConfig(r=4, chain_every=1, chain_length=1), 5, 10) == [], "one link: plain cLA"


def test_hook_switches_every_chain_every_epochs() -> None:
    assert switch_steps(C3LAConfig(r=4, chain_every_epochs=2, chain_length=10), 5, 30) == [10, 20]
    assert switch_steps(C3LAConfig(r=4, chain_every_epochs=1, chain_length=3), 4, 40) == [4, 8]


def test_hook_default_is_floor_epochs_over_k_epochs() -> None:
    assert switch_steps(C3LAConfig(r=4, chain_length=4), 5, 50) == [10, 20, 30]  # E = 10: every floor(2.5) = 2
    assert switch_steps(C3LAConfig(r=4, chain_length=4), 5, 40) == [10, 20, 30]  # E = 8: every 2 epochs
    assert switch_steps(C3LAConfig(r=4, chain_length=4), 5, 20) == [5, 10, 15]  # E = k = 4: every epoch


def test_hook_default_with_fewer_epochs_than_links_switches_every_floor_steps_over_k() -> None:
    """METHODS.md, c3LA: "default floor(E/k) epochs, or, when E < k, every floor(T/k) optimizer steps of the run's T,
    so that a chain always has its k links". Before issue 16 a run with E < k switched every epoch: E = 3, k = 4 gave
    3 links, not 4; and E = 1 gave 1 link (no switch at all)."""
    k = 4
    for steps_per_epoch, total in ((5, 15), (10, 10), (7, 10), (100, 250)):  # E = 3, 1, 1.43, 2.5: all below k
        period = total // k  # 3, 2, 2, 62
        expected = [period, 2 * period, 3 * period]
        assert switch_steps(C3LAConfig(r=4, chain_length=k), steps_per_epoch, total) == expected, (steps_per_epoch,
                                                                                                    total)
    assert default_switch_period(5, 15, 4) == 3 and default_switch_period(5, 40, 4) == 10
    assert switch_steps(C3LAConfig(r=4, chain_length=4), 1, 3) == [1, 2], "T < k: one link per step, at least 1"


def test_plan_prints_the_chain_schedule() -> None:
    def note(train: dict | None, **method: object) -> str:
        config = TrainConfig(data={"train": "a.jsonl"}, **train) if train else None
        return C3LALayer.schedule_note(C3LAConfig(r=4, chain_length=4, **method), config)

    assert note({"epochs": 10}).endswith("3 switches (never after the last step), every floor(E / k) = 2 epoch(s) "
                                         "(E = 10)")
    assert "every floor(T / k) optimizer steps, T the run's steps (E = 2 epochs < k = 4" in note({"epochs": 2})
    assert note({"max_steps": 30}).endswith("or floor(T / k) optimizer steps when E < k, T = 30: 7 steps")
    assert note(None, chain_every=5).endswith("every 5 optimizer steps")
    assert note({"epochs": 1}, chain_every_epochs=2).endswith("every 2 epoch(s)")


def test_config_errors() -> None:
    with pytest.raises(ValidationError, match="chain_every_epochs are both set"):
        C3LAConfig(chain_every=10, chain_every_epochs=1)
    with pytest.raises(ValidationError):
        C3LAConfig(chain_length=0)
    with pytest.raises(ValidationError):
        C3LAConfig(columns="random_block")
    with pytest.raises(ValueError, match="d_in=8"):
        C3LALayer(nn.Linear(8, 30), C3LAConfig(r=10), layer_name="fc")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("columns", ["first", "random"])
def test_checkpoint_rebuilds_the_chain_from_the_untouched_base(kind: str, dtype: torch.dtype, columns: str) -> None:
    config = C3LAConfig(r=10, columns=columns, chain_length=6)
    untouched = base_layers(D_IN, D_OUT, dtype=dtype)[kind]
    trained = trained_layer(copy.deepcopy(untouched), config, switches=3)
    state = {k: v.clone() for k, v in trained.adapter_state().items()}

    assert set(state) == {"cla_B", "cla_idx", "link_idx", "link_delta"}
    assert state["link_idx"].shape == (3, 10) and state["link_delta"].shape == (3, D_OUT, 10)
    assert all(D_IN not in t.shape for t in state.values()), "no dense d_out x d_in copy"

    fresh = C3LALayer(untouched, config, layer_name="h.0.attn.c_attn").eval()
    fresh.load_adapter_state(state)
    x = torch.randn(2, 5, D_IN, dtype=dtype)
    assert_close(fresh(x), trained(x), "links not replayed yet still count in delta")
    assert_close(fresh.fold().module(x), trained(x), "fold with links not replayed yet")

    fresh.on_checkpoint_loaded()
    fresh.on_checkpoint_loaded()  # idempotent
    assert torch.equal(weight_out_in(fresh.base), weight_out_in(trained.base)), "replay is bit-exact"
    torch.testing.assert_close(fresh(x), trained(x), atol=0, rtol=0)
    assert torch.equal(fresh.fold().module.weight, trained.fold().module.weight)
    assert_close(fresh.fold().module(x), fresh(x), f"c3la fold after reload on {kind} {dtype}")


def test_training_resumes_after_reload() -> None:
    config = C3LAConfig(r=4, chain_every=2, chain_length=4)
    untouched = nn.Linear(D_IN, D_OUT).double()
    trained = C3LALayer(copy.deepcopy(untouched), config, layer_name="fc")
    for step in (1, 2):
        trained.after_optimizer_step(TrainProgress(step, 10, 10, 1.0))
    resumed = C3LALayer(untouched, config, layer_name="fc")
    resumed.load_adapter_state(trained.adapter_state())
    resumed.on_checkpoint_loaded()
    assert resumed.after_optimizer_step(TrainProgress(3, 10, 10, 1.0)) == []
    assert resumed.after_optimizer_step(TrainProgress(4, 10, 10, 1.0)) == [resumed.cla_B]
    assert resumed.link_idx.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and resumed.cla_idx.tolist() == [8, 9, 10, 11]


def test_reloading_the_same_chain_is_a_no_op_and_a_different_one_is_refused() -> None:
    config = C3LAConfig(r=4)
    trained = trained_layer(nn.Linear(D_IN, D_OUT).double(), config, switches=2)
    weight = weight_out_in(trained.base).detach().clone()
    trained.load_adapter_state(trained.adapter_state())
    trained.on_checkpoint_loaded()
    assert torch.equal(weight_out_in(trained.base), weight), "links already in the base are not applied twice"

    other = trained_layer(nn.Linear(D_IN, D_OUT).double(), config, switches=2, seed=5)
    with pytest.raises(ValueError, match="untouched base"):
        trained.load_adapter_state(other.adapter_state())


def test_checkpoint_of_another_method_is_refused() -> None:
    layer = C3LALayer(nn.Linear(D_IN, D_OUT), C3LAConfig(r=4), layer_name="fc")
    with pytest.raises(ValueError, match="link_idx"):
        layer.load_adapter_state({"cla_B": torch.zeros(D_OUT, 4), "cla_idx": torch.arange(4)})


def test_adamw_training_with_switches_keeps_fold_equal_to_module() -> None:
    """A trainer-like loop: AdamW on B, the hook's returned params get their moments reset at each switch."""
    torch.manual_seed(0)
    config = C3LAConfig(r=4, chain_every=5, chain_length=4)
    layer = C3LALayer(nn.Linear(D_IN, D_OUT).double(), config, layer_name="fc")
    optimizer = torch.optim.AdamW(layer.adapter_params().values(), lr=1e-2, weight_decay=0.0)
    x, target = torch.randn(32, D_IN, dtype=torch.float64), torch.randn(32, D_OUT, dtype=torch.float64)
    losses = []
    for step in range(1, 21):
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        for param in layer.after_optimizer_step(TrainProgress(step, 10, 20, 2.0)):
            optimizer.state[param].clear()
            assert not param.any()
    assert layer.n_links == 3 and losses[-1] < losses[0]
    assert_close(layer.fold().module(x), layer(x), "c3la fold after AdamW training")
