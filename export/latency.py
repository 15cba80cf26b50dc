"""Latency of an exported model against the base model exported the same way, in onnxruntime.

The two sessions are timed one after the other, never both loaded (a real-size model's weights fit in memory once):
each is opened, warmed up, run ``runs`` times and closed; each reports the median of its runs. Both share one
SessionOptions (ORT_ENABLE_ALL, a fixed intra-op thread count, no spin-waiting). One after the other, a slow phase of
the machine can hit one and not the other; ``benchmarks/`` interleaves the candidates (and times PyTorch eager,
PEFT) for the published ratios. The numbers are measurements for the export report, never test thresholds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.decode import onnx_feed

# Our provider names -> the onnxruntime execution providers to try, in order (CPU is always the last fallback).
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class ProviderError(ValueError):
    """An unknown provider name, or one this onnxruntime build cannot run."""


def available_providers() -> list[str]:
    """Our provider names whose first execution provider this onnxruntime build has."""
    have = set(ort.get_available_providers())
    return [name for name, chain in PROVIDERS.items() if chain[0] in have]


def provider_chain(provider: str) -> list[str]:
    """The onnxruntime provider list for ``provider`` (cpu|cuda|tensorrt), or a ProviderError listing what exists."""
    if provider not in PROVIDERS:
        raise ProviderError(
            f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)} "
            f"(available in this onnxruntime: {available_providers()})"
        )
    chain = PROVIDERS[provider]
    if chain[0] not in ort.get_available_providers():
        raise ProviderError(
            f"provider {provider!r} needs {chain[0]}, which this onnxruntime build lacks; "
            f"available: {available_providers()} ({', '.join(ort.get_available_providers())}). "
            "Install onnxruntime-gpu (pip install '.[gpu]') for cuda and tensorrt."
        )
    return chain


def session_options(threads: int) -> ort.SessionOptions:
    """Full graph optimisation, ``threads`` intra-op threads, one inter-op thread, sequential execution."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle onnxruntime threads busy-wait by default; interleaved with PyTorch on few cores that starves the
    # other candidates and skews every ratio.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def ort_session(path: Path, provider: str = "cpu", options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An InferenceSession on ``path`` with the provider chain for ``provider`` (see ``PROVIDERS``); a float16 graph
    on the CPU provider gets :func:`lean_float16_options`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    if provider == "cpu" and has_float16_weights(path):
        options = lean_float16_options(options or session_options(torch.get_num_threads()))
    return ort.InferenceSession(str(path), sess_options=options, providers=provider_chain(provider))


def has_float16_weights(path: Path) -> bool:
    """Whether the graph stores any initializer in float16 (read without the weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in graph.initializer)


def lean_float16_options(options: ort.SessionOptions) -> ort.SessionOptions:
    """``options`` for a float16 graph on onnxruntime's CPU provider, which has no float16 MatMul and computes it in
    float32. At ORT_ENABLE_ALL it constant-folds the inserted Casts: a float32 copy of every weight in the session,
    three times the float16 model's bytes. At ORT_ENABLE_BASIC each weight is cast when it is used, but the default
    execution order runs every Cast of a weight (their inputs are ready at the start) before the first MatMul: all the
    float32 copies at once (measured: 32 float16 MatMuls of 8 MiB peak at 831 MiB; 335 MiB with PRIORITY_BASED).
    The priority-based order runs each Cast just before its MatMul, and without the memory arena (or memory patterns)
    the float32 copy is freed right after: the float16 weights plus one float32 weight. Verification and CPU latency
    of float16 exports use these; GPU providers run float16 natively."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


def declared_feed(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The subset of ``inputs`` the session declares; a declared input missing from ``inputs`` is an error."""
    names = [i.name for i in session.get_inputs()]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise ValueError(f"the model declares inputs {missing} that the feed lacks (feed has {sorted(inputs)})")
    return {name: inputs[name] for name in names}


def _median_ms(candidates: dict[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, float]:
    """Warm each candidate up, then time them round-robin ``runs`` times; median milliseconds per candidate."""
    for run in candidates.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    for i in range(runs):
        for name in order[i % len(order):] + order[: i % len(order)]:  # rotate who goes first each round
            start = time.perf_counter_ns()
            candidates[name]()
            times[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_latency(
    onnx_path: Path,
    base_onnx_path: Path,
    inputs: dict[str, np.ndarray],
    warmup: int = 3,
    runs: int = 20,
    provider: str = "cpu",
    threads: int | None = None,
) -> dict:
    """Median latency (ms) of the exported model and of the exported base model, one session at a time.

    The export's session is opened, warmed up, timed and closed before the base's is opened (never both loaded: a
    real-size model's weights fit once), both with the same SessionOptions. ``inputs`` feeds both, each getting only
    the names it declares. ``threads`` defaults to PyTorch's intra-op thread count.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    threads = threads or torch.get_num_threads()
    options = session_options(threads)
    medians = {name: median_ms(path, provider, options, inputs, warmup, runs)
               for name, path in (("ort_ms", onnx_path), ("base_ort_ms", base_onnx_path))}
    return {
        **medians,
        "overhead": medians["ort_ms"] / medians["base_ort_ms"],
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "provider": provider,
    }


def median_ms(path: Path, provider: str, options: ort.SessionOptions, inputs: dict[str, np.ndarray], warmup: int,
              runs: int) -> float:
    """Open ``path``, run it ``warmup`` times, then time ``runs`` runs; the session is released on return."""
    sess = ort_session(path, provider, options)
    feed = onnx_feed(sess, inputs)  # a decoder with a KV cache also gets position_ids and an empty cache (prefill)
    return _median_ms({"run": lambda: sess.run(None, feed)}, warmup, runs)["run"]
