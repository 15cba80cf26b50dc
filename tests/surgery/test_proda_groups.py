"""ProDA's sibling groups (surgery.groups, ProDASiblingGroup): after the fold, targets that read one input (q, k, v;
gate, up) compute the residual's down-projection and gate once per group, exactly as each layer alone would."""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.fold import fold_model
from export.onnx import export_checkpoint
from surgery.checkpoint import save_checkpoint
from surgery.config import parse_config
from surgery.groups import InputMemo, link_sibling_groups, sibling_groups
from surgery.methods.proda import ProDAFolded, ProDASiblingGroup
from surgery.rewrite import AdaptedModel, apply_surgery
from surgery.tolerances import LAYER, MODEL
from tests.export.checkpoints import (  # noqa: F401  (single_torch_thread: a fixture)
    adapted_model,
    onnx_logits,
    save_lively_base,
    single_torch_thread,
    task_of,
)
from tests.tiny_models import random_ids, tiny_model

F64 = LAYER[torch.float64]
# all-linear per architecture, and the groups the fold links: 2 layers each
GROUPS = {"bert": 2, "llama": 4, "gpt2": 0}  # BERT: query/key/value; Llama: q/k/v and gate/up; GPT-2: none
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]


def proda(arch: str, group_siblings: bool, targets: str | list[str] = "all-linear", seed: int = 0) -> AdaptedModel:
    """Float64 tiny model with ProDA (r 3, d_b 5) on ``targets``, every adapter tensor randomised (std 0.3)."""
    model = tiny_model(arch, dtype=torch.float64)
    adapted = apply_surgery(model, parse_config({
        "model": {"name_or_path": "tiny"}, "targets": targets,
        "method": {"name": "proda", "r": 3, "d_b": 5, "dropout": 0.1, "group_siblings": group_siblings},
    }))
    generator = torch.Generator().manual_seed(seed)
    for layer in adapted.layers.values():
        layer.randomize_(generator, std=0.3)
    return adapted


def groups_of(model: nn.Module) -> list[ProDASiblingGroup]:
    return [m for m in model.modules() if isinstance(m, ProDASiblingGroup)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_sibling_groups_follow_the_leaf_names() -> None:
    names = ["l.0.attn.query", "l.0.attn.value", "l.0.out.dense", "l.1.attn.key", "m.q_proj", "m.k_proj", "m.v_proj",
             "m.gate_proj", "m.up_proj", "m.down_proj", "c_attn", "n.gate_proj"]
    assert sibling_groups(names) == [("l.0.attn.query", "l.0.attn.value"), ("m.gate_proj", "m.up_proj"),
                                     ("m.q_proj", "m.k_proj", "m.v_proj")]


@pytest.mark.parametrize("arch", list(GROUPS))
def test_grouped_fold_equals_per_layer_fold_and_the_unfolded_model(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    grouped, per_layer = proda(arch, True), proda(arch, False)
    folded, alone = fold_model(grouped).model, fold_model(per_layer).model
    assert len(groups_of(folded)) == GROUPS[arch] and not groups_of(alone)
    members = {m for g in groups_of(folded) for m in folded.modules()
               if isinstance(m, ProDAFolded) and getattr(m, "sibling_group", None) is g}
    assert len(members) == {"bert": 6, "llama": 10, "gpt2": 0}[arch]
    own = ProDAFolded.own_gated_low_rank
    computed_alone: Counter = Counter()

    def counting(self: ProDAFolded, x: torch.Tensor) -> torch.Tensor:
        computed_alone[id(self)] += 1
        return own(self, x)

    monkeypatch.setattr(ProDAFolded, "own_gated_low_rank", counting)
    ids = random_ids(3, 11)  # the export traces (2, 8); these are other shapes
    with torch.no_grad():
        expected, reference, actual = logits(per_layer.model.eval(), ids), logits(alone, ids), logits(folded, ids)
    assert not any(id(m) in computed_alone for m in members), "a linked member computed its residual alone"
    torch.testing.assert_close(actual, reference, atol=F64.atol, rtol=F64.rtol)  # grouped == per-layer fold
    torch.testing.assert_close(actual, expected, atol=F64.atol, rtol=F64.rtol)  # == the unfolded model
    assert (actual - logits(tiny_model(arch, dtype=torch.float64), ids)).abs().max() > 1e-3, "adapters change it"


def test_group_output_is_each_member_s_own_on_one_attention() -> None:
    folded = fold_model(proda("llama", True)).model
    attention = folded.model.layers[1].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    assert q.sibling_group is k.sibling_group is v.sibling_group and "sibling_group" in dict(q.named_children())
    assert "sibling_group" not in dict(k.named_children()), "registered once: the state dict holds it once"
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        shared = [m(x) for m in (q, k, v)]  # one input, as the attention calls them
        expected = [nn.functional.linear(torch.cat([x, m.own_gated_low_rank(x)], -1), m.weight, m.bias)
                    for m in (q, k, v)]
    for got, want in zip(shared, expected, strict=True):
        torch.testing.assert_close(got, want, atol=F64.atol, rtol=F64.rtol)


def test_group_recomputes_for_another_input_a_changed_input_and_inference_tensors() -> None:
    folded = fold_model(proda("bert", True)).model
    attention = folded.bert.encoder.layer[0].attention.self
    q, k, v = attention.query, attention.key, attention.value
    x, memory = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    with torch.no_grad():
        expected_k, expected_v = k(memory.clone()), v(memory.clone())
        q(x)  # cross-attention: q reads x, k and v another tensor
        assert torch.equal(k(memory), expected_k) and torch.equal(v(memory), expected_v)
        q(x)
        x.add_(1.0)  # changed in place after q read it
        assert torch.equal(k(x), k(x.clone()))
    with torch.inference_mode():  # no version counter: each member computes its own, as exactly
        inferred = [m(memory) for m in (q, k, v)]
    torch.testing.assert_close(inferred[1], expected_k, atol=F64.atol, rtol=F64.rtol)
    torch.testing.assert_close(inferred[2], expected_v, atol=F64.atol, rtol=F64.rtol)


def test_a_copied_model_keeps_its_own_linked_group() -> None:
    folded = fold_model(proda("llama", True)).model
    copied = copy.deepcopy(folded)
    mlp, copied_mlp = folded.model.layers[0].mlp, copied.model.layers[0].mlp
    assert copied_mlp.gate_proj.sibling_group is copied_mlp.up_proj.sibling_group
    assert copied_mlp.up_proj.sibling_group is not mlp.up_proj.sibling_group
    assert copied_mlp.gate_proj.sibling_group.memo._entry is None
    restored = pickle.loads(pickle.dumps(mlp.gate_proj.sibling_group))
    assert restored.memo._entry is None and restored.members == 2
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(logits(copied, ids), logits(folded, ids), atol=0.0, rtol=0.0)


def test_group_siblings_false_and_lone_targets_link_nothing() -> None:
    assert not groups_of(fold_model(proda("llama", False)).model)
    assert not groups_of(fold_model(proda("llama", True, targets=["q_proj", "o_proj", "up_proj"])).model)
    folded = fold_model(proda("llama", True, targets=["q_proj", "v_proj"]))
    assert len(groups_of(folded.model)) == 2 and link_sibling_groups(folded.model) == 2  # linking again: same
    assert all("sibling group (q_proj, v_proj)" in record.residual for record in folded.layers)


def test_grouped_gradients_and_training_forward_are_untouched() -> None:
    """Only the fold groups: the unfolded layers (dropout on their low-rank paths in training) compute alone."""
    grouped, per_layer = proda("bert", True), proda("bert", False)
    ids = random_ids(2, 6)
    for adapted in (grouped, per_layer):
        adapted.model.train()
        torch.manual_seed(0)
        logits(adapted.model, ids).square().sum().backward()
    for (name, a), (_, b) in zip(grouped.layers.items(), per_layer.layers.items(), strict=True):
        for key, param in a.adapter_params().items():
            torch.testing.assert_close(param.grad, b.adapter_params()[key].grad, atol=F64.atol, rtol=F64.rtol,
                                       msg=f"{name}.{key}")


def test_members_that_do_not_fit_one_group_are_refused() -> None:
    folded = fold_model(proda("llama", True, targets=["q_proj", "k_proj"])).model
    attention = folded.model.layers[0].self_attn
    q = attention.q_proj
    other = ProDAFolded(torch.zeros(16, 32 + 2), None, torch.zeros(2 + 5, 32), torch.zeros(1, 5), rank=1)
    with pytest.raises(ValueError, match=r"one rank, d_b, d_in, dtype and device.*group_siblings: false"):
        ProDASiblingGroup.from_members([q, other])
    with pytest.raises(ValueError, match="do not fit 2 members"):
        ProDASiblingGroup(torch.zeros(5, 32), torch.zeros(12, 10), rank=3, members=2)


def test_input_memo_counts_uses_and_keys_weights() -> None:
    memo = InputMemo(3)
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return x @ w.t()

    first = memo(x, (w,), compute)
    assert memo(x, (w,), compute) is first and memo(x, (w,), compute) is first and len(calls) == 1
    assert memo._entry is None, "released after the last member"
    memo(x, (w,), compute)
    w.mul_(2.0)  # a changed weight computes anew
    memo(x, (w,), compute)
    assert len(calls) == 3


# ---- the exported graph --------------------------------------------------------------------------------------------
EXPORT_CASES = {"bert": BERT_TARGETS, "llama": LLAMA_TARGETS}
# residual MatMuls saved per layer: (G - 1) x (down-projection, gate); BERT q,k,v: 4; Llama q,k,v and gate,up: 6
SAVED_MATMULS = {"bert": 2 * 4, "llama": 2 * 6}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], dict]:
    """(arch, group_siblings) -> the report of a merged, verified float32 export."""
    root = tmp_path_factory.mktemp("proda_groups")
    found = {}
    for arch, targets in EXPORT_CASES.items():
        base = save_lively_base(arch, root / arch)
        for grouped in (True, False):
            method = {"name": "proda", "r": 4, "d_b": 4, "dropout": 0.0, "group_siblings": grouped}
            folder = root / f"{arch}_{grouped}"
            adapted = adapted_model(base, method, task_of(arch), targets, out=folder / "ckpt")
            save_checkpoint(adapted, folder / "ckpt")
            report = export_checkpoint(folder / "ckpt", folder / "onnx", merge=True, latency=False,
                                       fp16_check=False, log=lambda _: None)
            report["out"] = folder / "onnx"
            found[(arch, grouped)] = report
    return found


def op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("arch", list(EXPORT_CASES))
def test_grouped_export_verifies_and_has_fewer_residual_matmuls(arch: str, exports) -> None:
    grouped, per_layer = exports[(arch, True)], exports[(arch, False)]
    for report in (grouped, per_layer):  # parity against the unfolded PyTorch model at MODEL[float32]
        assert report["passed"] and not report["errors"]
        assert all(case["within"] for case in report["parity"]["cases"])
    ours, theirs = op_counts(grouped["out"] / "model.onnx"), op_counts(per_layer["out"] / "model.onnx")
    assert theirs["MatMul"] - ours["MatMul"] == SAVED_MATMULS[arch]
    assert theirs["Sigmoid"] - ours["Sigmoid"] == SAVED_MATMULS[arch] // 2  # one gate per group, not per layer
    tol = MODEL[torch.float32]
    a, b = onnx_logits(grouped["out"] / "model.onnx", 3, 6), onnx_logits(per_layer["out"] / "model.onnx", 3, 6)
    np.testing.assert_allclose(a, b, atol=tol.atol, rtol=tol.rtol)
    assert grouped["macs_per_token"] == per_layer["macs_per_token"]  # the records count each layer's own form
