"""What a run reports: the per-evaluation history table and ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery.checkpoint import atomic_write

METRICS_FILE = "metrics.json"


def format_history(history: list[dict[str, float]]) -> str:
    """One row per evaluation: epoch, step, mean training loss since the previous row, eval metrics."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    cells = [[_cell(row.get(key)) for key in columns] for row in history]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def write_metrics(output_dir: Path, metrics: dict[str, float], history: list[dict[str, float]]) -> Path:
    """``metrics.json``: the final figures at the top level and every evaluation under ``history``; atomic."""
    path = output_dir / METRICS_FILE
    payload: dict[str, Any] = {**metrics, "history": history}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))
    return path
