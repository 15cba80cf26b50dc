"""Fold every adapter layer of a model into its deployable form, checking each fold against the unfolded layer.

Each method's ``fold()`` hands back a drop-in module (a plain Linear/Conv1D where everything merged, otherwise the
folded static part plus a residual). Here, generically and without knowing method names:

- the folded module must reproduce the unfolded layer on random inputs N(0, 1) in the layer's dtype within
  ``surgery.tolerances.LAYER``; a layer that does not stops the fold with a :class:`FoldError` naming it;
- the folded model is a new module tree that shares every tensor the fold did not touch with the unfolded model
  (embeddings, norms, heads), so folding costs only the new weights, and the unfolded model stays usable as the
  reference for verification;
- folding a model without adapter layers (an already folded one) does nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from surgery.layers import ADAPTABLE_TYPES, layer_dims
from surgery.methods.base import AdapterLayer
from surgery.rewrite import AdaptedModel, adapter_layers
from surgery.tolerances import layer_tolerance

CHECK_TOKENS = 64  # random input rows per layer for the fold check


class FoldError(RuntimeError):
    """A layer whose folded module does not reproduce the unfolded layer within tolerance."""


@dataclass(frozen=True)
class LayerFold:
    """What the export report says about one adapted layer."""

    name: str
    method: str
    folded: bool
    residual: str | None  # what stays input-dependent after the fold; None when fully merged
    note: str  # how the static weight is stored ("dense", "2:4 sparse + low-rank", ...)
    fold_error: float | None  # max |folded(x) - unfolded(x)| on the check inputs; None when not folded
    macs_per_token: int  # of the deployed layer (folded, or base + unmerged adapter)
    base_macs_per_token: int  # of the original dense layer, d_in d_out
    sparse_2_4: bool  # a deployed weight keeps 2 of every 4 consecutive inputs (TensorRT sparse weights)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldedModel:
    """The deployable model and one record per adapted layer (empty when there was nothing to fold)."""

    model: nn.Module
    layers: list[LayerFold]


def fold_model(model: AdaptedModel | nn.Module, seed: int = 0, check_tokens: int = CHECK_TOKENS) -> FoldedModel:
    """Fold every adapter layer of ``model`` (an :class:`AdaptedModel` or its ``.model``).

    Returns a new module tree with each adapter layer replaced by its fold; the input is left unchanged. Raises
    :class:`FoldError` at the first layer whose fold changes its output beyond ``LAYER[dtype]``.
    """
    module = model.model if isinstance(model, AdaptedModel) else model
    layers = adapter_layers(module)
    if not layers:
        return FoldedModel(module, [])
    folded = tensor_sharing_copy(module, keep=layers.values())
    generator = torch.Generator().manual_seed(seed)
    records = []
    for name, layer in layers.items():
        replacement, record = fold_layer(name, layer, generator, check_tokens)
        folded.set_submodule(name, replacement)
        records.append(record)
    return FoldedModel(folded.eval(), records)


def fold_layer(
    name: str, layer: AdapterLayer, generator: torch.Generator, check_tokens: int = CHECK_TOKENS
) -> tuple[nn.Module, LayerFold]:
    """The folded module of one layer and its record, after checking it against the unfolded layer."""
    with torch.no_grad(), evaluating(layer):
        fold = layer.fold()
        x = torch.randn(check_tokens, layer.d_in, generator=generator).to(layer.base_weight.dtype)
        error, within = fold_error(layer, fold.module.eval(), x.to(layer.device))
    if not within:
        tol = layer_tolerance(layer.base_weight.dtype)
        raise FoldError(
            f"layer {name!r} ({layer.config.name}): the folded module differs from the unfolded layer by "
            f"max |diff| = {error:.3g} on N(0, 1) inputs (tolerance for {dtype_name(layer.base_weight.dtype)}: "
            f"atol {tol.atol:g}, rtol {tol.rtol:g}); the fold stops here and nothing is exported. This is a bug in "
            f"the method's fold(): check it against the layer's forward"
        )
    record = LayerFold(
        name=name, method=layer.config.name, folded=True, residual=fold.residual, note=fold.note,
        fold_error=error, macs_per_token=fold.macs_per_token, base_macs_per_token=layer.d_in * layer.d_out,
        sparse_2_4=any(is_2_4_sparse(w) for w in matrices(fold.module)),
    )
    return fold.module.requires_grad_(False), record


def fold_error(layer: AdapterLayer, folded: nn.Module, x: torch.Tensor) -> tuple[float, bool]:
    """(max |folded(x) - layer(x)|, whether every element is within LAYER[dtype]) for x: (n, d_in)."""
    expected, actual = layer(x), folded(x)
    tol = layer_tolerance(expected.dtype)
    diff = (actual.double() - expected.double()).abs()
    within = bool((diff <= tol.atol + tol.rtol * expected.double().abs()).all())
    return float(diff.max()), within


def unfolded_layers(model: AdaptedModel | nn.Module) -> list[LayerFold]:
    """Records for exporting the adapter graph as it is (no fold): base plus unmerged adapter MACs."""
    module = model.model if isinstance(model, AdaptedModel) else model
    records = []
    for name, layer in adapter_layers(module).items():
        macs = type(layer).macs_per_token(layer.d_in, layer.d_out, layer.config)
        records.append(LayerFold(
            name=name, method=layer.config.name, folded=False, residual=None, note="unfolded adapter",
            fold_error=None, macs_per_token=macs.base + macs.adapter, base_macs_per_token=layer.d_in * layer.d_out,
            sparse_2_4=any(is_2_4_sparse(w) for w in matrices(layer)),
        ))
    return records


# ---- model-level costs --------------------------------------------------------------------------------------------
def model_macs(model: nn.Module, layers: list[LayerFold]) -> tuple[int, int]:
    """(deployed, base) MACs per token of the model's Linear/Conv1D layers.

    Adapted layers count their record's MACs (deployed) or ``d_in d_out`` (base); every other Linear/Conv1D,
    heads included, counts ``d_in d_out`` in both. Attention products (sequence-length dependent) and embedding
    lookups are not counted. ``model`` is the unfolded model.
    """
    adapted = {record.name: record for record in layers}
    other = sum(
        d_in * d_out
        for name, module in named_modules_outside(model, adapted)
        if isinstance(module, ADAPTABLE_TYPES)
        for d_in, d_out in [layer_dims(module)]
    )
    deployed = other + sum(r.macs_per_token for r in layers)
    base = other + sum(r.base_macs_per_token for r in layers)
    return deployed, base


def named_modules_outside(model: nn.Module, skip: dict[str, object]) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the modules named in ``skip`` and their children."""
    prefixes = tuple(f"{name}." for name in skip)
    for name, module in model.named_modules():
        if name in skip or name.startswith(prefixes):
            continue
        yield name, module


# ---- helpers ------------------------------------------------------------------------------------------------------
def tensor_sharing_copy(model: nn.Module, keep: object = ()) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the original tensors (not copies);
    modules in ``keep`` are shared as they are (the caller replaces them in the copy)."""
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo.update({id(m): m for m in keep})  # type: ignore[union-attr]
    return copy.deepcopy(model, memo)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode (no dropout), restoring its train/eval flags afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def matrices(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every 2-D floating tensor (parameter or buffer) of ``module``."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.dim() == 2 and tensor.is_floating_point():
            yield tensor


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """True when a non-zero ``weight`` has at most 2 non-zero entries in every 4 consecutive ones.

    Checked both ways round (Linear stores (d_out, d_in), Conv1D (d_in, d_out)); the groups run along d_in.
    """
    return any(_groups_of_4_half_zero(w) for w in (weight, weight.t()))


def _groups_of_4_half_zero(weight: torch.Tensor) -> bool:
    if weight.shape[-1] % 4 or not bool(weight.detach().any()):
        return False
    nonzero = (weight.detach() != 0).reshape(*weight.shape[:-1], -1, 4).sum(dim=-1)
    return bool((nonzero <= 2).all())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
