"""export/latency.py: interleaved medians, declared-input feeds and provider errors (timings are never asserted)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from export.latency import ProviderError, _median_ms, declared_feed, measure_latency, ort_session
from tests.export.tiny_exports import labelled_bert, plain_bert_export, project_export
from tests.tiny_models import random_ids


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """base: the project's export (input_ids, attention_mask, token_type_ids); adapted: plain export without
    token_type_ids, so one feed has a name one model lacks."""
    folder = tmp_path_factory.mktemp("latency")
    model = labelled_bert()
    base = project_export(model, folder / "base", encoder=True) / "model.onnx"
    return plain_bert_export(model, folder / "adapted.onnx"), base, model


@pytest.fixture(scope="module")
def feeds():
    ids = random_ids(2, 8)
    torch_inputs = {"input_ids": ids, "attention_mask": ids.ne(0).long()}
    inputs = {name: t.numpy() for name, t in torch_inputs.items()}
    inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])
    return inputs, torch_inputs


def test_medians_are_positive_and_overhead_is_their_ratio(exports, feeds):
    adapted, base, _ = exports
    result = measure_latency(adapted, base, feeds[0], warmup=1, runs=5, threads=1)
    for key in ("ort_ms", "base_ort_ms"):
        assert result[key] > 0, key
    assert result["overhead"] == pytest.approx(result["ort_ms"] / result["base_ort_ms"])
    assert (result["runs"], result["warmup"], result["threads"]) == (5, 1, 1)


def test_each_session_gets_only_the_inputs_it_declares(exports, feeds):
    adapted, base, _ = exports
    inputs, _ = feeds
    assert set(declared_feed(ort_session(adapted), inputs)) == {"input_ids", "attention_mask"}
    assert set(declared_feed(ort_session(base), inputs)) == {"input_ids", "attention_mask", "token_type_ids"}
    with pytest.raises(ValueError, match="token_type_ids"):
        declared_feed(ort_session(base), {k: v for k, v in inputs.items() if k != "token_type_ids"})


def test_candidates_run_round_robin_after_warmup():
    calls: list[str] = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    medians = _median_ms(candidates, warmup=2, runs=4)
    assert calls[:8] == list("aabbccdd")  # warm-up, per candidate
    rounds = [calls[8 + 4 * i: 12 + 4 * i] for i in range(4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # every round runs each candidate once
    assert [r[0] for r in rounds] == list("abcd")  # and a different one goes first
    assert set(medians) == set("abcd")


def test_unknown_provider_lists_the_available_ones(exports):
    with pytest.raises(ProviderError, match=r"unknown provider 'tpu'.*available.*'cpu'"):
        ort_session(exports[0], "tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_missing_cuda_provider_says_what_exists(exports):
    with pytest.raises(ProviderError, match=r"CUDAExecutionProvider.*available: \['cpu'\]"):
        ort_session(exports[0], "cuda")
