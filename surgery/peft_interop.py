"""PEFT interop: read a PEFT LoRA adapter folder as our LoRA checkpoint, and write our LoRA in PEFT's format.

    python -m surgery.peft_interop import PEFT_DIR --out CKPT [--base MODEL] [--task causal-lm|seq-cls]
    python -m surgery.peft_interop export CKPT --out PEFT_DIR

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.lora_A.weight`` (r, d_in) and ``...lora_B.weight`` (d_out, r), the same layout as ours
for Linear and for GPT-2's Conv1D (PEFT's ``fan_in_fan_out`` only concerns the base weight). Only plain LoRA is
read: DoRA, per-layer rank/alpha patterns, trained biases and embedding adapters are refused by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from surgery.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from surgery.config import SurgeryConfig, parse_config
from surgery.model import load_model
from surgery.rewrite import AdaptedModel, apply_surgery

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False}


class PeftFormatError(ValueError):
    """A PEFT folder this importer cannot represent as a plain LoRA checkpoint."""


def read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise PeftFormatError(f"{folder}: no {PEFT_CONFIG}; is this a PEFT adapter folder?")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters can be imported")
    for key, plain in UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None):
            raise PeftFormatError(f"{path}: {key}={config[key]!r} is not plain LoRA and cannot be imported")
    return config


def split_peft_tensors(tensors: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(layer -> {lora_A, lora_B}, module -> {param: tensor}) from PEFT's flat keys."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise PeftFormatError(f"{source}: unexpected tensor key {key!r} (expected the prefix {PREFIX!r})")
        name = key[len(PREFIX):]
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                layers.setdefault(name[: -len(marker)], {})[part] = tensor
                break
        else:
            module, _, param = name.rpartition(".")
            if "lora_embedding" in name or "lora_" in param:
                raise PeftFormatError(f"{source}: {key!r} is an adapter type this importer does not read")
            modules.setdefault(module, {})[param] = tensor
    return layers, modules


def import_peft(folder: str | Path, out: str | Path, base: str | None = None, task: str | None = None) -> AdaptedModel:
    """Turn a PEFT LoRA folder into our checkpoint at ``out`` and return the adapted model."""
    folder, out = Path(folder), Path(out)
    peft_config = read_peft_config(folder)
    tensors = load_file(folder / PEFT_WEIGHTS)
    layers, modules = split_peft_tensors(tensors, folder / PEFT_WEIGHTS)
    base = base or peft_config.get("base_model_name_or_path")
    if not base:
        raise PeftFormatError(f"{folder / PEFT_CONFIG}: base_model_name_or_path is empty; pass --base MODEL")
    config = _surgery_config(peft_config, sorted(layers), base, task, out)
    adapted = apply_surgery(load_model(config.model), config)
    _load_lora(adapted, layers, folder)
    _load_modules(adapted, modules, folder)
    save_checkpoint(adapted, out, extra={"imported_from": str(folder)})
    return adapted


def _surgery_config(peft: dict[str, Any], layer_names: list[str], base: str, task: str | None,
                    out: Path) -> SurgeryConfig:
    task = task or TASKS.get(peft.get("task_type") or "", "causal-lm")
    saved = [m for m in (peft.get("modules_to_save") or []) if m not in ("classifier", "score")]
    return parse_config({
        "model": {"name_or_path": base, "task": task},
        "targets": layer_names,
        "method": {"name": "lora", "r": peft["r"], "alpha": peft["lora_alpha"],
                   "dropout": peft.get("lora_dropout", 0.0), "rslora": peft.get("use_rslora", False)},
        "modules_to_train": saved,
        "output_dir": str(out),
    }, source=f"PEFT config of {base}")


@torch.no_grad()
def _load_lora(adapted: AdaptedModel, layers: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    for name, layer in adapted.layers.items():
        pair = layers[name]
        for part in ("lora_A", "lora_B"):
            target = getattr(layer, part)
            if part not in pair or pair[part].shape != target.shape:
                raise PeftFormatError(
                    f"{folder / PEFT_WEIGHTS}: {name}.{part} has shape "
                    f"{tuple(pair[part].shape) if part in pair else 'missing'}, the base layer needs "
                    f"{tuple(target.shape)}; is --base the model this adapter was trained on?"
                )
            target.copy_(pair[part])


def _load_modules(adapted: AdaptedModel, modules: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    for name, state in modules.items():
        try:
            adapted.model.get_submodule(name).load_state_dict(state, strict=True)
        except (AttributeError, RuntimeError) as error:
            raise PeftFormatError(f"{folder / PEFT_WEIGHTS}: module {name!r} does not fit the base: {error}") from None


def export_peft(adapted: AdaptedModel, out: str | Path) -> Path:
    """Write a LoRA adapted model as a PEFT folder (loads with ``PeftModel.from_pretrained``)."""
    out = Path(out)
    method = adapted.config.method
    if method.name != "lora":
        raise PeftFormatError(f"method {method.name!r}: PEFT has no such adapter; only lora can be written")
    tensors: dict[str, torch.Tensor] = {}
    fan_in_fan_out = False
    for name, layer in adapted.layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
        fan_in_fan_out |= isinstance(layer.base, Conv1D)
    trained = list(adapted.trained_modules)
    for name, module in adapted.trained_modules.items():
        for key, tensor in module.state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / PEFT_WEIGHTS, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(_peft_config(adapted, fan_in_fan_out, trained), indent=2) + "\n")
    return out


def _peft_config(adapted: AdaptedModel, fan_in_fan_out: bool, trained: list[str]) -> dict[str, Any]:
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
        "modules_to_save": trained or None,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgery.peft_interop", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="PEFT LoRA folder -> our checkpoint")
    imp.add_argument("peft_dir", type=Path)
    imp.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    imp.add_argument("--base", help="base model path (default: the adapter's base_model_name_or_path)")
    imp.add_argument("--task", choices=sorted(TASKS.values()), help="default: from the adapter's task_type")
    exp = commands.add_parser("export", help="our LoRA checkpoint -> PEFT folder")
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("--out", type=Path, required=True, help="PEFT folder to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            import_peft(args.peft_dir, args.out, base=args.base, task=args.task)
        else:
            export_peft(load_checkpoint(args.checkpoint), args.out)
    except (PeftFormatError, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
