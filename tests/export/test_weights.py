"""export.weights and the in-place fold's storage reuse: the pieces that keep one copy of the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.fold import fold_in_place, fold_model
from export.weights import FLOAT16_MAX, PAGE, release_pages, tensor_chunks
from surgery.config import parse_config
from surgery.rewrite import adapter_layers, apply_surgery
from tests.method_configs import small_method
from tests.tiny_models import random_ids, tiny_model


@pytest.mark.parametrize("perm", [None, (1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunks_are_the_whole_tensor_permuted_and_converted(perm, dtype) -> None:
    weight = torch.randn(37, 53, generator=torch.Generator().manual_seed(0)) * 3
    weight[0, 0] = 1e6  # beyond float16: clamped to its largest value, not inf
    expected = (weight if perm is None else weight.permute(perm)).contiguous()
    if dtype == torch.float16:
        expected = expected.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    expected = expected.to(dtype).numpy().tobytes()
    pieces = list(tensor_chunks(weight, dtype, perm, chunk_bytes=256))  # a few rows a piece
    assert len(pieces) > 5
    assert b"".join(pieces) == expected


def test_release_pages_leaves_the_bytes_around_the_tensor_alone() -> None:
    """On anonymous memory the released pages read back as zeros: only pages wholly inside the tensor may go."""
    storage = torch.arange(8 * PAGE, dtype=torch.float32)  # 8 pages of floats = 32 pages of bytes
    start, length = 1000, 5 * PAGE  # a view starting mid-page
    view = storage[start:start + length]
    before = storage.clone()
    release_pages(view)
    outside = torch.ones_like(storage, dtype=torch.bool)
    outside[start:start + length] = False
    assert torch.equal(storage[outside], before[outside]), "bytes outside the tensor changed"
    inside = storage[start:start + length]
    changed = (inside != before[start:start + length]).nonzero()
    assert len(changed) > 0, "no page was released (the test would prove nothing)"
    first, last = int(changed.min()), int(changed.max())
    address = view.data_ptr()  # pages are aligned in the address space, not in the storage
    assert (address + 4 * first) % PAGE == 0 and (address + 4 * (last + 1)) % PAGE == 0, "a partial page was released"


def test_fold_in_place_writes_each_merged_weight_into_the_base_weight_it_replaces() -> None:
    model = tiny_model("llama")
    config = parse_config({"model": {"name_or_path": "unused", "task": "causal-lm"}, "targets": "all-linear",
                           "method": small_method("lora"), "output_dir": "unused"})
    adapted = apply_surgery(model, config)
    generator = torch.Generator().manual_seed(1)
    for layer in adapted.layers.values():
        layer.randomize_(generator, std=0.2)
    storages = {name: layer.base_weight.untyped_storage().data_ptr() for name, layer in adapted.layers.items()}
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = fold_model(adapted).model(input_ids=ids).logits
        records = fold_in_place(model)
        actual = model(input_ids=ids).logits
    assert not adapter_layers(model) and len(records) == len(storages)
    for name, pointer in storages.items():
        assert model.get_submodule(name).weight.untyped_storage().data_ptr() == pointer, name
    np.testing.assert_array_equal(actual.numpy(), expected.numpy())
