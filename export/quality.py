"""Task-level verification of a quantized export against the fp32 export it was made from.

A quantized graph is not checked element by element (int8/int4 weights move every logit by more than any float
tolerance); it is checked on the task, on the checkpoint's own eval data (``train.data.eval``, or the held-out split
of ``train.data.train`` that training used; paths as the config names them, relative to the working directory):

- seq-cls: the share of eval rows whose predicted label agrees with the fp32 export's, and both exports' accuracy
  against the rows' labels (and, for information, the largest and mean |logit - fp32 logit|). The quality drop is
  the accuracy lost, in points. Dynamic int8 scales each activation over the whole batch, so a row's logits depend
  a little on the rows batched with it: batches of 32 rows in file order;
- causal LM: perplexity of both exports on the eval texts (every token after the first), and the share of greedy
  tokens that agree (20 new tokens after each of the first prompts, end-of-sequence suppressed so every row has all
  20; position by position, and how many tokens stay identical before the first difference). The quality drop is
  the perplexity increase in percent (ratio 1.05 -> 5);
- feature extraction: the cosine similarity of the mean-pooled embeddings; the drop is 100 x (1 - the mean).

Texts are cut to ``train.data.max_length`` (what training evaluated) and the model's positions. A checkpoint with no
readable eval data (a surgery-only checkpoint, a file that moved) is checked on random tokens: agreement only, no
accuracy or drop, and ``--max-quality-drop`` then fails with a message saying so. The two sessions run one after the
other, never both loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.decode import greedy, onnx_feed
from export.exporters import CAUSAL_LM, SEQ_CLS, ExportedGraph
from export.latency import ort_session, session_options

MAX_ROWS = 512  # eval rows used, at most (the first ones)
MAX_LM_ROWS = 64  # causal LM rows for perplexity
GREEDY_PROMPTS, GREEDY_NEW, PROMPT_TOKENS = 8, 20, 16
BATCH = 32
RANDOM_ROWS, RANDOM_SEQ = 16, 32

Log = Callable[[str], None]


# ---- the data -----------------------------------------------------------------------------------------------------
def eval_rows(config: Any) -> tuple[list[dict[str, Any]], str]:
    """The checkpoint's eval records (at most MAX_ROWS) and where they came from; ([], why not) when there are none
    to read."""
    from train.data import DataError, check_rows, read_rows, split_rows

    train = getattr(config, "train", None)
    if train is None:
        return [], "random tokens: the checkpoint's config has no train.data section"
    data, task, labels = train.data, config.model.task, config.model.labels
    try:
        if data.eval is not None:
            rows = read_rows(data.eval, "train.data.eval", split="eval")
        else:
            rows = split_rows(read_rows(data.train, "train.data.train"), data.eval_fraction, train.seed)[1]
        check_rows(rows, "train.data.eval" if data.eval is not None else "train.data.train", task, labels)
    except (DataError, OSError) as error:
        return [], f"random tokens: the eval data could not be read ({str(error).splitlines()[0]})"
    return rows.records[:MAX_ROWS], f"{rows.source} ({min(len(rows), MAX_ROWS)} rows)"


def max_tokens(config: Any, hf_config: Any) -> int:
    """train.data.max_length (512 without a train section), within the model's positions."""
    from surgery.config import model_positions

    train = getattr(config, "train", None)
    wanted = train.data.max_length if train is not None else 512
    positions = model_positions(hf_config)
    return min(wanted, positions[0]) if positions else wanted


def load_tokenizer_from(folder: Path) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


# ---- running one export -------------------------------------------------------------------------------------------
def run_batches(model_file: Path, batches: list[dict[str, np.ndarray]], name: str) -> list[np.ndarray]:
    """``name`` output of the graph on every batch (empty cache for decoders); the session is closed on return."""
    session = ort_session(model_file, "cpu", session_options(threads()))
    return [session.run([name], onnx_feed(session, batch))[0] for batch in batches]


def greedy_tokens(model_file: Path, prompts: list[np.ndarray]) -> list[np.ndarray]:
    session = ort_session(model_file, "cpu", session_options(threads()))
    return [greedy(session, prompt[None, :], GREEDY_NEW, suppress_eos=True)[0] for prompt in prompts]


def threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- per task -----------------------------------------------------------------------------------------------------
def encoder_batches(records: list[dict[str, Any]], tokenizer: Any, limit: int) -> list[dict[str, np.ndarray]]:
    batches = []
    for start in range(0, len(records), BATCH):
        chunk = records[start:start + BATCH]
        texts = [row["text"] for row in chunk]
        pairs = [row.get("text_pair") for row in chunk]
        encoded = tokenizer(texts, pairs if any(p is not None for p in pairs) else None, padding=True,
                            truncation=True, max_length=limit, return_tensors="np")
        batches.append({k: np.asarray(v, dtype=np.int64) for k, v in encoded.items()})
    return batches


def random_batches(vocab: int, rows: int, seq: int) -> list[dict[str, np.ndarray]]:
    from export.reference import sample_inputs

    return [sample_inputs(vocab, 1, seq, seed=200 + i) for i in range(rows)]


def seq_cls_quality(fp32: Path, quantized: Path, batches: list[dict[str, np.ndarray]],
                    labels: list[int] | None) -> dict[str, Any]:
    """Label agreement, and accuracy of both exports when the rows have labels."""
    logits = {name: np.concatenate(run_batches(path, batches, "logits"))
              for name, path in (("fp32", fp32), ("quantized", quantized))}
    predicted = {name: values.argmax(-1) for name, values in logits.items()}
    difference = np.abs(logits["quantized"].astype(np.float64) - logits["fp32"])
    result: dict[str, Any] = {
        "rows": int(predicted["fp32"].size),
        "label_agreement": float((predicted["fp32"] == predicted["quantized"]).mean()),
        "logit_max_abs_diff": float(difference.max()), "logit_mean_abs_diff": float(difference.mean()),
        "accuracy_fp32": None, "accuracy_quantized": None, "accuracy_delta_points": None, "drop": None,
    }
    if labels is not None:
        truth = np.asarray(labels)
        fp32_acc, quant_acc = (float((predicted[k] == truth).mean()) for k in ("fp32", "quantized"))
        delta = 100 * (quant_acc - fp32_acc)
        result.update(accuracy_fp32=fp32_acc, accuracy_quantized=quant_acc, accuracy_delta_points=delta,
                      drop=max(0.0, -delta), drop_unit="accuracy points")
    return result


def lm_texts(records: list[dict[str, Any]]) -> list[str]:
    return [row["text"] if row.get("text") is not None else row["prompt"] + row["completion"] for row in records]


def token_rows(texts: list[str], tokenizer: Any, limit: int) -> list[np.ndarray]:
    rows = [np.asarray(tokenizer(text, truncation=True, max_length=limit)["input_ids"], dtype=np.int64)
            for text in texts[:MAX_LM_ROWS]]
    return [row for row in rows if row.size >= 2]


def perplexity(logits: list[np.ndarray], rows: list[np.ndarray]) -> float:
    """exp of the mean negative log-likelihood of every token after the first, over all rows (float64)."""
    total, count = 0.0, 0
    for row_logits, ids in zip(logits, rows, strict=True):
        scores = row_logits[0, :-1].astype(np.float64)  # (seq - 1, vocab): predicts tokens 1..seq-1
        shifted = scores - scores.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(ids.size - 1), ids[1:]].sum())
        count += ids.size - 1
    return math.exp(total / count)


def causal_lm_quality(fp32: Path, quantized: Path, rows: list[np.ndarray]) -> dict[str, Any]:
    """Perplexity of both exports on ``rows``, their ratio and the share of greedy tokens that agree."""
    batches = [{"input_ids": ids[None, :], "attention_mask": np.ones((1, ids.size), dtype=np.int64)} for ids in rows]
    prompts = [ids[:max(1, min(PROMPT_TOKENS, ids.size // 2))] for ids in rows[:GREEDY_PROMPTS]]
    ppl, tokens = {}, {}
    for name, path in (("fp32", fp32), ("quantized", quantized)):
        ppl[name] = perplexity(run_batches(path, batches, "logits"), rows)
        tokens[name] = greedy_tokens(path, prompts)
    pairs = list(zip(tokens["fp32"], tokens["quantized"], strict=True))
    agree = [float((a == b).mean()) for a, b in pairs]
    # tokens before the first difference: after it the two continue different texts, so position-wise agreement
    # also counts the consequences of one near-tie
    prefix = [int(np.argmin(a == b)) if (a != b).any() else a.size for a, b in pairs]
    ratio = ppl["quantized"] / ppl["fp32"]
    return {
        "rows": len(rows), "tokens": int(sum(ids.size - 1 for ids in rows)),
        "perplexity_fp32": ppl["fp32"], "perplexity_quantized": ppl["quantized"], "perplexity_ratio": ratio,
        "greedy_prompts": len(prompts), "greedy_new_tokens": GREEDY_NEW,
        "greedy_agreement": float(np.mean(agree)), "greedy_identical_prefix": float(np.mean(prefix)),
        "drop": max(0.0, 100 * (ratio - 1)),
        "drop_unit": "percent perplexity increase",
    }


def feature_quality(fp32: Path, quantized: Path, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Cosine similarity of the mean-pooled last_hidden_state of both exports."""
    pooled = {}
    for name, path in (("fp32", fp32), ("quantized", quantized)):
        hidden = run_batches(path, batches, "last_hidden_state")
        pooled[name] = np.concatenate([(h * b["attention_mask"][..., None]).sum(1) / b["attention_mask"].sum(1,
                                       keepdims=True) for h, b in zip(hidden, batches, strict=True)])
    a, b = pooled["fp32"], pooled["quantized"]
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"rows": int(a.shape[0]), "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "drop": 100 * (1 - float(cosine.mean())), "drop_unit": "100 x (1 - mean cosine)"}


def task_quality(graph: ExportedGraph, fp32_file: Path, config: Any, log: Log) -> dict[str, Any]:
    """The quantized ``graph.model_file`` against ``fp32_file`` on the task (see the module doc)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(graph.folder)
    records, source = eval_rows(config)
    tokenizer = load_tokenizer_from(graph.folder) if records else None
    if records and tokenizer is None:
        records, source = [], "random tokens: the export folder has no tokenizer"
    limit = max_tokens(config, hf_config)
    vocab = int(hf_config.vocab_size)
    if graph.task == CAUSAL_LM:
        rows = token_rows(lm_texts(records), tokenizer, limit) if records else []
        if not rows:  # no eval data, or no text of two tokens or more in it
            source = source if not records else f"random tokens: no eval text of {source} has two tokens"
            rows = [b["input_ids"][0] for b in random_batches(vocab, RANDOM_ROWS, RANDOM_SEQ)]
        result = causal_lm_quality(fp32_file, graph.model_file, rows)
        log(f"perplexity {result['perplexity_fp32']:.4g} -> {result['perplexity_quantized']:.4g} "
            f"(x{result['perplexity_ratio']:.4f}), greedy tokens agreeing {result['greedy_agreement']:.1%} "
            f"(identical for the first {result['greedy_identical_prefix']:.1f} of {GREEDY_NEW} on average)")
    else:
        batches = (encoder_batches(records, tokenizer, limit) if records
                   else random_batches(vocab, RANDOM_ROWS, RANDOM_SEQ))
        if graph.task == SEQ_CLS:
            labels = [int(row["label"]) for row in records] if records else None
            result = seq_cls_quality(fp32_file, graph.model_file, batches, labels)
            accuracy = ("" if result["accuracy_fp32"] is None else f", eval accuracy {result['accuracy_fp32']:.4f}"
                        f" -> {result['accuracy_quantized']:.4f} ({result['accuracy_delta_points']:+.2f} points)")
            log(f"labels agreeing with fp32 {result['label_agreement']:.1%}{accuracy}")
        else:
            result = feature_quality(fp32_file, graph.model_file, batches)
            log(f"embedding cosine vs fp32: mean {result['cosine_mean']:.5f}, min {result['cosine_min']:.5f}")
    if source.startswith("random tokens"):  # no drop to gate on: random text has no quality to lose
        result["drop"] = None
    return {"data": source, "max_tokens": limit, **result}


def quality_error(quality: dict[str, Any], max_drop: float | None) -> str | None:
    """The ``--max-quality-drop`` failure, or None."""
    if max_drop is None:
        return None
    if quality.get("drop") is None:
        return (f"--max-quality-drop {max_drop:g}: the quality drop needs the checkpoint's eval data, and "
                f"there is none ({quality['data']}); give the checkpoint's config train.data.eval, or drop "
                f"--max-quality-drop")
    if quality["drop"] <= max_drop:
        return None
    return (f"the quantized export loses {quality['drop']:.3g} {quality['drop_unit']} against the fp32 export on "
            f"{quality['data']}, beyond --max-quality-drop {max_drop:g}{detail(quality)}; try --quantize int8, a "
            f"smaller --block-size, or keep the fp32 export")


def detail(quality: dict[str, Any]) -> str:
    if quality.get("accuracy_fp32") is not None:
        return f" (accuracy {quality['accuracy_fp32']:.4f} -> {quality['accuracy_quantized']:.4f})"
    if quality.get("perplexity_ratio") is not None:
        return f" (perplexity {quality['perplexity_fp32']:.4g} -> {quality['perplexity_quantized']:.4g})"
    return ""
