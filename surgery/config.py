"""The YAML config and its typed schema. Everything is checked here, before any model is loaded.

A typo, a wrong type, a key of another method or a contradiction raises :class:`ConfigError` naming the key's
path, the bad value and what is allowed.

Types are strict: a value is validated as the JSON it would be, so ``r: true``, ``r: "8"`` or
``trust_remote_code: "yes"`` are refused (naming the key and the type it wants) instead of coerced; an integer
where a number is wanted (``lr: 1``) is fine. The YAML is read with :class:`ConfigLoader`: YAML 1.2 scalars
(only ``true``/``false`` are booleans, ``1e-4`` is a number, dates stay strings), duplicate keys refused with
both lines, aliases expanded into at most :data:`MAX_NODES` nodes, and the file must be UTF-8.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from surgery.methods import METHODS, MethodConfig, method_config_union
from surgery.targets import ALL_LINEAR
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

    @field_validator("targets", "exclude")
    @classmethod
    def _regex_compiles(cls, value: TargetSpec) -> TargetSpec:
        if isinstance(value, str) and value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{value!r} is not a valid regular expression ({error}); a single string is "
                                 "matched as a regex against whole module names (or give a list of names)") from None
        return value


# ---- reading YAML ------------------------------------------------------------------------------------------
MAX_NODES = 100_000  # scalars, lists and mappings of one config with every alias expanded (a real one has < 200)
MAX_DEPTH = 64  # nesting levels (a real config has 4)
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_STR = "tag:yaml.org,2002:str"


class _Yaml12Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core-schema scalars: only true/false are booleans (``yes``, ``on``, ``no`` stay strings), ``1e-4``
    is a number as in JSON, ``0777`` is decimal, and dates stay strings (no config key is a date)."""


for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (_INT, r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (_FLOAT, r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
             r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
    ("tag:yaml.org,2002:merge", r"^<<$", "<"),
):
    _Yaml12Resolver.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


class ConfigLoader(
    yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
    yaml.constructor.SafeConstructor, _Yaml12Resolver,
):
    """PyYAML's safe loader with YAML 1.2 scalars, no duplicate keys and bounded alias expansion.

    Every refusal is a :class:`ConfigError` naming the file, the line and the key path.
    """

    # dates, binary, sets and ordered pairs are no config value; an explicit tag for one is refused with its line
    yaml_constructors = {
        tag: construct for tag, construct in yaml.constructor.SafeConstructor.yaml_constructors.items()
        if tag not in {f"tag:yaml.org,2002:{t}" for t in ("timestamp", "binary", "set", "omap", "pairs")}
    }

    def __init__(self, text: str, name: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Yaml12Resolver.__init__(self)
        self.name = name  # marks (line, column) in PyYAML's own errors then name the file
        self._expanded: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded
        self._path: list[str] = []  # the key path of the node being composed

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if isinstance(index, ScalarNode):
            self._path.append(index.value)
        elif isinstance(index, int):
            self._path.append(str(index))
        try:
            return self._compose_counted(parent, index)
        finally:
            if isinstance(index, (ScalarNode, int)):
                self._path.pop()

    def _compose_counted(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if len(self._path) > MAX_DEPTH:
            self._refuse(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._expanded:
                self._refuse(event.start_mark, f"alias *{event.anchor} refers to a node that contains it")
            return super().compose_node(parent, index)  # an undefined alias: PyYAML's error, with its line
        node = super().compose_node(parent, index)
        children = node.value if isinstance(node, SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, MappingNode) else [])
        size = 1 + sum(self._expanded[id(child)] for child in children)
        if size > MAX_NODES:
            self._refuse(node.start_mark, f"expands to more than {MAX_NODES} values through aliases (*name); a "
                                          "config is small: write it out, or use fewer nested aliases")
        self._expanded[id(node)] = size
        if isinstance(node, MappingNode):
            self._check_unique_keys(node)
        return node

    def _check_unique_keys(self, node: MappingNode) -> None:
        first_seen: dict[tuple[str, str], ScalarNode] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            earlier = first_seen.setdefault((key.tag, key.value), key)
            if earlier is not key:
                path = ".".join([*self._path, key.value])
                self._refuse(key.start_mark, f"duplicate key {path} (first at line {earlier.start_mark.line + 1}); "
                                             "YAML would keep only the last: remove one", at=False)

    def _refuse(self, mark: yaml.Mark, problem: str, at: bool = True) -> None:
        shown = self._path if len(self._path) <= 8 else [*self._path[:8], "..."]
        where = f" (at {'.'.join(shown)})" if at and shown else ""
        raise ConfigError(f"{self.name} line {mark.line + 1}: {problem}{where}")


def _construct_int(loader: ConfigLoader, node: ScalarNode) -> int:
    text = node.value.replace("_", "")
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


ConfigLoader.add_constructor(_INT, _construct_int)


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that also quotes the strings :class:`ConfigLoader` would read as another type
    (``"1e-3"``), so a dumped config loads back the same with either loader."""

    _yaml12 = _Yaml12Resolver()

    def resolve(self, kind: type[Node], value: Any, implicit: tuple[bool, bool]) -> str:
        tag = super().resolve(kind, value, implicit)
        if kind is ScalarNode and tag == _STR and implicit[0]:
            return self._yaml12.resolve(kind, value, implicit)
        return tag


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` as plain data; :class:`ConfigError` names the file and line (or byte)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte offset {error.start} (line {line}) is "
                          f"0x{data[error.start]:02x}; save the file as UTF-8") from None
    return yaml_value(text, str(path))


def yaml_value(text: str, name: str) -> Any:
    """``text`` read as configs read YAML (YAML 1.2 scalars, no duplicate keys, bounded aliases); errors name
    ``name`` (a file, or e.g. ``--override KEY=VALUE``)."""
    try:
        loader = ConfigLoader(text, name)
    except yaml.reader.ReaderError as error:  # a control character: PyYAML checks the whole text first
        offset = len(text[:error.position].encode("utf-8"))
        raise ConfigError(f"{name}: not valid YAML: character #x{error.character:04x} at byte offset {offset} (line "
                          f"{text.count(chr(10), 0, error.position) + 1}) is not allowed in YAML; remove it") from None
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"{name}: not valid YAML: {error}") from None
    finally:
        loader.dispose()


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SurgeryConfig:
    """Read and validate a YAML config; ``overrides`` (top-level keys) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (model, targets, method, ...), got {type(raw).__name__}")
    raw.update(overrides or {})
    return parse_config(raw, source=str(path))


# ---- validating --------------------------------------------------------------------------------------------
def parse_config(raw: dict[str, Any], source: str = "config") -> SurgeryConfig:
    """Validate plain data (as YAML or JSON give it; ``Path`` values are taken as strings) strictly.

    The data is validated as JSON in pydantic's strict mode: no value changes type on the way in (``"8"`` is no
    integer, ``1`` no boolean), except an integer where a number is wanted.
    """
    document = json.dumps(_as_json(raw, source, ()))
    try:
        return SurgeryConfig.model_validate_json(document, strict=True)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, raw, source)) from None


def _as_json(value: Any, source: str, loc: tuple[str, ...]) -> Any:
    """``value`` with paths as strings; anything JSON has no type for is refused, naming its key path."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        plain = {str(key): _as_json(item, source, (*loc, str(key))) for key, item in value.items()}
        if len(plain) < len(value):
            raise ConfigError(f"{source}: {'.'.join(loc) or '<top level>'}: two keys read as the same name "
                              f"({sorted(map(repr, value))}); keep one")
        return plain
    if isinstance(value, (list, tuple)):
        return [_as_json(item, source, (*loc, str(i))) for i, item in enumerate(value)]
    raise ConfigError(f"{source}: {'.'.join(loc) or '<top level>'}: a {type(value).__name__} ({value!r}) is no "
                      "config value; use a string, number, true/false, list or mapping")


def format_validation_error(error: ValidationError, raw: dict[str, Any], source: str) -> str:
    method = raw.get("method")
    method_name = method.get("name") if isinstance(method, dict) else None
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for item in error.errors():
        lines.append("  " + _describe(item, method_name))
    return "\n".join(lines)


# what a wrong-type error adds after the value: how to write the type the key wants
TYPE_HINTS = {
    "bool_type": "only true or false, unquoted, set it",
    "int_type": "write a whole number, unquoted",
    "float_type": "write a number, unquoted",
    "string_type": "write a string",
    "list_type": "write a list, e.g. [a, b]",
}


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
    if item["type"] in TYPE_HINTS:
        return f"{loc}: {item['msg']} (got {value!r}, {_yaml_kind(value)}); {TYPE_HINTS[item['type']]}"
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{loc}: {item['msg']}{shown}"


def _yaml_kind(value: Any) -> str:
    """What a YAML/JSON value is, in the words of the file (``true`` is a boolean, ``"1"`` a string)."""
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _key_path(loc: tuple[Any, ...]) -> str:
    """Join a pydantic location, dropping the tags pydantic inserts: the method's name after ``method``, and the
    branch of ``targets``/``exclude`` (``list[str]`` or ``str``) a union error comes from."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "method" and parts[1] in METHODS:
        parts.pop(1)
    if len(parts) > 1 and parts[0] in ("targets", "exclude") and parts[1] in ("list[str]", "str"):
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


# ---- checks against the file system and the model's config.json, before any weight is loaded -----------------
# Fields of config.json that bound a sequence's length, in this order (GPT-2 aliases max_position_embeddings to
# n_positions, so n_positions names the field the file really holds); export.run reads the same two.
POSITION_FIELDS = ("n_positions", "max_position_embeddings")
# Encoders that number positions from pad_token_id + 1: that many positions are never reachable (RoBERTa: 514 -> 512).
PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "data2vec-text"}


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that is a file, or that cannot be created or written; creates nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is an existing file, not a folder; choose another output_dir")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir: {output_dir} cannot be created: {existing} is a file, not a folder; choose "
                          "another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {output_dir} cannot be written: {existing} is not writable by this user; "
                          "choose another output_dir or fix the folder's permissions")


def model_positions(hf_config: Any) -> tuple[int, str] | None:
    """The most tokens one sequence may have by the model's config.json, and the field that says so."""
    for field in POSITION_FIELDS:
        positions = getattr(hf_config, field, None)
        if isinstance(positions, int) and positions > 0:
            pad = getattr(hf_config, "pad_token_id", None)
            if getattr(hf_config, "model_type", None) in PADDING_OFFSET_TYPES and isinstance(pad, int):
                return positions - pad - 1, (f"{field} = {positions} in config.json, less pad_token_id + 1 = "
                                             f"{pad + 1}: positions start after the padding index")
            return positions, f"{field} in config.json"
    return None


def check_max_length(config: SurgeryConfig, hf_config: Any) -> None:
    """Refuse a ``train.data.max_length`` longer than the positions of the model (its config.json only)."""
    limit = model_positions(hf_config)
    if config.train is None or limit is None or config.train.data.max_length <= limit[0]:
        return
    positions, source = limit
    raise ConfigError(f"train.data.max_length: {config.train.data.max_length} is more than the {positions} positions "
                      f"of model {config.model.name_or_path!r} ({source}); set it to {positions} "
                      "or less")


def dump_config(config: SurgeryConfig) -> str:
    """The resolved config as YAML (defaults filled in), as saved with every checkpoint.

    It loads back to the same config: of the two warm-up keys only the one in effect is written (``train:`` refuses
    ``warmup_steps`` beside an explicit ``warmup_ratio``, and the filled-in default ``warmup_ratio: 0.0`` would be one).
    """
    resolved = config.model_dump(mode="json")
    train = resolved.get("train")
    if train is not None:
        train.pop("warmup_ratio" if train["warmup_steps"] is not None else "warmup_steps")
    return yaml.dump(resolved, Dumper=ConfigDumper, sort_keys=False)
