"""The quantization stage of ``python -m export.onnx CKPT --merge --quantize int8|int4``.

It runs after the fp32 export is written and verified: the merged weights are quantized once, which is what folding
buys (an unmerged adapter runtime keeps ``W0`` and the adapter apart and cannot quantize their sum). Steps:

1. the verified fp32 graph moves aside into a scratch folder inside the output folder (a rename: no copy);
2. onnxruntime's optimizer (ORT_ENABLE_BASIC: constant folding) writes it with every weight transpose folded, so
   each MatMul reads its weight straight from an initializer (what onnxruntime's quantizers need to quantize it);
3. the residual paths stay float32: for every layer whose fold left an input-dependent residual
   (``LayerFold.residual``), the nodes in its scope are excluded, except the MatMul carrying the merged weight (the
   one whose weight has at least ``d_in x d_out`` elements, the base layer's). Names only, never methods: the scope
   is the layer's module path as the exporter names nodes (``/.../encoder/layer.0/attention/self/query/...``);
4. ``int8``: ``onnxruntime.quantization.quantize_dynamic``, int8 weights per output channel for MatMul (uint8
   activations quantized per tensor at run time) and int8 embedding tables (Gather); onnxruntime's dynamic mode has
   no integer Gemm, so every plain Gemm (GPT-2's Conv1D layers, BERT's pooler and classifier) is first rewritten as
   MatMul + Add under its own name. ``int4``: onnxruntime's
   ``MatMulNBitsQuantizer`` (``MatMulNBits``, what onnxruntime-genai ships), symmetric int4 blocks of
   ``--block-size`` along the input dimension, accuracy level 4 (int8 compute on CPU); embeddings stay float32;
5. the quantized graph is written into the output folder as ``model.onnx`` (+ ``model.onnx_data`` past 2 GiB), and
   ``export.quality`` compares it with the fp32 export on the task: labels and eval accuracy, or perplexity and
   greedy tokens. The scratch folder is removed on the way out, pass or fail.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from export.exporters import EXTERNAL_DATA_FILE, MODEL_FILE, ExportedGraph
from export.fold import LayerFold

QUANTIZE_CHOICES = ("int8", "int4")
DEFAULT_BLOCK_SIZE = 32  # onnxruntime-genai's model builder default for int4 (onnxruntime's own default is 128)
MIN_BLOCK_SIZE = 16  # MatMulNBits: a power of two >= 16
INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes in int8 on CPU (onnxruntime-genai's CPU setting)
PROTOBUF_SAFE_BYTES = int(1.8 * 2**30)  # above this the graph keeps its weights in model.onnx_data
SCRATCH_PREFIX = ".fp32_export."
MATMUL_OPS = ("MatMul", "Gemm")

Log = Callable[[str], None]


class QuantizeError(RuntimeError):
    """The fp32 export cannot be quantized as asked; the message names the file or layer and what to do."""


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``--quantize``, ``--block-size`` and ``--max-quality-drop`` asked for."""

    kind: str  # int8 | int4
    block_size: int = DEFAULT_BLOCK_SIZE  # int4 only
    max_quality_drop: float | None = None  # percent: accuracy points (seq-cls) or perplexity increase (causal LM)

    def as_dict(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"kind": self.kind, "max_quality_drop": self.max_quality_drop}
        if self.kind == "int8":
            settings.update(method="onnxruntime quantize_dynamic", weights="int8 per output channel (MatMul), "
                            "int8 embedding tables (Gather)", activations="uint8 per tensor, computed at run time")
        else:
            settings.update(method="onnxruntime MatMulNBitsQuantizer", weights=f"int4 symmetric, blocks of "
                            f"{self.block_size} along the input dimension (MatMul)",
                            block_size=self.block_size, accuracy_level=INT4_ACCURACY_LEVEL)
        return settings


def check_quantize_options(quantize: str | None, block_size: int | None, max_quality_drop: float | None,
                           merge: bool, dtype: str) -> QuantizeOptions | None:
    """The options, or a ValueError naming the flag at fault (before anything is loaded or written)."""
    import math

    if quantize is None:
        if max_quality_drop is not None:
            raise ValueError("--max-quality-drop needs --quantize int8 or int4: it bounds the quantized export's loss "
                             "against the fp32 export")
        if block_size is not None:
            raise ValueError("--block-size needs --quantize int4 (the int4 block length)")
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if not merge:
        raise ValueError(f"--quantize {quantize} needs --merge: quantization applies to the folded weights (the "
                         f"unfolded adapter graph keeps W0 and the adapter apart)")
    if dtype != "fp32":
        raise ValueError(f"--quantize {quantize} with --dtype {dtype}: the quantizers start from the fp32 export; "
                         f"drop --dtype (or pass --dtype fp32)")
    if block_size is not None and quantize != "int4":
        raise ValueError(f"--block-size {block_size}: only --quantize int4 has blocks (int8 is per output channel)")
    size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if size < MIN_BLOCK_SIZE or size & (size - 1):
        raise ValueError(f"--block-size {size}: MatMulNBits needs a power of two >= {MIN_BLOCK_SIZE} (e.g. 32, 64, "
                         f"128); the default is {DEFAULT_BLOCK_SIZE}")
    if max_quality_drop is not None and not (math.isfinite(max_quality_drop) and max_quality_drop >= 0):
        raise ValueError(f"--max-quality-drop {max_quality_drop}: must be a finite percentage >= 0 (e.g. 1 for one "
                         f"accuracy point, or a 1% perplexity increase)")
    return QuantizeOptions(quantize, size, max_quality_drop)


# ---- which nodes stay float ---------------------------------------------------------------------------------------
def node_path(node_name: str) -> str:
    """A node name as a dotted path: ``/inner/model/bert/encoder/layer.0/x/MatMul`` -> ``.inner.model.bert...``."""
    return "." + node_name.strip("/").replace("/", ".") + "."


def in_scope(node_name: str, layer_name: str) -> bool:
    """Whether the exporter put ``node_name`` inside the module at ``layer_name`` (a dotted module path)."""
    return f".{layer_name}." in node_path(node_name)


def weight_elements(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> int | None:
    """Elements of a MatMul/Gemm's constant weight (input 1), or None when it is computed."""
    tensor = initializers.get(node.input[1]) if len(node.input) > 1 else None
    if tensor is None:
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def residual_nodes(model: onnx.ModelProto, layers: list[LayerFold]) -> dict[str, list[str]]:
    """{layer name: the nodes of its residual path} for every layer whose fold left a residual: every node in the
    layer's scope except MatMul/Gemm nodes whose constant weight has at least d_in x d_out elements (the merged
    weight). A residual layer with no node in the graph is a QuantizeError: its path could not be kept float."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for layer in layers:
        if layer.residual is None:
            continue
        scoped = [node for node in model.graph.node if in_scope(node.name, layer.name)]
        if not scoped:
            raise QuantizeError(f"layer {layer.name!r} ({layer.method}) keeps a residual path ({layer.residual}), but "
                                f"no node of the exported graph is named inside it, so it cannot be kept in float; "
                                f"export without --quantize")
        merged = merged_weight_node(scoped, layer, initializers)
        found[layer.name] = [node.name for node in scoped if node is not merged]
    return found


def merged_weight_node(scoped: list[onnx.NodeProto], layer: LayerFold,
                       initializers: dict[str, onnx.TensorProto]) -> onnx.NodeProto | None:
    """The one MatMul/Gemm of a layer that carries its merged weight: the largest constant weight of at least
    d_in x d_out elements (a fold leaves one static weight per layer, [W' | up] included). Only the largest: a
    sibling group's stacked down-projection, which sits in its first member's scope, can pass d_in x d_out on a
    small model but stays below the merged weight's (d_in + extra) x d_out."""
    sized = [(weight_elements(node, initializers), index, node) for index, node in enumerate(scoped)
             if node.op_type in MATMUL_OPS]
    sized = [(elements, -index, node) for elements, index, node in sized
             if elements is not None and elements >= layer.base_macs_per_token]
    return max(sized, key=lambda item: item[:2])[2] if sized else None


# ---- the stage ----------------------------------------------------------------------------------------------------
def model_bytes(model_file: Path) -> int:
    """The graph file plus its external data file, if any."""
    data = model_file.with_name(model_file.name + "_data")
    return model_file.stat().st_size + (data.stat().st_size if data.is_file() else 0)


@contextmanager
def fp32_aside(graph: ExportedGraph) -> Iterator[Path]:
    """Move the fp32 export's graph (and its external data) into a scratch folder inside the output folder; yield
    the moved graph file; remove the scratch folder on the way out."""
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=graph.folder))
    try:
        for name in (graph.model_file.name, graph.model_file.name + "_data"):
            if (graph.folder / name).is_file():
                (graph.folder / name).rename(scratch / name)
        yield scratch / graph.model_file.name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fold_constants(source: Path, target: Path, large: bool) -> None:
    """onnxruntime's basic optimizations (constant folding: the weight transposes) written to ``target``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    if large:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         target.name + "_data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def attribute(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def plain_gemms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gemm nodes that are a linear layer: Y = A B(^T) + C with a constant B, alpha = beta = 1, A not transposed."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type == "Gemm" and node.input[1] in initializers
            and attribute(node, "alpha", 1.0) == 1.0 and attribute(node, "beta", 1.0) == 1.0
            and not attribute(node, "transA", 0)]


def gemms_as_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite every plain Gemm as MatMul (+ Add of its bias), in place, the MatMul keeping the Gemm's name (and so
    its scope): onnxruntime's dynamic int8 and MatMulNBits quantize MatMul, not Gemm, and GPT-2's Conv1D and BERT's
    pooler and classifier export as Gemm. A transposed weight is stored transposed (B^T). Returns how many."""
    from onnx import numpy_helper

    gemms = plain_gemms(model)
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    for gemm in gemms:
        weight = tensors[gemm.input[1]]
        if attribute(gemm, "transB", 0):
            transposed = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name + "_T")
            model.graph.initializer.append(transposed)
            tensors[transposed.name] = transposed
            weight = transposed
        product = gemm.output[0] + "_matmul" if len(gemm.input) > 2 and gemm.input[2] else gemm.output[0]
        replacement = [onnx.helper.make_node("MatMul", [gemm.input[0], weight.name], [product], name=gemm.name)]
        if product != gemm.output[0]:
            replacement.append(onnx.helper.make_node("Add", [product, gemm.input[2]], [gemm.output[0]],
                                                     name=gemm.name + "_bias"))
        position = list(model.graph.node).index(gemm)
        model.graph.node.remove(gemm)
        for offset, node in enumerate(replacement):
            model.graph.node.insert(position + offset, node)
    used = {name for node in model.graph.node for name in node.input}
    unused = [tensor for tensor in model.graph.initializer if tensor.name not in used]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    return len(gemms)


def prepare(fp32_file: Path, large: bool, log: Log) -> Path:
    """The fp32 graph with its weight transposes folded and its Gemms as MatMuls, beside ``fp32_file``."""
    prepared = fp32_file.with_name("prepared.onnx")
    fold_constants(fp32_file, prepared, large)
    if not plain_gemms(onnx.load(str(prepared), load_external_data=False)):
        return prepared
    model = onnx.load(str(prepared))
    log(f"{gemms_as_matmuls(model)} Gemm nodes rewritten as MatMul + Add (the quantizers take MatMul)")
    rewritten = fp32_file.with_name("prepared_matmul.onnx")
    if large:
        onnx.save(model, str(rewritten), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=rewritten.name + "_data", size_threshold=1024)
    else:
        onnx.save(model, str(rewritten))
    return rewritten


def constant_weight_problem(model: onnx.ModelProto, layers: list[LayerFold]) -> str | None:
    """A sentence naming an adapted layer whose merged MatMul still computes its weight (the constant folding
    failed), or None."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    for layer in layers:
        matmuls = [n for n in model.graph.node if n.op_type in MATMUL_OPS and in_scope(n.name, layer.name)]
        if matmuls and not any(n.input[1] in initializers for n in matmuls):
            return f"layer {layer.name!r}: no MatMul of it reads a constant weight after onnxruntime's constant folding"
    return None


class PreprocessAdvice(logging.Filter):
    """Drops quantize_dynamic's advice to run onnxruntime's pre-processing: fold_constants has done what it needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(prepared: Path, target: Path, exclude: list[str], large: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    advice = PreprocessAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(prepared, target, op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.getLogger().removeFilter(advice)


def quantize_int4(prepared: Path, target: Path, exclude: list[str], block_size: int, large: bool) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # INFO: one line per MatMul
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        quantize_nbits(MatMulNBitsQuantizer, prepared, target, exclude, block_size, large)
    finally:
        chatty.setLevel(level)


def quantize_nbits(quantizer_class: type, prepared: Path, target: Path, exclude: list[str], block_size: int,
                   large: bool) -> None:
    model = onnx.load(str(prepared))
    quantizer = quantizer_class(model, bits=4, block_size=block_size, is_symmetric=True,
                                accuracy_level=INT4_ACCURACY_LEVEL, nodes_to_exclude=exclude,
                                op_types_to_quantize=("MatMul",))
    quantizer.process()
    del model
    quantizer.model.save_model_to_file(str(target), use_external_data_format=large)


def name_external_data(model_file: Path) -> None:
    """Give the quantizers' external data file (``model.onnx.data``) the exporter's name, ``model.onnx_data``: the
    file is renamed and the graph's references rewritten (the weights are not read)."""
    wanted = model_file.name + "_data"
    model = onnx.load(str(model_file), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    if not locations or locations == {wanted}:
        return
    if len(locations) > 1:
        raise QuantizeError(f"{model_file}: the quantizer wrote its weights into several files ({sorted(locations)})")
    data = model_file.parent / wanted
    (model_file.parent / locations.pop()).replace(data)
    data.chmod(model_file.stat().st_mode & 0o777)  # onnx writes it 0600; readable like the graph beside it
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = wanted
    onnx.save(model, str(model_file))


def op_counts(model_file: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(model_file), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def quantize_export(graph: ExportedGraph, fp32_file: Path, layers: list[LayerFold], options: QuantizeOptions,
                    log: Log) -> dict[str, Any]:
    """Quantize the fp32 graph at ``fp32_file`` into ``graph.model_file``; returns the report's settings, the
    residual nodes kept in float32, the sizes and the op counts."""
    large = fp32_file.with_name(fp32_file.name + "_data").is_file() or model_bytes(fp32_file) > PROTOBUF_SAFE_BYTES
    prepared = prepare(fp32_file, large, log)
    structure = onnx.load(str(prepared), load_external_data=False)
    problem = constant_weight_problem(structure, layers)
    if problem:
        raise QuantizeError(f"{fp32_file.name}: {problem}; nothing was quantized")
    kept = residual_nodes(structure, layers)
    del structure
    exclude = sorted({name for names in kept.values() for name in names})
    log(f"{sum(map(len, kept.values()))} residual-path nodes of {len(kept)} layers stay float32")
    target = graph.folder / MODEL_FILE
    if options.kind == "int8":
        quantize_int8(prepared, target, exclude, large)
    else:
        quantize_int4(prepared, target, exclude, options.block_size, large)
    if large:
        name_external_data(target)
    else:
        (graph.folder / EXTERNAL_DATA_FILE).unlink(missing_ok=True)
    fp32_bytes, quantized_bytes = model_bytes(fp32_file), model_bytes(target)
    log(f"{options.kind}: {quantized_bytes / 2**20:,.1f} MiB, {quantized_bytes / fp32_bytes:.3f}x the fp32 export's "
        f"{fp32_bytes / 2**20:,.1f} MiB")
    return {
        "settings": options.as_dict(),
        "float_nodes": {"reason": FLOAT_REASON, "layers": kept},
        "size": {"fp32_bytes": fp32_bytes, "quantized_bytes": quantized_bytes,
                 "ratio": quantized_bytes / fp32_bytes},
        "ops": op_counts(target),
    }


FLOAT_REASON = (
    "residual paths stay float32: they are a few small matmuls (rank r or the gate's d_b wide) feeding a "
    "non-linearity (a ReLU/sigmoid gate, LoDA's f1/f2), so quantizing them saves almost nothing in size or time, "
    "while int8 noise on their inputs moves units across the ReLU's zero and the gate's value (a multiplier on the "
    "whole low-rank term) with it; the merged matmul's int8 error averages over d_in products instead"
)


def quantize_stage(graph: ExportedGraph, config: Any, layers: list[LayerFold], options: QuantizeOptions,
                   step: Callable[..., None], log: Log) -> dict[str, Any]:
    """Quantize the verified fp32 export in place and check it on the task against the fp32 export (which is
    deleted afterwards); returns the report's ``quantization`` section. ``section["errors"]`` names a
    ``--max-quality-drop`` breach; a quantizer failure raises QuantizeError."""
    from export.quality import quality_error, task_quality

    with fp32_aside(graph) as fp32_file:
        step(f"quantizing to {options.kind}", "onnxruntime's quantizer on the folded fp32 export"
             + (f", int4 blocks of {options.block_size}" if options.kind == "int4" else ""))
        try:
            section = quantize_export(graph, fp32_file, layers, options, log)
        except QuantizeError:
            restore(graph, fp32_file)  # leave the verified fp32 export where it was
            raise
        except Exception as error:  # onnxruntime's quantizers raise their own types
            restore(graph, fp32_file)
            raise QuantizeError(f"onnxruntime's {options.kind} quantizer failed on {graph.model_file}: "
                                f"{type(error).__name__}: {error}; the fp32 export is kept") from error
        step("verifying the quantized export", "task-level, against the fp32 export")
        section["quality"] = task_quality(graph, fp32_file, config, log)
    error = quality_error(section["quality"], options.max_quality_drop)
    section["errors"] = [error] if error else []
    return section


def restore(graph: ExportedGraph, fp32_file: Path) -> None:
    """Put the fp32 graph (and its data) back into the output folder after a failed quantization."""
    for name in (fp32_file.name, fp32_file.name + "_data"):
        if (fp32_file.parent / name).is_file():
            (fp32_file.parent / name).replace(graph.folder / name)
