"""Adapter checkpoints: adapter tensors in safetensors, the resolved config, and a manifest that pins the base.

A checkpoint folder holds

- ``adapter.safetensors``: every adapter's tensors (``adapter.<layer>.<tensor>``) and the weights of modules trained
  in full or created by the task (``module.<name>.<param>``, e.g. the seq-cls head); never a base weight;
- ``surgery.yaml``: the resolved config (defaults filled in);
- ``checkpoint.json``: the manifest, written last: the base model's target-weight fingerprint, hashes of the
  tensors recomputed from the base (R-/S-LoDA's approximations) and of ``adapter.safetensors``.

Loading rebuilds the model from the untouched base, checks every hash, and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from surgery.config import ConfigError, dump_config, load_config
from surgery.model import load_model
from surgery.rewrite import AdaptedModel, apply_surgery

FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "surgery.yaml"
MANIFEST_FILE = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, corrupted, or saved against another base model."""


# ---- saving ----------------------------------------------------------------------------------------------
def checkpoint_tensors(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapted.layers.items():
        for key, tensor in layer.adapter_state().items():
            tensors[f"adapter.{name}.{key}"] = tensor
    for name, module in saved_modules(adapted).items():
        for key, tensor in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = tensor
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def saved_modules(adapted: AdaptedModel) -> dict[str, nn.Module]:
    """Trained modules, plus the task head a seq-cls model creates (random at load time unless saved)."""
    modules = dict(adapted.trained_modules)
    if adapted.config.model.task == "seq-cls":
        for name in ("classifier", "score"):
            if hasattr(adapted.model, name):
                modules.setdefault(name, adapted.model.get_submodule(name))
    return modules


def derived_hashes(adapted: AdaptedModel) -> dict[str, str]:
    return {
        f"{name}.{key}": tensor_hash(tensor)
        for name, layer in adapted.layers.items()
        for key, tensor in layer.derived_tensors().items()
    }


def save_checkpoint(adapted: AdaptedModel, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint files atomically (each to a temporary file, then renamed; the manifest last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ADAPTER_FILE, lambda tmp: save_file(checkpoint_tensors(adapted), tmp,
                                                                 metadata={"format": str(FORMAT_VERSION)}))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(dump_config(adapted.config)))
    manifest = {
        "format": FORMAT_VERSION,
        "method": adapted.config.method.name,
        "base_model": adapted.config.model.name_or_path,
        "base_fingerprint": adapted.base_fingerprint,
        "derived_hashes": derived_hashes(adapted),
        "files": {name: file_hash(folder / name) for name in (ADAPTER_FILE, CONFIG_FILE)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **(extra or {}),
    }
    atomic_write(folder / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return folder


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` (readable by all)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_hash(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}:{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- loading ---------------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, after checking that every file it lists is intact."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: corrupted manifest ({error}); re-save the checkpoint") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    for name, expected in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if file_hash(file) != expected:
            raise CheckpointError(f"{file}: corrupted or truncated (its SHA-256 differs from {MANIFEST_FILE})")
    return manifest


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(folder / ADAPTER_FILE)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{folder / ADAPTER_FILE}: cannot read tensors ({error})") from None


def load_checkpoint(folder: str | Path, model_path: str | None = None) -> AdaptedModel:
    """Rebuild the adapted model a checkpoint describes, from the untouched base model.

    ``model_path`` replaces ``model.name_or_path`` (the base moved); the fingerprint check still applies.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    overrides = {}
    try:
        config = load_config(folder / CONFIG_FILE)
        if model_path is not None:
            overrides["model"] = {**config.model.model_dump(), "name_or_path": model_path}
            config = load_config(folder / CONFIG_FILE, overrides=overrides)
    except ConfigError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {error}") from None
    adapted = apply_surgery(load_model(config.model), config)
    check_base(adapted, manifest, folder)
    restore_tensors(adapted, read_tensors(folder), folder)
    check_derived(adapted, manifest, folder)
    return adapted


def check_base(adapted: AdaptedModel, manifest: dict[str, Any], folder: Path) -> None:
    if adapted.base_fingerprint != manifest["base_fingerprint"]:
        raise CheckpointError(
            f"{folder}: saved against a different base model than {adapted.config.model.name_or_path!r} "
            f"(target-weight fingerprint {manifest['base_fingerprint'][:12]}... != "
            f"{adapted.base_fingerprint[:12]}...); point model.name_or_path at the model it was trained from"
        )


def check_derived(adapted: AdaptedModel, manifest: dict[str, Any], folder: Path) -> None:
    now = derived_hashes(adapted)
    for key, expected in manifest.get("derived_hashes", {}).items():
        if now.get(key) != expected:
            raise CheckpointError(
                f"{folder}: the frozen approximation {key} recomputed from the base differs from the one the "
                f"adapter was trained on; use the same base model and library versions ({manifest['versions']})"
            )


def restore_tensors(adapted: AdaptedModel, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Load adapter and module tensors into an adapted model; every tensor must find its place."""
    used: set[str] = set()
    for name, layer in adapted.layers.items():
        prefix = f"adapter.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in state)
        try:
            layer.load_adapter_state(state)
        except KeyError as error:
            raise CheckpointError(f"{folder / ADAPTER_FILE}: {error.args[0]}") from None
        layer.on_checkpoint_loaded()
    for name, module in saved_modules(adapted).items():
        prefix = f"module.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in state)
        module.load_state_dict(state, strict=True)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{folder / ADAPTER_FILE}: tensors match no layer of this model: {unused[:5]}")
