"""Verification of an export: onnxruntime against the outputs the unfolded PyTorch model recorded before the fold.

``export.reference`` runs the PyTorch model once (before folding, so no second model is ever held) on inputs at
shapes the exporters never traced; here onnxruntime runs the same inputs. Parity compares the main output (logits or
last_hidden_state) at the non-padding positions and passes when every element satisfies
``|onnx - torch| <= atol + rtol |torch|`` with the ``surgery.tolerances.MODEL`` entry of the export's dtype. Decoders
exported with a KV cache also run one cached step (2 new tokens on the presents of the first call) against PyTorch's
logits on the whole sequence. Decoders then generate 20 greedy tokens with onnxruntime (``export.decode.greedy``:
the cache when the graph has one): they must be PyTorch ``generate``'s tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.decode import PAST, greedy, onnx_feed, presents_as_past, run_named  # onnx_feed: also for callers
from export.exporters import CAUSAL_LM, ExportedGraph, output_name
from export.latency import ort_session
from export.latency import session_options as latency_session_options
from export.reference import CACHE_STEP_TOKENS, ParityCase, Reference, sample_inputs  # sample_inputs: for callers
from surgery.tolerances import Tolerance

__all__ = ["Parity", "Difference", "VerificationError", "verify_export", "onnx_feed", "sample_inputs", "torch_feed",
           "session", "compare"]


class VerificationError(RuntimeError):
    """The export does not reproduce the PyTorch model; the message gives the worst case."""


@dataclass(frozen=True)
class Difference:
    """One comparison of onnxruntime against PyTorch."""

    case: str
    max_abs_diff: float
    max_rel_diff: float
    within: bool


@dataclass
class Parity:
    tolerance: Tolerance
    cases: list[Difference] = field(default_factory=list)
    greedy_match: bool | None = None  # None for encoders
    greedy: dict | None = None

    @property
    def max_abs_diff(self) -> float:
        return max(case.max_abs_diff for case in self.cases)

    @property
    def max_rel_diff(self) -> float:
        return max(case.max_rel_diff for case in self.cases)

    @property
    def passed(self) -> bool:
        return all(case.within for case in self.cases) and self.greedy_match is not False

    def failure(self) -> str | None:
        """A sentence naming the worst failing case, or None when everything passed."""
        bad = [case for case in self.cases if not case.within]
        tol = self.tolerance
        if bad:
            worst = max(bad, key=lambda c: c.max_abs_diff)
            return (f"onnxruntime differs from the unfolded PyTorch model at {worst.case}: max |diff| "
                    f"{worst.max_abs_diff:.3g}, max rel {worst.max_rel_diff:.3g} (tolerance atol {tol.atol:g}, "
                    f"rtol {tol.rtol:g}: {tol.reason})")
        if self.greedy_match is False:
            return f"greedy decoding differs between onnxruntime and PyTorch: {self.greedy}"
        return None

    def as_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "tolerance": {**asdict(self.tolerance), "rule": "|onnx - torch| <= atol + rtol |torch| elementwise"},
            "greedy_match": self.greedy_match,
            "greedy": self.greedy,
            "passed": self.passed,
            "cases": [asdict(case) for case in self.cases],
        }


# ---- inputs -------------------------------------------------------------------------------------------------------
def torch_feed(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The ONNX feed without the cache, as torch tensors (the same token types and positions for PyTorch)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items() if not k.startswith(PAST)}


# ---- comparing ----------------------------------------------------------------------------------------------------
def compare(case: str, actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance,
            mask: np.ndarray | None = None) -> Difference:
    """max |diff|, max relative diff (where |expected| > atol) and the allclose verdict on the kept positions."""
    if actual.shape != expected.shape:
        raise VerificationError(f"{case}: onnxruntime output shape {actual.shape} != PyTorch {expected.shape}")
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    if mask is not None:  # token-level outputs: keep the non-padding positions
        keep = mask.astype(bool)
        actual, expected = actual[keep], expected[keep]
    diff = np.abs(actual - expected)
    if not np.isfinite(actual).all():
        return Difference(case, float("inf"), float("inf"), False)
    magnitude = np.abs(expected)
    large = magnitude > tolerance.atol
    rel = float((diff[large] / magnitude[large]).max()) if large.any() else 0.0
    within = bool((diff <= tolerance.atol + tolerance.rtol * magnitude).all())
    return Difference(case, float(diff.max()), rel, within)


def session_options() -> ort.SessionOptions:
    """Latency's options (no spin-waiting: verification alternates onnxruntime and PyTorch calls)."""
    return latency_session_options(torch.get_num_threads())


def session(path: Path) -> ort.InferenceSession:
    """A CPU session on ``path`` (float16 graphs with export.latency's lean options: one copy of the weights)."""
    return ort_session(path, "cpu", session_options())


# ---- parity -------------------------------------------------------------------------------------------------------
def check_parity(graph: ExportedGraph, reference: Reference, tolerance: Tolerance,
                 model_file: Path | None = None) -> Parity:
    """onnxruntime (``model_file``, default the graph's) against the recorded outputs (+ a cached step each)."""
    sess = session(model_file or graph.model_file)
    parity = Parity(tolerance)
    name = output_name(graph.task)
    for case in reference.cases:
        feed = onnx_feed(sess, case.inputs)
        outputs = run_named(sess, feed)
        parity.cases.append(compare(case.name, outputs[name], case.expected, tolerance, case.token_mask))
        if graph.with_past:
            parity.cases.append(cached_step(sess, case, outputs, tolerance))
    return parity


def cached_step(sess: ort.InferenceSession, case: ParityCase, outputs: dict[str, np.ndarray],
                tolerance: Tolerance) -> Difference:
    """The case's CACHE_STEP_TOKENS new tokens on the first call's presents vs PyTorch on the whole sequence."""
    if case.step_ids is None or case.step_logits is None:
        raise VerificationError(f"{case.name}: the reference has no cached step (recorded for another task?)")
    batch, seq = case.inputs["input_ids"].shape
    mask = np.ones((batch, seq + CACHE_STEP_TOKENS), dtype=np.int64)
    step_feed = onnx_feed(sess, {"input_ids": case.step_ids, "attention_mask": mask}, presents_as_past(outputs))
    logits = sess.run(["logits"], step_feed)[0]
    return compare(f"cached step: {CACHE_STEP_TOKENS} tokens after {case.name}", logits, case.step_logits, tolerance)


# ---- greedy decoding ----------------------------------------------------------------------------------------------
def check_greedy(graph: ExportedGraph, reference: Reference, model_file: Path | None = None) -> dict:
    """onnxruntime's greedy continuation of the recorded prompts against PyTorch's: {"match", "tokens", ...}."""
    case = reference.greedy
    if case is None:
        raise VerificationError("the reference has no greedy tokens (recorded with greedy=False or for an encoder)")
    tokens = case.tokens.shape[1]
    actual = greedy(session(model_file or graph.model_file), case.prompt, tokens, case.eos_ids, suppress_eos=True,
                    pad_id=case.pad_id)
    expected = case.tokens
    mismatch = np.argwhere(actual != expected) if actual.shape == expected.shape else np.zeros((1, 2), int)
    return {
        "match": len(mismatch) == 0,
        "tokens": tokens,
        "prompts": int(case.prompt.shape[0]),
        "first_mismatch": None if len(mismatch) == 0 else {"row": int(mismatch[0][0]), "step": int(mismatch[0][1])},
        "onnx": actual[0].tolist(),
        "torch": expected[0].tolist(),
    }


def verify_export(graph: ExportedGraph, reference: Reference, tolerance: Tolerance, model_file: Path | None = None,
                  greedy: bool = True) -> Parity:
    """Parity, then (decoders, when ``greedy`` and the reference has tokens) greedy decoding; the caller decides what
    a failure does."""
    parity = check_parity(graph, reference, tolerance, model_file)
    if greedy and graph.task == CAUSAL_LM and reference.greedy is not None:
        parity.greedy = check_greedy(graph, reference, model_file)
        parity.greedy_match = parity.greedy["match"]
    return parity
