"""File-system helpers for tests that check a refused command changed nothing of the user's."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (the user's files, before and after a refused command)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
