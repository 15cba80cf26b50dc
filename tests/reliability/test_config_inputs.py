"""Issue 12, configs: every bad input to ``python -m surgery.apply CFG`` is refused with a message naming the key path,
the file and line (or byte offset), before any model is loaded, and no file of the user's changes: the config, the
data and ``output_dir`` hash the same after the refused run, and a refused run creates no ``output_dir``.

Each case runs the command line (``surgery.apply.main``, exit status 2 and its stderr) and the Python API
(``load_config``, ``read_rows`` + ``check_rows``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

import surgery.apply
from surgery.apply import main
from surgery.config import ConfigError, check_max_length, load_config, parse_config
from train.data import DataError, check_rows, read_rows
from tests.fs import tree_digest
from tests.tiny_models import tiny_config
from tests.train.helpers import sentiment_rows, tiny_base, write_jsonl

REPO = Path(__file__).parents[2]
BILLION_LAUGHS = "".join(  # 9 levels of 10 aliases each: 10^9 strings once expanded
    [f"l0: &l0 [{', '.join(['lol'] * 10)}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9)]
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A config-only tiny Llama (64 positions; enough for every refusal before loading) and a tiny BERT classifier
    with weights and tokenizer (for the data, which is read after the model loads)."""
    root = tmp_path_factory.mktemp("bases")
    tiny_config("llama").save_pretrained(root / "llama-config-only")
    return {"llama": root / "llama-config-only", "bert": tiny_base(root, "bert", "seq-cls")}


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before the model loads: loading it fails the test."""
    def load_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(surgery.apply, "load_model", load_model)


def write_config(folder: Path, model: Path, body: str, train: str | None = None, data: str = "") -> Path:
    """``folder/cfg.yaml``: the model section, ``body`` (targets, method, ...) and, where ``train`` is given, a
    ``train:`` section with those lines (``data``: lines of ``train.data``) whose data is ``folder/train.jsonl``
    (written here, 20 good rows). output_dir is ``folder/out``."""
    text = f"model:\n  name_or_path: {model}\n  task: seq-cls\n{body}output_dir: {folder / 'out'}\n"
    if train is not None:
        write_jsonl(folder / "train.jsonl", sentiment_rows(20, seed=0))
        text += f"train:\n  data:\n    train: {folder / 'train.jsonl'}\n{data}  max_steps: 1\n{train}"
    path = folder / "cfg.yaml"
    path.write_text(text)
    return path


def refuse(folder: Path, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the command line, check it refused with exit status 2 and changed nothing under ``folder``; its stderr."""
    before = tree_digest(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert tree_digest(folder) == before, "a refused run changed a file of the user's"
    assert not (folder / "out").exists(), "a refused run created output_dir"
    return err


def refused_config(path: Path) -> str:
    before = tree_digest(path.parent)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert tree_digest(path.parent) == before
    return str(error.value)


# ---- 1. strict types ---------------------------------------------------------------------------------------
LORA = "targets: [q_proj]\nmethod:\n  name: lora\n"
BERT_LORA = "targets: [query]\nmethod: {name: lora, r: 2}\n"
STRICT = {
    "r: true": (LORA + "  r: true\n", "method.r: Input should be a valid integer (got True, a boolean)"),
    "r: '8'": (LORA + "  r: '8'\n", "method.r: Input should be a valid integer (got '8', a string)"),
    "lora_plus_ratio: true": (LORA + "  lora_plus_ratio: true\n",
                              "method.lora_plus_ratio: Input should be a valid number (got True, a boolean)"),
    "dropout: '0.1'": (LORA + "  dropout: '0.1'\n",
                       "method.dropout: Input should be a valid number (got '0.1', a string)"),
    "targets: [q_proj, 1]": ("targets: [q_proj, 1]\nmethod: {name: lora}\n",
                             "targets.1: Input should be a valid string (got 1, an integer)"),
}


@pytest.mark.parametrize(("body", "expected"), STRICT.values(), ids=STRICT.keys())
def test_wrong_type_is_refused_naming_key_and_type(
    tmp_path: Path, bases: dict[str, Path], body: str, expected: str, capsys: pytest.CaptureFixture, no_model_load
) -> None:
    cfg = write_config(tmp_path, bases["llama"], body)
    assert expected in refuse(tmp_path, [str(cfg), "--dry-run"], capsys)
    assert expected in refused_config(cfg)


STRICT_TRAIN = {
    "lr: true": ("  lr: true\n", "train.lr: Input should be a valid number (got True, a boolean)"),
    "batch_size: 2.0": ("  epochs: 2.5\n  batch_size: 2.0\n",
                       "train.batch_size: Input should be a valid integer (got 2.0, a number)"),
    "eval_before_training: 1": ("  eval_before_training: 1\n",
                                "train.eval_before_training: Input should be a valid boolean (got 1, an integer)"),
}


@pytest.mark.parametrize(("train", "expected"), STRICT_TRAIN.values(), ids=STRICT_TRAIN.keys())
def test_wrong_type_in_train_is_refused(
    tmp_path: Path, bases: dict[str, Path], train: str, expected: str, capsys: pytest.CaptureFixture, no_model_load
) -> None:
    cfg = write_config(tmp_path, bases["llama"], LORA, train=train)
    assert expected in refuse(tmp_path, [str(cfg)], capsys)


@pytest.mark.parametrize("value", ['"yes"', "yes", "'true'", "on", "1"])
def test_trust_remote_code_is_only_enabled_by_true(
    tmp_path: Path, bases: dict[str, Path], value: str, capsys: pytest.CaptureFixture, no_model_load
) -> None:
    """A string (quoted, or YAML 1.1's unquoted yes/on) or a number never turns remote code on."""
    cfg = write_config(tmp_path, bases["llama"], LORA)
    cfg.write_text(cfg.read_text().replace("  task: seq-cls\n", f"  task: seq-cls\n  trust_remote_code: {value}\n"))
    err = refuse(tmp_path, [str(cfg), "--dry-run"], capsys)
    assert "model.trust_remote_code: Input should be a valid boolean" in err
    assert "only true or false, unquoted, set it" in err


def test_command_line_exit_status_and_stderr(tmp_path: Path, bases: dict[str, Path]) -> None:
    """``python -m surgery.apply`` itself: status 2, one ``error:`` message on stderr, nothing on stdout."""
    cfg = write_config(tmp_path, bases["llama"], LORA)
    cfg.write_text(cfg.read_text().replace("  task: seq-cls\n", "  task: seq-cls\n  trust_remote_code: 'yes'\n"))
    before = tree_digest(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "surgery.apply", str(cfg), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {cfg}: 1 problem(s)\n  model.trust_remote_code: Input should be a valid "
                                  "boolean (got 'yes', a string)")
    assert done.stdout == ""
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_int_for_a_number_and_yaml_spellings_still_load(tmp_path: Path, bases: dict[str, Path]) -> None:
    """Strict, not pedantic: an integer where a number is wanted, ``1e-3`` (a number in YAML 1.2 and JSON), an
    unquoted ``no``, and the explicit true/false are accepted."""
    cfg = write_config(tmp_path, bases["llama"], LORA + "  alpha: 8\n  rslora: false\n",
                       train="  lr: 1e-3\n  weight_decay: 0\n  mixed_precision: no\n")
    cfg.write_text(cfg.read_text().replace("  task: seq-cls\n", "  task: seq-cls\n  trust_remote_code: false\n"))
    config = load_config(cfg)
    assert config.method.alpha == 8.0 and isinstance(config.method.alpha, float)
    assert config.train.lr == 1e-3 and config.train.weight_decay == 0.0
    assert config.train.mixed_precision == "no" and config.model.trust_remote_code is False


def test_python_api_takes_paths_and_refuses_other_objects(tmp_path: Path) -> None:
    raw = {"model": {"name_or_path": tmp_path}, "targets": ("q_proj",), "method": {"name": "lora"},
           "output_dir": tmp_path / "out"}
    config = parse_config(raw)
    assert config.model.name_or_path == str(tmp_path) and config.output_dir == tmp_path / "out"
    with pytest.raises(ConfigError, match=r"config: method\.r: a set \(\{4\}\) is no config value"):
        parse_config({**raw, "method": {"name": "lora", "r": {4}}})
    with pytest.raises(ConfigError, match=r"config: method: two keys read as the same name"):
        parse_config({**raw, "method": {"name": "lora", 1: 2, "1": 3}})


# ---- 1. data labels ----------------------------------------------------------------------------------------
def write_rows_with(path: Path, bad_line: int, bad_row: str) -> Path:
    """A JSONL file of good seq-cls rows whose line ``bad_line`` is ``bad_row``."""
    lines = [json.dumps(row) for row in sentiment_rows(20, seed=0)]
    lines[bad_line - 1] = bad_row
    path.write_text("\n".join(lines) + "\n")
    return path


def test_string_label_in_jsonl_names_file_and_line(tmp_path: Path) -> None:
    data = write_rows_with(tmp_path / "train.jsonl", 3, '{"text": "w1 good w2", "label": "1"}')
    with pytest.raises(DataError) as error:
        check_rows(read_rows(data, "train.data.train"), "train.data.train", "seq-cls", 2)
    assert f"{data} line 3: label must be an integer class index, got '1', a string" in str(error.value)


def test_string_label_refused_by_the_command_line(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    cfg = write_config(tmp_path, bases["bert"], BERT_LORA, train="", data="    max_length: 32\n")
    data = write_rows_with(tmp_path / "train.jsonl", 3, '{"text": "w1 good w2", "label": "1"}')
    err = refuse(tmp_path, [str(cfg)], capsys)
    assert f"{data} line 3: label must be an integer class index, got '1', a string" in err


@pytest.mark.parametrize("label", ["true", "1.5", "null"])
def test_other_non_integer_labels_name_the_line(tmp_path: Path, label: str) -> None:
    data = write_rows_with(tmp_path / "train.jsonl", 2, f'{{"text": "w1 bad", "label": {label}}}')
    with pytest.raises(DataError, match=rf"{data} line 2: .*label"):
        check_rows(read_rows(data, "train.data.train"), "train.data.train", "seq-cls", 2)


# ---- 2. YAML: duplicate keys, alias bombs, UTF-8 ------------------------------------------------------------
def test_duplicate_key_names_key_and_both_lines(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    cfg = write_config(tmp_path, bases["llama"], LORA + "  r: 4\n  alpha: 8\n  r: 16\n")
    lines = cfg.read_text().splitlines()
    first, second = [i + 1 for i, line in enumerate(lines) if line == "  r: 4" or line == "  r: 16"]
    expected = f"{cfg} line {second}: duplicate key method.r (first at line {first})"
    assert expected in refuse(tmp_path, [str(cfg), "--dry-run"], capsys)
    assert expected in refused_config(cfg)


def test_duplicate_top_level_key(tmp_path: Path, bases: dict[str, Path]) -> None:
    cfg = write_config(tmp_path, bases["llama"], LORA + "targets: [v_proj]\n")
    assert f"{cfg} line 7: duplicate key targets (first at line 4)" in refused_config(cfg)


def test_alias_bomb_fails_fast(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    """The billion laughs: refused while composing (a few hundred nodes read), never expanded."""
    cfg = write_config(tmp_path, bases["llama"], LORA)
    cfg.write_text(cfg.read_text() + BILLION_LAUGHS)
    expected = f"{cfg} line 12: expands to more than 100000 values through aliases"  # l4: 111,111 nodes
    assert expected in refuse(tmp_path, [str(cfg), "--dry-run"], capsys)
    assert expected in refused_config(cfg)


def test_recursive_alias_is_refused(tmp_path: Path, bases: dict[str, Path]) -> None:
    cfg = write_config(tmp_path, bases["llama"], "targets: &t [q_proj, *t]\nmethod: {name: lora}\n")
    assert f"{cfg} line 4: alias *t refers to a node that contains it (at targets.1)" in refused_config(cfg)


def test_small_aliases_and_merge_keys_still_work(tmp_path: Path, bases: dict[str, Path]) -> None:
    cfg = write_config(tmp_path, bases["llama"],
                       "targets: &attn [q_proj, v_proj]\nexclude: []\nmodules_to_train: *attn\n"
                       "method:\n  <<: {name: lora, r: 4}\n  r: 8\n")
    config = load_config(cfg)
    assert config.modules_to_train == ["q_proj", "v_proj"] and config.method.r == 8  # an explicit key wins a merge


def test_config_not_utf8_names_file_and_byte(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    cfg = write_config(tmp_path, bases["llama"], LORA)
    text = cfg.read_bytes()
    cfg.write_bytes(text + "# r\xe9glage\n".encode("latin-1"))  # é in Latin-1: 0xe9, no UTF-8 byte sequence
    offset, line = len(text) + len("# r"), len(text.splitlines()) + 1
    expected = f"{cfg}: not UTF-8 text: byte offset {offset} (line {line}) is 0xe9"
    assert expected in refuse(tmp_path, [str(cfg), "--dry-run"], capsys)
    assert expected in refused_config(cfg)


def test_data_not_utf8_names_file_line_and_byte(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    cfg = write_config(tmp_path, bases["bert"], BERT_LORA, train="", data="    max_length: 32\n")
    data = tmp_path / "train.jsonl"
    good = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(good[:4]) + '{"text": "caf\xe9 good", "label": 1}\n'.encode("latin-1")
                     + b"".join(good[5:]))
    offset = len(b"".join(good[:4])) + len('{"text": "caf')
    expected = f"{data} line 5: not UTF-8 text: byte offset {offset} is 0xe9"
    assert expected in refuse(tmp_path, [str(cfg)], capsys)
    with pytest.raises(DataError, match=expected):
        read_rows(data, "train.data.train")


def test_control_character_names_the_byte(tmp_path: Path, bases: dict[str, Path]) -> None:
    cfg = write_config(tmp_path, bases["llama"], "targets: [q_\x01proj]\nmethod: {name: lora}\n")
    assert f"{cfg}: not valid YAML: character #x0001 at byte offset" in refused_config(cfg)


# ---- 3. targets, max_length, output_dir: before any model is loaded ----------------------------------------
@pytest.mark.parametrize("key", ["targets", "exclude"])
def test_regex_that_does_not_compile(
    tmp_path: Path, bases: dict[str, Path], key: str, capsys: pytest.CaptureFixture, no_model_load
) -> None:
    body = LORA + "exclude: '.*(k_proj'\n" if key == "exclude" else "targets: '.*(q_proj'\nmethod: {name: lora}\n"
    cfg = write_config(tmp_path, bases["llama"], body)
    expected = f"{key}: Value error, '.*(k_proj' " if key == "exclude" else f"{key}: Value error, '.*(q_proj' "
    err = refuse(tmp_path, [str(cfg), "--dry-run"], capsys)
    assert expected + "is not a valid regular expression (missing ), unterminated subpattern at position 2)" in err
    assert expected in refused_config(cfg)


def test_max_length_beyond_the_positions(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    cfg = write_config(tmp_path, bases["llama"], LORA, train="", data="    max_length: 65\n")
    err = refuse(tmp_path, [str(cfg)], capsys)
    assert (f"train.data.max_length: 65 is more than the 64 positions of model '{bases['llama']}' "
            "(max_position_embeddings in config.json); set it to 64 or less") in err
    assert "train.data.max_length: 65" in refuse(tmp_path, [str(cfg), "--dry-run"], capsys)


def test_missing_data_file_refused_before_loading(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    cfg = write_config(tmp_path, bases["llama"], LORA, train="")
    cfg.write_text(cfg.read_text().replace("train.jsonl", "trian.jsonl"))
    err = refuse(tmp_path, [str(cfg)], capsys)
    assert f"train.data.train: {tmp_path / 'trian.jsonl'} does not exist" in err


@pytest.mark.parametrize(("arch", "positions", "source"), [
    ("llama", 64, "max_position_embeddings"),
    ("gpt2", 64, "n_positions"),
    ("roberta", 78, "max_position_embeddings = 80 in config.json, less pad_token_id + 1 = 2"),
])
def test_max_length_limit_per_architecture(tmp_path: Path, arch: str, positions: int, source: str) -> None:
    tiny_config(arch).save_pretrained(tmp_path)
    hf_config = AutoConfig.from_pretrained(tmp_path)
    raw = {"model": {"name_or_path": "m"}, "targets": ["q"], "method": {"name": "lora"},
           "train": {"data": {"train": "t.jsonl", "max_length": positions}, "max_steps": 1}}
    check_max_length(parse_config(raw), hf_config)  # exactly the positions: fine
    raw["train"]["data"]["max_length"] = positions + 1
    with pytest.raises(ConfigError, match=rf"train.data.max_length: {positions + 1} .*\({re.escape(source)}"):
        check_max_length(parse_config(raw), hf_config)


def test_output_dir_that_is_a_file(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    cfg = write_config(tmp_path, bases["llama"], LORA)
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    cfg.write_text(cfg.read_text().replace(f"output_dir: {tmp_path / 'out'}", f"output_dir: {user_file}"))
    err = refuse(tmp_path, [str(cfg), "--dry-run"], capsys)
    assert f"output_dir: {user_file} is an existing file, not a folder" in err
    err = refuse(tmp_path, [str(write_config(tmp_path, bases["llama"], LORA)), "--output-dir", str(user_file)], capsys)
    assert f"output_dir: {user_file} is an existing file" in err
    assert user_file.read_text() == "mine"


def test_output_dir_that_cannot_be_created(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    """Under a file no folder can be made, whoever runs it (the tests run as root, who writes anywhere else)."""
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    cfg = write_config(tmp_path, bases["llama"], LORA)
    err = refuse(tmp_path, [str(cfg), "--output-dir", str(user_file / "run" / "one")], capsys)
    assert f"output_dir: {user_file / 'run' / 'one'} cannot be created: {user_file} is a file, not a folder" in err


def test_output_dir_in_a_read_only_folder(
    tmp_path: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture, no_model_load
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) can write into a 0o500 folder")
        cfg = write_config(tmp_path, bases["llama"], LORA)
        err = refuse(tmp_path, [str(cfg), "--output-dir", str(locked / "run")], capsys)
        assert f"output_dir: {locked / 'run'} cannot be written: {locked} is not writable" in err
    finally:
        locked.chmod(0o700)
