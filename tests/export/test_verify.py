"""export.verify's verdicts on their own: the elementwise rule, the half-precision floor and the greedy near-tie rule.

Whole exports are verified in test_exporters, test_cli and test_half_precision; here the rules get inputs built to
sit just inside and just outside them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.verify import compare, greedy_comparison
from surgery.tolerances import MODEL, Tolerance

FP32, FP16 = MODEL[torch.float32], MODEL[torch.float16]


def outputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 3.0, size=(2, 7, 50)).astype(np.float32)


def test_elementwise_rule_is_atol_plus_rtol_times_the_reference() -> None:
    expected = outputs()
    bound = FP32.atol + FP32.rtol * np.abs(expected)
    assert compare("in", expected + 0.9 * bound, expected, FP32).within
    outside = expected.copy()
    outside[1, 3, 7] += 1.1 * bound[1, 3, 7]
    assert not compare("out", outside, expected, FP32).within


def test_the_float16_floor_passes_an_error_within_twice_pytorchs_own_and_no_more() -> None:
    expected = outputs()
    expected[0, 0, 0] = 0.0
    assert FP16.floor_factor == 2.0
    floor = expected + 0.04 * np.sign(expected)  # the model stored in float16: max |diff| 0.04
    drift = np.zeros_like(expected)
    drift[0, 0, 0] = 0.079  # beyond the elementwise bound (atol 0.05 where |expected| is 0), within 2 x 0.04
    inside = compare("inside", expected + drift, expected, FP16, floor=floor)
    assert inside.within and inside.floor_abs_diff == pytest.approx(0.04, rel=1e-5)
    assert not compare("no floor recorded", expected + drift, expected, FP16).within
    drift[0, 0, 0] = 0.081
    assert not compare("beyond 2x", expected + drift, expected, FP16, floor=floor).within


def test_a_tolerance_without_a_floor_factor_ignores_the_floor() -> None:
    expected = outputs()
    floor = expected + 10.0  # a huge floor would excuse anything
    assert FP32.floor_factor is None
    assert not compare("fp32", expected + 1.0, expected, FP32, floor=floor).within


def test_padding_positions_are_left_out_of_the_floor_too() -> None:
    expected = outputs()
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, -2:] = 0
    floor = expected.copy()
    floor[1, -1] += 5.0  # a padding position: must not widen the floor
    actual = expected.copy()
    actual[0, 0, 0] += 0.2 + FP16.rtol * abs(expected[0, 0, 0])
    result = compare("masked", actual, expected, FP16, mask=mask, floor=floor)
    assert result.floor_abs_diff == 0.0 and not result.within


def test_non_finite_outputs_never_pass() -> None:
    expected = outputs()
    actual = expected.copy()
    actual[0, 1, 2] = np.nan
    assert not compare("nan", actual, expected, FP16, floor=expected + 1.0).within


def test_greedy_tokens_may_diverge_only_at_a_near_tie() -> None:
    expected = np.array([[5, 6, 7], [1, 2, 3]])
    scores = np.zeros((3, 2, 8), dtype=np.float32)  # (steps, batch, vocab): what the unfolded model chose from
    scores[1, 1, 2], scores[1, 1, 4] = 4.0, 4.0 - 1e-4  # row 1, step 1: token 2 barely ahead of token 4
    scores[1, 0, 6], scores[1, 0, 3] = 4.0, 1.0  # row 0, step 1: token 6 clearly ahead of token 3
    tol = FP32
    same = greedy_comparison(expected.copy(), expected, scores, tol)
    assert same["match"] and same["passed"]
    near_tie = greedy_comparison(np.array([[5, 6, 7], [1, 4, 0]]), expected, scores, tol)
    assert near_tie["passed"] and not near_tie["match"]
    assert near_tie["divergences"][0] | {"margin": None} == {
        "row": 1, "step": 1, "expected_token": 2, "actual_token": 4, "margin": None,
        "allowed": pytest.approx(2 * tol.atol + tol.rtol * (4.0 + 4.0 - 1e-4)), "near_tie": True}
    flip = greedy_comparison(np.array([[5, 3, 7], [1, 4, 0]]), expected, scores, tol)
    assert not flip["passed"] and [d["near_tie"] for d in flip["divergences"]] == [False, True]


def test_greedy_of_another_length_fails() -> None:
    expected = np.array([[5, 6, 7]])
    section = greedy_comparison(np.array([[5, 6]]), expected, np.zeros((3, 1, 8), np.float32), Tolerance(0, 0, "x"))
    assert not section["passed"] and "!=" in section["divergences"][0]
