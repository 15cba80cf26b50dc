"""export/fold.py: the generic fold of every registered method, its per-layer check, idempotence, tensor sharing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from export.fold import FoldError, fold_model, is_2_4_sparse, model_macs, unfolded_layers
from surgery.methods.base import Fold
from surgery.methods.lora import LoRALayer
from surgery.rewrite import adapter_layers
from surgery.tolerances import LAYER, MODEL
from tests.export.checkpoints import adapted_model, single_torch_thread  # noqa: F401  (fixture)
from tests.method_configs import registered_methods
from tests.tiny_models import random_ids, save_tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TARGETS = ["query", "value"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("bert", tmp_path_factory.mktemp("fold") / "bert")


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", registered_methods())
def test_fold_reproduces_the_unfolded_model_and_leaves_it_alone(method: str, bert: Path) -> None:
    adapted = adapted_model(bert, method, "seq-cls", TARGETS)
    adapted.model.eval()
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    folded = fold_model(adapted)
    ids = random_ids(3, 9)
    tol = MODEL[torch.float32]
    torch.testing.assert_close(logits(folded.model, ids), logits(adapted.model, ids), atol=tol.atol, rtol=tol.rtol)
    assert [record.name for record in folded.layers] == list(adapted.layers)
    assert all(r.folded and r.method == method and r.fold_error <= LAYER[torch.float32].atol for r in folded.layers)
    assert not adapter_layers(folded.model), "every adapter layer is replaced by its fold"
    for name, tensor in adapted.model.state_dict().items():  # the unfolded model is untouched
        assert torch.equal(tensor, before[name]), name
    embeddings = adapted.model.bert.embeddings.word_embeddings.weight
    assert folded.model.bert.embeddings.word_embeddings.weight is embeddings, "unfolded tensors are shared"
    for record in folded.layers:
        module = folded.model.get_submodule(record.name)
        assert (type(module) is nn.Linear) == (record.residual is None), "fully merged layers are plain again"


@pytest.mark.parametrize("method", registered_methods())
def test_folding_twice_folds_nothing_the_second_time(method: str, bert: Path) -> None:
    folded = fold_model(adapted_model(bert, method, "seq-cls", TARGETS))
    again = fold_model(folded.model)
    assert again.layers == [] and again.model is folded.model


@pytest.mark.parametrize("method", ["lora", "proda", "loda_plus"])
def test_half_precision_folds_round_once_within_the_float16_tolerance(method: str, bert: Path) -> None:
    adapted = adapted_model(bert, method, "seq-cls", TARGETS)
    for layer in adapted.layers.values():
        layer.base.half()
    folded = fold_model(adapted)
    assert all(record.fold_error <= LAYER[torch.float16].atol for record in folded.layers)
    for record in folded.layers:
        static = [p for p in folded.model.get_submodule(record.name).parameters() if p.dim() == 2]
        assert static[0].dtype == torch.float16, "the folded weight is rounded to the base dtype"


def test_a_wrong_fold_stops_with_the_layer_name(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fold_without_adapter(self: LoRALayer) -> Fold:  # forgets s B A
        return Fold(module=self.merged_layer(torch.zeros_like(self.base_weight)), residual=None, note="dense",
                    macs_per_token=self.d_in * self.d_out)

    adapted = adapted_model(bert, "lora", "seq-cls", TARGETS)
    monkeypatch.setattr(LoRALayer, "fold", fold_without_adapter)
    with pytest.raises(FoldError, match=r"layer 'bert\.encoder\.layer\.0\.attention\.self\.query' \(lora\): the "
                                        r"folded module differs .* max \|diff\|"):
        fold_model(adapted)


def test_unfolded_records_count_the_adapter_macs(bert: Path) -> None:
    adapted = adapted_model(bert, "lora", "seq-cls", TARGETS)
    records = unfolded_layers(adapted)
    assert all(not r.folded and r.fold_error is None for r in records)
    deployed, base = model_macs(adapted.model, records)
    r, d = 4, 32
    assert deployed - base == len(records) * r * (d + d)
    folded_macs, folded_base = model_macs(adapted.model, fold_model(adapted).layers)
    assert folded_macs == folded_base == base


def test_2_4_sparsity_is_read_from_the_weights() -> None:
    weight = torch.randn(6, 8)
    assert not is_2_4_sparse(weight)
    groups = weight.reshape(6, 2, 4).clone()
    groups[..., 1::2] = 0  # 2 of every 4 consecutive inputs
    assert is_2_4_sparse(groups.reshape(6, 8))
    assert is_2_4_sparse(groups.reshape(6, 8).t()), "Conv1D stores (d_in, d_out)"
    assert not is_2_4_sparse(torch.zeros(4, 8)), "an all-zero matrix is no sparse weight"
    assert not is_2_4_sparse(torch.randn(4, 6))
