"""Checkpoints across transformers majors, for real: load, forward and fold the set the other major wrote.

CI (.ci/run) runs ``make test`` (transformers 5.x writes build/cross/v5), then ``make test-compat`` (4.x writes v4
and reads v5 here), then ``make test-cross`` (5.x reads v4 here). The tests marked ``cross_version`` read the other
major's set: under CI=true a missing set fails them, elsewhere they skip with the command that writes it. The
tests marked ``compat`` write and read a set of this version (the writer and the checks themselves), in both jobs.

Reference: the logits the writer computed under the other major with the same torch, on the same stored inputs;
the tolerance is the whole-model float32 entry (other attention kernels, folded weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from export.fold import fold_model
from surgery.checkpoint import load_checkpoint, major
from surgery.config import ModelConfig
from surgery.model import ModelLoadError, load_model, load_tokenizer
from surgery.tolerances import model_tolerance
from tests.compat.write_checkpoints import (
    CASES, EXPECTED_FILE, ROPE_THETA, SET_FILE, TEXT, Case, cross_root, set_folder, write_set,
)
from tests.export.checkpoints import task_of

INSTALLED = transformers.__version__
OTHER_MAJOR = 4 if major(INSTALLED) >= 5 else 5
READS_NEWER = OTHER_MAJOR > major(INSTALLED)  # 4.x reading what 5.x wrote
WRITER = {4: "make test-compat (.venv-compat)", 5: "make test (.venv)"}
TOLERANCE = model_tolerance(torch.float32)
# transformers 5 writes a llama config's rope_theta inside rope_parameters, which 4.x does not read: refused.
REFUSED = {"llama-rope-lora"} if READS_NEWER else set()
TOKENIZERS_UNREADABLE = pytest.mark.xfail(
    READS_NEWER, raises=ModelLoadError, strict=True,
    reason="transformers 5 saves a PreTrainedTokenizerFast as tokenizer_class 'TokenizersBackend', a class 4.x does "
           "not have; setting tokenizer_class to 'PreTrainedTokenizerFast' in tokenizer_config.json makes it load",
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def other_set() -> Path:
    """The set the other transformers major wrote; missing: a failure under CI, a skip elsewhere."""
    folder = set_folder(cross_root(), OTHER_MAJOR)
    if not (folder / SET_FILE).is_file():
        why = (f"{folder} holds no checkpoints of transformers {OTHER_MAJOR}.x: {WRITER[OTHER_MAJOR]} writes them "
               f"(python -m tests.compat.write_checkpoints in that environment)")
        if in_ci():
            pytest.fail(why)
        pytest.skip(why)
    return folder


def base_config(folder: Path, case: Case) -> ModelConfig:
    return ModelConfig(name_or_path=str(folder / case.base), task=task_of(case.arch))


def check_case(folder: Path, case: Case) -> None:
    """The base computes the writer's base logits; the checkpoint, loaded and folded, the writer's adapted ones."""
    expected = load_file(folder / case.name / EXPECTED_FILE)
    written_with = json.loads((folder / SET_FILE).read_text())["transformers"]
    where = f"{case.name}: written with transformers {written_with}, read with {INSTALLED}"
    input_ids = expected["input_ids"]

    base = load_model(base_config(folder, case))
    assert_close(logits(base, input_ids), expected["base_logits"], f"{where}: the base model's logits")
    adapted = load_checkpoint(folder / case.name, model_path=str(folder / case.base))
    adapted_logits = logits(adapted.model, input_ids)
    assert_close(adapted_logits, expected["logits"], f"{where}: the adapted model's logits")
    assert (adapted_logits - expected["base_logits"]).abs().max() > 100 * TOLERANCE.atol, "adapters had no effect"
    folded = fold_model(adapted)
    assert_close(logits(folded.model, input_ids), expected["logits"], f"{where}: the folded model's logits")


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=TOLERANCE.atol, rtol=TOLERANCE.rtol,
                               msg=lambda detail: f"{what} differ ({TOLERANCE.reason}): {detail}")


# ---- the other major's set -------------------------------------------------------------------------------
@pytest.mark.cross_version
def test_the_other_set_was_written_by_the_other_major() -> None:
    written = json.loads((other_set() / SET_FILE).read_text())
    assert major(written["transformers"]) == OTHER_MAJOR
    assert [Case(**case) for case in written["cases"]] == list(CASES)


@pytest.mark.cross_version
@pytest.mark.parametrize("case", [c for c in CASES if c.name not in REFUSED], ids=lambda case: case.name)
def test_checkpoint_of_the_other_major_loads_forwards_and_folds(case: Case) -> None:
    check_case(other_set(), case)


@pytest.mark.cross_version
@pytest.mark.skipif(not READS_NEWER, reason="transformers 5 reads the rope_theta a 4.x config.json sets (loaded above)")
def test_rope_theta_a_newer_major_wrote_is_refused_not_ignored() -> None:
    folder = other_set()
    with pytest.raises(ModelLoadError) as error:
        load_checkpoint(folder / "llama-rope-lora", model_path=str(folder / "llama-rope"))
    message = str(error.value)
    assert f"written with transformers {OTHER_MAJOR}." in message
    assert f"transformers {INSTALLED} does not read" in message
    assert f'add "rope_theta": {ROPE_THETA} to its config.json' in message


@pytest.mark.cross_version
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda case: case.base)
@TOKENIZERS_UNREADABLE
def test_tokenizer_of_the_other_major(case: Case) -> None:
    folder = other_set()
    expected = load_file(folder / case.name / EXPECTED_FILE)["token_ids"]
    assert load_tokenizer(base_config(folder, case))(TEXT)["input_ids"] == expected.tolist()


# ---- this major's own set: the writer and the checks, with no other environment needed ---------------------
@pytest.fixture(scope="module")
def own_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second spinning thread only slows a shared 2-core machine
    yield write_set(tmp_path_factory.mktemp("cross"))
    torch.set_num_threads(threads)


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_own_set_round_trip(case: Case, own_set: Path) -> None:
    check_case(own_set, case)
