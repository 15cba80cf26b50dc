"""The ONNX export's output folder: an export deletes only what an earlier export wrote there.

Each export leaves ``.export_files.json`` in its folder, listing the files it wrote. The next export into that
folder removes exactly those (an earlier fp16 variant, external data of another size) and nothing else. A folder
holding files no export recorded (a user's folder, a hand-made ``model.onnx``) is refused before anything is loaded,
unless ``--overwrite``: then the export writes into it, replacing files of the names it writes and deleting none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RECORD = ".export_files.json"
WRITTEN_BY = "python -m export.onnx"
GRAPH_FILES = ("model.onnx", "model.onnx_data", "config.json", "generation_config.json")
REPORTS = ("export_report.json", "EXPORT_REPORT.md")
FP16_DIR = "fp16"
SHOWN = 5


class OutFolderError(ValueError):
    """``--out`` cannot be used as it is; the message names the folder and what to do (export.onnx, export.hf)."""


def few(names: list[str], shown: int = SHOWN) -> str:
    """The first ``shown`` names, then a count of the rest."""
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {rest} more" if rest > 0 else "")


def refuse_non_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out}: exists and is not a folder; choose a folder path")


def files_in(out: Path) -> set[str]:
    """Every file under ``out``, as paths relative to it ('/'-separated); empty when ``out`` does not exist."""
    if not out.is_dir():
        return set()
    return {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file() or path.is_symlink()}


def recorded(out: Path) -> list[str] | None:
    """The files the record in ``out`` lists; None without a record. A record that is not a list of relative paths
    inside ``out`` is an OutFolderError naming it."""
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
            raise TypeError("files is not a list of paths")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutFolderError(f"--out {out}: its {RECORD} is damaged ({error}); delete the folder's old export by hand "
                             f"or choose another folder") from None
    outside = [name for name in files if Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        raise OutFolderError(f"--out {out}: its {RECORD} lists paths outside the folder ({outside[:SHOWN]}); "
                             f"nothing was deleted; choose another folder")
    return files


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder with files no earlier export recorded (unless ``overwrite``);
    nothing is deleted here."""
    refuse_non_folder(out)
    ours = set(recorded(out) or []) | {RECORD}
    foreign = sorted(files_in(out) - ours)
    if foreign and not overwrite:
        raise OutFolderError(f"--out {out}: the folder holds files no export wrote ({few(foreign)}); pass --overwrite "
                             f"to export into it (files of the names the export writes are replaced, no other file "
                             f"is deleted) or choose another folder")


def clear_recorded(out: Path) -> set[str]:
    """Delete what the record in ``out`` lists (and the record, and folders that end up empty); returns the files
    left, which the export will not claim."""
    for name in recorded(out) or []:
        (out / name).unlink(missing_ok=True)
        for parent in (out / name).parents:
            if parent == out or not parent.is_relative_to(out):
                break
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    (out / RECORD).unlink(missing_ok=True)
    return files_in(out)


def record_written(out: Path, before: set[str]) -> None:
    """Write the record: the files that appeared since ``before``, and those of the export's own names."""
    own = {*GRAPH_FILES, *REPORTS, *(f"{FP16_DIR}/{name}" for name in GRAPH_FILES)}
    now = files_in(out) - {RECORD}
    written = sorted((now - before) | (now & own))
    temporary = out / (RECORD + ".tmp")
    temporary.write_text(json.dumps({"written_by": WRITTEN_BY, "files": written}, indent=2) + "\n")
    os.replace(temporary, out / RECORD)
