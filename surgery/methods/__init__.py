"""The method registry: config name -> adapter class. Adding a method is one file and one line here."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from surgery.methods.base import AdapterLayer, Fold, Macs, MethodConfig, TrainProgress
from surgery.methods.lora import LoRALayer

METHODS: dict[str, type[AdapterLayer]] = {
    "lora": LoRALayer,
}
# Registration lines, one per method (each file appends its own with register(...)):
from surgery.methods.proda import ProDALayer  # noqa: E402
METHODS["proda"] = ProDALayer
from surgery.methods.pera import PERALayer  # noqa: E402
METHODS["pera"] = PERALayer
from surgery.methods.loda import LoDALayer, LoDAPlusLayer  # noqa: E402
METHODS["loda"] = LoDALayer
METHODS["loda_plus"] = LoDAPlusLayer
from surgery.methods.r_loda import RLoDALayer, RLoDAPlusLayer  # noqa: E402
METHODS["r_loda"] = RLoDALayer
METHODS["r_loda_plus"] = RLoDAPlusLayer
from surgery.methods.s_loda import SLoDALayer, SLoDAPlusLayer  # noqa: E402
METHODS["s_loda"] = SLoDALayer
METHODS["s_loda_plus"] = SLoDAPlusLayer
from surgery.methods.cla import CLALayer  # noqa: E402
METHODS["cla"] = CLALayer
from surgery.methods.c3la import C3LALayer  # noqa: E402
METHODS["c3la"] = C3LALayer


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
