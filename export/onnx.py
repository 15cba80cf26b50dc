"""``python -m export.onnx CKPT --merge``: fold an adapter checkpoint, export it to ONNX, verify it, report.

    python -m export.onnx runs/demo --merge                       # folded export into runs/demo/onnx
    python -m export.onnx runs/demo                               # the unfolded adapter graph (for comparison)
    python -m export.onnx runs/demo --merge --dtype fp16 --max-overhead 1.2 --out exported/
    python -m export.onnx runs/demo --merge --quantize int8 --max-quality-drop 1   # int8 after the fold
    python -m export.onnx runs/a runs/b --adapters --out served/  # one graph + a.onnx_adapter, b.onnx_adapter

Steps, one copy of the weights at a time: load the checkpoint onto its untouched base model (memory-mapped); run the
unfolded model on the verification inputs and keep only its outputs; fold every adapter layer in place (``--merge``;
each fold checked against its layer); export with torch.onnx, weights streamed tensor by tensor (decoders with their
KV cache; optimum-onnx instead where the [optimum] extra is installed and knows the architecture); free the PyTorch
model; check onnxruntime against the recorded outputs (a cached step and greedy decoding for decoders); measure
latency against the base model exported the same way, one session at a time; check TensorRT readiness and an fp16
variant; write ``export_report.json`` and ``EXPORT_REPORT.md`` into the output folder. With ``--quantize`` the
verified fp32 graph is quantized in its place after verification (``export.quantize``: residual paths stay float32)
and checked on the task against it (``export.quality``); the latency step then times the quantized graph against the
fp32 base export, and no fp16 variant is made.

Exit status: 0 when every check passed; 1 when a check failed: parity, greedy decoding, the fp16 variant,
``--max-overhead`` or ``--max-quality-drop`` (the report is written, with the error), or a layer's fold beyond
tolerance (nothing is exported);
2 when the inputs cannot be used (checkpoint, base model, options, an architecture the chosen backend cannot export).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.adapters import AdapterSet, export_adapters
from export.exporters import CAUSAL_LM, BACKEND_CHOICES, ExportedGraph, ExportError, export_model, model_task
from export.fold import FoldError, LayerFold, fold_in_place, model_macs, unfolded_layers
from export.outdir import FP16_DIR, check_out, clear_recorded, record_written
from export.quantize import (DEFAULT_BLOCK_SIZE, QUANTIZE_CHOICES, QuantizeError, QuantizeOptions,
                             check_quantize_options, quantize_stage)
from export.reference import GREEDY_TOKENS, PARITY_SHAPES, Reference, record_reference, sample_inputs
from export.report import summary, write_report
from export.verify import Parity, verify_export
from export.weights import release_memory
from surgery.checkpoint import CheckpointError, load_checkpoint
from surgery.config import ConfigError, SurgeryConfig
from surgery.model import ModelLoadError, load_model, load_tokenizer, resolve_model_path
from surgery.targets import TargetError
from surgery.tolerances import MODEL, Tolerance

DEFAULT_OPSET = 18  # optimum-onnx's default for these architectures; TensorRT 10 parses opsets 9-20
MIN_OPSET = 17  # LayerNormalization as one op
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # bf16: refused (check_options)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
LATENCY_BATCH, LATENCY_MAX_SEQUENCE = 1, 128
USER_ERRORS = (CheckpointError, ModelLoadError, ConfigError, TargetError, ExportError, FileNotFoundError, ValueError)

Log = Callable[[str], None]
MODEL_PATH_HELP = ("where the base model is now, if it moved since training (its weights must be the ones the "
                   "checkpoint was trained on)")


class ExportFailed(RuntimeError):
    """The export was written but a check failed; ``report`` holds the findings (also in the output folder)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# ---- the pipeline -------------------------------------------------------------------------------------------------
def export_checkpoint(
    ckpt: str | Path,
    out: str | Path | None = None,
    merge: bool = True,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    max_overhead: float | None = None,
    *,
    backend: str = "auto",
    model_path: str | None = None,
    base_onnx: str | Path | None = None,
    latency: bool = True,
    fp16_check: bool = True,
    overwrite: bool = False,
    log: Log = print,
    quantize: str | None = None,
    block_size: int | None = None,
    max_quality_drop: float | None = None,
    adapters: AdapterSet | None = None,
) -> dict[str, Any]:
    """Fold (``merge``), export, verify, measure and report one checkpoint; returns the report.

    One copy of the weights at a time: the unfolded model's outputs on the verification inputs are recorded first
    (``export.reference``), the layers are folded in place, the exporter writes the weights tensor by tensor, and the
    PyTorch model is freed before onnxruntime opens the export. ``base_onnx`` reuses an export of the base model for
    the latency comparison (else one is made the same way in a temporary folder; the two are timed one after the
    other). ``out`` may hold an earlier export (whose files, and only those, are replaced: ``export.outdir``);
    other files need ``overwrite``. Raises :class:`ExportFailed` (report written) when a check fails,
    :class:`FoldError` when a layer's fold is off, and CheckpointError / ModelLoadError / ExportError / ValueError
    (OutFolderError among them) for unusable inputs.
    """
    check_options(opset, dtype, max_overhead, latency)
    quantizing = check_quantize_options(quantize, block_size, max_quality_drop, merge, dtype)
    fp16_check = fp16_check and quantizing is None  # a quantized export ships no fp16 variant
    ckpt = Path(ckpt)
    out = Path(out) if out is not None else ckpt / ("onnx" if merge else "onnx_unfolded")
    check_out(out, overwrite)
    tolerance = export_tolerance(dtype)
    step = Steps(log, total=(7 if latency else 6) + (2 if quantizing else 0))
    step("loading the checkpoint", f"{ckpt}")
    adapted = load_checkpoint(ckpt, model_path=model_path)
    if adapters is not None:  # --adapters (export.adapters): the set's tensors kept, its baked tensors compared
        adapters.check_loaded(adapted)
    config, model = adapted.config, adapted.model.eval()
    task = model_task(model)
    step("running the unfolded model", f"parity inputs {PARITY_SHAPES}"
         + (f", a cached step, {GREEDY_TOKENS} greedy tokens" if task == CAUSAL_LM else "")
         + (" (in float32: each module's weights upcast while it runs)" if model_dtype(model) != torch.float32 else "")
         + (", then in float16 (the dtype's own error)" if dtype == "fp16" or fp16_check else ""))
    reference = record_reference(model, task, floor_dtype=torch.float16 if dtype == "fp16" or fp16_check else None)
    step("folding in place" if merge else "keeping the adapters unfolded", f"{len(adapted.layers)} adapted layers"
         + (f", folds rounded once to {dtype}" if merge else ""))
    layers = fold_in_place(model, dtype=EXPORT_DTYPES[dtype]) if merge else unfolded_layers(adapted)
    del adapted
    step("exporting", f"into {out}, weights in {dtype}")
    before = clear_recorded(out)
    with adapters.marked() if adapters is not None else nullcontext():
        graph = export_model(model, out, opset, backend, task=task, log=step.detail, dtype=EXPORT_DTYPES[dtype])
    variant = fp16_variant_from(model, graph) if fp16_check and dtype != "fp16" else None
    report = base_report(ckpt, config, graph, merge, dtype, layers, model_macs(model, layers))
    del model  # the PyTorch model goes before onnxruntime opens the export
    release_memory()
    save_tokenizer(config, out, step.detail)
    step("verifying", f"onnxruntime vs the unfolded PyTorch model at {tolerance.atol:g} / {tolerance.rtol:g}")
    if adapters is None:
        parity = verify_export(graph, reference, tolerance)
    else:  # swappable inputs, one adapter file per checkpoint, each adapter and the base verified
        parity = adapters.finish(graph, reference, tolerance, step.detail)
        report["adapters"] = adapters.section(out)
    report["parity"] = parity.as_dict()
    if not parity.passed:
        fail(report, out, parity.failure() or "parity failed", before)
    if quantizing is not None:  # export.quantize: the verified fp32 graph quantized in place, checked on the task
        quantization(report, graph, config, layers, quantizing, step, before)
    if latency:
        step("measuring latency", "against the base model exported the same way, one session at a time")
        report["latency"] = measure(graph, config, reference, dtype, base_onnx, max_overhead)
    step("checking TensorRT readiness", "opset, ops, profiles" + (", fp16 variant" if fp16_check else ""))
    report["tensorrt"] = tensorrt_section(graph, reference, layers, dtype, variant, parity, report["errors"])
    overhead_error(report, max_overhead)
    if report["errors"]:
        fail(report, out, "; ".join(report["errors"]), before)
    report["passed"] = True
    finish(report, out, before)
    step.done(out)
    return report


def check_options(opset: int, dtype: str, max_overhead: float | None, latency: bool) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: use {MIN_OPSET} or later (TensorRT readiness needs LayerNormalization "
                         f"as one op); the default is {DEFAULT_OPSET}")
    if opset > newest_opset():
        raise ValueError(f"--opset {opset}: the installed onnx knows opsets up to {newest_opset()}; the default is "
                         f"{DEFAULT_OPSET}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if dtype == "bf16":
        raise ValueError(bf16_refusal(cpu_bf16_problem()))
    if max_overhead is not None and not (math.isfinite(max_overhead) and max_overhead > 0):
        raise ValueError(f"--max-overhead {max_overhead}: must be a positive, finite ratio (e.g. 1.2)")
    if max_overhead is not None and not latency:
        raise ValueError("--max-overhead needs the latency measurement; drop --no-latency")


def newest_opset() -> int:
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def cpu_bf16_problem() -> str | None:
    """Why onnxruntime's CPU provider cannot run a bfloat16 graph: its error for a one-node bf16 MatMul (every
    adapted layer exports as one), or None when it can. Nothing is written: the graph is built in memory."""
    import onnxruntime
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 2])
    weight = helper.make_tensor("w", TensorProto.BFLOAT16, [2, 2], [1.0, 0.0, 0.0, 1.0])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "bf16_probe", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own pybind types; the first line names the missing kernel
        return str(error).strip().split("\n", 1)[0]
    return None


def bf16_refusal(problem: str | None) -> str:
    """The --dtype bf16 error: onnxruntime's CPU provider (which verifies every export) cannot run it, or, should a
    later onnxruntime run it, this exporter does not convert to bf16 yet."""
    import onnxruntime

    if problem is None:
        return ("--dtype bf16: this onnxruntime's CPU provider runs a bfloat16 MatMul, but the exporter has no bf16 "
                "graph conversion yet; export with --dtype fp16 or --dtype fp32")
    return (f"--dtype bf16: onnxruntime {onnxruntime.__version__}'s CPU execution provider cannot run a bfloat16 "
            f"graph ({problem}), and every export is verified on it, so nothing was exported. Use --dtype fp16 "
            f"(weights rounded once to float16) or --dtype fp32 (a bfloat16 base is upcast exactly); TensorRT builds "
            f"a bf16 engine from the fp32 file with trtexec --bf16")


class Steps:
    """Numbered progress lines with the elapsed time."""

    def __init__(self, log: Log, total: int) -> None:
        self.log, self.count, self.total, self.start = log, 0, total, time.perf_counter()

    def __call__(self, what: str, detail: str = "") -> None:
        self.count += 1
        self.log(f"[{self.count}/{self.total}] {what}{': ' + detail if detail else ''} "
                 f"({time.perf_counter() - self.start:.1f}s)")

    def detail(self, message: str) -> None:
        self.log(f"      {message}")

    def done(self, out: Path) -> None:
        self.log(f"done in {time.perf_counter() - self.start:.1f}s: {out}")


# ---- fold and export ----------------------------------------------------------------------------------------------
def model_dtype(model: nn.Module) -> torch.dtype:
    """The least precise floating dtype of the model's parameters: the stored base weights' (a half-precision base
    keeps its adapters in float32)."""
    return max((p.dtype for p in model.parameters() if p.is_floating_point()), key=lambda d: torch.finfo(d).eps)


def export_tolerance(dtype: str) -> Tolerance:
    """The MODEL entry for verifying a ``--dtype`` export against the unfolded PyTorch model.

    The reference always computes in float32 (a half-precision base upcast exactly, ``export.reference``): the same
    values the fold starts from, so it differs from the export only by the export's own arithmetic, and the entry is
    the export dtype's: fp32 -> MODEL[float32] (kernels, the fold's float32 reassociation; greedy tokens must match),
    fp16 -> MODEL[float16] (weights rounded once to float16, float16 activations; at depth, within a factor of
    the error of the model stored in float16 on the same inputs, which the reference records).
    """
    wanted = EXPORT_DTYPES[dtype]
    if wanted not in MODEL:
        raise ValueError(f"surgery/tolerances.py has no MODEL tolerance for {wanted} (--dtype {dtype}); add a MODEL "
                         f"entry with its reason")
    return MODEL[wanted]


def fp16_variant_from(model: nn.Module, graph: ExportedGraph) -> ExportedGraph:
    """The float16 variant for TensorRT readiness, written from the PyTorch weights (each rounded once to float16)
    into ``FP16_DIR`` beside the export, with the same backend and opset."""
    return export_model(model, graph.folder / FP16_DIR, graph.opset, graph.backend, task=graph.task,
                        log=lambda _: None, dtype=torch.float16)


def save_tokenizer(config: SurgeryConfig, out: Path, log: Log) -> None:
    """The base model's tokenizer into ``out``; a warning (not an error) when the base model has none."""
    source = Path(resolve_model_path(config.model.name_or_path))
    if source.is_dir() and not any((source / name).is_file() for name in TOKENIZER_FILES):
        log(f"warning: {source} has no tokenizer files; save one into {out} before running the export")
        return
    try:
        load_tokenizer(config.model).save_pretrained(out)
    except ModelLoadError as error:
        log(f"warning: no tokenizer saved ({error}); save one into {out} before running the export")


# ---- quantization -------------------------------------------------------------------------------------------------
def quantization(report: dict[str, Any], graph: ExportedGraph, config: SurgeryConfig, layers: list[LayerFold],
                 options: QuantizeOptions, step: Steps, before: set[str]) -> None:
    """export.quantize's stage into ``report['quantization']``; a quantizer failure fails the export (the fp32
    graph is put back), a --max-quality-drop breach joins the errors (latency is still measured)."""
    try:
        report["quantization"] = quantize_stage(graph, config, layers, options, step, step.detail)
    except QuantizeError as error:
        fail(report, graph.folder, str(error), before)
    report["files"] = {"model": graph.model_file.name,
                       **({"external_data": graph.model_file.name + "_data"} if graph.external_data else {})}
    report["errors"].extend(report["quantization"]["errors"])


# ---- latency ------------------------------------------------------------------------------------------------------
def latency_sequence(config: Any) -> int:
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(LATENCY_MAX_SEQUENCE, positions // 2) if positions else LATENCY_MAX_SEQUENCE


def measure(graph: ExportedGraph, config: SurgeryConfig, reference: Reference, dtype: str,
            base_onnx: str | Path | None, max_overhead: float | None) -> dict[str, Any]:
    """export.latency.measure_latency on one batch-1 input, with a base export made the same way if needed."""
    from export.latency import measure_latency

    seq = latency_sequence(reference.config)
    inputs = sample_inputs(reference.vocab_size, LATENCY_BATCH, seq, seed=99)
    with tempfile.TemporaryDirectory(prefix="base_onnx.") as scratch:
        base_path = Path(base_onnx) if base_onnx else export_base(config, graph, dtype, Path(scratch))
        result = measure_latency(graph.model_file, base_path, inputs)
    kind = " (prefill, empty cache)" if graph.with_past else ""
    return {**result, "input": f"batch {LATENCY_BATCH} x seq {seq}{kind}", "max_overhead": max_overhead,
            "base_onnx": str(base_onnx) if base_onnx else "exported for this run"}


def export_base(config: SurgeryConfig, graph: ExportedGraph, dtype: str, folder: Path) -> Path:
    """The base model (no adapter) exported with the same backend, opset and dtype, then freed."""
    base = load_model(config.model).eval()
    base_graph = export_model(base, folder, graph.opset, graph.backend, task=graph.task, log=lambda _: None,
                              dtype=EXPORT_DTYPES[dtype])
    del base
    release_memory()
    return base_graph.model_file


def overhead_error(report: dict[str, Any], max_overhead: float | None) -> None:
    latency = report.get("latency")
    if max_overhead is None or latency is None or latency["overhead"] <= max_overhead:
        return
    report["errors"].append(
        f"onnxruntime overhead {latency['overhead']:.3f} (export {latency['ort_ms']:.3f} ms / base "
        f"{latency['base_ort_ms']:.3f} ms) exceeds --max-overhead {max_overhead:g}"
    )


# ---- TensorRT -----------------------------------------------------------------------------------------------------
def profile_max_sequence(config: Any, with_past: bool) -> int:
    """The profile's longest sequence: the model's positions (up to 512), halved with a cache so that past +
    new tokens stay within them."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    longest = min(512, int(positions))
    return longest // 2 if with_past else longest


def tensorrt_section(graph: ExportedGraph, reference: Reference, layers: list[LayerFold], dtype: str,
                     variant: ExportedGraph | None, parity: Parity, errors: list[str]) -> dict[str, Any]:
    """trt_readiness with a profile sized to the model, and the fp16 variant (``variant``; the export itself with
    ``--dtype fp16``) checked at MODEL[float16]."""
    from export.tensorrt import suggest_profile, trt_readiness

    max_seq = profile_max_sequence(reference.config, graph.with_past)
    profile = suggest_profile(graph.model_file, opt_seq=max(1, max_seq // 4), max_seq=max_seq)
    readiness = trt_readiness(graph.model_file, graph.opset, any(layer.sparse_2_4 for layer in layers), profile)
    if dtype == "fp16":
        readiness["fp16"] = {"file": graph.model_file.name, "parity": parity.as_dict()}
    elif variant is not None:
        fp16_parity = verify_export(variant, reference, MODEL[torch.float16], greedy=False)
        relative = str(variant.model_file.relative_to(graph.folder))
        readiness["fp16"] = {"file": relative, "parity": fp16_parity.as_dict()}
        if not fp16_parity.passed:
            errors.append(f"fp16 variant {variant.model_file}: {fp16_parity.failure()}")
    return readiness


# ---- report -------------------------------------------------------------------------------------------------------
def base_report(ckpt: Path, config: SurgeryConfig, graph: ExportedGraph, merge: bool, dtype: str,
                layers: list[LayerFold], macs: tuple[int, int]) -> dict[str, Any]:
    macs_per_token, base_macs = macs
    files = {"model": graph.model_file.name}
    if graph.external_data:
        files["external_data"] = graph.model_file.name + "_data"
    return {
        "passed": False,
        "errors": [],
        "checkpoint": str(ckpt),
        "base_model": config.model.name_or_path,
        "method": config.method.name,
        "task": graph.task,
        "merge": merge,
        "backend": graph.backend,
        "with_past": graph.with_past,
        "opset": graph.opset,
        "dtype": dtype,
        "files": files,
        "parity": None,
        "latency": None,
        "layers": [layer.as_dict() for layer in layers],
        "macs_per_token": macs_per_token,
        "base_macs_per_token": base_macs,
        "tensorrt": None,
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import onnx
    import onnxruntime
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
             "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    for package in ("optimum-onnx", "optimum"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def fail(report: dict[str, Any], out: Path, message: str, kept: set[str]) -> None:
    """Write the report as failed and raise ExportFailed."""
    if message not in report["errors"]:
        report["errors"].append(message)
    report["passed"] = False
    finish(report, out, kept)
    raise ExportFailed(message, report)


def finish(report: dict[str, Any], out: Path, kept: set[str]) -> None:
    """Write the report and the record of the files this export wrote (what the next export may delete; ``kept``:
    files that were there before, not claimed)."""
    write_report(report, out)
    record_written(out, kept)


# ---- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", type=Path, nargs="+", help="checkpoint folder written by surgery/training "
                        "(adapter.safetensors, surgery.yaml, checkpoint.json); several only with --adapters")
    parser.add_argument("--adapters", action="store_true",
                        help="one unfolded base graph whose adapter tensors are swappable inputs, plus one "
                             "NAME.onnx_adapter per checkpoint (NAME: its folder's name) for onnxruntime's "
                             "RunOptions.add_active_adapter; the checkpoints must share base model, method, settings "
                             "and layers (export.adapters; default --out CKPT/onnx_adapters; fp32, no latency step: "
                             "benchmarks/bench_adapters.py measures it)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the adapters (METHODS.md): fully mergeable layers become plain Linear/Conv1D, "
                             "others the folded weight plus their residual path; without it the unfolded adapter "
                             "graph is exported")
    parser.add_argument("--out", type=Path, help="output folder (default CKPT/onnx, or CKPT/onnx_unfolded without "
                                                 "--merge); an earlier export's graphs and reports there are replaced")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32",
                        help="dtype of the exported weights and activations (default fp32). Folds are computed in "
                             "float32 from the stored weights and rounded once to it: fp32 carries a bfloat16/float16 "
                             "base upcast exactly plus the unrounded delta; fp16 keeps float32 inputs/outputs and is "
                             "verified at the float16 tolerance; bf16 is refused while onnxruntime's CPU provider "
                             "(which verifies every export) has no bfloat16 MatMul")
    parser.add_argument("--max-overhead", type=float, metavar="X",
                        help="fail when onnxruntime latency of the export / that of the base model exceeds X")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="auto: optimum-onnx where the [optimum] extra is installed and knows the "
                             "architecture, else torch.onnx (decoders with the KV cache); optimum or torch force one")
    parser.add_argument("--model-path", help=MODEL_PATH_HELP)
    parser.add_argument("--base-onnx", type=Path, help="an existing ONNX export of the base model to compare latency "
                                                       "against (default: export it again, the same way)")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the latency measurement (and the base model's export it needs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="export into an --out holding files no earlier export wrote (files of the names the "
                             "export writes are replaced, no other file is deleted); an earlier export's own files "
                             "are always replaced")
    parser.add_argument("--no-fp16-check", action="store_true",
                        help="skip building and verifying the fp16 variant (TensorRT readiness)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="after the fp32 export is verified, quantize it with onnxruntime's tooling (needs "
                             "--merge, fp32): int8 = dynamic int8, per output channel, MatMul and embeddings; "
                             "int4 = MatMulNBits weight-only blocks (decoders; encoders too). Residual paths stay "
                             "float32. Checked on the task against the fp32 export (export.quality); no fp16 "
                             "variant")
    parser.add_argument("--block-size", type=int, metavar="N",
                        help=f"--quantize int4: weights per quantization block, a power of two >= 16 (default "
                             f"{DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--max-quality-drop", type=float, metavar="X",
                        help="with --quantize: fail when the quantized export loses more than X against the fp32 "
                             "export on the checkpoint's eval data: seq-cls accuracy points, causal-LM perplexity "
                             "increase in percent")
    args = parser.parse_args(argv)
    if len(args.checkpoint) > 1 and not args.adapters:
        parser.error(f"{len(args.checkpoint)} checkpoints given; several checkpoints export together only with "
                     f"--adapters (one base graph and an adapter file each); export one at a time otherwise")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run_export(args)
    except ExportFailed as failure:
        print(summary(failure.report))
        print(f"error: {failure}", file=sys.stderr)
        return 1
    except FoldError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(report))
    return 0


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """export_checkpoint, or with --adapters export.adapters' wrapper around it."""
    if args.adapters:
        if (args.merge or args.max_overhead is not None or args.base_onnx is not None
                or getattr(args, "quantize", None)):
            raise ValueError("--adapters exports the unfolded float32 graph without a latency step: drop --merge, "
                             "--max-overhead, --base-onnx and --quantize")
        return export_adapters(args.checkpoint, args.out, opset=args.opset, dtype=args.dtype, backend=args.backend,
                               model_path=args.model_path, overwrite=args.overwrite)
    return export_checkpoint(
        args.checkpoint[0], args.out, merge=args.merge, opset=args.opset, dtype=args.dtype,
        max_overhead=args.max_overhead, backend=args.backend, model_path=args.model_path,
        base_onnx=args.base_onnx, latency=not args.no_latency, fp16_check=not args.no_fp16_check,
        overwrite=args.overwrite,
        quantize=args.quantize, block_size=args.block_size, max_quality_drop=args.max_quality_drop,
    )


if __name__ == "__main__":
    sys.exit(main())
