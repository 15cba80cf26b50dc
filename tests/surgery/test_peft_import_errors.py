"""PEFT import and export refuse bad input: the error names the fault, the file and the tensor or key; the CLI
prints one line and exits 2; the PEFT folder is unchanged and --out is not created (or left empty)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file

from surgery.checkpoint import save_checkpoint
from surgery.model import ModelLoadError
from surgery.peft_interop import OutFolderError, PeftFormatError, export_peft, import_peft, main
from tests.fs import tree_digest
from tests.tiny_models import save_tiny_model, tiny_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"  # a LoRA layer of the adapter below


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny BERT base folder, PEFT folder of a rank-4 seq-cls LoRA on query/value with its 2-label head)."""
    root = tmp_path_factory.mktemp("peft_bert")
    base = save_tiny_model("bert", root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS)
    peft_model = get_peft_model(tiny_model("bert"), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(root / "peft")
    return base, root / "peft"


@pytest.fixture
def peft_dir(saved: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[1], tmp_path / "peft"))


@pytest.fixture
def base(saved: tuple[Path, Path]) -> Path:
    return saved[0]


def assert_refused(capsys: pytest.CaptureFixture, peft_dir: Path, out: Path, base: Path, fragments: list[str],
                   error: type[Exception] = PeftFormatError, options: dict[str, str] | None = None) -> None:
    """import_peft raises ``error`` and the CLI exits 2 with one line, both naming every fragment; the PEFT folder
    is unchanged and ``out`` is as it was (absent, or an empty folder)."""
    options = options or {}
    before, out_existed = tree_digest(peft_dir), out.exists()
    kwargs = {key.replace("-", "_"): int(value) if key == "num-labels" else value for key, value in options.items()}
    with pytest.raises(error) as raised:
        import_peft(peft_dir, out, base=str(base), **kwargs)
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))
    capsys.readouterr()
    argv = ["import", str(peft_dir), "--out", str(out), "--base", str(base)]
    argv += [item for key, value in options.items() for item in (f"--{key}", value)]
    assert main(argv) == 2
    line = error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert tree_digest(peft_dir) == before
    assert out.exists() == out_existed and (not out.exists() or not any(out.iterdir()))


def error_line(stderr: str) -> str:
    """The CLI's one error line, last on stderr (transformers' loading progress may come before it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and stderr.endswith(lines[0] + "\n") and "Traceback" not in stderr, stderr
    return lines[0]


def rewrite_tensors(peft_dir: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(peft_dir / WEIGHTS)
    change(tensors)
    save_file(tensors, peft_dir / WEIGHTS, metadata={"format": "pt"})


def rewrite_config(peft_dir: Path, **changes: object) -> None:
    config = json.loads((peft_dir / CONFIG).read_text())
    (peft_dir / CONFIG).write_text(json.dumps({**config, **changes}))


# ---- 1. adapter_config.json ------------------------------------------------------------------------------
CONFIG_TEXTS: dict[str, tuple[Callable[[str], str], list[str]]] = {  # name -> (new text from old, fragments)
    "garbage": (lambda text: "\x00\x7fnot json at all", ["not valid JSON"]),
    "empty": (lambda text: "", ["not valid JSON"]),
    "truncated": (lambda text: text[: len(text) // 2], ["not valid JSON", "truncated"]),
    "a list": (lambda text: "[4, 8]", ["expected a JSON object", "got a JSON array"]),
    "a string": (lambda text: '"LORA"', ["expected a JSON object", "got a JSON string"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_TEXTS))
def test_unreadable_config_is_named(case: str, peft_dir: Path, base: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    change, fragments = CONFIG_TEXTS[case]
    path = peft_dir / CONFIG
    path.write_text(change(path.read_text()))
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, [str(path), *fragments])


CONFIG_TYPES: dict[str, tuple[dict[str, object], list[str]]] = {  # name -> (keys set, fragments)
    "r a string": ({"r": "4"}, ["r must be a positive integer", "got '4'"]),
    "r zero": ({"r": 0}, ["r must be a positive integer", "got 0"]),
    "r a float": ({"r": 4.0}, ["r must be a positive integer", "got 4.0"]),
    "alpha a bool": ({"lora_alpha": True}, ["lora_alpha must be a positive number", "got True"]),
    "alpha NaN": ({"lora_alpha": float("nan")}, ["lora_alpha must be a positive number", "got nan"]),
    "dropout a string": ({"lora_dropout": "0.1"}, ["lora_dropout must be a number in [0, 1)", "got '0.1'"]),
    "rslora a string": ({"use_rslora": "yes"}, ["use_rslora must be true or false", "got 'yes'"]),
    "targets a number": ({"target_modules": 3}, ["target_modules must be a list of module names", "got 3"]),
    "saved a string": ({"modules_to_save": "classifier"}, ["modules_to_save must be a list", "got 'classifier'"]),
    "saved an empty name": ({"modules_to_save": [""]}, ["modules_to_save must be a list", "got ['']"]),
    "task a list": ({"task_type": ["SEQ_CLS"]}, ["task_type must be null or one of", "got ['SEQ_CLS']"]),
    "unknown task": ({"task_type": "TOKEN_CLS"}, ["task_type 'TOKEN_CLS' is not one of", "pass --task"]),
    "base a number": ({"base_model_name_or_path": 7}, ["base_model_name_or_path must be", "got 7"]),
    "not lora": ({"peft_type": "IA3"}, ["peft_type 'IA3'", "only LORA"]),
    "layer replication": ({"layer_replication": [[0, 2]]}, ["layer_replication=[[0, 2]] is not plain LoRA"]),
    "trained biases": ({"bias": "all"}, ["bias='all' is not plain LoRA"]),
    "r and alpha both wrong": ({"r": "4", "lora_alpha": "8"}, ["r must be", "lora_alpha must be"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_TYPES))
def test_config_key_of_wrong_type_is_named(case: str, peft_dir: Path, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    changes, fragments = CONFIG_TYPES[case]
    rewrite_config(peft_dir, **changes)
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, [str(peft_dir / CONFIG), *fragments])


def test_targets_that_miss_the_tensors_are_refused(peft_dir: Path, base: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """PEFT would not load LoRA tensors of a layer target_modules does not name: the pair is from two adapters."""
    rewrite_config(peft_dir, target_modules=["query"])
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base,
                   [str(peft_dir / WEIGHTS), "attention.self.value", "target_modules ['query']"])


# ---- 2. adapter_model.safetensors: damaged, mis-shaped ---------------------------------------------------
@pytest.mark.parametrize("cut", [1, 100, "all"])
def test_truncated_weights_are_named(cut: int | str, peft_dir: Path, base: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    path = peft_dir / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(b"" if cut == "all" else data[: len(data) - int(cut)])
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, [str(path), "cannot read tensors", "truncated"])


def test_missing_weights_are_named(peft_dir: Path, base: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    (peft_dir / WEIGHTS).unlink()
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, [str(peft_dir), f"no {WEIGHTS}"])


def set_tensor(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = make(tensors[key]).contiguous()
    return change


def nan_at_origin(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[0, 0] = float("nan")
    return tensor


def inf_at_origin(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("-inf")
    return tensor


TENSOR_FAULTS: dict[str, tuple[Callable[[dict], None], list[str]]] = {  # name -> (change, fragments)
    "lora_A of rank 2, r=4": (set_tensor(f"{QUERY0}.lora_A.weight", lambda t: t[:2]),
                              [f"{QUERY0}.lora_A.weight", "has shape (2, 32), expected (4, 32)", "r=4"]),
    "lora_B of rank 6, r=4": (set_tensor(f"{QUERY0}.lora_B.weight", lambda t: torch.zeros(32, 6)),
                              [f"{QUERY0}.lora_B.weight", "has shape (32, 6), expected (32, 4)"]),
    "lora_A a vector": (set_tensor(f"{QUERY0}.lora_A.weight", lambda t: t.reshape(-1)),
                        [f"{QUERY0}.lora_A.weight", "has shape (128,), expected (4, 'd_in')"]),
    "d_in 16, base 32": (set_tensor(f"{QUERY0}.lora_A.weight", lambda t: t[:, :16]),
                         [f"{QUERY0}.lora_A.weight", "has shape (4, 16)", "needs (4, 32)", "d_in=32"]),
    "d_out 16, base 32": (set_tensor(f"{QUERY0}.lora_B.weight", lambda t: t[:16]),
                          [f"{QUERY0}.lora_B.weight", "has shape (16, 4)", "needs (32, 4)", "d_out=32"]),
    "head of another width": (set_tensor("base_model.model.classifier.weight", lambda t: torch.zeros(2, 16)),
                              ["base_model.model.classifier.weight", "has shape (2, 16)", "has (2, 32)"]),
    "lora_B missing": (lambda tensors: tensors.pop(f"{QUERY0}.lora_B.weight"),
                       [f"{QUERY0}.lora_B.weight", "is missing"]),
    "head missing": (lambda tensors: tensors.pop("base_model.model.classifier.bias"),
                     ["base_model.model.classifier.bias", "is missing"]),
    "a layer the base lacks": (
        lambda tensors: [tensors.__setitem__(key.replace("layer.0.", "layer.7."), tensors.pop(key))
                         for key in [k for k in tensors if "layer.0.attention.self.query" in k]],
        ["bert.encoder.layer.7.attention.self.query", "has no Linear or Conv1D layer"]),
    "NaN in lora_B": (set_tensor(f"{QUERY0}.lora_B.weight", nan_at_origin),
                      [f"{QUERY0}.lora_B.weight", "1 non-finite value(s)"]),
    "inf in the head": (set_tensor("base_model.model.classifier.bias", inf_at_origin),
                        ["base_model.model.classifier.bias", "non-finite"]),
    "an integer tensor": (set_tensor(f"{QUERY0}.lora_A.weight", lambda t: t.long()),
                          [f"{QUERY0}.lora_A.weight", "dtype torch.int64"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_FAULTS))
def test_bad_tensor_is_named(case: str, peft_dir: Path, base: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    change, fragments = TENSOR_FAULTS[case]
    rewrite_tensors(peft_dir, change)
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, [str(peft_dir / WEIGHTS), *fragments])


def test_rank_other_than_config_r_is_named(peft_dir: Path, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """The weights are rank 4; a config that says r=8 belongs to another adapter."""
    rewrite_config(peft_dir, r=8)
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base,
                   [str(peft_dir / WEIGHTS), ".lora_", "r=8 in adapter_config.json", "from different adapters"])


# ---- 3. tensors that would have been dropped -------------------------------------------------------------
STRAY_TENSORS = {  # name -> (key added, fragments)
    "an embedding": ("base_model.model.bert.embeddings.word_embeddings.weight",
                     ["belongs to no LoRA layer and to no module of modules_to_save", "never dropped"]),
    "no prefix": ("classifier.weight", ["unexpected tensor key 'classifier.weight'"]),
    "an embedding adapter": ("base_model.model.bert.embeddings.word_embeddings.lora_embedding_A",
                             ["is an adapter type this importer does not read"]),
    "a DoRA magnitude": (f"{QUERY0}.lora_magnitude_vector", ["is an adapter type this importer does not read"]),
    "a wrapper's key": ("base_model.model.classifier.modules_to_save.default.weight",  # not what save_pretrained writes
                        ["classifier has no modules_to_save.default.weight"]),
}


@pytest.mark.parametrize("case", sorted(STRAY_TENSORS))
def test_unknown_tensor_is_refused_by_name(case: str, peft_dir: Path, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    key, fragments = STRAY_TENSORS[case]
    rewrite_tensors(peft_dir, lambda tensors: tensors.__setitem__(key, torch.ones(4, 32)))
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, [str(peft_dir / WEIGHTS), key, *fragments])


def test_tied_module_to_save_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """GPT-2's wte is tied to lm_head: PEFT trains an untied copy, which loading in place would tie back."""
    base = save_tiny_model("gpt2", tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["wte"], fan_in_fan_out=True)
    get_peft_model(tiny_model("gpt2"), config).save_pretrained(tmp_path / "peft")
    assert_refused(capsys, tmp_path / "peft", tmp_path / "ckpt", base,
                   [str(tmp_path / "peft" / WEIGHTS), "'transformer.wte'", "lm_head.weight", "tied"])


# ---- 4. --num-labels --------------------------------------------------------------------------------------
def test_num_labels_against_the_saved_head(peft_dir: Path, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base,
                   ["--num-labels 3", "base_model.model.classifier.weight", str(peft_dir / WEIGHTS), "2 labels",
                    "pass --num-labels 2"], options={"num-labels": "3"})


def test_num_labels_is_for_seq_cls_only(peft_dir: Path, base: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, ["--num-labels 2 is for --task seq-cls only"],
                   options={"num-labels": "2", "task": "causal-lm"})


def test_base_with_a_head_of_other_size_is_named(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 3-label adapter on a base saved with a 2-label head: transformers refuses the head; load_model's error says
    so in one line (it does not ignore mismatched head sizes)."""
    model = tiny_model("bert")
    model.classifier = torch.nn.Linear(32, 3)
    model.config.num_labels = 3
    config = LoraConfig(r=4, target_modules=["query"], task_type=TaskType.SEQ_CLS)
    get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    assert_refused(capsys, tmp_path / "peft", tmp_path / "ckpt", base,
                   [f"{str(base)!r} does not fit model.task seq-cls with num_labels 3",
                    "point model.name_or_path at the model without that head"], error=ModelLoadError)


def test_invalid_target_regex_is_named(peft_dir: Path, base: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    rewrite_config(peft_dir, target_modules="(query")
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base,
                   [str(peft_dir / CONFIG), "target_modules '(query' is not a valid regular expression"])


# ---- --out -----------------------------------------------------------------------------------------------
def test_failure_leaves_an_empty_out_empty(peft_dir: Path, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """A fault found after the base is loaded (d_in) still writes nothing into an --out that existed, empty."""
    (tmp_path / "ckpt").mkdir()
    rewrite_tensors(peft_dir, set_tensor(f"{QUERY0}.lora_A.weight", lambda t: t[:, :16]))
    assert_refused(capsys, peft_dir, tmp_path / "ckpt", base, ["has shape (4, 16)"])
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".ckpt.")]  # no staging left


def test_non_empty_out_is_refused(peft_dir: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutFolderError, match="not empty"):
        import_peft(peft_dir, out, base=str(base))
    assert [path.name for path in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_import_into_an_empty_out(peft_dir: Path, base: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    import_peft(peft_dir, tmp_path / "ckpt", base=str(base))
    assert (tmp_path / "ckpt" / "checkpoint.json").is_file()


# ---- 5. export refuses non-finite tensors ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["lora_B", "head"])
def test_export_refuses_non_finite_tensors(where: str, peft_dir: Path, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    adapted = import_peft(peft_dir, tmp_path / "ckpt", base=str(base))
    layer = "bert.encoder.layer.1.attention.self.value"
    with torch.no_grad():
        if where == "lora_B":
            adapted.layers[layer].lora_B[3, 1] = float("nan")
        else:
            adapted.model.classifier.weight[1, 5] = float("inf")
    tensor = f"{layer}.lora_B" if where == "lora_B" else "classifier.weight"
    with pytest.raises(PeftFormatError, match=rf"tensor 'base_model\.model\.{tensor}(\.weight)?' holds 1 non-finite"):
        export_peft(adapted, tmp_path / "peft_out")
    assert not (tmp_path / "peft_out").exists()
    save_checkpoint(adapted, tmp_path / "diverged")
    before = tree_digest(tmp_path / "diverged")
    assert main(["export", str(tmp_path / "diverged"), "--out", str(tmp_path / "peft_out")]) == 2
    line = error_line(capsys.readouterr().err)  # load_checkpoint refuses it first, in our tensor names
    assert tensor in line and "NaN" in line and str(tmp_path / "diverged") in line, line
    assert not (tmp_path / "peft_out").exists()
    assert tree_digest(tmp_path / "diverged") == before


def test_export_refuses_a_non_empty_out(peft_dir: Path, base: Path, tmp_path: Path) -> None:
    adapted = import_peft(peft_dir, tmp_path / "ckpt", base=str(base))
    (tmp_path / "peft_out").mkdir()
    (tmp_path / "peft_out" / "README.md").write_text("mine")
    with pytest.raises(OutFolderError, match="not empty"):
        export_peft(adapted, tmp_path / "peft_out")
    assert (tmp_path / "peft_out" / "README.md").read_text() == "mine"
