"""Weightless tracing and streamed weights: how the torch exporter writes a model of any size with one copy of it.

``torch.onnx.export`` serialises every weight into the ModelProto it builds, a second copy of the model in memory
(and a third when the graph is converted to float16 afterwards). Instead:

1. :func:`stand_in_parameters`: while tracing (and probing the cache), every parameter is a zero-stride float32
   stand-in of its shape (one number in memory) and floating buffers are float32 copies; the exporter's
   ``WeightsAsInputs`` passes the model's state in as graph inputs (:func:`swapped_state`), so the traced graph holds
   no weights and the exporter never sees their values.
2. :func:`attach_weights`: each parameter input becomes an initializer whose bytes are written from the PyTorch
   tensor, one tensor at a time, cast to the export dtype and transposed on the way where the graph does so (what
   constant folding would have done), 16 MiB at a time (that piece is the only extra memory); past 128 MiB they go
   to one external data file (inline weights would be held twice more while the file is written).

For a float16 export the weightless graph is converted first (onnxruntime's converter, inputs kept float32): each
weight input then feeds one Cast to float16, and the weight is written as a float16 initializer in that Cast's
place. Weights of ops the converter keeps in float32 (its block list) stay float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from surgery.pages import MADV_DONTNEED, PAGE, advise  # PAGE: for callers

PROTOBUF_LIMIT = 2**31  # one serialised ModelProto must stay below 2 GiB
INLINE_LIMIT = 2**27  # weights up to 128 MiB go inside model.onnx (one file); more are streamed to model.onnx_data
FLOAT16_MAX = 65504.0
ALIGNMENT = 4096  # external tensors start on page boundaries (onnxruntime can map them)
CHUNK_BYTES = 2**24  # a weight is converted/transposed and written 16 MiB at a time
ONNX_DTYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.int64: onnx.TensorProto.INT64,
               torch.int32: onnx.TensorProto.INT32, torch.bool: onnx.TensorProto.BOOL}


@contextmanager
def stand_in_parameters(model: nn.Module) -> Iterator[None]:
    """Trace ``model`` without its weights: parameters become float32 stand-ins of their shapes and floating
    buffers float32 copies; everything is restored afterwards (also on error)."""
    saved: dict[int, tuple[nn.Parameter | torch.Tensor, torch.Tensor]] = {}
    for i, param in enumerate(model.parameters()):  # parameters() and buffers() list a tied tensor once
        saved[id(param)] = (param, param.data)
        param.data = torch.full((), (i + 1) * 1e-3, dtype=torch.float32, device=param.device).expand(param.shape)
    for buffer in model.buffers():
        if buffer.is_floating_point() and buffer.dtype != torch.float32:
            saved[id(buffer)] = (buffer, buffer.data)
            buffer.data = buffer.data.float()
    try:
        yield
    finally:
        for tensor, data in saved.values():
            tensor.data = data


@contextmanager
def swapped_state(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Let ``module`` run on ``tensors`` (state name -> tensor, names as :func:`named_parameters` gives them) in
    place of its own parameters and buffers; tied tensors are swapped wherever they appear. ``torch.func``'s
    functional_call does this too, but refuses to run under the TorchScript tracer."""
    originals = named_parameters(module)
    replacement = {id(originals[name]): tensor for name, tensor in tensors.items()}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    for owner in module.modules():
        for slots in (owner._parameters, owner._buffers):
            for key, tensor in slots.items():
                if tensor is not None and id(tensor) in replacement:
                    swapped.append((slots, key, tensor))
                    slots[key] = replacement[id(tensor)]
    try:
        yield
    finally:
        for slots, key, tensor in swapped:
            slots[key] = tensor


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing more):
    freed tensors' pages otherwise stay in the process's RSS, counted against the next stage's peak."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # no C library to load (not glibc): the garbage collection above is what there is
        pass


def release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel the pages lying wholly inside ``tensor``'s bytes are no longer needed (MADV_DONTNEED), for a
    tensor that is dead but whose memory stays mapped: a base weight replaced by a fold of another shape or dtype, a
    view of the safetensors file's private mapping that lives on while other weights of the shard do. Its
    file-backed pages leave the process's RSS (a later read would reload them from the file); on anonymous memory
    they would read back as zeros, so only for dead tensors."""
    advise(tensor, MADV_DONTNEED)


@dataclass(frozen=True)
class WeightSlot:
    """Where one weight goes: the initializer's name, the parameter it comes from, the dtype it is stored in and the
    permutation applied to it first (a folded Transpose; None: as it is)."""

    initializer: str
    parameter: str
    dtype: torch.dtype
    perm: tuple[int, ...] | None = None


def weight_slots(graph: onnx.GraphProto, parameters: Mapping[str, torch.Tensor],
                 dtype: torch.dtype) -> tuple[list[WeightSlot], list[onnx.NodeProto]]:
    """One slot per graph input that is a parameter, and the nodes the slots replace.

    What constant folding would have done to the weight is done as it is written: a chain of sole consumers that
    cast it to ``dtype`` (a float16 conversion kept the inputs float32) or transpose it (``nn.Linear``'s ``x @ W.T``)
    is folded into the stored tensor, which takes the last folded node's output name. Index buffers (cLA's columns)
    are stored as they are.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    slots, folded = [], []
    for value in graph.input:
        if value.name not in parameters:
            continue
        tensor = parameters[value.name]
        if value.name not in consumers:  # unused by this graph (a pooler under feature extraction): not written
            continue
        if not tensor.is_floating_point():
            slots.append(WeightSlot(value.name, value.name, tensor.dtype))
            continue
        slot, nodes = fold_chain(WeightSlot(value.name, value.name, torch.float32), consumers, dtype)
        slots.append(slot)
        folded.extend(nodes)
    return slots, folded


def fold_chain(slot: WeightSlot, consumers: Mapping[str, list[onnx.NodeProto]],
               dtype: torch.dtype) -> tuple[WeightSlot, list[onnx.NodeProto]]:
    """Follow ``slot``'s sole consumers while they are a Cast to ``dtype`` or a Transpose, folding each in."""
    nodes = []
    while len(users := consumers.get(slot.initializer, [])) == 1:
        node = users[0]
        if node.op_type == "Cast" and dtype != torch.float32 and cast_target(node) == ONNX_DTYPES[dtype]:
            slot = WeightSlot(node.output[0], slot.parameter, dtype, slot.perm)
        elif node.op_type == "Transpose" and slot.perm is None and (perm := transpose_perm(node)) is not None:
            slot = WeightSlot(node.output[0], slot.parameter, slot.dtype, perm)
        else:
            break
        nodes.append(node)
    return slot, nodes


def transpose_perm(node: onnx.NodeProto) -> tuple[int, ...] | None:
    """The explicit ``perm`` of a Transpose node (None when it relies on the default reversal: rank unknown here)."""
    return next((tuple(attribute.ints) for attribute in node.attribute if attribute.name == "perm"), None)


def cast_target(node: onnx.NodeProto) -> int | None:
    return next((attribute.i for attribute in node.attribute if attribute.name == "to"), None)


def tensor_chunks(tensor: torch.Tensor, dtype: torch.dtype, perm: tuple[int, ...] | None = None,
                  chunk_bytes: int | None = CHUNK_BYTES) -> Iterator[memoryview]:
    """The raw little-endian bytes of ``tensor`` permuted by ``perm`` in ``dtype``, in pieces of about
    ``chunk_bytes`` (slices along the permuted tensor's first axis; None: one piece), so that a transposed or
    converted weight costs one piece of extra memory, not a copy of the weight."""
    data = tensor.detach() if perm is None else tensor.detach().permute(perm)
    rows = data.shape[0] if data.dim() else 1
    row_bytes = max(1, data[0].numel() if data.dim() else 1) * max(dtype.itemsize, data.dtype.itemsize)
    step = rows if chunk_bytes is None else max(1, chunk_bytes // row_bytes)
    for start in range(0, rows, step):
        yield piece_bytes(data[start:start + step] if data.dim() else data, dtype)


def piece_bytes(data: torch.Tensor, dtype: torch.dtype) -> memoryview:
    if data.is_floating_point():
        if dtype == torch.float16:  # beyond float16's range: the largest finite value, not inf (as onnxruntime does)
            data = data.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        data = data.to(dtype)
    flat = data.to("cpu").contiguous().reshape(-1)  # reshape: unit stride even where a size-1 axis kept another
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def initializer(slot: WeightSlot, tensor: torch.Tensor) -> onnx.TensorProto:
    proto = onnx.TensorProto()
    proto.name, proto.data_type = slot.initializer, ONNX_DTYPES[slot.dtype]
    proto.dims.extend(tensor.shape if slot.perm is None else tensor.permute(slot.perm).shape)
    return proto


def attach_weights(model: onnx.ModelProto, parameters: Mapping[str, torch.Tensor], path: Path,
                   dtype: torch.dtype = torch.float32, external: bool | None = None) -> Path:
    """Write ``model`` to ``path`` with every parameter input turned into an initializer holding the parameter's
    values in ``dtype`` (see :func:`weight_slots`). ``external``: all weights in ``path.name + "_data"``, written
    tensor by tensor (default: past INLINE_LIMIT; inline weights are held twice more while the file is written,
    as TensorProtos and serialised); else inline. Returns ``path``."""
    graph = model.graph
    slots, folded = weight_slots(graph, parameters, dtype)
    total = sum(parameters[s.parameter].numel() * s.dtype.itemsize for s in slots)
    external = total > INLINE_LIMIT if external is None else external
    data_file = path.with_name(path.name + "_data")
    data_file.unlink(missing_ok=True)
    protos = write_external(slots, parameters, data_file) if external else inline(slots, parameters)
    kept_inputs = [value for value in graph.input if value.name not in parameters]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    dropped = {id(node) for node in folded}
    kept_nodes = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(protos)
    onnx.save(model, str(path))
    return path


def inline(slots: list[WeightSlot], parameters: Mapping[str, torch.Tensor]) -> list[onnx.TensorProto]:
    protos = []
    for slot in slots:
        proto = initializer(slot, parameters[slot.parameter])
        proto.raw_data = b"".join(tensor_chunks(parameters[slot.parameter], slot.dtype, slot.perm))
        protos.append(proto)
    return protos


def write_external(slots: list[WeightSlot], parameters: Mapping[str, torch.Tensor],
                   data_file: Path) -> list[onnx.TensorProto]:
    """Append each tensor's bytes to ``data_file`` (page-aligned) and return initializers that point there."""
    protos = []
    with open(data_file, "wb") as handle:
        for slot in slots:
            tensor = parameters[slot.parameter]
            offset = -(-handle.tell() // ALIGNMENT) * ALIGNMENT
            handle.seek(offset)
            length = sum(handle.write(piece) for piece in tensor_chunks(tensor, slot.dtype, slot.perm))
            proto = initializer(slot, tensor)
            proto.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_file.name), ("offset", str(offset)), ("length", str(length))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, value
            protos.append(proto)
    return protos


def named_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state (parameters and persistent buffers) by the names the TorchScript exporter gives their graph
    inputs under ``export_params=False`` (tied weights once, under their first name)."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            found[name] = tensor
    return found
