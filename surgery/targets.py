"""Which layers to adapt: names (full name or ``.name`` suffix), one regex string, or ``all-linear``."""

from __future__ import annotations

import difflib
import re

from torch import nn

from surgery.layers import is_adaptable

ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")


class TargetError(ValueError):
    """The targets matched nothing, or something that cannot be adapted."""


def _name_matches(name: str, spec: str) -> bool:
    return name == spec or name.endswith("." + spec)


def _is_output_head(name: str) -> bool:
    return any(part in OUTPUT_HEADS for part in name.split("."))


def match(name: str, spec: list[str] | str) -> bool:
    """Does the qualified module name match a target spec?"""
    if isinstance(spec, list):
        return any(_name_matches(name, s) for s in spec)
    if spec == ALL_LINEAR:
        return not _is_output_head(name)
    return re.fullmatch(spec, name) is not None


def resolve_targets(
    model: nn.Module, targets: list[str] | str, exclude: list[str] | str = ()
) -> dict[str, nn.Module]:
    """Qualified name -> layer for every adaptable layer matched by ``targets`` and not by ``exclude``.

    Raises :class:`TargetError` listing the closest module names when nothing matches, and when a name
    matches a layer that is neither ``nn.Linear`` nor ``Conv1D``.
    """
    _check_regex(targets, "targets")
    _check_regex(exclude, "exclude")
    exclude = list(exclude) if not isinstance(exclude, str) else exclude
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not match(name, targets) or (exclude and match(name, exclude)):
            continue
        if is_adaptable(module):
            found[name] = module
        elif isinstance(targets, list) and not any(is_adaptable(m) for m in module.modules()):
            raise TargetError(
                f"targets: {name!r} is a {type(module).__name__}; only nn.Linear and Conv1D layers can be adapted"
            )
    if not found:
        raise TargetError(_no_match_message(model, targets, exclude))
    return found


def _check_regex(spec: list[str] | str, key: str) -> None:
    if isinstance(spec, str) and spec != ALL_LINEAR:
        try:
            re.compile(spec)
        except re.error as error:
            raise TargetError(f"{key}: {spec!r} is not a valid regular expression ({error})") from None


def _no_match_message(model: nn.Module, targets: list[str] | str, exclude: list[str] | str) -> str:
    adaptable = [n for n, m in model.named_modules() if is_adaptable(m)]
    short = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    wanted = targets if isinstance(targets, list) else [targets]
    close: list[str] = []
    for spec in wanted:
        close += difflib.get_close_matches(spec.rsplit(".", 1)[-1], short, n=3, cutoff=0.4)
    hint = f"closest layer names: {', '.join(dict.fromkeys(close))}; " if close else ""
    return (
        f"targets {targets!r} (exclude {exclude!r}) matched no Linear/Conv1D layer of "
        f"{type(model).__name__}; {hint}adaptable layer names here: {', '.join(short)}"
    )


def head_module_names(model: nn.Module) -> list[str]:
    """The classification head's top-level module names (``classifier``, ``score``) present in the model."""
    return [name for name, _ in model.named_children() if name in ("classifier", "score")]
