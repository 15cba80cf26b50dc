"""Checkpoint round trip for every method, and the errors for a wrong base or a damaged file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.checkpoint import ADAPTER_FILE, MANIFEST_FILE, CheckpointError, load_checkpoint, save_checkpoint
from surgery.config import parse_config
from surgery.model import load_model
from surgery.rewrite import apply_surgery
from tests.method_configs import registered_methods, small_method
from tests.tiny_models import random_ids, save_tiny_model


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "bert": save_tiny_model("bert", root / "bert"),
        "gpt2": save_tiny_model("gpt2", root / "gpt2"),
        "bert_other": save_tiny_model("bert", root / "bert_other", seed=7),
    }


def trained_like(base: Path, method: str, out: Path, task: str = "seq-cls", targets=("query", "value")):
    """A surgered model with random non-zero adapter weights (as if trained), saved to ``out``."""
    config = parse_config({"model": {"name_or_path": str(base), "task": task}, "targets": list(targets),
                           "method": small_method(method), "output_dir": str(out)})
    adapted = apply_surgery(load_model(config.model), config)
    generator = torch.Generator().manual_seed(3)
    for layer in adapted.layers.values():
        layer.randomize_(generator, std=0.2)
    with torch.no_grad():
        for module in adapted.trained_modules.values():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator))
    save_checkpoint(adapted, out)
    return adapted


@pytest.mark.parametrize("method", registered_methods())
def test_round_trip_reproduces_outputs(method: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    saved = trained_like(base_dirs["bert"], method, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids = random_ids(3, 6)
    with torch.no_grad():
        expected, actual = saved.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits
        base = load_model(saved.config.model)(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    assert not torch.allclose(actual, base), "the randomised adapter must change the output"


def test_round_trip_on_conv1d(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    saved = trained_like(base_dirs["gpt2"], "lora", tmp_path / "c", task="causal-lm", targets=("c_attn",))
    loaded = load_checkpoint(tmp_path / "c")
    ids = random_ids(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, saved.model(input_ids=ids).logits)


def test_checkpoint_holds_no_base_weight(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    trained_like(base_dirs["bert"], "lora", tmp_path / "ckpt")
    keys = load_file(tmp_path / "ckpt" / ADAPTER_FILE).keys()
    assert keys and all(k.startswith(("adapter.", "module.classifier.")) for k in keys)
    assert not any(".base." in k for k in keys)


def test_wrong_base_model_is_refused(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    trained_like(base_dirs["bert"], "lora", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="saved against a different base model"):
        load_checkpoint(tmp_path / "ckpt", model_path=str(base_dirs["bert_other"]))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_a_clear_error(damage: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    trained_like(base_dirs["bert"], "lora", folder)
    adapter = folder / ADAPTER_FILE
    data = adapter.read_bytes()
    if damage == "truncate":
        adapter.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        adapter.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "delete":
        adapter.unlink()
    else:
        (folder / MANIFEST_FILE).write_text("{not json")
    expected = {"truncate": "corrupted or truncated", "flip": "corrupted or truncated",
                "delete": "missing from the checkpoint", "manifest": "corrupted manifest"}[damage]
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(folder)


def test_unhashed_garbage_file_is_a_clear_error(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A manifest that stops listing the adapter file no longer switches its hash check off."""
    folder = tmp_path / "ckpt"
    trained_like(base_dirs["bert"], "lora", folder)
    (folder / ADAPTER_FILE).write_bytes(b"\x00" * 64)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"].pop(ADAPTER_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest is damaged: files: \['adapter.safetensors'\] not listed"):
        load_checkpoint(folder)


def test_not_a_checkpoint_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path)
