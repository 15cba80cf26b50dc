"""Issue 13's holes in what a checkpoint trusts: the manifest's schema, every base tensor pinned, non-finite values.

Each test feeds the damaged input, asserts the message names the fault (field, tensor or file) and that nothing of
the user's changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.onnx import export_checkpoint
from surgery.checkpoint import ADAPTER_FILE, MANIFEST_FILE, CheckpointError, file_hash, load_checkpoint
from surgery.model import load_model
from tests.fs import tree_digest
from tests.surgery.test_checkpoint import trained_like
from tests.tiny_models import random_ids, save_tiny_model, tiny_model


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("bert", tmp_path_factory.mktemp("base") / "bert")


@pytest.fixture()
def ckpt(bert: Path, tmp_path: Path) -> Path:
    trained_like(bert, "lora", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_manifest(folder: Path, edit: Callable[[dict], object]) -> None:
    """Write back what ``edit`` returns for the parsed manifest."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps(edit(manifest)))


def updated(manifest: dict, **changes: object) -> dict:
    return {**manifest, **changes}


def without(manifest: dict, *keys: str) -> dict:
    return {key: value for key, value in manifest.items() if key not in keys}


def refused(folder: Path, pattern: str, **kwargs) -> str:
    before = tree_digest(folder)
    with pytest.raises(CheckpointError, match=pattern) as error:
        load_checkpoint(folder, **kwargs)
    assert tree_digest(folder) == before, "a refused load changed the checkpoint"
    return str(error.value)


# ---- the manifest's schema ----------------------------------------------------------------------------------------
DAMAGES = {
    "files emptied": (lambda m: updated(m, files={}), r"files: \['adapter.safetensors', 'surgery.yaml'\] not listed"),
    "files a list": (lambda m: updated(m, files=list(m["files"])), r"damaged: files: Input should be a valid dict"),
    "no fingerprint": (lambda m: without(m, "base_fingerprint"), r"damaged: base_fingerprint: Field required"),
    "empty fingerprint": (lambda m: updated(m, base_fingerprint=""), r"damaged: base_fingerprint: String should"),
    "no base tensors": (lambda m: without(m, "base_tensors"), r"damaged: base_tensors: missing or empty"),
    "hash not hex": (lambda m: updated(m, files={**m["files"], ADAPTER_FILE: "abc"}),
                     r"files: \['adapter.safetensors'\] without"),
    "layers not shapes": (lambda m: updated(m, layers=["x"]), r"damaged: layers: Input should be a valid dictionary"),
    "unknown format": (lambda m: updated(m, format=99), r"damaged: format: 99, this version reads \[1, 2\]"),
    "a list": (lambda m: [m], r"damaged: a JSON list, not an object"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_manifest_names_the_field(ckpt: Path, damage: str) -> None:
    edit, pattern = DAMAGES[damage]
    edit_manifest(ckpt, edit)
    message = refused(ckpt, pattern)
    assert "this checkpoint's manifest is damaged" in message and "restore checkpoint.json" in message


def test_a_byte_flipped_adapter_is_caught_although_the_manifest_lists_nothing(ckpt: Path) -> None:
    """The trial's hole: "files": {} switched every hash check off and a flipped adapter exported with exit 0."""
    data = bytearray((ckpt / ADAPTER_FILE).read_bytes())
    data[-5] ^= 0xFF
    (ckpt / ADAPTER_FILE).write_bytes(bytes(data))
    edit_manifest(ckpt, lambda m: updated(m, files={}))
    refused(ckpt, "manifest is damaged: files")


# ---- every base tensor pinned -------------------------------------------------------------------------------------
def test_a_base_with_other_non_target_tensors_is_refused_naming_them(bert: Path, ckpt: Path, tmp_path: Path) -> None:
    """Only query/value are targets; the trial changed 33 other tensors and the export went through."""
    other = tiny_model("bert", task="seq-cls", seed=0)
    other.load_state_dict(load_model(load_checkpoint(ckpt).config.model).state_dict())
    changed = [name for name, _ in other.named_parameters()
               if name.endswith("weight") and ("LayerNorm" in name or "intermediate" in name)]  # biases are 0
    with torch.no_grad():
        for name in changed:
            other.get_parameter(name).mul_(1.01)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    message = refused(ckpt, "saved against a different base model", model_path=str(tmp_path / "other"))
    assert f"{len(changed)} tensor(s) with other values or shapes: {sorted(changed)[0]}" in message
    assert "--model-path" in message


def test_model_path_to_a_copy_of_the_same_base_loads(bert: Path, ckpt: Path, tmp_path: Path) -> None:
    """--model-path keeps its meaning: the base moved, its tensors did not."""
    copy = tmp_path / "moved"
    copy.mkdir()
    for file in bert.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    ids = random_ids(2, 5)
    with torch.no_grad():
        moved = load_checkpoint(ckpt, model_path=str(copy)).model(input_ids=ids).logits
        original = load_checkpoint(ckpt).model(input_ids=ids).logits
    torch.testing.assert_close(moved, original, atol=0, rtol=0)


def test_a_format_1_manifest_still_loads_and_checks_the_target_weights(bert: Path, ckpt: Path, tmp_path: Path) -> None:
    from surgery.rewrite import target_fingerprint

    adapted = load_checkpoint(ckpt)
    old = target_fingerprint({name: layer.base for name, layer in adapted.layers.items()})
    edit_manifest(ckpt, lambda m: updated(without(m, "base_tensors"), format=1, base_fingerprint=old))
    assert load_checkpoint(ckpt).layers.keys() == adapted.layers.keys()
    other = save_tiny_model("bert", tmp_path / "other", seed=7)
    refused(ckpt, "the target layers' weights", model_path=str(other))


# ---- non-finite tensors -------------------------------------------------------------------------------------------
def poison_adapter(folder: Path) -> str:
    """A NaN in one adapter tensor of a file whose hash the manifest then carries (a diverged run saves that)."""
    tensors = load_file(folder / ADAPTER_FILE)
    key = sorted(k for k in tensors if k.endswith("lora_B"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / ADAPTER_FILE, metadata={"format": "1"})
    edit_manifest(folder, lambda m: updated(m, files={**m["files"], ADAPTER_FILE: file_hash(folder / ADAPTER_FILE)}))
    return key


def test_a_nan_adapter_tensor_is_named_at_load(ckpt: Path) -> None:
    key = poison_adapter(ckpt)
    message = refused(ckpt, "hold NaN or infinite values")
    assert key in message and "lower lr" in message


def test_a_nan_adapter_tensor_stops_the_export_before_it_writes(ckpt: Path, tmp_path: Path) -> None:
    key = poison_adapter(ckpt)
    before = tree_digest(ckpt)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        export_checkpoint(ckpt, tmp_path / "onnx", latency=False, log=lambda _: None)
    assert not (tmp_path / "onnx").exists() and tree_digest(ckpt) == before


def test_an_infinite_base_tensor_is_named_at_load(bert: Path, ckpt: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in bert.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = "bert.encoder.layer.1.output.dense.weight"  # not a target: the old fingerprint never read it
    weights[name][2, 3] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    before = tree_digest(broken)
    message = refused(ckpt, "hold NaN or infinite values", model_path=str(broken))
    assert name in message and "base model's files are damaged" in message
    assert tree_digest(broken) == before


def test_a_base_whose_saved_head_has_another_size_names_num_labels(tmp_path: Path) -> None:
    """transformers raises a bare RuntimeError for a 3-label head loaded as 2 labels: a ModelLoadError here."""
    from surgery.config import parse_config
    from surgery.model import ModelLoadError

    base = tmp_path / "three"
    three = tiny_model("bert", task="seq-cls")
    three.config.num_labels = 3
    three.classifier = torch.nn.Linear(three.config.hidden_size, 3)
    three.save_pretrained(base, safe_serialization=True)
    before = tree_digest(base)
    config = parse_config({"model": {"name_or_path": str(base), "task": "seq-cls", "num_labels": 2},
                           "targets": ["query"], "method": {"name": "lora", "r": 2}, "output_dir": str(tmp_path / "o")})
    with pytest.raises(ModelLoadError, match="num_labels 2: .*set model.num_labels to the saved head's"):
        load_model(config.model)
    assert tree_digest(base) == before
