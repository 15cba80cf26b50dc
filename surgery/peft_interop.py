"""PEFT interop: read a PEFT LoRA adapter folder as our LoRA checkpoint, and write our LoRA in PEFT's format.

    python -m surgery.peft_interop import PEFT_DIR --out CKPT [--base MODEL] [--task causal-lm|seq-cls]
                                                              [--num-labels N]
    python -m surgery.peft_interop export CKPT --out PEFT_DIR

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.lora_A.weight`` (r, d_in) and ``...lora_B.weight`` (d_out, r), the same layout as ours
for Linear and for GPT-2's Conv1D (PEFT's ``fan_in_fan_out`` only concerns the base weight), and
``base_model.model.<module>.<param>`` for each module of ``modules_to_save`` (PEFT 0.21 strips its
``modules_to_save.default`` infix; a seq-cls adapter saves its ``classifier``/``score`` head this way). Only plain
LoRA is read: DoRA, per-layer rank/alpha patterns, trained biases, layer replication, aLoRA/QA-LoRA, Arrow routing and
embedding or token adapters are refused by name.

Import trusts nothing it reads, and checks all of it before writing anything:

- ``adapter_config.json`` is a JSON object whose keys the importer reads have PEFT's types (``r`` a positive integer,
  ``target_modules`` a list of names or one regex, ...); JSON values are never coerced.
- ``adapter_model.safetensors`` is complete and holds floating-point tensors, all finite (NaN/inf are refused with
  the tensor's key). Every lora_A/lora_B pair has rank ``r`` and the (d_in, d_out) of its base layer.
- Every tensor finds its place or the import stops naming it, never dropping one: the LoRA pairs, and the modules of
  ``modules_to_save`` (and the seq-cls head), which become trained modules of the checkpoint (``modules_to_train``,
  ``train_head``), so the imported model computes PEFT's logits. A module whose weights are tied to another
  (GPT-2's ``wte`` and ``lm_head``) is refused: PEFT trains an untied copy, which our checkpoint cannot hold.
- ``--num-labels N`` sets a seq-cls model's label count; without it, the rows of the saved head
  (``classifier.weight``, ``classifier.out_proj.weight`` or ``score.weight``) do, else 2. Both given and different is
  an error naming both.

``--out`` must be a new or empty folder: the checkpoint is written into a temporary folder beside it and renamed to
it last, so a failed import leaves no ``--out`` behind. Export refuses a non-finite adapter or module tensor by name
and writes its folder the same way. The CLI prints one line and exits 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgery.checkpoint import (CheckpointError, load_checkpoint, nearest_children, one_line, save_checkpoint,
                                saved_modules, sub_state)
from surgery.config import SurgeryConfig, parse_config
from surgery.model import ModelLoadError, load_model
from surgery.rewrite import AdaptedModel, apply_surgery
from surgery.targets import ALL_LINEAR, TargetError, match

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
LORA_PARTS = ("lora_A", "lora_B")
HEAD_WEIGHTS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")  # (num_labels, hidden)
UNSUPPORTED = {  # key -> its plain-LoRA value; anything else changes the forward in ways we do not represent
    "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False,
    "layer_replication": None, "alora_invocation_tokens": None, "use_qalora": False, "target_parameters": None,
    "trainable_token_indices": None, "megatron_config": None, "velora_config": None, "monteclora_config": None,
    "use_bdlora": None, "arrow_config": None,
}

Tensors = dict[str, torch.Tensor]


class PeftFormatError(ValueError):
    """A PEFT folder this importer cannot represent as a plain LoRA checkpoint (or a checkpoint PEFT cannot take)."""


class OutFolderError(ValueError):
    """``--out`` is a file or a folder that already holds files."""


class PeftLoraConfig(BaseModel):
    """The keys of ``adapter_config.json`` the importer reads, with PEFT's types and defaults (others are kept)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    peft_type: str | None = Field(None, description='"LORA"')
    r: int = Field(8, gt=0, description="a positive integer (the LoRA rank)")
    lora_alpha: float = Field(8.0, gt=0, allow_inf_nan=False, description="a positive number")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="a number in [0, 1)")
    use_rslora: bool = Field(False, description="true or false")
    task_type: str | None = Field(None, description=f"null or one of {', '.join(TASKS)}")
    base_model_name_or_path: str | None = Field(None, description="a model path or hub id (a string), or null")
    target_modules: list[str] | str | None = Field(None, description="a list of module names, one regex, or null")
    modules_to_save: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="a list of module names (non-empty strings), or null")


# ---- reading a PEFT folder -------------------------------------------------------------------------------
def read_peft_config(folder: Path) -> PeftLoraConfig:
    """``adapter_config.json``, validated: a plain LoRA config whose keys have PEFT's types."""
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise PeftFormatError(f"{folder}: no {PEFT_CONFIG}; is this a PEFT adapter folder?")
    raw = read_json_object(path)
    try:
        config = PeftLoraConfig.model_validate(raw)
    except ValidationError as error:
        raise PeftFormatError(f"{path}: {describe_errors(error, raw)}; fix the value or re-save the adapter with "
                              f"PEFT's save_pretrained") from None
    if config.peft_type != "LORA":
        raise PeftFormatError(f"{path}: peft_type {config.peft_type!r}; only LORA adapters can be imported")
    for key, plain in UNSUPPORTED.items():
        if raw.get(key) not in (plain, None, [], {}, False):
            raise PeftFormatError(f"{path}: {key}={raw[key]!r} is not plain LoRA and cannot be imported")
    return config


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PeftFormatError(f"{path}: not valid JSON ({error}); the file is damaged or truncated: restore it or "
                              f"re-save the adapter with PEFT's save_pretrained") from None
    if not isinstance(raw, dict):
        raise PeftFormatError(f"{path}: expected a JSON object of LoRA settings (peft_type, r, lora_alpha, ...), "
                              f"got a JSON {json_type(raw)}")
    return raw


def json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def describe_errors(error: ValidationError, raw: dict[str, Any]) -> str:
    """One clause per wrong key: ``r must be a positive integer (the LoRA rank), got '8'``."""
    keys = dict.fromkeys(str(item["loc"][0]) for item in error.errors())
    fields = PeftLoraConfig.model_fields
    return "; ".join(f"{key} must be {fields[key].description}, got {raw.get(key)!r}" for key in keys)


def read_peft_tensors(folder: Path) -> Tensors:
    """Every tensor of ``adapter_model.safetensors``; a truncated or damaged file is a PeftFormatError."""
    path = folder / PEFT_WEIGHTS
    if not path.is_file():
        pickle = " (adapter_model.bin is a pickle and is never loaded: re-save with safe_serialization=True)"
        raise PeftFormatError(f"{folder}: no {PEFT_WEIGHTS}{pickle if (folder / 'adapter_model.bin').exists() else ''}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise PeftFormatError(f"{path}: cannot read tensors ({error}); the file is truncated or damaged: copy it "
                              f"again or re-save the adapter") from None
    check_values(tensors, str(path), "the adapter diverged or the file is damaged; nothing was written")
    return tensors


def check_values(tensors: Tensors, source: str, remedy: str) -> None:
    """Every tensor is floating point and finite; the first that is not is named with ``remedy``."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise PeftFormatError(f"{source}: tensor {key!r} has dtype {tensor.dtype}, adapter weights are floating "
                                  f"point; {remedy}")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise PeftFormatError(f"{source}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of "
                                  f"{tensor.numel()}; {remedy}")


def peft_key(name: str, part: str | None = None) -> str:
    return f"{PREFIX}{name}.{part}.weight" if part else f"{PREFIX}{name}"


def split_peft_tensors(tensors: Tensors, source: Path) -> tuple[dict[str, Tensors], Tensors]:
    """(layer -> {lora_A, lora_B}, module tensor name -> tensor) from PEFT's flat keys, names without the prefix."""
    layers: dict[str, Tensors] = {}
    others: Tensors = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise PeftFormatError(f"{source}: unexpected tensor key {key!r} (expected the prefix {PREFIX!r})")
        name = key[len(PREFIX):]
        layer, _, part = name.removesuffix(".weight").rpartition(".")
        if name.endswith(".weight") and part in LORA_PARTS:
            layers.setdefault(layer, {})[part] = tensor
        elif any(piece.startswith("lora_") for piece in name.split(".")):
            raise PeftFormatError(f"{source}: {key!r} is an adapter type this importer does not read (plain LoRA "
                                  f"only: {', '.join(peft_key('<layer>', p) for p in LORA_PARTS)})")
        else:
            others[name] = tensor
    unpaired = sorted(peft_key(layer, part) for layer, pair in layers.items() for part in set(LORA_PARTS) - set(pair))
    if unpaired:
        raise PeftFormatError(f"{source}: tensor {unpaired[0]!r} is missing (its pair is there); the file is "
                              f"incomplete: copy it again or re-save the adapter")
    return layers, others


def check_ranks(layers: dict[str, Tensors], r: int, source: Path) -> None:
    """lora_A is (r, d_in) and lora_B (d_out, r), with r from adapter_config.json."""
    for layer, pair in layers.items():
        for part, tensor in pair.items():
            got = tuple(tensor.shape)
            d_in, d_out = (got[1], got[0]) if len(got) == 2 else ("d_in", "d_out")
            want = (r, d_in) if part == "lora_A" else (d_out, r)
            if got != want:
                raise PeftFormatError(
                    f"{source}: tensor {peft_key(layer, part)!r} has shape {got}, expected {want} (r={r} in "
                    f"{PEFT_CONFIG}; lora_A is (r, d_in), lora_B (d_out, r)); the config and the weights are from "
                    f"different adapters: use the {PEFT_CONFIG} saved with these weights")


def check_targeted(layers: dict[str, Tensors], target_modules: list[str] | str | None, source: Path) -> None:
    """Each LoRA layer is one ``target_modules`` names (PEFT would not load its tensors otherwise)."""
    if target_modules is None or target_modules == ALL_LINEAR:
        return
    try:
        stray = sorted(layer for layer in layers if not match(layer, target_modules))
    except re.error as error:
        raise PeftFormatError(f"{source.parent / PEFT_CONFIG}: target_modules {target_modules!r} is not a valid "
                              f"regular expression ({error})") from None
    if stray:
        raise PeftFormatError(f"{source}: LoRA tensors for {stray[0]!r} ({len(stray)} layer(s)) but target_modules "
                              f"{target_modules!r} in {PEFT_CONFIG} does not name it, so PEFT would not load them; "
                              f"use the {PEFT_CONFIG} saved with these weights")


# ---- the model the adapter describes ---------------------------------------------------------------------
def resolve_task(peft: PeftLoraConfig, task: str | None, path: Path) -> str:
    if task:
        return task
    if peft.task_type is None:
        return "causal-lm"
    if peft.task_type not in TASKS:
        raise PeftFormatError(f"{path}: task_type {peft.task_type!r} is not one of {', '.join(TASKS)}; pass "
                              f"--task causal-lm or --task seq-cls if the model is one of them")
    return TASKS[peft.task_type]


def resolve_num_labels(task: str, num_labels: int | None, others: Tensors, source: Path) -> int | None:
    """--num-labels, else the rows of the saved seq-cls head; both given and different is an error."""
    heads = [name for name in HEAD_WEIGHTS if name in others]
    if task != "seq-cls":
        if num_labels is not None:
            raise PeftFormatError(f"--num-labels {num_labels} is for --task seq-cls only; the task here is {task}")
        return None
    if not heads:
        return num_labels
    shape = tuple(others[heads[0]].shape)
    if len(shape) != 2:
        raise PeftFormatError(f"{source}: the head tensor {peft_key(heads[0])!r} has shape {shape}, expected "
                              f"(num_labels, hidden)")
    if num_labels is not None and num_labels != shape[0]:
        raise PeftFormatError(f"--num-labels {num_labels} but the saved head {peft_key(heads[0])!r} in {source} has "
                              f"{shape[0]} labels (shape {shape}); pass --num-labels {shape[0]} or leave it out")
    return shape[0]


def surgery_config(peft: PeftLoraConfig, layer_names: list[str], base: str, task: str, num_labels: int | None,
                   out: Path, modules_to_train: list[str]) -> SurgeryConfig:
    model = {"name_or_path": base, "task": task, **({"num_labels": num_labels} if num_labels is not None else {})}
    return parse_config({
        "model": model,
        "targets": layer_names,
        "method": {"name": "lora", "r": peft.r, "alpha": peft.lora_alpha, "dropout": peft.lora_dropout,
                   "rslora": peft.use_rslora},
        "modules_to_train": modules_to_train,
        "output_dir": str(out),
    }, source=f"PEFT config of {base}")


def modules_to_train(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Full names of the modules PEFT wraps for ``modules_to_save``: every name that ends with an entry (PEFT matches
    plain suffixes, so ``norm`` also takes ``input_layernorm``), outermost only; entries matching nothing are
    skipped, as PEFT does."""
    specs = modules_to_save or []
    found = [name for name, _ in model.named_modules() if name and any(name.endswith(spec) for spec in specs)]
    return [name for name in found if not any(name.startswith(f"{outer}.") for outer in found)]


def adapt(peft: PeftLoraConfig, layers: dict[str, Tensors], base: str, task: str, num_labels: int | None,
          out: Path, source: Path) -> AdaptedModel:
    """The base model with a LoRA layer where the adapter has tensors and ``modules_to_save`` trained."""
    first = surgery_config(peft, sorted(layers), base, task, num_labels, out, [])
    model = load_model(first.model)  # a saved head of another size than num_labels: a ModelLoadError naming it
    config = surgery_config(peft, sorted(layers), base, task, num_labels, out,
                            modules_to_train(model, peft.modules_to_save))
    try:
        return apply_surgery(model, config)
    except TargetError as error:
        raise PeftFormatError(f"{source}: the adapter's layers do not fit the base model {base}: {error}; is --base "
                              f"the model this adapter was trained on?") from None


# ---- loading the tensors ---------------------------------------------------------------------------------
@torch.no_grad()
def load_lora(adapted: AdaptedModel, layers: dict[str, Tensors], source: Path) -> None:
    """Copy every lora_A/lora_B pair into its layer; a layer the base lacks or a shape it does not fit is named."""
    base = adapted.config.model.name_or_path
    absent = sorted(set(layers) - set(adapted.layers))
    if absent:
        raise PeftFormatError(f"{source}: tensor {peft_key(absent[0], 'lora_A')!r}: the base model {base} has no "
                              f"Linear or Conv1D layer {absent[0]!r} ({nearest_children(adapted.model, absent[0])}); "
                              f"is --base the model this adapter was trained on?")
    for name, layer in adapted.layers.items():
        for part in LORA_PARTS:
            tensor, target = layers[name][part], getattr(layer, part)
            if tensor.shape != target.shape:
                raise PeftFormatError(
                    f"{source}: tensor {peft_key(name, part)!r} has shape {tuple(tensor.shape)}, but layer {name!r} "
                    f"of {base} needs {tuple(target.shape)} (d_in={layer.d_in}, d_out={layer.d_out}); is --base the "
                    f"model this adapter was trained on?")
            target.copy_(tensor)


def load_modules(adapted: AdaptedModel, others: Tensors, source: Path) -> None:
    """Load ``modules_to_save`` (and the head) in full; a tensor that belongs to none of them is refused."""
    trained = adapted.trained_modules
    stray = sorted(name for name in others if not any(name.startswith(f"{module}.") for module in trained))
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise PeftFormatError(
            f"{source}: tensor {peft_key(stray[0])!r}{more} belongs to no LoRA layer and to no module "
            f"of modules_to_save (here: {sorted(trained) or 'none'}); tensors are never dropped: if that module was "
            f"trained, add it to modules_to_save in {PEFT_CONFIG}, else delete the tensor")
    for name, module in trained.items():
        refuse_tied(adapted.model, name, source)
        load_module(name, module, sub_state(others, f"{name}."), source)


def refuse_tied(model: nn.Module, name: str, source: Path) -> None:
    inside = {id(param) for param in model.get_submodule(name).parameters()}
    tied = [other for other, param in model.named_parameters(remove_duplicate=False)
            if id(param) in inside and not other.startswith(f"{name}.")]
    if tied:
        raise PeftFormatError(f"{source}: module {name!r} of modules_to_save shares its weights with {tied} (tied); "
                              f"PEFT trained an untied copy, which a checkpoint of ours cannot hold (loading it would "
                              f"change {tied[0]} too); untie the weights before training, or train without it")


@torch.no_grad()
def load_module(name: str, module: nn.Module, state: Tensors, source: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PeftFormatError(f"{source}: module {name!r} is trained (modules_to_save or the seq-cls head) but "
                              f"tensor {peft_key(f'{name}.{missing[0]}')!r} is missing; re-save the adapter, or pass "
                              f"the --task it was trained for")
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None or tensor.shape != want.shape:
            need = f"the base's {name}.{key} has {tuple(want.shape)}" if want is not None else f"{name} has no {key}"
            raise PeftFormatError(f"{source}: tensor {peft_key(f'{name}.{key}')!r} has shape {tuple(tensor.shape)}, "
                                  f"{need}; is --base the model this adapter was trained on (for a head: "
                                  f"--num-labels)?")
    module.load_state_dict(state, strict=True)


# ---- writing a new folder --------------------------------------------------------------------------------
def check_out(out: Path) -> None:
    """``--out`` is a new or an empty folder (nothing of the user's is overwritten)."""
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out}: exists and is not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutFolderError(f"--out {out}: the folder is not empty; choose a new or empty folder (nothing was "
                             f"written)")


def write_new_folder(out: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write`` on a temporary folder beside ``out``, then rename it to ``out``; on failure no ``out`` is left."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        write(staging)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        os.replace(staging, out)  # onto an empty folder too
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


# ---- import and export -----------------------------------------------------------------------------------
def import_peft(folder: str | Path, out: str | Path, base: str | None = None, task: str | None = None,
                num_labels: int | None = None) -> AdaptedModel:
    """Turn a PEFT LoRA folder into our checkpoint at ``out`` and return the adapted model."""
    folder, out = Path(folder), Path(out)
    check_out(out)
    peft = read_peft_config(folder)
    source = folder / PEFT_WEIGHTS
    layers, others = split_peft_tensors(read_peft_tensors(folder), source)
    if not layers:
        raise PeftFormatError(f"{source}: holds no lora_A/lora_B tensors; nothing to import")
    check_ranks(layers, peft.r, source)
    check_targeted(layers, peft.target_modules, source)
    base = base or peft.base_model_name_or_path
    if not base:
        raise PeftFormatError(f"{folder / PEFT_CONFIG}: base_model_name_or_path is empty; pass --base MODEL")
    task = resolve_task(peft, task, folder / PEFT_CONFIG)
    adapted = adapt(peft, layers, base, task, resolve_num_labels(task, num_labels, others, source), out, source)
    load_lora(adapted, layers, source)
    load_modules(adapted, others, source)
    write_new_folder(out, lambda staging: save_checkpoint(adapted, staging, extra={"imported_from": str(folder)}))
    return adapted


def peft_tensors(adapted: AdaptedModel) -> tuple[Tensors, list[str]]:
    """PEFT's keys -> tensors (LoRA pairs and saved modules), and the saved modules' names."""
    tensors: Tensors = {}
    for name, layer in adapted.layers.items():
        for part in LORA_PARTS:
            tensors[peft_key(name, part)] = getattr(layer, part)
    modules = saved_modules(adapted)
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            tensors[peft_key(f"{name}.{key}")] = tensor
    return {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}, list(modules)


def export_peft(adapted: AdaptedModel, out: str | Path, source: str = "the adapted model") -> Path:
    """Write a LoRA adapted model as a new PEFT folder (loads with ``PeftModel.from_pretrained``); ``source`` names
    the model in errors. Non-finite tensors are refused before anything is written."""
    out = Path(out)
    method = adapted.config.method
    if method.name != "lora":
        raise PeftFormatError(f"method {method.name!r}: PEFT has no such adapter; only lora can be written")
    check_out(out)
    tensors, saved = peft_tensors(adapted)
    check_values(tensors, source, f"refusing to export it (nothing was written to {out}); retrain or restore the "
                                  f"checkpoint")
    fan_in_fan_out = any(isinstance(layer.base, Conv1D) for layer in adapted.layers.values())
    config = json.dumps(peft_config(adapted, fan_in_fan_out, saved), indent=2) + "\n"

    def write(staging: Path) -> None:
        save_file(tensors, staging / PEFT_WEIGHTS, metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(config)

    return write_new_folder(out, write)


def peft_config(adapted: AdaptedModel, fan_in_fan_out: bool, saved: list[str]) -> dict[str, Any]:
    method = adapted.config.method
    return {
        "peft_type": "LORA",
        "task_type": {v: k for k, v in TASKS.items()}[adapted.config.model.task],
        "base_model_name_or_path": adapted.config.model.name_or_path,
        "r": method.r,
        "lora_alpha": method.resolved_alpha,
        "lora_dropout": method.dropout,
        "use_rslora": method.rslora,
        "target_modules": sorted(adapted.layers),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": saved or None,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgery.peft_interop", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="PEFT LoRA folder -> our checkpoint")
    imp.add_argument("peft_dir", type=Path)
    imp.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (new or empty)")
    imp.add_argument("--base", help="base model path (default: the adapter's base_model_name_or_path)")
    imp.add_argument("--task", choices=sorted(TASKS.values()), help="default: from the adapter's task_type")
    imp.add_argument("--num-labels", type=int, help="seq-cls: number of labels (default: the saved head's rows)")
    exp = commands.add_parser("export", help="our LoRA checkpoint -> PEFT folder")
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("--out", type=Path, required=True, help="PEFT folder to write (new or empty)")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            import_peft(args.peft_dir, args.out, base=args.base, task=args.task, num_labels=args.num_labels)
        else:
            export_peft(load_checkpoint(args.checkpoint), args.out, source=f"checkpoint {args.checkpoint}")
    except (CheckpointError, ModelLoadError, ValueError, OSError) as error:  # ValueError: ours, config, targets
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
