"""Periodic training checkpoints: ``output_dir/checkpoints/step-N/`` holds the adapter checkpoint (the same three
files as a final one) plus ``trainer_state.pt`` (optimizer, scheduler, RNG states, step, history).

A checkpoint is written into a hidden temporary folder and renamed into place in one step, so a run killed while
saving leaves the previous checkpoints intact and at worst a ``.step-N.*.tmp`` folder that the next run removes.
``trainer_state.pt`` holds only tensors and plain Python values: it is read with ``torch.load(weights_only=True)``,
never unpickled, and its SHA-256 is pinned in the checkpoint's manifest. Every file and the folder are fsynced before
the manifest is written and the folder renamed; a full disk is :class:`DiskFullError`, naming the folder and the
bytes needed. A new run refuses an ``output_dir`` holding an earlier run's checkpoints unless told to overwrite
(:func:`check_start`).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from surgery.checkpoint import (
    ADAPTER_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    CheckpointError,
    check_base,
    checkpoint_tensors,
    check_derived,
    file_hash,
    fsync_path,
    read_manifest,
    read_tensors,
    restore_tensors,
    save_checkpoint,
)
from surgery.rewrite import AdaptedModel
from train.report import METRICS_FILE

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/step-N
RUN_FILES = (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE, METRICS_FILE)  # a run's final files in output_dir
STEP_FOLDER = re.compile(r"^step-(\d+)$")
TMP_GLOB = ".step-*.tmp"
log = logging.getLogger("train")


class DiskFullError(CheckpointError, OSError):
    """A checkpoint could not be written for lack of space; the earlier checkpoints are intact."""


class ExistingRunError(CheckpointError):
    """A new run pointed at an ``output_dir`` holding an earlier run's checkpoints (neither --resume nor
    --overwrite given)."""


# ---- RNG ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global random state training draws from (dropout, user code), as tensors and plain values."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- saving ------------------------------------------------------------------------------------------------
def save_training_checkpoint(adapted: AdaptedModel, root: Path, step: int, trainer_state: dict[str, Any],
                             keep: int) -> Path:
    """Write ``root/step-{step}`` atomically and keep only the newest ``keep`` step folders.

    Every file and the folder are fsynced before the manifest is written and the folder renamed into place. A full
    disk raises :class:`DiskFullError` naming the folder and the bytes needed; the earlier checkpoints stay.
    """
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"step-{step}"
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}.", suffix=".tmp"))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the step folder gets the usual permissions
        write_trainer_state(trainer_state, tmp / STATE_FILE)
        save_checkpoint(adapted, tmp, extra={"step": step, "trainer_state": {STATE_FILE: file_hash(tmp / STATE_FILE)}})
        _move_into_place(tmp, folder)
        fsync_path(root)
    except (OSError, SafetensorError) as error:
        if not is_disk_full(error):
            raise
        raise disk_full(root, tensor_bytes([trainer_state, checkpoint_tensors(adapted)]), error) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp)
    prune(root, keep)
    return folder


def write_trainer_state(trainer_state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a Python file, fsynced: a failed write is the OSError with its errno (torch's own
    file writer reports a full disk as "inline_container.cc: unexpected pos")."""
    with open(path, "wb") as handle:
        torch.save(trainer_state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "(os error 28)" in str(error)  # safetensors: a Rust I/O error


def disk_full(folder: Path, needed: int, error: BaseException) -> DiskFullError:
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return DiskFullError(f"cannot save into {folder}, the disk is full ({error}): the checkpoint needs at least "
                         f"{needed:,} bytes, {free:,} are free there; free space, or move output_dir to a disk "
                         f"with room")


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a nest of dicts, lists and tuples: what saving them needs at least."""
    if torch.is_tensor(value):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; an existing ``folder`` (the same step saved again) is swapped out first."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old.tmp")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-N`` folder under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_FOLDER.match(p.name))]
    return sorted(found, reverse=True)


def prune(root: Path, keep: int) -> None:
    for _, folder in step_folders(root)[keep:]:
        shutil.rmtree(folder)


def earlier_run(output_dir: Path) -> list[Path]:
    """What a training run left in ``output_dir``: its step checkpoints and its final files."""
    steps = [folder for _, folder in step_folders(output_dir / CHECKPOINTS)]
    return steps + [output_dir / name for name in RUN_FILES if (output_dir / name).is_file()]


def check_start(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """A new run refuses an ``output_dir`` that holds an earlier run's checkpoints, unless ``overwrite``; a resume
    continues them (read-only: nothing is removed here)."""
    if resume and overwrite:
        raise ExistingRunError("--resume continues the run in output_dir and --overwrite replaces it; give one of them")
    found = [] if resume else earlier_run(output_dir)
    if found and not overwrite:
        shown = ", ".join(str(path.relative_to(output_dir)) for path in found[:5]) + (", ..." if len(found) > 5 else "")
        raise ExistingRunError(
            f"output_dir {output_dir} holds an earlier run's checkpoints ({shown}); continue that run with --resume, "
            f"replace it with --overwrite (which removes only these files), or choose another output_dir"
        )


def remove_earlier_run(output_dir: Path) -> None:
    """A new run with ``--overwrite``: delete the earlier run's step checkpoints and final files (nothing else in
    ``output_dir``), and the temporary folders of a killed save."""
    found = earlier_run(output_dir)
    if found:
        log.warning("--overwrite: removing the earlier run's %s from %s",
                    ", ".join(str(path.relative_to(output_dir)) for path in found), output_dir)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    remove_leftovers(output_dir / CHECKPOINTS)


def remove_leftovers(root: Path) -> None:
    """Delete temporary folders a killed save left behind."""
    for leftover in root.glob(TMP_GLOB) if root.is_dir() else ():
        shutil.rmtree(leftover)


# ---- loading -----------------------------------------------------------------------------------------------
def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact step folder; damaged ones are skipped with a warning."""
    for _, folder in step_folders(root):
        try:
            check_folder(folder)
            return folder
        except CheckpointError as error:
            log.warning("skipping damaged checkpoint %s: %s", folder, error)
    return None


def check_folder(folder: Path) -> dict[str, Any]:
    """The manifest of a training checkpoint whose files (trainer state included) all match their hashes."""
    manifest = read_manifest(folder)
    expected = manifest.get("trainer_state", {}).get(STATE_FILE)
    path = folder / STATE_FILE
    if expected is None or not path.is_file() or file_hash(path) != expected:
        raise CheckpointError(f"{path}: missing or not the file this checkpoint was saved with")
    return manifest


def restore_adapters(adapted: AdaptedModel, folder: Path) -> None:
    """Load a step folder's adapter tensors into a model built from the untouched base (c3LA replays its links)."""
    manifest = check_folder(folder)
    check_base(adapted, manifest, folder)
    restore_tensors(adapted, read_tensors(folder), folder)
    check_derived(adapted, manifest, folder)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"{folder / STATE_FILE}: cannot read the trainer state ({error})") from None
