from pathlib import Path

import pytest
import yaml

from surgery.config import ConfigError, dump_config, load_config, parse_config

CONFIGS = Path(__file__).parents[2] / "configs"
SHIPPED = sorted(  # configs/accelerate holds accelerate launch's own config files, not surgery configs
    p for p in CONFIGS.glob("**/*.yaml") if CONFIGS / "accelerate" not in p.parents
)
BASE = {"model": {"name_or_path": "x", "task": "seq-cls"}, "targets": ["query"], "method": {"name": "lora", "r": 4}}


def with_(**changes):
    return {**BASE, **changes}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_(method={"name": "lora", "r": 4, "d_b": 8}), "method.d_b: unknown key"),
        (with_(method={"name": "lora", "r": "four"}), "method.r: Input should be a valid integer"),
        (with_(method={"name": "lora", "r": 0}), "method.r: Input should be greater than 0"),
        (with_(method={"name": "lora", "r": True}), "method.r: Input should be a valid integer (got True, a boolean)"),
        (with_(model={"name_or_path": "x", "trust_remote_code": "true"}),
         "model.trust_remote_code: Input should be a valid boolean (got 'true', a string)"),
        (with_(targets="(query"), "targets: Value error, '(query' is not a valid regular expression"),
        (with_(method={"name": "prodaa"}), "method"),
        (with_(modle={}), "modle: unknown key (did you mean 'model'?)"),
        (with_(model={"name_or_path": "x", "taks": "seq-cls"}), "model.taks: unknown key (did you mean 'task'?)"),
        (with_(model={"name_or_path": "x", "num_labels": 3}), "num_labels is for task: seq-cls only"),
        (with_(model={"name_or_path": "x", "dtype": "float8"}), "model.dtype"),
        (with_(targets=[]), "targets is empty"),
        (with_(train={"data": {"train": "a"}, "lrr": 1}), "train.lrr: unknown key (did you mean 'lr'?)"),
        (with_(train={"data": {"train": "a"}}), "set `epochs` or `max_steps`"),
        ({"model": {"name_or_path": "x"}, "method": {"name": "lora"}}, "targets: required key is missing"),
    ],
)
def test_bad_config_names_the_key(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert expected in str(error.value)


def test_key_of_another_method_names_its_owner() -> None:
    from surgery.methods import METHODS

    if "proda" not in METHODS:
        pytest.skip("proda is not registered")
    with pytest.raises(ConfigError, match=r"method.d_b: unknown key for method 'lora' \(it belongs to proda\)"):
        parse_config(with_(method={"name": "lora", "d_b": 8}))


def test_defaults_filled_and_trust_remote_code_off() -> None:
    config = parse_config(BASE)
    assert config.model.trust_remote_code is False
    assert config.method.resolved_alpha == 8 and config.method.scaling == 2.0
    assert config.model.labels == 2


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_every_shipped_config_validates() -> None:
    assert SHIPPED, "configs/ ships at least one config"
    for path in SHIPPED:
        load_config(path)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_survives_dump_and_reload(path: Path, tmp_path: Path) -> None:
    """A checkpoint's surgery.yaml is dump_config of the resolved config; loading it must give the same config."""
    config = load_config(path)
    saved = tmp_path / "surgery.yaml"
    saved.write_text(dump_config(config))
    assert load_config(saved).model_dump() == config.model_dump()


@pytest.mark.parametrize(
    ("warmup", "steps_of_10k"), [({"warmup_steps": 500}, 500), ({"warmup_ratio": 0.06}, 600), ({}, 0)], ids=str
)
def test_warmup_survives_dump_and_reload(warmup: dict, steps_of_10k: int) -> None:
    config = parse_config(with_(train={"data": {"train": "a"}, "epochs": 1, **warmup}))
    reloaded = parse_config(yaml.safe_load(dump_config(config)))
    assert reloaded.model_dump() == config.model_dump()
    assert reloaded.train.warmup_for(10_000) == steps_of_10k


def test_dump_quotes_strings_a_yaml_reader_would_take_for_another_type(tmp_path: Path) -> None:
    """``1e5`` is a number to ConfigLoader (YAML 1.2) but a string to PyYAML's safe_load (YAML 1.1); ``yes`` the
    other way round. dump_config quotes both, so a checkpoint's surgery.yaml reads back the same with either."""
    config = parse_config(with_(model={"name_or_path": "1e5", "task": "seq-cls"}, targets="0x1f",
                                exclude=["yes", "no"]))
    saved = tmp_path / "surgery.yaml"
    saved.write_text(dump_config(config))
    assert load_config(saved).model_dump() == config.model_dump()
    assert parse_config(yaml.safe_load(saved.read_text())).model_dump() == config.model_dump()


def test_yaml_1_2_scalars(tmp_path: Path) -> None:
    """ConfigLoader reads YAML 1.2's core schema: 1e-3 is a number, yes/no/on and 2:4 stay strings (YAML 1.1 would
    give booleans and the base-60 number 124), 0777 is decimal, dates stay strings."""
    from surgery.config import read_yaml

    path = tmp_path / "scalars.yaml"
    path.write_text("lr: 1e-3\nyes: yes\nno: no\non: on\npattern: 2:4\nmode: 0777\nday: 2024-01-01\nbig: 1_000\n"
                    "flag: true\nnothing: null\n")
    assert read_yaml(path) == {"lr": 1e-3, "yes": "yes", "no": "no", "on": "on", "pattern": "2:4", "mode": 777,
                               "day": "2024-01-01", "big": 1000, "flag": True, "nothing": None}
