"""TensorRT readiness of an ONNX export, checked without TensorRT: opset, op coverage, dynamic axes, a trtexec line.

Also ``fp16_variant``: the fp32 export converted to float16 with float32 inputs and outputs, runnable in
onnxruntime's CPU provider (TensorRT itself builds fp16 engines from the fp32 file with ``--fp16``).
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx

logger = logging.getLogger(__name__)

MIN_OPSET = 17  # LayerNormalization is a single ONNX op from opset 17; TensorRT 10 fuses it natively.
MAX_DOCUMENTED_OPSET = 20  # "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"

# The ONNX (default-domain) ops marked "Y" in onnx-tensorrt's docs/operators.md at the "ONNX-TensorRT 10.1 GA
# release" commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c (github.com/onnx/onnx-tensorrt, June 2024): 150 ops.
# Restrictions in that table's last column (e.g. Slice/Squeeze `axes` must be initializers, LayerNormalization's
# first output only) are not checked here. Ops of other domains (com.microsoft contrib ops such as FusedMatMul,
# SkipLayerNormalization, Attention; ai.onnx.ml) are never in it: the parser only takes them through plugins.
TRT_ONNX_OPS: frozenset[str] = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If",
    "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu",
    "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool",
    "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not",
    "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QuantizeLinear", "RNN", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round", "ScaledTanh", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
    "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})

DEFAULT_DOMAINS = ("", "ai.onnx")

# dim_param names -> which profile range they take. optimum names them batch_size / sequence_length /
# past_sequence_length (and sums such as "past_sequence_length + sequence_length"); torch.onnx uses the names
# given to its dynamic_axes / torch.export.Dim.
_BATCH, _SEQUENCE, _PAST = "batch", "sequence", "past"


# -- reading the graph -------------------------------------------------------------------------------------------


def _load_graph(onnx_path: Path) -> onnx.ModelProto:
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    return onnx.load(str(path), load_external_data=False)  # structure only: weights are not needed


def _with_subgraphs(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Every node of ``nodes`` and of their subgraphs (If/Loop/Scan bodies), depth first."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
            for graph in graphs:
                yield from _with_subgraphs(graph.node)


def op_types(model: onnx.ModelProto) -> set[str]:
    """Op types the parser meets: default-domain ops by name, others as ``domain.Op``; local functions inlined."""
    functions = {(f.domain, f.name): f for f in model.functions}
    pending, expanded, seen = list(_with_subgraphs(model.graph.node)), set(), set()
    while pending:
        node = pending.pop()
        key = (node.domain, node.op_type)
        if key in functions:  # a call of a model-local function: the parser inlines its body
            if key not in expanded:
                expanded.add(key)
                pending.extend(_with_subgraphs(functions[key].node))
            continue
        seen.add(node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}")
    return seen


def graph_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), default=0)


def dynamic_axes(model: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """{input or output name: {axis: dim_param}} for every axis without a fixed size ("?" when it has no name)."""
    axes: dict[str, dict[int, str]] = {}
    for value in [*model.graph.input, *model.graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        dims = {
            axis: dim.dim_param or "?"
            for axis, dim in enumerate(value.type.tensor_type.shape.dim)
            if not dim.HasField("dim_value")
        }
        if dims:
            axes[value.name] = dims
    return axes


def _input_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph inputs (initializers excluded) -> their dims, an int where fixed, the dim_param (or "?") otherwise."""
    initializers = {init.name for init in model.graph.initializer}
    return {
        value.name: [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
                     for dim in value.type.tensor_type.shape.dim]
        for value in model.graph.input
        if value.name not in initializers
    }


# -- optimisation profiles ---------------------------------------------------------------------------------------


def _dim_kind(name: str) -> str | None:
    lowered = name.lower()
    if "batch" in lowered:
        return _BATCH
    if "past" in lowered:
        return _PAST
    if "seq" in lowered or "length" in lowered:
        return _SEQUENCE
    return None


def suggest_profile(
    onnx_path: Path, max_batch: int = 8, opt_seq: int = 128, max_seq: int = 512, opt_batch: int = 1
) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes for every input with a dynamic axis, chosen from its dim_param names.

    batch: 1 / opt_batch / max_batch; sequence: 1 / opt_seq / max_seq; past sequence: 0 / opt_seq / max_seq
    (the first decoding step has an empty cache). A sum such as "past_sequence_length + sequence_length" sums
    its terms' ranges. A dynamic axis whose name says none of these is an error: pass that profile by hand.
    """
    ranges = {_BATCH: (1, opt_batch, max_batch), _SEQUENCE: (1, opt_seq, max_seq), _PAST: (0, opt_seq, max_seq)}
    model = _load_graph(onnx_path)
    profile: dict[str, dict[str, list[int]]] = {}
    for name, dims in _input_shapes(model).items():
        if all(isinstance(d, int) for d in dims):
            continue
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                low = opt = high = dim
            else:
                terms = [term.strip() for term in re.split(r"\s*\+\s*", dim)]
                kinds = [_dim_kind(term) for term in terms]
                if None in kinds:
                    raise ValueError(
                        f"{onnx_path}: input {name!r} axis {axis} is dynamic ({dim!r}) but its name says neither "
                        "batch, sequence nor past sequence; write that input's min/opt/max profile by hand"
                    )
                low, opt, high = (sum(ranges[k][i] for k in kinds) for i in range(3))
            for key, size in zip(("min", "opt", "max"), (low, opt, high), strict=True):
                shapes[key].append(size)
        profile[name] = shapes
    return profile


def _profile_problems(model: onnx.ModelProto, profile: dict[str, dict[str, list[int]]]) -> list[str]:
    problems = []
    inputs = _input_shapes(model)
    for name, dims in inputs.items():
        if any(not isinstance(d, int) for d in dims) and name not in profile:
            problems.append(f"dynamic input {name!r} has no min/opt/max in the profile")
    for name, shapes in profile.items():
        if name not in inputs:
            problems.append(f"profile names {name!r}, which is not a graph input (inputs: {sorted(inputs)})")
            continue
        if sorted(shapes) != ["max", "min", "opt"]:
            problems.append(f"profile of {name!r} needs exactly the keys min, opt, max (has {sorted(shapes)})")
            continue
        low, opt, high, dims = shapes["min"], shapes["opt"], shapes["max"], inputs[name]
        if not len(low) == len(opt) == len(high) == len(dims):
            problems.append(f"profile of {name!r}: min/opt/max must each have rank {len(dims)}")
            continue
        for axis, dim in enumerate(dims):
            if not low[axis] <= opt[axis] <= high[axis]:
                problems.append(f"profile of {name!r} axis {axis}: need min <= opt <= max")
            if isinstance(dim, int) and not low[axis] == opt[axis] == high[axis] == dim:
                problems.append(f"profile of {name!r} axis {axis}: the graph fixes it to {dim}")
    return problems


def _shapes_flag(flag: str, profile: dict[str, dict[str, list[int]]], key: str) -> str:
    return f"--{flag}=" + ",".join(f"{name}:{'x'.join(map(str, shapes[key]))}" for name, shapes in profile.items())


def trtexec_command(onnx_path: Path, profile: dict[str, dict[str, list[int]]], sparse_2_4: bool) -> str:
    """``trtexec --onnx=... --minShapes=... --optShapes=... --maxShapes=... --fp16 [--sparsity=enable]``."""
    parts = ["trtexec", f"--onnx={shlex.quote(str(onnx_path))}"]
    if profile:
        parts += [_shapes_flag(flag, profile, key)
                  for flag, key in (("minShapes", "min"), ("optShapes", "opt"), ("maxShapes", "max"))]
    parts.append("--fp16")
    if sparse_2_4:
        parts.append("--sparsity=enable")
    return " ".join(parts)


def trt_readiness(
    onnx_path: Path, opset: int, sparse_2_4: bool, profile: dict[str, dict[str, list[int]]]
) -> dict:
    """Whether TensorRT 10's ONNX parser can take the export as it is, and the trtexec line to build an engine.

    ``opset`` is the opset the export asked for; the graph's own default-domain opset is checked too.
    """
    model = _load_graph(onnx_path)
    declared = graph_opset(model)
    unsupported = sorted(op for op in op_types(model) if op not in TRT_ONNX_OPS)
    opset_ok = min(opset, declared) >= MIN_OPSET
    problems = _profile_problems(model, profile)
    if not opset_ok:
        problems.append(f"opset {min(opset, declared)} < {MIN_OPSET}: re-export with opset >= {MIN_OPSET}")
    if unsupported:
        problems.append(f"ops TensorRT's ONNX parser lacks: {', '.join(unsupported)}")
    if declared > MAX_DOCUMENTED_OPSET:
        logger.warning("%s declares opset %d; onnx-tensorrt 10.1 documents opsets up to %d",
                       onnx_path, declared, MAX_DOCUMENTED_OPSET)
    return {
        "opset": opset,
        "graph_opset": declared,
        "opset_ok": opset_ok,
        "unsupported_ops": unsupported,
        "dynamic_axes": dynamic_axes(model),
        "profile": profile,
        "sparse_2_4": sparse_2_4,
        "trtexec": trtexec_command(onnx_path, profile, sparse_2_4),
        "problems": problems,
        "ready": not problems,
    }


# -- float16 variant ---------------------------------------------------------------------------------------------

# One serialised ModelProto must stay under protobuf's 2 GiB; past 1.8 GiB of weights they go to an external file.
EXTERNAL_DATA_ABOVE = int(1.8 * 2**30)


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(init.ByteSize() for init in model.graph.initializer)


def _save(model: onnx.ModelProto, out_path: Path, external: bool) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        data = out_path.with_name(out_path.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(out_path))


def _cpu_session_error(path: Path) -> str | None:
    """None if onnxruntime's CPU provider can build a session on ``path``, else the error text."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except ort.capi.onnxruntime_pybind11_state.NotImplemented as err:
        return str(err)
    return None


def fp16_variant(
    onnx_path: Path, out_path: Path, op_block_list: Iterable[str] | None = None, max_retries: int = 8
) -> Path:
    """Write ``onnx_path`` converted to float16 (inputs/outputs stay float32) to ``out_path``; return ``out_path``.

    Uses onnxruntime's ``convert_float_to_float16`` with its default op block list plus ``op_block_list``. The
    result must build an onnxruntime CPU session: if the CPU provider has no float16 kernel for an op (error
    "Could not find an implementation for OP(version)"), that op type joins the block list (stays float32, with
    Casts around it) and the conversion is redone. onnxruntime's CPU provider already wraps most float16 nodes it
    has no kernel for in Casts of its own (InsertCastTransformer): with onnxruntime 1.32 the tiny BERT and GPT-2
    exports load on the first try. Weights go to ``out_path.data`` when the source keeps external data or the
    weights would pass protobuf's 2 GiB limit.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")
    external_source = any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in _load_graph(onnx_path).graph.initializer
    )
    blocked = set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list or ())
    for _ in range(max_retries + 1):
        # A path (not a ModelProto) lets the converter run shape inference through files, which works past 2 GiB.
        model = convert_float_to_float16(str(onnx_path), keep_io_types=True, op_block_list=sorted(blocked))
        _save(model, out_path, external=external_source or _tensor_bytes(model) > EXTERNAL_DATA_ABOVE)
        error = _cpu_session_error(out_path)
        if error is None:
            return out_path
        missing = re.search(r"Could not find an implementation for (\w+)\(", error)
        if missing is None or missing.group(1) in blocked:
            raise RuntimeError(f"the float16 model {out_path} does not load in onnxruntime (CPU): {error}")
        logger.info("fp16: the CPU provider lacks a float16 %s; keeping it in float32", missing.group(1))
        blocked.add(missing.group(1))
    raise RuntimeError(f"the float16 model {out_path} still fails on CPU after blocking {sorted(blocked)}")
