"""Feeding an exported graph and decoding greedily with onnxruntime, with or without the KV cache.

Shared by verification (``export.verify``) and inference (``export.run``); no optimum needed. A decoder graph with a
cache takes ``input_ids (batch, new)``, ``attention_mask (batch, past + new)``, ``position_ids (batch, new)`` and
``past_key_values.{i}.key / .value (batch, kv_heads, past, head_dim)`` and returns ``logits (batch, new, vocab)`` and
``present.{i}.key / .value (batch, kv_heads, past + new, head_dim)``: optimum's names, so optimum's
``ORTModelForCausalLM`` loads the same folder.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

PAST, PRESENT = "past_key_values.", "present."
ONNX_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
ONNX_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class FeedError(ValueError):
    """The graph declares an input that cannot be derived from the tokens and the mask."""


def position_ids(mask: np.ndarray, past: int = 0) -> np.ndarray:
    """Positions as transformers derives them from the mask: cumsum - 1, clipped at 0, for the columns after
    ``past``. mask: (batch, past + new) -> (batch, new)."""
    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    return positions[:, past:] if past else positions


def empty_past(arg: ort.NodeArg, batch: int) -> np.ndarray:
    """A past_key_values input with no cached positions: named dims are the batch or the (zero) past length."""
    shape = [d if isinstance(d, int) else (batch if "batch" in str(d) else 0) for d in arg.shape]
    return np.zeros(shape, dtype=ONNX_FLOAT[arg.type])


def has_cache(session: ort.InferenceSession) -> bool:
    return any(arg.name.startswith(PAST) for arg in session.get_inputs())


def onnx_feed(session: ort.InferenceSession, inputs: dict[str, np.ndarray],
              past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The session's declared inputs from ``inputs`` (input_ids, attention_mask [, token_type_ids]), with
    position_ids derived from the mask and the cache entries from ``past`` (empty when None)."""
    batch = inputs["input_ids"].shape[0]
    past_length = next(iter(past.values())).shape[2] if past else 0
    derived = {"position_ids": position_ids(inputs["attention_mask"], past_length),
               "token_type_ids": np.zeros_like(inputs["input_ids"])}
    feed = {}
    for arg in session.get_inputs():
        if arg.name.startswith(PAST):
            feed[arg.name] = past[arg.name] if past else empty_past(arg, batch)
            continue
        value = inputs.get(arg.name, derived.get(arg.name))
        if value is None:
            raise FeedError(f"the graph declares input {arg.name!r}, which cannot be derived from input_ids and "
                            f"attention_mask (known: {sorted({*inputs, *derived})})")
        feed[arg.name] = value.astype(ONNX_INT.get(arg.type, value.dtype))
    return feed


def run_named(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def presents_as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """present.{i}.key -> past_key_values.{i}.key, for the next step."""
    return {PAST + name[len(PRESENT):]: value for name, value in outputs.items() if name.startswith(PRESENT)}


def next_tokens(logits: np.ndarray, eos: list[int], suppress_eos: bool) -> np.ndarray:
    """argmax of the last position's logits (batch, vocab), with end-of-sequence tokens masked when asked."""
    if suppress_eos:
        logits = logits.copy()
        logits[:, [i for i in eos if i < logits.shape[-1]]] = -np.inf
    return logits.argmax(axis=-1).astype(np.int64)


def greedy(session: ort.InferenceSession, prompt: np.ndarray, max_new_tokens: int, eos: list[int] | None = None, *,
           suppress_eos: bool = False, pad_id: int = 0, mask: np.ndarray | None = None) -> np.ndarray:
    """Greedy continuation of ``prompt`` (batch, seq): the new tokens (batch, <= max_new_tokens).

    With a cache the prompt runs once and each step feeds one token and the presents of the step before; without
    one every step re-reads the whole sequence. ``suppress_eos`` masks end-of-sequence tokens (``generate``'s
    ``min_new_tokens``); otherwise a row that produced one is padded with ``pad_id`` and decoding stops when all
    rows have. ``mask`` marks left padding in the prompt (default: none).
    """
    eos = eos or []
    ids = np.asarray(prompt, dtype=np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
    cached, past, step_ids = has_cache(session), None, ids
    new, done = [], np.zeros(ids.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        inputs = {"input_ids": step_ids if cached else ids, "attention_mask": mask}
        outputs = run_named(session, onnx_feed(session, inputs, past))
        token = next_tokens(outputs["logits"][:, -1], eos, suppress_eos)
        token = np.where(done, pad_id, token)
        new.append(token)
        done |= np.isin(token, eos)
        if done.all() and not suppress_eos:
            break
        ids, step_ids = np.concatenate([ids, token[:, None]], axis=1), token[:, None]
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        past = presents_as_past(outputs) if cached else None
    return np.stack(new, axis=1) if new else np.zeros((ids.shape[0], 0), dtype=np.int64)
