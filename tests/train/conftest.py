"""Shared fixtures of the training tests: one thread per test (the tiny models are latency-bound and the CI box
has two cores), and the tiny bases built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import task_files, tiny_base


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every training test on one PyTorch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-bases")


@pytest.fixture(scope="session")
def llama_lm(tiny_root: Path) -> Path:
    return tiny_base(tiny_root, "llama", "causal-lm")


@pytest.fixture(scope="session")
def lm_data(tiny_root: Path) -> dict[str, str]:
    return task_files(tiny_root, "causal-lm")


@pytest.fixture(scope="session")
def bert_cls(tiny_root: Path) -> Path:
    return tiny_base(tiny_root, "bert", "seq-cls")


@pytest.fixture(scope="session")
def cls_data(tiny_root: Path) -> dict[str, str]:
    return task_files(tiny_root, "seq-cls")
