"""Adapter checkpoints: adapter tensors in safetensors, the resolved config, and a manifest that pins the base.

A checkpoint folder holds

- ``adapter.safetensors``: every adapter's tensors (``adapter.<layer>.<tensor>``) and the weights of modules trained
  in full or created by the task (``module.<name>.<param>``, e.g. the seq-cls head); never a base weight;
- ``surgery.yaml``: the resolved config (defaults filled in);
- ``checkpoint.json``: the manifest, written last: the SHA-256 of every base-model tensor and a fingerprint over
  them (``surgery.fingerprint``), every adapted layer's name and (d_in, d_out), hashes of the tensors recomputed
  from the base (R-/S-LoDA's approximations) and of ``adapter.safetensors`` and ``surgery.yaml``, and the torch and
  transformers versions it was written with. Its schema (:class:`Manifest`) is checked on load: a field missing or
  of the wrong type is "this checkpoint's manifest is damaged", naming the field.

Loading rebuilds the model from the untouched base, checks every hash (a base that differs in any tensor is named
tensor by tensor), refuses NaN or infinite adapter and base tensors by name, and never unpickles anything.
Format-1 manifests (which pinned only the target layers' weights) still load, checked as they were. A checkpoint
loads under another transformers version (4.x <-> 5.x) as long as the model matches it; when something does not
(a layer renamed or reshaped, other target weights), the error names both versions and the way back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from surgery.config import ConfigError, SurgeryConfig, dump_config, load_config
from surgery.model import ModelLoadError, load_model
from surgery.fingerprint import BaseModelError, is_finite, non_finite_error, tensor_digest
from surgery.rewrite import AdaptedModel, apply_surgery, target_fingerprint

FORMAT_VERSION = 2  # 2: every base tensor's digest (base_tensors); 1: the target layers' fingerprint only
READABLE_FORMATS = (1, 2)
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "surgery.yaml"
MANIFEST_FILE = "checkpoint.json"
SHA256 = re.compile(r"[0-9a-f]{64}")
DAMAGED_REMEDY = "restore checkpoint.json from a copy of the checkpoint, or save the checkpoint again"


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


def layer_shapes(adapted: AdaptedModel) -> dict[str, list[int]]:
    """Adapted layer name -> [d_in, d_out]; loading checks them before any tensor (a renamed or reshaped layer)."""
    return {name: [layer.d_in, layer.d_out] for name, layer in adapted.layers.items()}


def derived_hashes(adapted: AdaptedModel) -> dict[str, str]:
    return {
        f"{name}.{key}": tensor_digest(tensor)
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
        "base_tensors": adapted.base.tensors,
        "layers": layer_shapes(adapted),
        "derived_hashes": derived_hashes(adapted),
        "files": {name: file_hash(folder / name) for name in (ADAPTER_FILE, CONFIG_FILE)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **(extra or {}),
    }
    atomic_write(folder / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return folder


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` (readable by all).

    The file is fsynced before the rename and its folder after it: a file written before the manifest is on disk
    before the manifest names it, even if the machine loses power."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_path(path: str | Path) -> None:
    """Flush a file's, or a folder's (its entries: renames), contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- loading ---------------------------------------------------------------------------------------------
class Manifest(BaseModel):
    """checkpoint.json's schema. Extra keys (training state, where an import came from) are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: int
    method: str
    base_model: str
    base_fingerprint: str = Field(min_length=1)
    base_tensors: dict[str, str] | None = None  # format 2: required
    layers: dict[str, list[int]] | None = None
    derived_hashes: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str]
    versions: dict[str, str] | None = None

    @model_validator(mode="after")
    def complete(self) -> Manifest:
        if self.format not in READABLE_FORMATS:
            raise ValueError(f"format: {self.format}, this version reads {list(READABLE_FORMATS)}")
        listed = [name for name in (ADAPTER_FILE, CONFIG_FILE) if name not in self.files]
        if listed:
            raise ValueError(f"files: {listed} not listed (every file of the checkpoint is, with its SHA-256)")
        bad = [name for name, value in self.files.items() if not SHA256.fullmatch(value)]
        if bad:
            raise ValueError(f"files: {bad} without a SHA-256 (64 hex digits)")
        if self.format >= 2 and not self.base_tensors:
            raise ValueError("base_tensors: missing or empty (format 2 pins every base-model tensor)")
        return self


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, after checking its schema and that every file it lists is intact."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: corrupted manifest ({error}); re-save the checkpoint") from None
    manifest = validated(manifest, path)
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if file_hash(file) != expected:
            raise CheckpointError(f"{file}: corrupted or truncated (its SHA-256 differs from {MANIFEST_FILE})")
    return manifest


def validated(manifest: Any, path: Path) -> dict[str, Any]:
    """``manifest`` checked against :class:`Manifest`; a CheckpointError naming the first bad field."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: this checkpoint's manifest is damaged: a JSON {type(manifest).__name__}, "
                              f"not an object; {DAMAGED_REMEDY}")
    try:
        return Manifest.model_validate(manifest).model_dump()
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")  # the schema's own checks name their field
        where = ".".join(str(part) for part in first["loc"])
        raise CheckpointError(f"{path}: this checkpoint's manifest is damaged: "
                              f"{f'{where}: ' if where else ''}{message}; {DAMAGED_REMEDY}") from None


def check_finite(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Every floating adapter and module tensor is finite; the error names those that are not."""
    bad = sorted(key for key, tensor in tensors.items() if not is_finite(tensor))
    if bad:
        raise CheckpointError(non_finite_error(bad, str(folder / ADAPTER_FILE),
                                               "training diverged before this save: resume from an earlier checkpoint "
                                               "or train again with a lower lr"))


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
    config = read_config(folder, model_path)
    model = load_model(config.model)
    check_rope_config(model.config, config.model.name_or_path)
    try:
        adapted = apply_surgery(model, config, trusted_base=manifest.get("base_tensors"))
    except BaseModelError as error:  # NaN or infinite base tensors, named
        raise CheckpointError(f"{folder}: {error}") from None
    except ValueError as error:  # targets that match nothing, a layer the method cannot adapt
        raise CheckpointError(f"{folder}: " + Versions.of(manifest).explain(
            f"its surgery does not apply to {type(model).__name__}: {error}",
            "point model.name_or_path at the model it was trained from")) from None
    tensors = read_tensors(folder)
    check_finite(tensors, folder)
    check_layers(adapted, manifest, folder)
    check_strays(adapted, tensors, folder, manifest)
    check_base(adapted, manifest, folder)
    restore_tensors(adapted, tensors, folder, manifest)
    check_derived(adapted, manifest, folder)
    return adapted


def read_config(folder: Path, model_path: str | None) -> SurgeryConfig:
    try:
        config = load_config(folder / CONFIG_FILE)
        if model_path is not None:
            overrides = {"model": {**config.model.model_dump(), "name_or_path": model_path}}
            config = load_config(folder / CONFIG_FILE, overrides=overrides)
    except ConfigError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {error}") from None
    return config


@dataclass(frozen=True)
class Versions:
    """The transformers version a checkpoint was written with and the one loading it.

    A checkpoint loads under another version without a word while the model matches it; an error about a
    mismatch names both versions, since a model that changed between them is then the likely cause.
    """

    written: str | None  # None for a manifest without versions
    loading: str

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> Versions:
        return cls(manifest.get("versions", {}).get("transformers"), transformers.__version__)

    @property
    def differ(self) -> bool:
        return self.written is not None and self.written != self.loading

    def explain(self, problem: str, remedy: str | None = None) -> str:
        """``problem; remedy``, led by both versions and closed by the way back when they differ."""
        if not self.differ:
            return f"{problem}; {remedy}" if remedy else problem
        way_back = f"load it with transformers=={self.written} (the version it was written with)"
        return (f"written with transformers {self.written}, loading with {self.loading}: {problem}; "
                + (f"{remedy}, or {way_back}" if remedy else way_back))


def major(version: str) -> int:
    return int(version.split(".")[0])


def check_rope_config(hf_config: PretrainedConfig, name_or_path: str, installed: str | None = None) -> None:
    """Refuse a base whose config.json a newer transformers major wrote with rotary settings this one ignores.

    transformers 5 writes ``rope_parameters`` (with ``rope_theta`` inside); 4.x reads only ``rope_theta`` and
    ``rope_scaling``, keeps the unknown key and silently runs its defaults: other outputs, same weights, same
    fingerprint. Found on a Llama with rope_theta 500000 written under 5.24 and loaded under 4.56 (logits off by 6).
    """
    installed = installed or transformers.__version__
    written = getattr(hf_config, "transformers_version", None)
    declared = getattr(hf_config, "rope_parameters", None)
    if not written or not isinstance(declared, dict) or major(written) <= major(installed):
        return
    theta, used_theta = declared.get("rope_theta"), getattr(hf_config, "rope_theta", None)
    scaling = {key: value for key, value in declared.items() if key != "rope_theta"}
    missing = []
    if theta is not None and used_theta is not None and used_theta != theta:
        missing.append(f'"rope_theta": {theta}')
    if scaling.get("rope_type", "default") != "default" and getattr(hf_config, "rope_scaling", {}) is None:
        missing.append(f'"rope_scaling": {json.dumps(scaling)}')
    if missing:
        raise ModelLoadError(
            f"model.name_or_path: {name_or_path}: its config.json was written with transformers {written} and sets "
            f"rope_parameters {declared}, which transformers {installed} does not read (it would run "
            f"rope_theta={used_theta}, rope_scaling={getattr(hf_config, 'rope_scaling', None)}: other outputs than "
            f"the model was trained with); load it with transformers>={major(written)}, or add "
            f"{', '.join(missing)} to its config.json"
        )


def check_layers(adapted: AdaptedModel, manifest: dict[str, Any], folder: Path) -> None:
    """Every layer the checkpoint adapted is in the model with the same (d_in, d_out), and no other is adapted."""
    saved = manifest.get("layers")
    if saved is None:  # a manifest from before layers were recorded: restore_tensors still catches strays
        return
    now, versions = layer_shapes(adapted), Versions.of(manifest)
    remedy = "point model.name_or_path at the model it was trained from"
    for name, dims in saved.items():
        if name not in now:
            raise CheckpointError(f"{folder}: " + versions.explain(
                f"layer {name!r} is not in the model {type(adapted.model).__name__} "
                f"({nearest_children(adapted.model, name)})", remedy))
        if now[name] != list(dims):
            raise CheckpointError(f"{folder}: " + versions.explain(
                f"layer {name!r} has (d_in, d_out) = {tuple(dims)} in the checkpoint but {tuple(now[name])} in the "
                f"model", remedy))
    extra = sorted(set(now) - set(saved))
    if extra:
        raise CheckpointError(f"{folder}: " + versions.explain(
            f"the targets adapt {len(extra)} layer(s) the checkpoint holds no adapter for, e.g. {extra[0]!r}",
            remedy))


def nearest_children(model: nn.Module, name: str) -> str:
    """What the model holds where a missing module was: the children of its nearest existing ancestor."""
    modules = dict(model.named_modules())
    parent = name.rpartition(".")[0]
    while parent not in modules:  # the root, "", is always there
        parent = parent.rpartition(".")[0]
    children = [child for child, _ in modules[parent].named_children()]
    shown = children[:10] + (["..."] if len(children) > 10 else [])
    return f"{parent!r} holds {', '.join(shown)}" if parent else f"it holds {', '.join(shown)}"


def check_base(adapted: AdaptedModel, manifest: dict[str, Any], folder: Path) -> None:
    """The base model is the one the checkpoint was saved against: every tensor (format 2), the target layers'
    weights (format 1)."""
    if manifest["format"] >= 2:
        differences = adapted.base.differences(manifest["base_tensors"])
    else:
        targets = {name: layer.base for name, layer in adapted.layers.items()}
        same = target_fingerprint(targets) == manifest["base_fingerprint"]
        differences = [] if same else ["the target layers' weights (a format-1 checkpoint pins only those)"]
    if not differences:
        return
    versions = Versions.of(manifest)
    found = "; ".join(differences)
    if versions.differ:
        problem = (f"the base model {adapted.config.model.name_or_path!r} differs from the one it was saved against "
                   f"({found}): another base model, or one this version loads differently (converted, renamed or "
                   f"retyped weights)")
    else:
        problem = f"saved against a different base model than {adapted.config.model.name_or_path!r} ({found})"
    raise CheckpointError(f"{folder}: " + versions.explain(problem, "point model.name_or_path (or --model-path) at "
                                                                     "the model it was trained from"))


def check_derived(adapted: AdaptedModel, manifest: dict[str, Any], folder: Path) -> None:
    now = derived_hashes(adapted)
    for key, expected in manifest.get("derived_hashes", {}).items():
        if now.get(key) != expected:
            raise CheckpointError(f"{folder}: " + Versions.of(manifest).explain(
                f"the frozen approximation {key} recomputed from the base differs from the one the adapter was "
                f"trained on", f"use the same base model and library versions ({manifest.get('versions')})"))


def restore_tensors(adapted: AdaptedModel, tensors: dict[str, torch.Tensor], folder: Path,
                    manifest: dict[str, Any] | None = None) -> None:
    """Load adapter and module tensors into an adapted model; every tensor must find its place."""
    versions = Versions.of(manifest or {})
    check_strays(adapted, tensors, folder, manifest or {})
    for name, layer in adapted.layers.items():
        try:
            layer.load_adapter_state(sub_state(tensors, f"adapter.{name}."))
        except KeyError as error:  # a tensor missing or unexpected: the message names the layer
            raise CheckpointError(f"{folder / ADAPTER_FILE}: {error.args[0]}") from None
        except ValueError as error:  # a method's own shape check; its message names the layer
            raise CheckpointError(f"{folder / ADAPTER_FILE}: " + versions.explain(one_line(error))) from None
        except RuntimeError as error:  # torch: a tensor whose shape does not fit
            raise CheckpointError(f"{folder / ADAPTER_FILE}: " + versions.explain(
                f"layer {name!r}: {one_line(error)}", "load it with the rank and base model it was saved with"
            )) from None
        layer.on_checkpoint_loaded()
    for name, module in saved_modules(adapted).items():
        try:
            module.load_state_dict(sub_state(tensors, f"module.{name}."), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{folder / ADAPTER_FILE}: " + versions.explain(
                f"module {name!r}: {one_line(error)}", "load it with the base model and num_labels it was saved with"
            )) from None


def check_strays(adapted: AdaptedModel, tensors: dict[str, torch.Tensor], folder: Path,
                 manifest: dict[str, Any]) -> None:
    """Every tensor belongs to an adapted layer or a saved module of this model (names a renamed layer even
    when the manifest predates the recorded layers)."""
    prefixes = tuple([f"adapter.{name}." for name in adapted.layers] +
                     [f"module.{name}." for name in saved_modules(adapted)])
    stray = sorted(key for key in tensors if not key.startswith(prefixes))
    if stray:
        raise CheckpointError(f"{folder / ADAPTER_FILE}: " + Versions.of(manifest).explain(
            f"tensors match no layer of this model: {stray[:5]}",
            "point model.name_or_path at the model it was trained from"))


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())
