"""The YAML config and its typed schema. Everything is checked here, before any model is loaded.

A typo, a wrong type, a key of another method or a contradiction raises :class:`ConfigError` naming the key's
path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surgery.methods import METHODS, MethodConfig, method_config_union
from train.config import TrainConfig

TargetSpec = list[str] | str
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and says what is allowed."""


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name_or_path: str = Field(description="folder with config.json (+ weights), or a hub id where a hub is reachable")
    task: Literal["causal-lm", "seq-cls"] = Field("causal-lm", description="what the model is trained and exported for")
    num_labels: int | None = Field(None, ge=2, description="seq-cls only; 2 when omitted")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the base weights (adapters train in float32 under half precision)"
    )
    trust_remote_code: bool = Field(False, description="run the model repository's own code; off unless set")

    @model_validator(mode="after")
    def _labels_only_for_classification(self) -> ModelConfig:
        if self.task == "causal-lm" and self.num_labels is not None:
            raise ValueError("model.num_labels is for task: seq-cls only; remove it or set task: seq-cls")
        return self

    @property
    def labels(self) -> int:
        return self.num_labels or 2


class SurgeryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(description="the pretrained model (section `model`)")
    targets: TargetSpec = Field(
        description="module names (full name or '.name' suffix), one regex string, or 'all-linear'"
    )
    exclude: TargetSpec = Field(default_factory=list, description="same forms as targets; removed from the match")
    method: method_config_union() = Field(  # type: ignore[valid-type]
        description="the adapter method and its keys (sections `method (name: ...)`)"
    )
    train_head: bool = Field(True, description="seq-cls: train the new classification head in full")
    modules_to_train: list[str] = Field(
        default_factory=list, description="other modules trained in full (names as in targets)"
    )
    train: TrainConfig | None = Field(None, description="training (section `train`); surgery and save only when absent")
    output_dir: Path = Field(Path("runs/default"), description="the checkpoint folder")

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value: TargetSpec) -> TargetSpec:
        if (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
            raise ValueError("targets is empty; name the layers to adapt, e.g. [q_proj, v_proj] or all-linear")
        return value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SurgeryConfig:
    """Read and validate a YAML config; ``overrides`` (top-level keys) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (model, targets, method, ...), got {type(raw).__name__}")
    raw.update(overrides or {})
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> SurgeryConfig:
    try:
        return SurgeryConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, raw, source)) from None


def format_validation_error(error: ValidationError, raw: dict[str, Any], source: str) -> str:
    method = raw.get("method")
    method_name = method.get("name") if isinstance(method, dict) else None
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for item in error.errors():
        lines.append("  " + _describe(item, method_name))
    return "\n".join(lines)


def _describe(item: dict[str, Any], method_name: str | None) -> str:
    loc = _key_path(item["loc"])
    if item["type"] == "extra_forbidden":
        key = str(item["loc"][-1])
        allowed = _allowed_keys(item["loc"], method_name)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        owners = [n for n, cls in METHODS.items() if key in cls.config_class.model_fields]
        if item["loc"][0] == "method" and owners:
            hint = f" for method {method_name!r} (it belongs to {', '.join(owners)})"
        return f"{loc}: unknown key{hint}; allowed here: {', '.join(allowed)}"
    if item["type"] == "missing":
        return f"{loc}: required key is missing"
    value = item.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{loc}: {item['msg']}{shown}"


def _key_path(loc: tuple[Any, ...]) -> str:
    """Join a pydantic location, dropping the discriminator tag pydantic inserts after ``method``."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "method" and parts[1] in METHODS:
        parts.pop(1)
    return ".".join(parts) or "<top level>"


def _allowed_keys(loc: tuple[Any, ...], method_name: str | None) -> list[str]:
    parent = loc[:-1]
    if parent and parent[0] == "method":
        model: type[BaseModel] = METHODS[method_name].config_class if method_name in METHODS else MethodConfig
        return list(model.model_fields)
    model = SurgeryConfig
    for part in parent:
        annotation = model.model_fields[str(part)].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next(c for c in candidates if issubclass(c, BaseModel))
    return list(model.model_fields)


def dump_config(config: SurgeryConfig) -> str:
    """The resolved config as YAML (defaults filled in), as saved with every checkpoint.

    It loads back to the same config: of the two warm-up keys only the one in effect is written (``train:`` refuses
    ``warmup_steps`` beside an explicit ``warmup_ratio``, and the filled-in default ``warmup_ratio: 0.0`` would be one).
    """
    resolved = config.model_dump(mode="json")
    train = resolved.get("train")
    if train is not None:
        train.pop("warmup_ratio" if train["warmup_steps"] is not None else "warmup_steps")
    return yaml.safe_dump(resolved, sort_keys=False)
