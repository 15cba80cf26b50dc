"""Reading and checking the training data: JSONL / JSON / CSV / Parquet files or a ``datasets`` folder.

Rows by task:

- ``causal-lm``: ``text`` (every token is a target), or ``prompt`` + ``completion`` (only the completion is);
- ``seq-cls``: ``text``, optional ``text_pair``, and an integer ``label`` in ``0 .. num_labels - 1`` (a JSON number,
  not a string: ``"label": "1"`` is refused; in CSV/TSV, where every cell is text, the digits).

Everything is checked before training starts; a problem raises :class:`DataError` naming the file, the row and
what to do.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import DataConfig

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
EVAL_SPLITS = ("validation", "eval", "test")
MAX_PROBLEMS = 5


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class Rows:
    """The records of one data file, with where each came from (``line 7`` of a JSONL, ``row 7`` of a table).

    ``text_cells``: every value is a string (CSV/TSV), so a label is written as digits; elsewhere it must be a
    number."""

    source: str
    records: list[dict[str, Any]]
    locations: list[str]
    text_cells: bool = False

    def where(self, index: int) -> str:
        return f"{self.source} {self.locations[index]}"

    def subset(self, indices: list[int], source: str | None = None) -> Rows:
        return Rows(source or self.source, [self.records[i] for i in indices], [self.locations[i] for i in indices],
                    self.text_cells)

    def __len__(self) -> int:
        return len(self.records)


# ---- reading -----------------------------------------------------------------------------------------------
def read_rows(path: Path, key: str, split: str = "train") -> Rows:
    """Every record of ``path``; ``key`` is the config key that named it (for messages), ``split`` the split to
    take from a saved ``DatasetDict``."""
    check_path(path, key)
    if path.is_dir():
        return _read_saved_dataset(path, key, split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="," if suffix == ".csv" else "\t")
    return _read_json(path)


def check_path(path: Path, key: str) -> None:
    """Refuse, without reading it, a data path that does not exist or whose suffix no reader takes."""
    if not path.exists():
        raise DataError(f"{key}: {path} does not exist; fix the path (relative paths start at the working directory)")
    suffix = path.suffix.lower()
    if not path.is_dir() and suffix not in SUFFIXES:
        raise DataError(f"{key}: {path} has suffix {suffix!r}; use one of {', '.join(SUFFIXES)} or a datasets folder")


def check_paths(data: DataConfig) -> None:
    """:func:`check_path` for the train and eval files of ``train.data`` (before any model is loaded)."""
    check_path(data.train, "train.data.train")
    if data.eval is not None:
        check_path(data.eval, "train.data.eval")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; :class:`DataError` names the first byte that is not, with its offset and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text: byte offset {error.start} is 0x{data[error.start]:02x}; "
                        f"save the file as UTF-8") from None


def _read_json(path: Path) -> Rows:
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        return _checked_records(path, records, [f"item {i + 1}" for i in range(len(records))])
    records, locations = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: not valid JSON ({error.msg}); one JSON object per line") from None
        locations.append(f"line {number}")
    return _checked_records(path, records, locations)


def _checked_records(path: Path, records: Any, locations: list[str]) -> Rows:
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of objects, got {type(records).__name__}")
    for record, location in zip(records, locations):
        if not isinstance(record, dict):
            raise DataError(f"{path} {location}: expected an object with named fields, got {type(record).__name__}")
    return Rows(str(path), records, locations)


def _read_csv(path: Path, delimiter: str) -> Rows:
    text = io.StringIO(_read_text(path), newline="")
    records = [dict(row) for row in csv.DictReader(text, delimiter=delimiter)]
    # row i of the table is line i + 2 of the file (the header is line 1)
    return Rows(str(path), records, [f"row {i + 1}" for i in range(len(records))], text_cells=True)


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    records = pq.read_table(path).to_pylist()
    return Rows(str(path), records, [f"row {i + 1}" for i in range(len(records))])


def _read_saved_dataset(path: Path, key: str, split: str) -> Rows:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"{key}: {path} is a folder but not a dataset saved with save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = (split,) if split == "train" else EVAL_SPLITS
        found = next((n for n in names if n in loaded), None)
        if found is None:
            raise DataError(f"{key}: {path} has splits {list(loaded)}; it needs a {' or '.join(names)!r} split")
        loaded, path = loaded[found], path / found
    return Rows(str(path), loaded.to_list(), [f"row {i + 1}" for i in range(len(loaded))])


# ---- checking ----------------------------------------------------------------------------------------------
def check_rows(rows: Rows, key: str, task: str, num_labels: int) -> None:
    """Raise one :class:`DataError` listing the first problems, or return when every row is usable."""
    if not rows.records:
        raise DataError(f"{key}: {rows.source} holds no rows; point it at a file with data")
    check = _seq_cls_problem if task == "seq-cls" else _causal_lm_problem
    problems = [f"{rows.where(i)}: {p}" for i, p in _problems(rows, check, num_labels, rows.text_cells)]
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise DataError(f"{key}: {len(problems)} unusable row(s) for task {task}:\n  " + "\n  ".join(shown) + more)


def _problems(rows: Rows, check: Any, num_labels: int, text_cells: bool) -> Iterator[tuple[int, str]]:
    for index, record in enumerate(rows.records):
        problem = check(record, num_labels, text_cells)
        if problem:
            yield index, problem


def _seq_cls_problem(record: dict[str, Any], num_labels: int, text_cells: bool) -> str | None:
    for field in ("text", "label"):
        if record.get(field) is None:
            return f"missing field {field!r} (has {sorted(record)}); seq-cls rows need text, label (+ text_pair)"
    if not isinstance(record["text"], str):
        return f"text must be a string, got {type(record['text']).__name__}"
    if record.get("text_pair") is not None and not isinstance(record["text_pair"], str):
        return f"text_pair must be a string, got {type(record['text_pair']).__name__}"
    if isinstance(record["label"], str) and not text_cells:
        return (f"label must be an integer class index, got {record['label']!r}, a string; write the number "
                f"without quotes")
    label = as_label(record["label"])
    if label is None:
        return f"label must be an integer class index, got {record['label']!r}"
    if not 0 <= label < num_labels:
        return (f"label {label} is outside 0..{num_labels - 1} (model.num_labels={num_labels}); fix the row or set "
                f"model.num_labels")
    return None


def _causal_lm_problem(record: dict[str, Any], num_labels: int, text_cells: bool) -> str | None:
    if record.get("prompt") is not None or record.get("completion") is not None:
        fields = ("prompt", "completion")
    elif record.get("text") is not None:
        fields = ("text",)
    else:
        return f"missing field 'text' (or 'prompt' + 'completion') (has {sorted(record)})"
    for field in fields:
        if record.get(field) is None:
            return f"missing field {field!r} (has {sorted(record)}); give prompt and completion together"
        if not isinstance(record[field], str):
            return f"{field} must be a string, got {type(record[field]).__name__}"
    return None


def as_label(value: Any) -> int | None:
    """An integer class index from a JSON int, an integral float (Parquet) or a digit string (CSV); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


# ---- the two splits ----------------------------------------------------------------------------------------
def load_splits(data: DataConfig, task: str, num_labels: int, seed: int) -> tuple[Rows, Rows]:
    """The checked train and eval rows: ``data.eval``, or a split of ``data.train`` seeded by ``seed``."""
    train = read_rows(data.train, "train.data.train")
    check_rows(train, "train.data.train", task, num_labels)
    if data.eval is not None:
        held_out = read_rows(data.eval, "train.data.eval", split="eval")
        check_rows(held_out, "train.data.eval", task, num_labels)
        return train, held_out
    return split_rows(train, data.eval_fraction, seed)


def split_rows(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """A seeded random split: ``round(fraction n)`` rows (at least one) held out for evaluation."""
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise DataError(
            f"train.data.train: {rows.source} has {len(rows)} row(s), too few to hold out {fraction:.0%} for "
            f"evaluation; add rows or give train.data.eval"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return rows.subset(kept), rows.subset(held_out, source=f"{rows.source} (held-out split)")
