"""The quality benchmark's smoke run (``--quick``: lora, proda and the head alone, a few steps on a subsample of
data/debian_sections) writes its result files in the documented schema, and every export's test accuracy through
onnxruntime equals the PyTorch model's up to the predictions the two disagree on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.bench_quality import COLUMNS, NAME, QUICK_ROWS, main

pytestmark = pytest.mark.slow  # ~40 s on 2 cores: three short trainings, three exports

ROW_KEYS = {"row", "method", "setting", "trainable_params", "adapter_params", "budget_vs_lora", "lr",
            "lr_sweep_val_accuracy", "val_accuracy", "test_accuracy_mean", "test_accuracy_std", "test_accuracy_min",
            "test_accuracy_max", "onnx_test_accuracy_mean", "disagreements", "disagreements_beyond_ties",
            "latency_vs_base", "ms_per_step", "step_time_vs_lora", "runs"}
RUN_KEYS = {"seed", "lr", "val_accuracy", "test_examples", "test_accuracy", "onnx_test_accuracy", "disagreements",
            "disagreements_beyond_ties", "latency_vs_base", "train_runtime_s", "steps", "export"}
ACCURACIES = ("val_accuracy", "test_accuracy_mean", "test_accuracy_min", "test_accuracy_max",
              "onnx_test_accuracy_mean")
HEAD_PARAMS = 384 * 12 + 12  # MiniLM's hidden size x 12 sections, and the bias
LORA_R8_PARAMS = 6 * 2 * 8 * (384 + 384)  # 6 layers x (query, value) x r (d_in + d_out)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick run for the module's tests, on one PyTorch thread (the CI box has two cores)."""
    out = tmp_path_factory.mktemp("bench_quality")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--quick", "--out-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    payload = json.loads((out_dir / f"{NAME}.json").read_text())
    assert payload["benchmark"] == NAME and payload["settings"]["quick"] is True
    assert payload["settings"]["wall_time_s"] > 0
    return {row["row"]: row for row in payload["rows"]}


def test_the_quick_rows_have_every_field(rows: dict[str, dict[str, Any]]):
    assert list(rows) == list(QUICK_ROWS)
    for row in rows.values():
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert len(row["runs"]) == 1 and all(RUN_KEYS <= set(run) for run in row["runs"])


def test_the_markdown_table_has_every_column(out_dir: Path):
    text = (out_dir / f"{NAME}.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [column.header for column in COLUMNS]
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + len(QUICK_ROWS)
    assert "the whole run took" in text


def test_accuracies_lie_in_the_unit_interval(rows: dict[str, dict[str, Any]]):
    for row in rows.values():
        for key in ACCURACIES:
            assert 0.0 <= row[key] <= 1.0, (row["row"], key, row[key])
        assert row["test_accuracy_min"] <= row["test_accuracy_mean"] <= row["test_accuracy_max"]


def test_onnx_accuracy_equals_pytorch_up_to_the_disagreements(rows: dict[str, dict[str, Any]]):
    for row in rows.values():
        for run in row["runs"]:
            differing_correct = abs(run["onnx_test_accuracy"] - run["test_accuracy"]) * run["test_examples"]
            assert differing_correct <= run["disagreements"] + 1e-9, (row["row"], run)
            assert run["disagreements_beyond_ties"] == 0, (row["row"], run)


def test_parameter_budget_and_the_references(rows: dict[str, dict[str, Any]]):
    assert rows["lora"]["adapter_params"] == LORA_R8_PARAMS
    assert rows["lora"]["trainable_params"] == LORA_R8_PARAMS + HEAD_PARAMS
    assert rows["lora"]["step_time_vs_lora"] == 1.0
    assert abs(rows["proda"]["budget_vs_lora"] - 1.0) < 0.05, rows["proda"]["setting"]
    assert rows["head_only"]["trainable_params"] == HEAD_PARAMS and rows["head_only"]["adapter_params"] is None
    assert rows["lora"]["runs"][0]["export"] == "export_checkpoint --merge"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the plot needs the [bench] extra")
def test_the_plot_is_written(out_dir: Path):
    assert (out_dir / f"{NAME}.png").stat().st_size > 0


def test_resume_takes_finished_rows_without_training_them(out_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A second run with --resume reads the rows the first one finished from NAME.partial.jsonl: no training."""
    import benchmarks.bench_quality as bench_quality

    first = json.loads((out_dir / f"{NAME}.json").read_text())["rows"]

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a resumed row was trained again")

    monkeypatch.setattr(bench_quality, "measure_row", no_training)
    resumed = out_dir / "resumed"
    resumed.mkdir()
    (resumed / f"{NAME}.partial.jsonl").write_text((out_dir / f"{NAME}.partial.jsonl").read_text())
    assert main(["--quick", "--rows", "head_only", "--rounds", "1", "--resume", "--out-dir", str(resumed)]) == 0
    (row,) = json.loads((resumed / f"{NAME}.json").read_text())["rows"]
    (before,) = [r for r in first if r["row"] == "head_only"]
    assert row["runs"] == before["runs"] and row["lr"] == before["lr"]
