"""Every method's fold on a half-precision base: computed in float32 and rounded once (METHODS.md, "Rules that hold
for every method"), and its ``static_update``, the dense update the export report recomputes in float64.

The harness's base layers (a Linear with bias and a GPT-2 Conv1D, weights ~N(0, 0.5)) are rounded to bfloat16 or
float16; the adapters stay in float32 (as surgery keeps them on a half base) and are randomised, never the zero init.
"""

from __future__ import annotations

import pytest
import torch

from export.fold import cast_copy, static_weight
from surgery.methods import METHODS
from surgery.methods.base import AdapterLayer
from surgery.tolerances import layer_tolerance
from tests.method_configs import small_method
from tests.surgery.method_harness import base_layers

HALF = (torch.bfloat16, torch.float16)
NOT_DENSE = {"r_loda": "keeps the rank-R factors", "r_loda_plus": "keeps the rank-R factors"}


def half_layer(method: str | dict, kind: str, dtype: torch.dtype) -> AdapterLayer:
    config_dict = small_method(method) if isinstance(method, str) else method
    cls = METHODS[config_dict["name"]]
    base = base_layers(24, 20, dtype=torch.float32)[kind].to(dtype)
    layer = cls(base, cls.config_class(**config_dict), layer_name="layer")
    layer.randomize_(torch.Generator().manual_seed(1), std=0.1)
    return layer.eval()


def dense_methods() -> list[str]:
    return [name for name in sorted(METHODS) if name not in NOT_DENSE]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", dense_methods())
def test_half_precision_fold_is_float32_sum_rounded_once(method: str, kind: str, dtype: torch.dtype) -> None:
    layer = half_layer(method, kind, dtype)
    assert layer.base_weight.dtype == dtype and layer.static_update(torch.float32).dtype == torch.float32
    with torch.no_grad():
        folded = static_weight("layer", layer.fold().module)
        w0 = layer.merge_base.detach()
        delta = layer.static_update(layer.fold_dtype())
        once = (w0.float() + delta).to(dtype)  # W0 upcast exactly, the delta in float32, one rounding
        twice = w0 + delta.to(dtype)  # PEFT's merge: the delta rounded first, then the sum rounded
    assert folded.dtype == dtype
    assert torch.equal(folded, once), f"{method}: the fold does not round the float32 sum once"
    assert not torch.equal(once, twice), "the check cannot tell one rounding from two on these weights"
    assert delta.abs().max() > 1e-2, "randomised adapters give a non-trivial update"


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", dense_methods())
def test_static_update_is_what_the_fold_merges(method: str, kind: str) -> None:
    """In float64 the fold's static weight is merge_base + static_update(float64): the update the report's float64
    reference uses is the one the fold adds (and the harness checks the fold against METHODS.md's formula)."""
    layer = cast_copy(half_layer(method, kind, torch.bfloat16), torch.float64)
    with torch.no_grad():
        folded = static_weight("layer", layer.fold().module)
        expected = layer.merge_base.detach() + layer.static_update(torch.float64)
    tol = layer_tolerance(torch.float64)
    torch.testing.assert_close(folded, expected, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("method", [*NOT_DENSE, {"name": "s_loda", "r": 4, "pattern": "2:4"}],
                         ids=lambda m: m if isinstance(m, str) else "s_loda-2:4")
def test_folds_without_a_dense_merge_have_no_static_update(method: str | dict) -> None:
    layer = half_layer(method, "linear", torch.bfloat16)
    assert layer.static_update(torch.float64) is None
    assert layer.fold().module is not None


def test_pruned_methods_merge_into_the_pruned_weight() -> None:
    layer = half_layer("s_loda", "linear", torch.bfloat16)
    assert layer.merge_base is layer.pruned_weight and not torch.equal(layer.merge_base, layer.base_weight)
