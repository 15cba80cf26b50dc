"""Checkpoints across transformers versions: a checkpoint whose manifest records another transformers version loads
without a word while the model matches it; when the model changed (a renamed or reshaped layer, other target
weights, another head), the error names both versions, the layer, and the way back, and leaves the files alone.

The other version is simulated: the manifest's recorded version is edited, and the model the loader gets is
changed the way a new transformers release could change it. The real round trip between 4.x and 5.x is
tests/compat (CI runs it with both virtual environments).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import surgery.checkpoint as checkpoint
from surgery.checkpoint import MANIFEST_FILE, CheckpointError, load_checkpoint
from surgery.model import ModelLoadError, load_model
from surgery.rewrite import AdaptedModel
from tests.surgery.test_checkpoint import trained_like
from tests.tiny_models import random_ids, save_tiny_model

pytestmark = pytest.mark.compat

INSTALLED = transformers.__version__
# A release of the other major: what the manifest claims the checkpoint was written with.
OTHER = "4.57.1" if int(INSTALLED.split(".")[0]) >= 5 else "5.24.0"
QUERY_0 = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("bert", tmp_path_factory.mktemp("base") / "bert")


def saved_checkpoint(base: Path, out: Path, method: str = "lora") -> AdaptedModel:
    """Surgery on ``base`` with random non-zero adapters and head (as if trained), saved to ``out``."""
    return trained_like(base, method, out)


def record_version(folder: Path, version: str, drop: tuple[str, ...] = ()) -> None:
    """Make the manifest say the checkpoint was written with transformers ``version`` (and forget ``drop`` keys)."""
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["versions"]["transformers"] = version
    for key in drop:
        del manifest[key]
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def loading_changed_model(monkeypatch: pytest.MonkeyPatch, change: Callable[[nn.Module], None]) -> None:
    """The loader gets the base model as a transformers release that changed it would build it."""
    def load_changed(*args, **kwargs):
        model = load_model(*args, **kwargs)
        change(model)
        return model

    monkeypatch.setattr(checkpoint, "load_model", load_changed)


def rename(renames: dict[str, str], layers: tuple[int, ...]) -> Callable[[nn.Module], None]:
    """Rename attention projections (old name -> new name) in the given BERT layers."""
    def change(model: nn.Module) -> None:
        for index in layers:
            attention = model.get_submodule(f"bert.encoder.layer.{index}.attention.self")
            for old, new in renames.items():
                setattr(attention, new, getattr(attention, old))
                delattr(attention, old)

    return change


def refused(folder: Path) -> str:
    """The message of the CheckpointError loading ``folder`` raises; the folder's files must stay as they were."""
    before = file_bytes(folder)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    assert file_bytes(folder) == before
    return str(error.value)


def assert_names_both_versions(message: str) -> None:
    assert f"written with transformers {OTHER}, loading with {INSTALLED}" in message, message
    assert f"load it with transformers=={OTHER}" in message, message


def refused_across_versions(base: Path, folder: Path, monkeypatch: pytest.MonkeyPatch,
                            change: Callable[[nn.Module], None], drop: tuple[str, ...] = ()) -> str:
    """Save a checkpoint at ``folder`` as if written by transformers OTHER, load it where the base model comes out
    ``change``d: the refusal's message, which must name both versions."""
    saved_checkpoint(base, folder)
    record_version(folder, OTHER, drop=drop)
    loading_changed_model(monkeypatch, change)
    message = refused(folder)
    assert_names_both_versions(message)
    return message


def test_other_version_that_matches_loads_without_a_word(bert_base: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    saved = saved_checkpoint(bert_base, tmp_path / "ckpt")
    record_version(tmp_path / "ckpt", OTHER)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = load_checkpoint(tmp_path / "ckpt")
    ours = ("surgery", "train", "export")
    assert not [record.getMessage() for record in caplog.records if record.name.startswith(ours)]
    assert not [str(w.message) for w in caught if Path(w.filename).parent.name in ours]
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, saved.model(input_ids=ids).logits,
                                   atol=0, rtol=0)


def test_renamed_layer_names_both_versions_and_the_layer(bert_base: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    layer_0_renamed = rename({"query": "q"}, layers=(0,))  # layer 1 still matches
    message = refused_across_versions(bert_base, tmp_path / "ckpt", monkeypatch, layer_0_renamed)
    assert f"layer {QUERY_0!r} is not in the model BertForSequenceClassification" in message
    assert "('bert.encoder.layer.0.attention.self' holds key, value, dropout, q)" in message


def test_renamed_layer_in_an_older_manifest_is_found_by_its_tensors(bert_base: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest written before layers were recorded: the tensors that find no layer name it."""
    message = refused_across_versions(bert_base, tmp_path / "ckpt", monkeypatch, rename({"query": "q"}, layers=(0,)),
                                      drop=("layers",))
    assert f"tensors match no layer of this model: ['adapter.{QUERY_0}.lora_A'" in message


def test_target_matching_nothing_names_both_versions(bert_base: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    message = refused_across_versions(bert_base, tmp_path / "ckpt", monkeypatch,
                                      rename({"query": "q_proj", "value": "v_proj"}, layers=(0, 1)))
    assert "its surgery does not apply to BertForSequenceClassification" in message
    assert "'query'" in message


def test_reshaped_layer_names_both_versions_and_the_shapes(bert_base: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def shrink_query(model: nn.Module) -> None:
        model.set_submodule(QUERY_0, nn.Linear(32, 16))

    message = refused_across_versions(bert_base, tmp_path / "ckpt", monkeypatch, shrink_query)
    assert f"layer {QUERY_0!r} has (d_in, d_out) = (32, 32) in the checkpoint but (32, 16) in the model" in message


def test_changed_target_weights_name_both_versions(bert_base: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Same names and shapes, other bytes: as if the new release converted the weights on load."""
    def convert_query(model: nn.Module) -> None:
        with torch.no_grad():
            model.get_submodule(QUERY_0).weight.mul_(2)

    message = refused_across_versions(bert_base, tmp_path / "ckpt", monkeypatch, convert_query)
    assert f"differs from the one it was saved against (1 tensor(s) with other values or shapes: {QUERY_0}.weight)" \
        in message
    assert "this version loads differently" in message


def test_reshaped_head_names_both_versions_and_the_module(bert_base: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def three_labels(model: nn.Module) -> None:
        model.classifier = nn.Linear(32, 3)

    message = refused_across_versions(bert_base, tmp_path / "ckpt", monkeypatch, three_labels)
    assert "module 'classifier': Error(s) in loading state_dict" in message
    assert "size mismatch for weight" in message


def test_same_version_mismatch_does_not_talk_about_versions(bert_base: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    saved_checkpoint(bert_base, tmp_path / "ckpt")
    loading_changed_model(monkeypatch, rename({"query": "q"}, layers=(0,)))
    message = refused(tmp_path / "ckpt")
    assert f"layer {QUERY_0!r} is not in the model" in message
    assert "written with transformers" not in message and "transformers==" not in message


# ---- rotary settings a newer major wrote -----------------------------------------------------------------
def config_as_read(written: str, rope_parameters: dict | None, rope_theta: float | None = 10000.0,
                   rope_scaling: dict | None = None) -> SimpleNamespace:
    """A config object as transformers 4.x builds it from a config.json: unknown keys kept as attributes, its own
    rope_theta / rope_scaling at their defaults when the file does not set them."""
    fields = {"transformers_version": written, "rope_theta": rope_theta, "rope_scaling": rope_scaling}
    if rope_parameters is not None:
        fields["rope_parameters"] = rope_parameters
    return SimpleNamespace(**fields)


def test_rope_theta_only_in_rope_parameters_is_refused_under_an_older_major() -> None:
    config = config_as_read("5.24.0", {"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(ModelLoadError) as error:
        checkpoint.check_rope_config(config, "base/llama", installed="4.56.2")
    message = str(error.value)
    assert "written with transformers 5.24.0" in message and "transformers 4.56.2 does not read" in message
    assert "it would run rope_theta=10000.0" in message
    assert 'add "rope_theta": 500000.0 to its config.json' in message


def test_rope_scaling_only_in_rope_parameters_is_refused_under_an_older_major() -> None:
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 10000.0}
    with pytest.raises(ModelLoadError, match='"rope_scaling": {"rope_type": "llama3", "factor": 8.0'):
        checkpoint.check_rope_config(config_as_read("5.24.0", llama3), "base/llama", installed="4.56.2")


@pytest.mark.parametrize("written, installed, rope_parameters, rope_theta", [
    ("5.24.0", "4.56.2", {"rope_type": "default", "rope_theta": 10000.0}, 10000.0),  # the default: read the same
    ("5.24.0", "5.24.0", {"rope_type": "default", "rope_theta": 500000.0}, None),  # 5.x reads its own key
    ("4.56.2", "5.24.0", {"rope_type": "default", "rope_theta": 500000.0}, None),  # 5.x converts rope_theta
    ("4.56.2", "4.56.2", None, 500000.0),  # no rope_parameters at all
])
def test_rope_settings_read_the_same_pass(written: str, installed: str, rope_parameters: dict | None,
                                          rope_theta: float | None) -> None:
    checkpoint.check_rope_config(config_as_read(written, rope_parameters, rope_theta), "base", installed=installed)
