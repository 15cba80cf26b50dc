"""Rewrite the README's generated config-key tables from the schema: python scripts/sync_readme.py"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.config_docs import render  # noqa: E402

START, END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"


def synced(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render()}\n{END}{tail}"


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "README.md"
    path.write_text(synced(path.read_text()))
