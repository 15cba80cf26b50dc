"""The GPU training benchmark's CPU smoke run (``--device cpu --tiny``: a 2-layer Llama of hidden 64 in bfloat16)
writes every method's row in the documented schema, its folds (float32 on the device, one rounding to bfloat16) are
within the bfloat16 layer tolerance, a machine without CUDA gets a clear error unless ``--device cpu`` is given, and
the module imports nothing the GPU machine may lack beyond small wheels (no onnx, onnxruntime)."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import gpu_train
from benchmarks.gpu_train import CANDIDATES, COLUMNS, NAME, PEFT_LORA, main
from surgery.tolerances import layer_tolerance
from tests.fs import tree_digest

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = {"method", "label", "impl", "trainable_params", "trained_dtypes", "ms_per_step", "spread",
            "time_vs_peft_lora", "time_vs_lora", "peak_cuda_mib", "train_cuda_mib", "peak_vs_peft_lora", "peak_vs_lora",
            "cpu_peak_rss_mib", "fold_layers", "fold_max_abs", "fold_worst_layer", "fold_within_tolerance",
            "peft_merge_max_abs", "base_rounding_max_abs", "fold_vs_base_rounding"}
SETTINGS = {"device": "cpu", "shape": "tiny-llama", "dtype": "bfloat16", "targets": "qv", "rank": 16, "batch": 2,
            "seq": 16, "rounds": 2, "autocast": "bf16", "baseline": PEFT_LORA}
TARGET_LAYERS = 2 * 2  # 2 layers x (q_proj, v_proj)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke run for the module's tests, on one PyTorch thread (the CI box has two cores): ~6 s."""
    out = tmp_path_factory.mktemp("gpu_train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--device", "cpu", "--tiny", "--steps", "2", "--out-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def payload(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / f"{NAME}.json").read_text())


def rows_of(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["method"]: row for row in payload["rows"]}


def test_every_method_has_a_row_with_every_field(payload: dict[str, Any]):
    assert payload["benchmark"] == NAME
    assert SETTINGS.items() <= payload["settings"].items()
    rows = rows_of(payload)
    assert list(rows) == list(CANDIDATES)
    for name, row in rows.items():
        assert ROW_KEYS <= set(row), (name, ROW_KEYS - set(row))
        assert row["ms_per_step"] > 0 and math.isfinite(row["ms_per_step"])
        assert row["trainable_params"] > 0
        assert row["trained_dtypes"] == ["float32"], name  # adapters train in float32 beside the bf16 base, PEFT's too
        assert row["peak_cuda_mib"] is None and row["train_cuda_mib"] is None  # no CUDA allocator on the CPU
        assert row["cpu_peak_rss_mib"] > 0  # the smoke figure, labelled as such
    assert rows[PEFT_LORA]["trainable_params"] == rows["lora"]["trainable_params"]  # same rank and targets
    assert rows["lora"]["time_vs_lora"] == 1.0 and rows[PEFT_LORA]["time_vs_peft_lora"] == 1.0


def test_the_folds_are_within_the_bfloat16_tolerance(payload: dict[str, Any]):
    tol = layer_tolerance(torch.bfloat16)
    for name, row in rows_of(payload).items():
        if name == PEFT_LORA:  # PEFT's model holds none of our adapter layers: no fold row
            assert row["fold_max_abs"] is None and row["fold_within_tolerance"] is None
            continue
        assert row["fold_layers"] == TARGET_LAYERS, name
        assert row["fold_within_tolerance"] is True, name
        assert 0 < row["fold_max_abs"] < tol.atol, (name, row["fold_max_abs"])  # non-zero: the adapters were random
        assert 0 < row["base_rounding_max_abs"] < tol.atol and math.isfinite(row["fold_vs_base_rounding"])
    rows = rows_of(payload)
    for merged in ("lora", "cla"):  # fully merged: PEFT's two-rounding merge is reported beside ours
        assert 0 < rows[merged]["peft_merge_max_abs"] < tol.atol
    assert rows["proda"]["peft_merge_max_abs"] is None  # a residual stays: no plain merged weight to compare


def test_the_markdown_table_has_every_column(out_dir: Path):
    text = (out_dir / f"{NAME}.md").read_text()
    for column in COLUMNS:
        assert f" {column.header} |" in text, column.header
    assert "CPU run: no CUDA allocator" in text  # the RSS column is labelled as a smoke figure
    assert "Targets:" not in text  # the paper's claim is a GPU claim: not judged on a CPU run


def test_no_cuda_without_device_cpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "keep.txt").write_text("the user's file\n")
    before = tree_digest(tmp_path)
    for argv in ([], ["--tiny"], ["--device", "cuda:0", "--tiny"]):
        with pytest.raises(SystemExit) as raised:
            main([*argv, "--out-dir", str(tmp_path / "results")])
        message = str(raised.value)
        assert "no CUDA device" in message and "--device cpu --tiny" in message, message
        assert "--device cuda" in message
    assert tree_digest(tmp_path) == before and not (tmp_path / "results").exists()


@pytest.mark.parametrize("argv, fault", [
    (["--methods", "lora,dora"], "--methods: unknown ['dora']"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--seq", "1"], "--seq must be at least 2"),
])
def test_bad_arguments_name_the_option(argv: list[str], fault: str, capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path / "results"), *argv])
    assert fault in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_without_peft_its_row_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    names, skipped = gpu_train.available(list(CANDIDATES))
    assert names == [n for n in CANDIDATES if n != PEFT_LORA]
    assert [name for name, _ in skipped] == [PEFT_LORA] and "carry it along" in skipped[0][1]
    assert gpu_train.baseline_of(names) == "lora"


FORBIDDEN = ("onnx", "onnxruntime", "onnxscript")  # the GPU machine's image need not have them


def module_imports(module: str) -> set[str]:
    """The modules ``module``'s file imports at load time (its top level, including under ``if``/``try``)."""
    path = REPO / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names)
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                found.add(inner.module)
    return found


def load_time_closure(module: str) -> set[str]:
    """Every module loading ``module`` imports, following the project's own packages (third-party ones as named)."""
    project = ("benchmarks", "surgery", "train", "export")
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.split(".")[0] in project:
            parts = name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages load first
            todo += module_imports(name)
    return seen


def test_the_module_imports_no_onnx():
    """Loading the benchmark (the project's side of it: surgery/, train/, benchmarks/) needs no onnx, onnxruntime
    or export's folding and exporting modules; PEFT is imported only inside the function that builds its row."""
    closure = load_time_closure("benchmarks.gpu_train")
    assert {"surgery.rewrite", "train.optim", "benchmarks.common"} <= closure  # the walk follows the project
    assert not {m for m in closure if m.split(".")[0] in FORBIDDEN}
    assert {m for m in closure if m.split(".")[0] == "export"} <= {"export", "export.report"}
    assert "peft" not in closure
