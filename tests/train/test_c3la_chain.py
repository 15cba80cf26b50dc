"""c3LA / r-c3LA chains inside the trainer (METHODS.md, cLA family): at each switch the link folds into the frozen
base (``W0[:, idx] += s B``), B is zero, its AdamW moments are reset, the learning-rate schedule keeps running,
the window moves on, and the switch is logged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import train.trainer
from surgery.methods import METHODS
from tests.train.helpers import build, make_config
from train.trainer import train_adapters

pytestmark = pytest.mark.skipif("c3la" not in METHODS, reason="c3la is not registered in surgery.methods.METHODS")

LR, STEPS, EVERY = 1e-2, 6, 2


def _snapshot(layer) -> dict:
    return {"B": layer.cla_B.detach().clone(), "W": layer.base_weight.detach().clone(),
            "idx": layer.cla_idx.clone(), "links": layer.n_links}


def _check_switch(layer, before: dict, state: dict) -> None:
    idx, r = before["idx"], layer.config.r
    expected = before["W"].clone()
    expected[:, idx] = before["W"].index_select(1, idx) + layer.scaling * before["B"]
    assert torch.equal(layer.base_weight, expected), "the link is folded into W0[:, idx] and nowhere else"
    assert torch.equal(layer.link_idx[-1], idx)
    assert torch.equal(layer.link_delta[-1], layer.scaling * before["B"])
    assert not layer.cla_B.any(), "B is zero after the switch"
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any(), "AdamW moments of B are reset"
    assert int(state["step"]) == 0, "B's bias correction restarts like a fresh parameter"
    new = layer.cla_idx
    if layer.config.columns == "first":
        assert torch.equal(new, (idx + r) % layer.d_in), "c3LA: the next r columns, modulo d_in"
    else:
        assert torch.equal(new, layer.window(layer.n_links))
        assert not any(torch.equal(new, old) for old in layer.link_idx), "r-c3LA: a window not used yet"


@pytest.mark.parametrize("columns", ["first", "random"])
def test_chain_switches_in_the_trainer(columns: str, llama_lm: Path, lm_data: dict, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    method = {"name": "c3la", "r": 4, "columns": columns, "chain_length": 3, "chain_every": EVERY}
    config = make_config(llama_lm, "causal-lm", method, lm_data, tmp_path / "run", max_steps=STEPS, lr=LR)
    adapted, tokenizer = build(config)
    switches: list[int] = []
    real_step_adapters = train.trainer.step_adapters

    def watched(layers, optimizer, progress):
        before = {name: _snapshot(layer) for name, layer in layers.items()}
        fired = real_step_adapters(layers, optimizer, progress)
        for name, layer in layers.items():
            if layer.n_links > before[name]["links"]:
                assert before[name]["B"].any(), "B trained before the switch"
                _check_switch(layer, before[name], optimizer.state[layer.cla_B])
        if fired:
            assert set(fired) == set(layers), "every c3LA layer switches on the same step"
            assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * (STEPS - progress.step) / STEPS)
            switches.append(progress.step)
        return fired

    monkeypatch.setattr(train.trainer, "step_adapters", watched)
    with caplog.at_level(logging.INFO, logger="train"):
        train_adapters(adapted, tokenizer, tmp_path / "run")

    assert switches == [2, 4], "chain_length 3 gives 2 switches, every 2 steps, never after the last step"
    assert all(layer.n_links == 2 for layer in adapted.layers.values())
    logged = [r.getMessage() for r in caplog.records if "schedule hook fired" in r.getMessage()]
    assert [m.split(":")[0] for m in logged] == ["step 2", "step 4"]


def test_default_chain_has_its_k_links_when_epochs_are_fewer(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """METHODS.md, c3LA: with no period set and E < k, switch every floor(T / k) optimizer steps. One epoch of the 64
    training rows at batch 8 is T = 8 steps; k = 3: every floor(8 / 3) = 2 steps, after steps 2 and 4 (before issue
    16: every epoch, after step 8 = the last step, so never: one link instead of three)."""
    method = {"name": "c3la", "r": 4, "chain_length": 3}
    config = make_config(llama_lm, "causal-lm", method, lm_data, tmp_path / "run", epochs=1, eval_before_training=False)
    adapted, tokenizer = build(config)
    switches: list[tuple[int, int]] = []
    real_step_adapters = train.trainer.step_adapters

    def watched(layers, optimizer, progress):
        fired = real_step_adapters(layers, optimizer, progress)
        if fired:
            switches.append((progress.step, progress.total_steps))
        return fired

    monkeypatch.setattr(train.trainer, "step_adapters", watched)
    train_adapters(adapted, tokenizer, tmp_path / "run")
    assert switches == [(2, 8), (4, 8)]
    assert all(layer.n_links == 2 for layer in adapted.layers.values()), "k - 1 = 2 finished links + the current one"
