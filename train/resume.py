"""What a resumed run may differ in from the run its checkpoints belong to.

A resume continues one run, so every setting that changes the result must be the one the run was saved with
(``surgery.yaml`` of the step checkpoint) and the data must have the same content (SHA-256 in ``trainer_state.pt``).
A few changes are meaningful mid-run and are applied when asked for by name, ``--override KEY=VALUE``
(:data:`OVERRIDABLE`); settings that only change how the run is logged or saved (:data:`BOOKKEEPING`) are taken
from the new config with a note. Anything else that differs is refused, naming the key and both values.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import yaml

from surgery.checkpoint import CheckpointError, file_hash
from surgery.config import ConfigError, SurgeryConfig, dump_config, parse_config, yaml_value
from train.config import DataConfig

OVERRIDABLE = {
    "train.max_steps": "train to another length (not below the step already reached)",
    "train.epochs": "train to another length (when train.max_steps is not set)",
    "train.lr": "a new peak learning rate; the schedule continues from the current step at the new peak",
    "train.max_grad_norm": "clip the gradients at another norm (null: no clipping)",
}
BOOKKEEPING = ("output_dir", "model.name_or_path", "train.log_every", "train.save_every", "train.keep_checkpoints",
               "train.eval_batch_size", "train.eval_before_training")
DATA_KEYS = ("train.data.train", "train.data.eval")
log = logging.getLogger("train")


class ResumeError(CheckpointError):
    """A resume that would not continue the run its checkpoints belong to; the message names the keys."""


# ---- --override KEY=VALUE ----------------------------------------------------------------------------------
def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-4"]`` -> ``{"train.lr": 1e-4}`` (values read as YAML); only :data:`OVERRIDABLE` keys."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not text.strip():
            raise ConfigError(f"--override {item}: expected KEY=VALUE, e.g. --override train.lr=1e-4")
        if key not in OVERRIDABLE:
            raise ConfigError(f"--override {item}: {key!r} cannot be changed on resume; --override takes "
                              f"{', '.join(OVERRIDABLE)} (anything else that changes the result needs a new run)")
        overrides[key] = yaml_value(text.strip(), f"--override {item}")
    return overrides


def apply_overrides(config: SurgeryConfig, overrides: dict[str, Any]) -> SurgeryConfig:
    """``config`` with the overridden keys set, validated like the YAML (a bad value names its key)."""
    if not overrides:
        return config
    if config.train is None:
        raise ConfigError("--override: the config has no `train:` section; it applies to a resumed training run")
    if "train.epochs" in overrides and "train.max_steps" not in overrides and config.train.max_steps is not None:
        raise ConfigError(f"--override train.epochs: train.max_steps={config.train.max_steps} is set and decides the "
                          f"length; override train.max_steps instead")
    raw = yaml_value(dump_config(config), "--override")
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return parse_config(raw, source="--override")


# ---- the data's content --------------------------------------------------------------------------------------
def data_digests(data: DataConfig) -> dict[str, str | None]:
    """SHA-256 of the train and eval data (a file, or every file of a ``datasets`` folder)."""
    return {"train.data.train": data_digest(data.train),
            "train.data.eval": data_digest(data.eval) if data.eval is not None else None}


def data_digest(path: Path) -> str:
    if not path.is_dir():
        return file_hash(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_hash(file)}\n".encode())
    return digest.hexdigest()


# ---- the check -----------------------------------------------------------------------------------------------
def check_resumable(saved: SurgeryConfig, config: SurgeryConfig, saved_data: dict[str, str | None] | None,
                    data: dict[str, str | None], overridden: Collection[str], folder: Path) -> None:
    """Refuse a resume whose config changes the result unless overridden by name; log every change applied."""
    before, now = flatten(saved.model_dump(mode="json")), flatten(config.model_dump(mode="json"))
    changed = differences(before, now)
    problems = []
    if saved_data is not None:  # checkpoints written before the data was hashed compare the paths only
        for key in DATA_KEYS:
            moved = changed.pop(key, None)
            if saved_data.get(key) != data[key]:
                problems.append(data_problem(key, before.get(key), now.get(key), saved_data.get(key), data[key]))
            elif moved is not None:
                log.info("--resume: %s moved from %s to %s (same content)", key, *moved)
    for key, (old, new) in changed.items():
        if key in BOOKKEEPING or key in overridden:
            log.info("--resume: %s: %r -> %r (applied%s)", key, old, new,
                     ", --override" if key in overridden else "; it does not change the result")
            continue
        remedy = (f"; apply it on purpose with --override {key}={yaml.safe_dump(new).splitlines()[0]}"
                  if key in OVERRIDABLE else "")
        problems.append(f"{key}: {old!r} in the run, {new!r} in this config{remedy}")
    if problems:
        raise ResumeError(
            f"--resume: this config differs from the run saved in {folder} in what decides the result:\n  "
            + "\n  ".join(problems)
            + "\nRestore the run's values to continue it, or start a new run (--overwrite, or another output_dir)"
        )


def data_problem(key: str, path_before: str | None, path_now: str | None, digest_before: str | None,
                 digest_now: str | None) -> str:
    if digest_before is None or digest_now is None:  # given in one run, not in the other (a split of train)
        return f"{key}: {path_before!r} in the run, {path_now!r} in this config"
    where = path_now if path_now == path_before else f"{path_now} (the run read {path_before})"
    return (f"{key}: the content of {where} differs from the data the run was trained on (SHA-256 "
            f"{digest_before[:12]}... then, {digest_now[:12]}... now)")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(before: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (before.get(key), now.get(key)) for key in dict.fromkeys([*before, *now])
            if before.get(key) != now.get(key)}
