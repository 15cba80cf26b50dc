"""Verification of an export: onnxruntime against the unfolded PyTorch model, and greedy decoding in both.

Parity runs on fresh inputs at shapes the exporters never traced (batch 1 and 3, sequence lengths 5 and 11; the
batch-3 encoder input has a right-padded row), compares the main output (logits or last_hidden_state) at the
non-padding positions, and passes when every element satisfies ``|onnx - torch| <= atol + rtol |torch|`` with the
``surgery.tolerances.MODEL`` entry of the export's dtype. Decoders exported with a KV cache also run one cached step
(2 new tokens on the presents of the first call) against PyTorch on the whole sequence. Decoders then generate 20
greedy tokens with onnxruntime (``export.decode.greedy``: the cache when the graph has one) and with the PyTorch
model's ``generate``: the tokens must be identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.decode import PAST, greedy, onnx_feed, position_ids, presents_as_past  # onnx_feed: also for callers
from export.exporters import CAUSAL_LM, FEATURES, ExportedGraph, output_name
from export.latency import session_options as latency_session_options
from surgery.tolerances import Tolerance

PARITY_SHAPES = ((1, 5), (3, 11))  # (batch, sequence): neither is the exporters' trace shape (2 x 8, 2 x 16)
CACHE_STEP_TOKENS = 2
GREEDY_TOKENS = 20
GREEDY_SHAPE = (3, 6)


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
def sample_inputs(vocab: int, batch: int, seq: int, seed: int, pad_last_row: bool = False) -> dict[str, np.ndarray]:
    """input_ids in [3, vocab), attention_mask (the last row right-padded by 2 when asked), token_type_ids 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(3, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    if pad_last_row and batch > 1 and seq > 3:
        mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


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


def main_output(reference: nn.Module, inputs: dict[str, torch.Tensor], task: str) -> np.ndarray:
    extra = {"use_cache": False} if task == CAUSAL_LM else {}
    with torch.no_grad():
        out = reference(**inputs, **extra, return_dict=True)[output_name(task)]
    return out.float().numpy()


def session_options() -> ort.SessionOptions:
    """Latency's options (no spin-waiting: verification alternates onnxruntime and PyTorch calls)."""
    return latency_session_options(torch.get_num_threads())


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])


# ---- parity -------------------------------------------------------------------------------------------------------
def check_parity(graph: ExportedGraph, reference: nn.Module, tolerance: Tolerance, model_file: Path | None = None,
                 seed: int = 2024) -> Parity:
    """onnxruntime (``model_file``, default the graph's) against ``reference`` at PARITY_SHAPES (+ a cached step)."""
    sess = session(model_file or graph.model_file)
    vocab = int(reference.config.vocab_size)
    parity = Parity(tolerance)
    for i, (batch, seq) in enumerate(PARITY_SHAPES):
        inputs = sample_inputs(vocab, batch, seq, seed + i, pad_last_row=graph.task != CAUSAL_LM)
        feed = onnx_feed(sess, inputs)
        outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
        expected = main_output(reference, torch_feed(feed), graph.task)
        token_mask = inputs["attention_mask"] if graph.task in (CAUSAL_LM, FEATURES) else None
        name = output_name(graph.task)
        parity.cases.append(compare(f"batch {batch} x seq {seq}", outputs[name], expected, tolerance, token_mask))
        if graph.with_past:
            parity.cases.append(cached_step(sess, reference, inputs, outputs, tolerance, seed + 10 + i))
    return parity


def cached_step(sess: ort.InferenceSession, reference: nn.Module, inputs: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray], tolerance: Tolerance, seed: int) -> Difference:
    """CACHE_STEP_TOKENS new tokens on the first call's presents vs PyTorch on the whole sequence."""
    batch, seq = inputs["input_ids"].shape
    new = sample_inputs(int(reference.config.vocab_size), batch, CACHE_STEP_TOKENS, seed)["input_ids"]
    past = presents_as_past(outputs)
    full = {"input_ids": np.concatenate([inputs["input_ids"], new], axis=1),
            "attention_mask": np.ones((batch, seq + CACHE_STEP_TOKENS), dtype=np.int64)}
    step_feed = onnx_feed(sess, {"input_ids": new, "attention_mask": full["attention_mask"]}, past)
    logits = sess.run(["logits"], step_feed)[0]
    full_feed = {k: torch.from_numpy(v) for k, v in full.items()}
    if "position_ids" in step_feed:
        full_feed["position_ids"] = torch.from_numpy(position_ids(full["attention_mask"]))
    expected = main_output(reference, full_feed, CAUSAL_LM)[:, seq:]
    return compare(f"cached step: {CACHE_STEP_TOKENS} tokens after batch {batch} x seq {seq}", logits, expected,
                   tolerance)


# ---- greedy decoding ----------------------------------------------------------------------------------------------
def check_greedy(graph: ExportedGraph, reference: nn.Module, tokens: int = GREEDY_TOKENS, seed: int = 7) -> dict:
    """Greedy continuations of the same prompts by onnxruntime and PyTorch: {"match", "tokens", "first_mismatch"}."""
    batch, seq = GREEDY_SHAPE
    prompt = torch.from_numpy(sample_inputs(int(reference.config.vocab_size), batch, seq, seed)["input_ids"])
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1, max_new_tokens=tokens,
                  min_new_tokens=tokens, pad_token_id=pad_id(reference))
    with torch.no_grad():
        expected = reference.generate(prompt, **kwargs)[:, seq:].numpy()
    actual = greedy(session(graph.model_file), prompt.numpy(), tokens, eos_ids(reference), suppress_eos=True,
                    pad_id=pad_id(reference))
    mismatch = np.argwhere(actual != expected) if actual.shape == expected.shape else np.zeros((1, 2), int)
    return {
        "match": len(mismatch) == 0,
        "tokens": tokens,
        "prompts": batch,
        "first_mismatch": None if len(mismatch) == 0 else {"row": int(mismatch[0][0]), "step": int(mismatch[0][1])},
        "onnx": actual[0].tolist(),
        "torch": expected[0].tolist(),
    }


def eos_ids(model: nn.Module) -> list[int]:
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    return [] if value is None else list(value) if isinstance(value, list) else [int(value)]


def pad_id(model: nn.Module) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(source, key, None)
            if value is not None:
                return value[0] if isinstance(value, list) else int(value)
    return 0


def verify_export(graph: ExportedGraph, reference: nn.Module, tolerance: Tolerance, model_file: Path | None = None,
                  greedy: bool = True) -> Parity:
    """Parity, then (decoders, when ``greedy``) greedy decoding; the caller decides what a failure does."""
    parity = check_parity(graph, reference, tolerance, model_file)
    if greedy and graph.task == CAUSAL_LM and model_file is None:
        parity.greedy = check_greedy(graph, reference)
        parity.greedy_match = parity.greedy["match"]
    return parity
