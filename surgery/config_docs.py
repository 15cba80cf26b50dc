"""Render every config key (type, default, description) as markdown, straight from the schema.

    python -m surgery.config_docs > docs/config_keys.md

The README's key tables are this output; a test keeps them in sync with the schema.
"""

from __future__ import annotations

import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from surgery.config import ModelConfig, SurgeryConfig
from surgery.methods import METHODS
from train.config import DataConfig, TrainConfig

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", SurgeryConfig),
    ("model", ModelConfig),
    ("train", TrainConfig),
    ("train.data", DataConfig),
]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return "method"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _is_section(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        return True
    candidates = typing.get_args(annotation) or (annotation,)
    return any(isinstance(c, type) and issubclass(c, BaseModel) for c in candidates)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default}`" if field.default is not None else "`null`"


def _rows(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind = "section" if _is_section(field.annotation) else _type_name(field.annotation)
        default = _default(field)
        if name == "alpha" and field.default is None:
            default += f" (= {getattr(model, 'default_alpha', '2r')})"
        rows.append(f"| `{name}` | {kind} | {default} | {field.description or ''} |")
    return rows


def _table(title: str, rows: list[str]) -> list[str]:
    return [f"#### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]


def render() -> str:
    lines: list[str] = []
    for title, model in SECTIONS:
        lines += _table(title, _rows(model))
    for cls in dict.fromkeys(METHODS.values()):
        names = [n for n, c in METHODS.items() if c is cls]
        lines += _table(f"method (name: {' | '.join(names)})", _rows(cls.config_class, skip=("name",)))
    return "\n".join(lines)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
