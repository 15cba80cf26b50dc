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
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.decode import PAST, greedy, onnx_feed, presents_as_past, run_named  # onnx_feed: also for callers
from export.exporters import CAUSAL_LM, ExportedGraph, output_name
from export.latency import ort_session
from export.latency import session_options as latency_session_options
from export.reference import CACHE_STEP_TOKENS, ParityCase, Reference, sample_inputs  # sample_inputs: for callers
from surgery.tolerances import Tolerance

__all__ = ["Parity", "Difference", "VerificationError", "verify_export", "greedy_comparison", "rule", "onnx_feed",
           "sample_inputs", "torch_feed", "session", "compare"]


class VerificationError(RuntimeError):
    """The export does not reproduce the PyTorch model; the message gives the worst case."""


@dataclass(frozen=True)
class Difference:
    """One comparison of onnxruntime against PyTorch."""

    case: str
    max_abs_diff: float
    max_rel_diff: float
    within: bool
    floor_abs_diff: float | None = None  # the model stored in the export's half dtype: its max |diff|


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
        return all(case.within for case in self.cases) and (self.greedy is None or self.greedy["passed"])

    def failure(self) -> str | None:
        """A sentence naming the worst failing case, or None when everything passed."""
        bad = [case for case in self.cases if not case.within]
        tol = self.tolerance
        if bad:
            worst = max(bad, key=lambda c: c.max_abs_diff)
            return (f"onnxruntime differs from the unfolded PyTorch model at {worst.case}: max |diff| "
                    f"{worst.max_abs_diff:.3g}, max rel {worst.max_rel_diff:.3g} (tolerance atol {tol.atol:g}, "
                    f"rtol {tol.rtol:g}: {tol.reason})")
        if self.greedy is not None and not self.greedy["passed"]:
            return f"greedy decoding differs between onnxruntime and PyTorch beyond a near-tie: {self.greedy}"
        return None

    def as_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "tolerance": {**asdict(self.tolerance), "rule": rule(self.tolerance, "onnx", "torch")},
            "greedy_match": self.greedy_match,
            "greedy": self.greedy,
            "passed": self.passed,
            "cases": [asdict(case) for case in self.cases],
        }


def rule(tolerance: Tolerance, actual: str, expected: str) -> str:
    """The parity rule in words, for reports."""
    text = f"|{actual} - {expected}| <= atol + rtol |{expected}| elementwise"
    if tolerance.floor_factor is not None:
        text += (f", or max |diff| <= {tolerance.floor_factor:g} x the max |diff| of the model stored in the export's "
                 f"half dtype (where recorded)")
    return text


# ---- inputs -------------------------------------------------------------------------------------------------------
def torch_feed(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The ONNX feed without the cache, as torch tensors (the same token types and positions for PyTorch)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items() if not k.startswith(PAST)}


# ---- comparing ----------------------------------------------------------------------------------------------------
def compare(case: str, actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance,
            mask: np.ndarray | None = None, floor: np.ndarray | None = None) -> Difference:
    """max |diff|, max relative diff (where |expected| > atol) and the verdict on the kept positions: allclose, or
    (``floor``: the same output computed by PyTorch in the export's half dtype, and a tolerance with a floor_factor)
    a max |diff| within floor_factor x the floor's."""
    if actual.shape != expected.shape:
        raise VerificationError(f"{case}: onnxruntime output shape {actual.shape} != PyTorch {expected.shape}")
    keep = slice(None) if mask is None else mask.astype(bool)  # token-level outputs: the non-padding positions
    actual, expected = actual.astype(np.float64)[keep], expected.astype(np.float64)[keep]
    if not np.isfinite(actual).all():
        return Difference(case, float("inf"), float("inf"), False)
    diff = np.abs(actual - expected)
    magnitude = np.abs(expected)
    large = magnitude > tolerance.atol
    rel = float((diff[large] / magnitude[large]).max()) if large.any() else 0.0
    within = bool((diff <= tolerance.atol + tolerance.rtol * magnitude).all())
    floor_diff = None
    if floor is not None and tolerance.floor_factor is not None:
        floor_diff = float(np.abs(floor.astype(np.float64)[keep] - expected).max())
        within = within or float(diff.max()) <= tolerance.floor_factor * floor_diff
    return Difference(case, float(diff.max()), rel, within, floor_diff)


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
        parity.cases.append(compare(case.name, outputs[name], case.expected, tolerance, case.token_mask, case.floor))
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
    return compare(f"cached step: {CACHE_STEP_TOKENS} tokens after {case.name}", logits, case.step_logits, tolerance,
                   floor=case.step_floor)


# ---- greedy decoding ----------------------------------------------------------------------------------------------
def check_greedy(graph: ExportedGraph, reference: Reference, tolerance: Tolerance,
                 model_file: Path | None = None) -> dict[str, Any]:
    """onnxruntime's greedy continuation of the recorded prompts against PyTorch's (:func:`greedy_comparison`)."""
    case = reference.greedy
    if case is None:
        raise VerificationError("the reference has no greedy tokens (recorded with greedy=False or for an encoder)")
    actual = greedy(session(model_file or graph.model_file), case.prompt, case.tokens.shape[1], case.eos_ids,
                    suppress_eos=True, pad_id=case.pad_id)
    return greedy_comparison(actual, case.tokens, case.scores, tolerance)


def greedy_comparison(actual: np.ndarray, expected: np.ndarray, scores: np.ndarray,
                      tolerance: Tolerance) -> dict[str, Any]:
    """Greedy tokens of the export or reloaded model (``actual``) against the unfolded model's (``expected``, chosen
    as the argmax of ``scores``: (steps, batch, vocab)), both (batch, steps).

    Passes when the tokens are identical, or when in every row that diverges the unfolded model's scores at the first
    differing step put the two tokens within what parity allows each logit to move (``2 atol + rtol (|a| + |b|)``):
    a near-tie that either computation may break either way. Half precision makes such ties common (bfloat16 logits
    near 5 are 0.03 apart); anything wider is a failure. Only the first divergence per row is judged: after it the
    two continuations read different prefixes.
    """
    section: dict[str, Any] = {"match": False, "passed": False, "tokens": int(expected.shape[1]),
                               "prompts": int(expected.shape[0]), "divergences": [],
                               "actual": actual[0].tolist(), "expected": expected[0].tolist()}
    if actual.shape != expected.shape:
        section["divergences"].append(f"tokens {actual.shape} != expected {expected.shape}")
        return section
    for row in range(expected.shape[0]):
        differing = np.flatnonzero(actual[row] != expected[row])
        if len(differing):
            section["divergences"].append(divergence(row, int(differing[0]), expected, actual, scores, tolerance))
    section["match"] = not section["divergences"]
    section["passed"] = all(d["near_tie"] for d in section["divergences"])
    return section


def divergence(row: int, step: int, expected: np.ndarray, actual: np.ndarray, scores: np.ndarray,
               tolerance: Tolerance) -> dict[str, Any]:
    """The unfolded model's margin between its token and the other's at the first differing step."""
    chosen, other = int(expected[row, step]), int(actual[row, step])
    a, b = float(scores[step, row, chosen]), float(scores[step, row, other])
    allowed = 2 * tolerance.atol + tolerance.rtol * (abs(a) + abs(b))
    return {"row": row, "step": step, "expected_token": chosen, "actual_token": other, "margin": a - b,
            "allowed": allowed, "near_tie": bool(a - b <= allowed)}


def verify_export(graph: ExportedGraph, reference: Reference, tolerance: Tolerance, model_file: Path | None = None,
                  greedy: bool = True) -> Parity:
    """Parity, then (decoders, when ``greedy`` and the reference has tokens) greedy decoding; the caller decides what
    a failure does."""
    parity = check_parity(graph, reference, tolerance, model_file)
    if greedy and graph.task == CAUSAL_LM and reference.greedy is not None:
        parity.greedy = check_greedy(graph, reference, tolerance, model_file)
        parity.greedy_match = parity.greedy["match"]
    return parity
