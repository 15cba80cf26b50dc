"""Shared fixtures of the training tests: one thread per test (the tiny models are latency-bound and the CI box
has two cores), and the tiny bases built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.train.helpers import task_files, tiny_base


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
