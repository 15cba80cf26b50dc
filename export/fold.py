"""Fold every adapter layer of a model into its deployable form, checking each fold against the unfolded layer.

Each method's ``fold()`` hands back a drop-in module (a plain Linear/Conv1D where everything merged, otherwise the
folded static part plus a residual). Here, generically and without knowing method names:

- every fold is computed in float32 (float64 for float64 layers) from the stored weights upcast exactly and rounded
  once to the output dtype: the layer's base dtype by default, or the ``dtype`` asked for. With a half-precision base,
  a float32 fold is ``W0 + delta`` unrounded (what an fp32 export carries), a float16 fold one rounding of it to
  float16, a bfloat16 fold one rounding to bfloat16; no method rounds the delta before adding it;
- the folded module must reproduce the unfolded layer on random inputs N(0, 1) within ``surgery.tolerances.LAYER`` of
  the output dtype, both run in the accumulation dtype (the unfolded layer with its weights upcast exactly), so the
  check sees the fold's own rounding and nothing else; a layer that does not stops the fold with a
  :class:`FoldError` naming it;
- each record gives the merged weight's error against float64 (``W0`` and ``delta`` in float64) next to the error
  of PEFT's way to merge, ``W0 + delta.to(W0.dtype)`` in the base dtype (two roundings), stored in the same dtype:
  ours is never worse;
- ``fold_in_place`` replaces the layers of the model itself, one at a time (the export's way: one copy of the
  weights); ``fold_model`` builds a new module tree that shares every tensor the fold did not touch (embeddings,
  norms, heads), so the unfolded model stays usable beside it;
- folding a model without adapter layers (an already folded one) does nothing;
- once every layer is folded, folded siblings that read one input and declare it (``surgery.groups``) are linked so
  that they compute their shared first projection once.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from export.weights import release_pages
from surgery.groups import link_sibling_groups
from surgery.layers import ADAPTABLE_TYPES, is_adaptable, layer_dims, weight_out_in
from surgery.methods.base import AdapterLayer, ApproximatedLayer
from surgery.rewrite import AdaptedModel, adapter_layers
from surgery.tolerances import Tolerance, layer_tolerance

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
    base_dtype: str | None = None  # dtype of the stored base weight W0
    weight_dtype: str | None = None  # dtype the folded weights are stored in (one rounding from float32)
    # max |W' - (W0 + delta)| over the merged weight, the reference in float64; None where nothing merges densely
    weight_error: float | None = None  # ours: W' as stored in the folded module
    peft_weight_error: float | None = None  # PEFT's merge: W0 + delta.to(W0.dtype), added in W0's dtype

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldedModel:
    """The deployable model and one record per adapted layer (empty when there was nothing to fold)."""

    model: nn.Module
    layers: list[LayerFold]


def fold_model(model: AdaptedModel | nn.Module, seed: int = 0, check_tokens: int = CHECK_TOKENS,
               dtype: torch.dtype | None = None) -> FoldedModel:
    """Fold every adapter layer of ``model`` (an :class:`AdaptedModel` or its ``.model``) into a new module tree.

    The input is left unchanged (its tensors are shared, not copied; see :func:`fold_in_place` for the export's
    one-copy fold). ``dtype``: the folded layers' dtype (default: each layer's base dtype, a model PyTorch runs as it
    is); every other module keeps its tensors, so with another ``dtype`` the model has mixed dtypes (the exporters
    write each weight in the export's dtype). Raises :class:`FoldError` at the first layer whose fold changes its
    output beyond ``LAYER[dtype]``, ValueError where a folded weight overflows ``dtype``.
    """
    module = model.model if isinstance(model, AdaptedModel) else model
    layers = adapter_layers(module)
    if not layers:
        return FoldedModel(module, [])
    folded = tensor_sharing_copy(module, keep=layers.values())
    del layers
    records = fold_in_place(folded, seed, check_tokens, dtype, reuse_storage=False)  # the layers are shared
    return FoldedModel(folded.eval(), records)


def fold_in_place(model: nn.Module, seed: int = 0, check_tokens: int = CHECK_TOKENS, dtype: torch.dtype | None = None,
                  before_replacing: Callable[[str, LayerFold], None] | None = None,
                  reuse_storage: bool = True) -> list[LayerFold]:
    """Replace every adapter layer of ``model`` by its fold, one layer at a time; returns the records.

    Only layer names are held across iterations, so each unfolded layer is freed as soon as its fold takes its place:
    the peak is the model plus one layer's new weights. ``before_replacing(name, record)`` may raise to stop before a
    layer is replaced (``export.hf`` refuses residual paths). ``reuse_storage``: write each fold into the storage of
    the tensors it replaces (:func:`into_old_storage`); the layers must not be used elsewhere. Errors as
    :func:`fold_model`.
    """
    generator = torch.Generator().manual_seed(seed)
    shared = tied_tensors(model) if reuse_storage else set()
    records = []
    for name in list(adapter_layers(model)):
        layer = model.get_submodule(name)
        replacement, record = fold_layer(name, layer, generator, check_tokens, dtype)
        if before_replacing is not None:
            before_replacing(name, record)
        if reuse_storage:
            into_old_storage(layer, replacement, shared)
        del layer
        model.set_submodule(name, replacement)
        records.append(record)
    link_sibling_groups(model)  # folded siblings reading one input share their first projection (surgery.groups)
    return records


def tied_tensors(model: nn.Module) -> set[int]:
    """ids of the parameters/buffers that more than one module slot holds (tied weights)."""
    seen: set[int] = set()
    tied: set[int] = set()
    for module in model.modules():
        for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
            if tensor is not None:
                (tied if id(tensor) in seen else seen).add(id(tensor))
    return tied


@torch.no_grad()
def into_old_storage(old: nn.Module, new: nn.Module, shared: set[int]) -> None:
    """Move each tensor of the fold ``new`` into the storage of a tensor of the layer ``old`` it replaces with the same
    shape and dtype (the base weight, for a merged W0 + delta), so that the fold allocates nothing that outlives it.

    The base weights of a model loaded from safetensors are views of the file's memory map: a new tensor would add
    its bytes while the mapping stays resident (other tensors of the shard keep it alive); written into the old
    storage, the page only turns from file-backed to private. Old tensors that nothing fits in (ProDA's static
    weight is wider than W0; a float32 fold of a bfloat16 base) have their pages released instead
    (``export.weights.release_pages``). Old tensors also held elsewhere (``shared``: tied weights) or still used by
    ``new`` are left alone.
    """
    in_use = {t.untyped_storage().data_ptr() for t in itertools.chain(new.parameters(), new.buffers())}
    pool: dict[tuple, list[torch.Tensor]] = {}
    for tensor in itertools.chain(old.parameters(), old.buffers()):
        if id(tensor) not in shared and tensor.untyped_storage().data_ptr() not in in_use and tensor.is_contiguous():
            pool.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)
    for module in new.modules():
        for slots in (module._parameters, module._buffers):
            for key, tensor in slots.items():
                target = pool.get((tuple(tensor.shape), tensor.dtype, tensor.device)) if tensor is not None else None
                if target:
                    storage = target.pop()
                    storage.data.copy_(tensor.data)
                    slots[key].data = storage.data
    for leftover in itertools.chain.from_iterable(pool.values()):  # dead, nothing of the fold fits in them
        release_pages(leftover)


def fold_layer(
    name: str, layer: AdapterLayer, generator: torch.Generator, check_tokens: int = CHECK_TOKENS,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, LayerFold]:
    """The folded module of one layer in ``dtype`` (default: the base dtype) and its record, after checking it
    against the unfolded layer."""
    out_dtype = dtype or layer.base_weight.dtype
    accumulate = accumulation_dtype(layer, out_dtype)
    tol = layer_tolerance(out_dtype)
    with torch.no_grad(), evaluating(layer):
        exact = cast_copy(layer, accumulate)  # the layer itself unless a tensor needs upcasting
        fold = exact.fold()
        check_range(name, layer, fold.module, out_dtype)
        module = fold.module.to(out_dtype).eval()  # the one rounding (none when out_dtype is the accumulation's)
        x = torch.randn(check_tokens, layer.d_in, generator=generator).to(layer.device, accumulate)
        error, within = fold_error(exact, cast_copy(module, accumulate), x, tol)
        weight_error, peft_weight_error = merge_errors(name, layer, module)
    if not within:
        raise FoldError(
            f"layer {name!r} ({layer.config.name}): the folded module differs from the unfolded layer by "
            f"max |diff| = {error:.3g} on N(0, 1) inputs (tolerance for {dtype_name(out_dtype)}: "
            f"atol {tol.atol:g}, rtol {tol.rtol:g}); the fold stops here and nothing is exported. This is a bug in "
            f"the method's fold(): check it against the layer's forward"
        )
    record = LayerFold(
        name=name, method=layer.config.name, folded=True, residual=fold.residual, note=fold.note,
        fold_error=error, macs_per_token=fold.macs_per_token, base_macs_per_token=layer.d_in * layer.d_out,
        sparse_2_4=any(is_2_4_sparse(w) for w in matrices(module)), base_dtype=dtype_name(layer.base_weight.dtype),
        weight_dtype=dtype_name(out_dtype), weight_error=weight_error, peft_weight_error=peft_weight_error,
    )
    return module.requires_grad_(False), record


def fold_error(reference: nn.Module, folded: nn.Module, x: torch.Tensor, tol: Tolerance) -> tuple[float, bool]:
    """(max |folded(x) - reference(x)|, whether every element is within ``tol``) for x: (n, d_in)."""
    expected, actual = reference(x), folded(x)
    diff = (actual.double() - expected.double()).abs()
    within = bool((diff <= tol.atol + tol.rtol * expected.double().abs()).all())
    return float(diff.max()), within


# ---- precision ----------------------------------------------------------------------------------------------------
def accumulation_dtype(layer: AdapterLayer, out_dtype: torch.dtype) -> torch.dtype:
    """float64 where the layer or the output is float64 (tests), float32 otherwise (half bases included)."""
    dtypes = {t.dtype for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()} | {out_dtype}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with every floating tensor in ``dtype``: the module itself when they all are, else a copy whose other
    tensors are shared (an upcast from half precision is exact, so the copy computes with the stored values)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return module
    memo: dict[int, object] = {}
    for tensor in tensors:
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            memo[id(tensor)] = tensor
            continue
        converted = tensor.detach().to(dtype)
        if isinstance(tensor, nn.Parameter):
            converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = converted
    return copy.deepcopy(module, memo)


def check_range(name: str, layer: AdapterLayer, folded: nn.Module, out_dtype: torch.dtype) -> None:
    """A ValueError naming the layer when a folded tensor (still in the accumulation dtype) overflows ``out_dtype``."""
    tensors = [t for t in (*folded.parameters(), *folded.buffers()) if t.is_floating_point() and t.numel()]
    largest = max((float(t.detach().abs().max()) for t in tensors), default=0.0)
    limit = torch.finfo(out_dtype).max
    if largest > limit:
        raise ValueError(
            f"layer {name!r} ({layer.config.name}): the folded weights reach |w| = {largest:.4g}, beyond "
            f"{dtype_name(out_dtype)}'s largest value {limit:.4g}; export with --dtype fp32 (or a dtype with the range)"
        )


def merge_errors(name: str, layer: AdapterLayer, folded: nn.Module) -> tuple[float | None, float | None]:
    """(ours, PEFT's): max |W' - (W0 + delta)| with the reference in float64, for the folded module's W' and for
    PEFT's merge ``W0 + delta.to(W0.dtype)`` (the delta rounded to W0's dtype first, then added in it) stored in the
    same dtype as ours. None, None where the fold merges nothing into a dense weight. ``W0`` is the layer's
    ``merge_base``, delta its ``static_update``: in float64 for the reference, in the fold's float32 for PEFT's merge.

    Both end on the output dtype's grid, and ours is the grid point nearest the float32 sum (one rounding), so ours is
    never further from the reference than PEFT's, up to float32's own rounding of the sum (~1e-7 relative) in the
    rare element that lies that close to a tie."""
    update = layer.static_update(torch.float64)
    if update is None:
        return None, None
    base, ours = layer.merge_base.detach(), static_weight(name, folded)
    delta = layer.static_update(layer.fold_dtype())
    ours_error = peft_error = 0.0
    for rows in row_blocks(base):  # the float64 sums and differences a block of rows at a time, not a layer
        exact = base[rows].double() + update[rows]
        peft = (base[rows] + delta[rows].to(base.dtype)).to(ours.dtype)
        ours_error = max(ours_error, float((ours[rows].double() - exact).abs().max()))
        peft_error = max(peft_error, float((peft.double() - exact).abs().max()))
    return ours_error, peft_error


def row_blocks(weight: torch.Tensor, elements: int = 2**20) -> Iterator[slice]:
    """Slices of ``weight``'s rows holding about ``elements`` elements each."""
    step = max(1, elements // max(1, weight[0].numel()))
    return (slice(start, start + step) for start in range(0, weight.shape[0], step))


def static_weight(name: str, folded: nn.Module) -> torch.Tensor:
    """``W'`` (d_out, d_in) as the folded module stores it: a plain layer's weight, or its ``static_weight``."""
    if is_adaptable(folded):
        return weight_out_in(folded)
    weight = getattr(folded, "static_weight", None)
    if not isinstance(weight, torch.Tensor):
        raise FoldError(f"layer {name!r}: the fold merged a dense update (static_update) but its module "
                        f"{type(folded).__name__} has no static_weight to read it back from")
    return weight


def unfolded_layers(model: AdaptedModel | nn.Module) -> list[LayerFold]:
    """Records for exporting the adapter graph as it is (no fold): base plus unmerged adapter MACs."""
    module = model.model if isinstance(model, AdaptedModel) else model
    records = []
    for name, layer in adapter_layers(module).items():
        macs = layer.layer_macs()  # as built: a qkv group shares V_R x, S-LoDA counts its kept entries
        records.append(LayerFold(
            name=name, method=layer.config.name, folded=False, residual=None, note="unfolded adapter",
            fold_error=None, macs_per_token=macs.base + macs.adapter, base_macs_per_token=layer.d_in * layer.d_out,
            sparse_2_4=any(is_2_4_sparse(w) for w in matrices(layer)), base_dtype=dtype_name(layer.base_weight.dtype),
        ))
    return records


# ---- model-level costs --------------------------------------------------------------------------------------------
def model_macs(model: nn.Module, layers: list[LayerFold]) -> tuple[int, int]:
    """(deployed, base) MACs per token of the model's Linear/Conv1D layers.

    Adapted layers count their record's MACs (deployed) or ``d_in d_out`` (base); a layer the surgery approximated
    without adapter (:class:`ApproximatedLayer`, R-/S-LoDA's untargeted q/k/v sibling) counts its own ``layer_macs()``
    (deployed) or ``d_in d_out`` (base); every other Linear/Conv1D, heads included, counts ``d_in d_out`` in both.
    Attention products (sequence-length dependent) and embedding lookups are not counted. ``model`` is the unfolded
    model (or the folded one: the records' names are skipped either way).
    """
    adapted = {record.name: record for record in layers}
    approximated = {name: module for name, module in named_modules_outside(model, adapted)
                    if isinstance(module, ApproximatedLayer)}
    other = sum(
        d_in * d_out
        for name, module in named_modules_outside(model, {**adapted, **approximated})
        if isinstance(module, ADAPTABLE_TYPES)
        for d_in, d_out in [layer_dims(module)]
    )
    approximations = [(module.layer_macs(), module.d_in * module.d_out) for module in approximated.values()]
    deployed = other + sum(r.macs_per_token for r in layers) + sum(m.base + m.adapter for m, _ in approximations)
    base = other + sum(r.base_macs_per_token for r in layers) + sum(dense for _, dense in approximations)
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
