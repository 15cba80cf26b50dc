"""Latency of an exported model: onnxruntime (adapted vs base export) and PyTorch (unfolded vs folded).

Two pairs, each run round-robin inside its own loop so a slow phase of the machine (another process, thermal
throttling) hits both members alike: the adapted against the base export in onnxruntime, then the unfolded against
the folded PyTorch model. The pairs are not mixed: right after a PyTorch call its OpenMP threads still spin and its
working set fills the caches, and in one four-way rotation the adapted export always ran right after PyTorch while
the base mostly ran after the adapted export (measured on MiniLM + ProDA: export / base 1.16 that way, 1.03 in
pairs). Each candidate reports the median of its runs. Both onnxruntime sessions share one
SessionOptions (ORT_ENABLE_ALL, a fixed intra-op thread count) and PyTorch runs with the same thread count under
``torch.inference_mode``. The numbers are measurements for the export report, never test thresholds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

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
    """An InferenceSession on ``path`` with the provider chain for ``provider`` (see ``PROVIDERS``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    return ort.InferenceSession(str(path), sess_options=options, providers=provider_chain(provider))


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
    torch_unfolded: nn.Module,
    torch_folded: nn.Module,
    inputs: dict[str, np.ndarray],
    torch_inputs: dict[str, torch.Tensor],
    warmup: int = 3,
    runs: int = 20,
    provider: str = "cpu",
    threads: int | None = None,
) -> dict:
    """Median latency (ms) of the exported model, the exported base model and both PyTorch models.

    ``inputs`` feeds both ONNX sessions, each getting only the names it declares; ``torch_inputs`` are the keyword
    arguments of both PyTorch modules. ``threads`` defaults to PyTorch's intra-op thread count.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    threads = threads or torch.get_num_threads()
    options = session_options(threads)
    adapted, base = ort_session(onnx_path, provider, options), ort_session(base_onnx_path, provider, options)
    adapted_feed, base_feed = declared_feed(adapted, inputs), declared_feed(base, inputs)
    onnx_pair = {
        "ort_ms": lambda: adapted.run(None, adapted_feed),
        "base_ort_ms": lambda: base.run(None, base_feed),
    }
    torch_pair = {
        "torch_unfolded_ms": lambda: torch_unfolded(**torch_inputs),
        "torch_folded_ms": lambda: torch_folded(**torch_inputs),
    }
    medians = _median_ms(onnx_pair, warmup, runs)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            medians.update(_median_ms(torch_pair, warmup, runs))
    finally:
        torch.set_num_threads(previous_threads)
    return {
        **medians,
        "overhead": medians["ort_ms"] / medians["base_ort_ms"],
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "provider": provider,
    }
