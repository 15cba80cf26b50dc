"""The method registry: config name -> adapter class. Adding a method is one file and one line here."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from surgery.methods.base import AdapterLayer, Fold, Macs, MethodConfig, TrainProgress
from surgery.methods.c3la import C3LALayer
from surgery.methods.cla import CLALayer
from surgery.methods.loda import LoDALayer, LoDAPlusLayer
from surgery.methods.lora import LoRALayer
from surgery.methods.pera import PERALayer
from surgery.methods.proda import ProDALayer
from surgery.methods.r_loda import RLoDALayer, RLoDAPlusLayer
from surgery.methods.s_loda import SLoDALayer, SLoDAPlusLayer

METHODS: dict[str, type[AdapterLayer]] = {
    "lora": LoRALayer,
    "proda": ProDALayer,
    "loda": LoDALayer,
    "loda_plus": LoDAPlusLayer,
    "r_loda": RLoDALayer,
    "r_loda_plus": RLoDAPlusLayer,
    "s_loda": SLoDALayer,
    "s_loda_plus": SLoDAPlusLayer,
    "cla": CLALayer,
    "c3la": C3LALayer,
    "pera": PERALayer,
}


def method_class(name: str) -> type[AdapterLayer]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def method_config_union() -> object:
    """The discriminated union of every registered method's config, for the YAML schema."""
    configs = tuple(cls.config_class for cls in dict.fromkeys(METHODS.values()))
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="name")]  # noqa: UP007


__all__ = [
    "METHODS",
    "AdapterLayer",
    "Fold",
    "Macs",
    "MethodConfig",
    "TrainProgress",
    "method_class",
    "method_config_union",
]
