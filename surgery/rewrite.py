"""The rewrite itself: swap target layers for adapter layers and decide what trains."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.config import SurgeryConfig
from surgery.fingerprint import BaseDigest, BaseModelError, base_digest, non_finite_error
from surgery.layers import layer_dims
from surgery.methods import AdapterLayer, method_class
from surgery.model import initialised_at_load
from surgery.targets import TargetError, head_module_names, match, resolve_targets


@dataclass
class AdaptedModel:
    """A model after surgery, with what the pipeline needs to train, save and fold it."""

    model: nn.Module
    config: SurgeryConfig
    base_params: int
    base: BaseDigest  # every base tensor's digest, taken before surgery (surgery.fingerprint)
    trained_modules: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def base_fingerprint(self) -> str:
        return self.base.fingerprint

    @property
    def layers(self) -> dict[str, AdapterLayer]:
        return adapter_layers(self.model)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Qualified name -> parameter for everything that trains: declared adapter params and trained modules."""
        params: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            for param_name, param in layer.adapter_params().items():
                params[f"{name}.{param_name}"] = param
        for name, module in self.trained_modules.items():
            for param_name, param in module.named_parameters():
                params[f"{name}.{param_name}"] = param
        return params

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multiplier per trainable parameter (LoRA+ and friends)."""
        scales = {name: 1.0 for name in self.trainable_parameters()}
        for name, layer in self.layers.items():
            for param_name in layer.adapter_params():
                scales[f"{name}.{param_name}"] = layer.lr_scale(param_name)
        return scales


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def target_fingerprint(layers: dict[str, nn.Module]) -> str:
    """SHA-256 over the target layers' names, shapes, dtypes and weight bytes; "meta" for empty weights. What a
    format-1 checkpoint pinned (format 2 pins every tensor: surgery.fingerprint)."""
    digest = hashlib.sha256()
    for name in sorted(layers):
        for param_name, tensor in sorted(layers[name].state_dict().items()):
            if tensor.is_meta:
                return "meta"
            digest.update(f"{name}.{param_name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def apply_surgery(model: nn.Module, config: SurgeryConfig, trusted_base: dict[str, str] | None = None
                  ) -> AdaptedModel:
    """Wrap every target layer with the configured method, freeze the rest, and return the adapted model.

    The model's outputs are unchanged at initialisation (every method starts with delta = 0). Every base tensor is
    digested and checked for NaN/inf first (``trusted_base``: a checkpoint's saved digests, whose tensors were
    checked when it was saved and are not checked again).
    """
    if adapter_layers(model):
        raise ValueError("this model already holds adapter layers; load a fresh base model before surgery")
    base_params = sum(p.numel() for p in model.parameters())
    targets = resolve_targets(model, config.targets, config.exclude)
    cls = method_class(config.method.name)
    for name, layer in targets.items():
        cls.check_layer(*layer_dims(layer), config.method, name)
    base = base_digest(model, skip=initialised_at_load(model) | saved_tensor_names(model, config), trusted=trusted_base)
    if base.non_finite:
        raise BaseModelError(non_finite_error(base.non_finite, f"model.name_or_path: {config.model.name_or_path}",
                                              "the base model's files are damaged; load another copy of them"))
    for param in model.parameters():
        param.requires_grad_(False)
    for name, replacement in cls.wrap_targets(targets, config.method, model=model).items():
        model.set_submodule(name, replacement)
    trained = _trained_modules(model, config)
    for module in trained.values():
        module.requires_grad_(True)
    for layer in adapter_layers(model).values():
        for param in layer.adapter_params().values():
            param.requires_grad_(True)
    return AdaptedModel(model, config, base_params, base, trained)


def saved_tensor_names(model: nn.Module, config: SurgeryConfig) -> frozenset[str]:
    """State-dict keys the checkpoint itself stores (trained modules, a seq-cls head): not what pins the base."""
    modules = list(_trained_modules(model, config))
    modules += head_module_names(model) if config.model.task == "seq-cls" else []
    prefixes = tuple(f"{name}." for name in modules)
    return frozenset(key for key in model.state_dict() if prefixes and key.startswith(prefixes))


def _trained_modules(model: nn.Module, config: SurgeryConfig) -> dict[str, nn.Module]:
    """The seq-cls head (unless ``train_head: false``) and every module ``modules_to_train`` names."""
    names = head_module_names(model) if (config.model.task == "seq-cls" and config.train_head) else []
    for spec in config.modules_to_train:
        hits = [n for n, _ in model.named_modules() if n and match(n, [spec])]
        if not hits:
            raise TargetError(f"modules_to_train: {spec!r} matches no module of {type(model).__name__}")
        names += hits
    return {name: model.get_submodule(name) for name in dict.fromkeys(names)}
