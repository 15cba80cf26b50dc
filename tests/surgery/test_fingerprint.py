"""surgery.fingerprint on its own: digests that see every byte, tied tensors, the finiteness check's fast path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.fingerprint import META, BaseDigest, base_digest, is_finite, tensor_digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finiteness_finds_one_nan_or_inf_anywhere_and_passes_huge_finite_sums(dtype: torch.dtype) -> None:
    x = torch.randn(64, 33).to(dtype)
    assert is_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[63, 32] = bad
        assert not is_finite(y), bad
    both = x.clone()
    both[0, 0], both[1, 1] = float("inf"), -float("inf")  # their sum is NaN, not a cancellation
    assert not is_finite(both)
    huge = torch.full((64, 64), torch.finfo(dtype).max, dtype=dtype)  # the float32 sum overflows; every value is fine
    assert is_finite(huge)
    assert is_finite(torch.arange(5))  # integer tensors are finite by nature


def test_a_digest_sees_shape_dtype_and_every_byte() -> None:
    x = torch.randn(8, 4)
    flipped = x.clone()
    flipped.view(torch.int32)[7, 3] ^= 1  # the last bit of the last value
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(flipped)
    assert tensor_digest(x) != tensor_digest(x.reshape(4, 8))
    assert tensor_digest(x) != tensor_digest(x.view(torch.int32))
    assert tensor_digest(x.t()) == tensor_digest(x.t().contiguous()), "a non-contiguous view digests its values"


def test_base_digest_names_each_difference_and_digests_tied_tensors_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as an untied head is not
    model.register_buffer("scale", torch.ones(3))
    digest = base_digest(model)
    assert set(digest.tensors) == {"0.weight", "1.weight", "scale"}
    assert digest.tensors["0.weight"] == digest.tensors["1.weight"] and not digest.non_finite
    with torch.no_grad():
        model[0].weight[2, 1] += 1
    assert base_digest(model).differences(digest.tensors) == [
        "2 tensor(s) with other values or shapes: 0.weight, 1.weight"]
    assert base_digest(model, skip={"scale"}).differences(digest.tensors) == [
        "2 tensor(s) with other values or shapes: 0.weight, 1.weight", "1 tensor(s) missing: scale"]
    assert base_digest(model).fingerprint != digest.fingerprint


def test_non_finite_parameters_are_found_by_name_buffers_are_not_judged() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model.register_buffer("mask", torch.tensor([float("-inf"), 0.0]))  # masks hold -inf on purpose
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    assert base_digest(model).non_finite == ["1.bias"]


def test_a_weightless_model_has_the_meta_fingerprint() -> None:
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    assert base_digest(model) == BaseDigest(META)


def test_trusted_digests_skip_the_finiteness_check_only_for_identical_tensors() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    digest = base_digest(model)
    assert base_digest(model, trusted=digest.tensors).non_finite == [], "an identical tensor is not checked again"
    other = {**digest.tensors, "1.bias": "0" * 64}
    assert base_digest(model, trusted=other).non_finite == ["1.bias"], "a tensor that differs is checked"
