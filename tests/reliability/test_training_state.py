"""Issue 12, data and training state: every bad input is a clear error naming the fault, every run is resumable,
and nothing of the user's is lost (the output folder's files are hashed before and after where it matters)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import surgery.apply
import surgery.checkpoint
import train.trainer
from surgery.apply import main as apply_main
from surgery.checkpoint import ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE, CheckpointError, load_checkpoint
from surgery.config import dump_config
from tests.train.helpers import build, make_config, task_files, tiny_base, write_jsonl
from train.data import DataError
from train.report import METRICS_FILE
from train.resume import ResumeError, apply_overrides, parse_overrides
from train.state import (
    STATE_FILE,
    DiskFullError,
    ExistingRunError,
    check_folder,
    restore_adapters,
    save_training_checkpoint,
)
from train.trainer import NonFiniteLossError, train_adapters

LORA = {"name": "lora", "r": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("bases"), "llama", "causal-lm")


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # rows of 6 to 14 words; max_length within the tiny model's 64 positions (surgery.apply checks it)
    return {**task_files(tmp_path_factory.mktemp("data"), "causal-lm", n_train=32, n_eval=8), "max_length": 32}


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. causal-lm examples whose prompt fills max_length --------------------------------------------------
LONG_PROMPT = {"prompt": "w1 w2 w3 w4 w5 w6", "completion": "w7 w8"}  # 6 prompt tokens: max_length 6 leaves none
SHORT_PROMPT = {"prompt": "w1 w2", "completion": "w3 w4"}


def test_prompts_that_fill_max_length_leave_nothing_to_learn(llama_lm: Path, tmp_path: Path):
    train = write_jsonl(tmp_path / "prompts.jsonl", [LONG_PROMPT] * 12)
    data = {"train": str(train), "eval": str(write_jsonl(tmp_path / "eval.jsonl", [SHORT_PROMPT] * 4)),
            "max_length": 6}
    out = tmp_path / "run"
    adapted, tokenizer = build(make_config(llama_lm, "causal-lm", LORA, data, out, max_steps=2))
    with pytest.raises(DataError) as caught:
        train_adapters(adapted, tokenizer, out)
    message = str(caught.value)
    for part in ("train.data.train", "prompts.jsonl", "12 of 12 row(s)", "max_length=6", "line 1, line 2, line 3",
                 "raise train.data.max_length or shorten the prompts"):
        assert part in message, f"{part!r} missing from: {message}"
    assert not out.exists(), "refused before anything was written"


def test_an_eval_split_without_targets_is_refused_too(llama_lm: Path, tmp_path: Path):
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", [SHORT_PROMPT] * 8)),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", [LONG_PROMPT] * 3)), "max_length": 6}
    adapted, tokenizer = build(make_config(llama_lm, "causal-lm", LORA, data, tmp_path / "run", max_steps=2))
    with pytest.raises(DataError, match=r"train.data.eval: 3 of 3 row\(s\) of .*eval.jsonl keep no target token"):
        train_adapters(adapted, tokenizer, tmp_path / "run")


def test_some_rows_without_targets_are_left_out_with_a_warning(llama_lm: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture):
    rows = [LONG_PROMPT, SHORT_PROMPT] * 8  # lines 1, 3, 5, ... keep no target
    data = {"train": str(write_jsonl(tmp_path / "mixed.jsonl", rows)),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", [SHORT_PROMPT] * 4)), "max_length": 6}
    out = tmp_path / "run"
    adapted, tokenizer = build(make_config(llama_lm, "causal-lm", LORA, data, out, max_steps=2))
    with caplog.at_level(logging.INFO, logger="train"):
        metrics = train_adapters(adapted, tokenizer, out)
    assert ("train.data.train: 8 of 16 row(s) of " in caplog.text and "line 1, line 3, line 5, ..." in caplog.text
            and "they are left out: raise train.data.max_length" in caplog.text)
    assert "data: 8 training and 4 evaluation examples" in caplog.text
    assert metrics["eval_perplexity"] > 1.0 and metrics["train_loss"] > 0.0


# ---- 2. --resume finishes what was pending; a finished run is left as it is --------------------------------
class Interrupted(Exception):
    pass


def _resume_config(llama_lm: Path, lm_data: dict, out: Path, **train):
    # 32 rows / batch 8: 4 steps per epoch; a checkpoint at step 4 is written before the epoch's evaluation
    settings = {"max_steps": 8, "save_every": 4, "eval_before_training": False, **train}
    return make_config(llama_lm, "causal-lm", LORA, lm_data, out, **settings)


def _results(out: Path) -> dict:
    metrics = json.loads((out / METRICS_FILE).read_text())
    metrics.pop("train_runtime_s")
    return metrics


def _straight(llama_lm: Path, lm_data: dict, out: Path, **train) -> dict:
    adapted, tokenizer = build(_resume_config(llama_lm, lm_data, out, **train))
    train_adapters(adapted, tokenizer, out)
    return _results(out)


def test_resume_records_the_evaluation_the_interrupted_run_had_pending(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    expected = _straight(llama_lm, lm_data, tmp_path / "straight")
    assert [row["step"] for row in expected["history"]] == [4, 8]

    out = tmp_path / "split"
    adapted, tokenizer = build(_resume_config(llama_lm, lm_data, out))
    real_save = train.trainer.save

    def killed_after_saving_step_4(run):
        real_save(run)
        if run.step == 4:
            raise Interrupted  # before the end of epoch 1 was evaluated

    monkeypatch.setattr(train.trainer, "save", killed_after_saving_step_4)
    with pytest.raises(Interrupted):
        train_adapters(adapted, tokenizer, out)
    monkeypatch.undo()

    resumed, _ = build(_resume_config(llama_lm, lm_data, out), seed=1)
    train_adapters(resumed, tokenizer, out, resume=True)
    assert _results(out) == expected, "the same history (step 4 evaluated) and the same final figures"


def test_resume_writes_the_final_checkpoint_and_metrics_a_killed_run_had_left(llama_lm: Path, lm_data: dict,
                                                                              tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    expected = _straight(llama_lm, lm_data, tmp_path / "straight")
    out = tmp_path / "split"
    adapted, tokenizer = build(_resume_config(llama_lm, lm_data, out))

    def killed_before_the_final_checkpoint(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(train.trainer, "save_checkpoint", killed_before_the_final_checkpoint)
    with pytest.raises(Interrupted):
        train_adapters(adapted, tokenizer, out)
    monkeypatch.undo()
    assert not (out / METRICS_FILE).exists() and (out / "checkpoints" / "step-8").is_dir()

    resumed, _ = build(_resume_config(llama_lm, lm_data, out), seed=1)
    assert train_adapters(resumed, tokenizer, out, resume=True)["steps"] == 8
    assert _results(out) == expected
    load_checkpoint(out)


def test_resuming_a_finished_run_changes_nothing(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture):
    out = tmp_path / "run"
    _straight(llama_lm, lm_data, out)
    before = file_hashes(out)
    saved = json.loads((out / METRICS_FILE).read_text())

    resumed, tokenizer = build(_resume_config(llama_lm, lm_data, out), seed=1)
    with caplog.at_level(logging.INFO, logger="train"):
        metrics = train_adapters(resumed, tokenizer, out, resume=True)
    assert "finished at step 8; nothing to do" in caplog.text
    assert file_hashes(out) == before, "metrics.json and every checkpoint file unchanged byte for byte"
    assert metrics == {key: value for key, value in saved.items() if key != "history"}


# ---- 3. a resume continues the same run: changes are refused by name, or applied with --override -----------
@pytest.fixture(scope="module")
def finished_run(llama_lm: Path, lm_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    _straight(llama_lm, lm_data, out)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lr": 1e-3}, "train.lr: 0.01 in the run, 0.001 in this config; apply it on purpose with "
                       "--override train.lr=0.001"),
        ({"seed": 1}, "train.seed: 0 in the run, 1 in this config"),
        ({"warmup_steps": 2}, "train.warmup_steps: None in the run, 2 in this config"),
        ({"method": {"name": "lora", "r": 8}}, "method.r: 4 in the run, 8 in this config"),
        ({"targets": ["q_proj", "v_proj"]}, "targets: 'all-linear' in the run, ['q_proj', 'v_proj'] in this config"),
    ],
)
def test_a_resume_that_changes_the_result_is_refused_naming_the_key(change: dict, named: str, finished_run: Path,
                                                                    llama_lm: Path, lm_data: dict, tmp_path: Path):
    out = _copy(finished_run, tmp_path)
    before = file_hashes(out)
    method, targets = change.pop("method", LORA), change.pop("targets", "all-linear")
    config = make_config(llama_lm, "causal-lm", method, lm_data, out, targets=targets,
                         **{"max_steps": 8, "save_every": 4, "eval_before_training": False, **change})
    adapted, tokenizer = build(config)
    with pytest.raises(ResumeError) as caught:
        train_adapters(adapted, tokenizer, out, resume=True)
    assert named in str(caught.value) and "step-8 in what decides the result" in str(caught.value)
    assert "start a new run (--overwrite, or another output_dir)" in str(caught.value)
    assert file_hashes(out) == before


def test_a_resume_on_changed_data_is_refused_and_on_moved_data_accepted(llama_lm: Path, lm_data: dict,
                                                                        tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture):
    train_file = tmp_path / "train.jsonl"
    shutil.copy(lm_data["train"], train_file)
    data = {"train": str(train_file), "eval": lm_data["eval"]}
    out = tmp_path / "run"
    _straight(llama_lm, data, out, max_steps=4)
    before = file_hashes(out)
    with train_file.open("a") as handle:
        handle.write('{"text": "w1 w2 w3"}\n')  # one more row: same path, other content

    adapted, tokenizer = build(_resume_config(llama_lm, data, out, max_steps=4))
    with pytest.raises(ResumeError, match=r"train.data.train: the content of .*train.jsonl differs from the data "
                                          r"the run was trained on \(SHA-256 [0-9a-f]{12}\.\.\. then"):
        train_adapters(adapted, tokenizer, out, resume=True)
    assert file_hashes(out) == before

    moved = tmp_path / "moved.jsonl"
    shutil.copy(lm_data["train"], moved)  # the original content under another name
    adapted, tokenizer = build(_resume_config(llama_lm, {**data, "train": str(moved)}, out, max_steps=4))
    with caplog.at_level(logging.INFO, logger="train"):
        train_adapters(adapted, tokenizer, out, resume=True)
    assert "train.data.train moved from" in caplog.text and "(same content)" in caplog.text


def test_the_nan_advice_works_when_followed(llama_lm: Path, lm_data: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "run"
    config = make_config(llama_lm, "causal-lm", LORA, lm_data, out, max_steps=6, save_every=1, log_every=1,
                         eval_before_training=False)
    adapted, tokenizer = build(config)
    real_losses = train.trainer.example_losses
    calls = {"n": 0}

    def nan_on_step_3(model, batch, task, label_smoothing=0.0):
        calls["n"] += 1
        losses = real_losses(model, batch, task, label_smoothing)
        if calls["n"] == 3:
            losses.loss = losses.loss * math.nan
        return losses

    monkeypatch.setattr(train.trainer, "example_losses", nan_on_step_3)
    with pytest.raises(NonFiniteLossError) as caught:
        train_adapters(adapted, tokenizer, out)
    monkeypatch.undo()
    advice = re.search(r"--resume --override (\S+?);", str(caught.value))
    assert advice, str(caught.value)
    assert advice.group(1) == "train.lr=0.001"

    overrides = parse_overrides([advice.group(1)])
    resumed, _ = build(apply_overrides(config, overrides), seed=1)
    with caplog.at_level(logging.INFO, logger="train"):
        metrics = train_adapters(resumed, tokenizer, out, resume=True, overridden=tuple(overrides))
    assert metrics["steps"] == 6
    assert "train.lr: 0.01 -> 0.001 (applied, --override)" in caplog.text
    # linear decay over 6 steps, logged after each step: 0.001 x (6 - 3) / 6 at step 3 (0.005 had the lr been kept)
    assert re.search(r"step 3/6 .* lr 0\.0005$", caplog.text, re.MULTILINE), caplog.text
    state = torch.load(out / "checkpoints" / "step-6" / "trainer_state.pt", weights_only=True)
    assert state["scheduler"]["base_lrs"] == [1e-3] and state["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3


def test_override_max_steps_trains_a_finished_run_further(finished_run: Path, llama_lm: Path, lm_data: dict,
                                                          tmp_path: Path):
    out = _copy(finished_run, tmp_path)
    config = _resume_config(llama_lm, lm_data, out)
    shorter = apply_overrides(config, parse_overrides(["train.max_steps=6"]))
    adapted, tokenizer = build(shorter)
    with pytest.raises(ResumeError, match=r"already reached step 8, this config ends at step 6; give train.max_steps"):
        train_adapters(adapted, tokenizer, out, resume=True, overridden=("train.max_steps",))

    longer = apply_overrides(config, parse_overrides(["train.max_steps=12"]))
    adapted, tokenizer = build(longer)
    assert train_adapters(adapted, tokenizer, out, resume=True, overridden=("train.max_steps",))["steps"] == 12
    assert [row["step"] for row in json.loads((out / METRICS_FILE).read_text())["history"]] == [4, 8, 12]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--override", "train.lr=1e-3"], "--override train.lr=1e-3: --override changes a resumed run and needs "
                                          "--resume"),
        (["--resume", "--override", "train.seed=3"], "'train.seed' cannot be changed on resume; --override takes "
                                                     "train.max_steps, train.epochs, train.lr, train.max_grad_norm"),
        (["--resume", "--override", "train.lr"], "--override train.lr: expected KEY=VALUE"),
        (["--resume", "--override", "train.lr=-1"], "train.lr"),
        (["--resume", "--override", "train.epochs=3"], "train.max_steps=8 is set and decides the length"),
    ],
)
def test_bad_overrides_are_usage_errors(argv: list, message: str, llama_lm: Path, lm_data: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture):
    config = _resume_config(llama_lm, lm_data, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(config))
    assert apply_main([str(path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_override_values_read_as_the_config_reads_them():
    assert parse_overrides(["train.lr=1e-4", "train.max_grad_norm=null", "train.max_steps=12"]) == {
        "train.lr": 1e-4, "train.max_grad_norm": None, "train.max_steps": 12}


# ---- 4. a new run does not delete an earlier run's checkpoints unless told to --------------------------------
def _with_user_files(run: Path) -> None:
    (run / "notes.txt").write_text("what I tried\n")
    (run / "onnx").mkdir()
    (run / "onnx" / "model.onnx").write_bytes(b"an export of this run")


def test_a_new_run_into_an_earlier_runs_output_dir_is_refused(finished_run: Path, llama_lm: Path, lm_data: dict,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch):
    out = _copy(finished_run, tmp_path)
    _with_user_files(out)
    before = file_hashes(out)
    config = _resume_config(llama_lm, lm_data, out)
    adapted, tokenizer = build(config)
    with pytest.raises(ExistingRunError) as caught:
        train_adapters(adapted, tokenizer, out)
    assert str(caught.value) == (
        f"output_dir {out} holds an earlier run's checkpoints (checkpoints/step-8, checkpoints/step-4, "
        f"adapter.safetensors, surgery.yaml, checkpoint.json, ...); continue that run with --resume, replace it with "
        f"--overwrite (which removes only these files), or choose another output_dir")
    assert file_hashes(out) == before

    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(config))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(surgery.apply, "plan", no_model)
    assert apply_main([str(path)]) == 2
    assert "holds an earlier run's checkpoints" in capsys.readouterr().err
    assert apply_main([str(path), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert file_hashes(out) == before


def test_overwrite_replaces_only_the_earlier_runs_files(finished_run: Path, llama_lm: Path, lm_data: dict,
                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = _copy(finished_run, tmp_path)
    _with_user_files(out)
    user_files = {k: v for k, v in file_hashes(out).items() if k in ("notes.txt", "onnx/model.onnx")}
    old_manifest = (out / "checkpoint.json").read_bytes()
    adapted, tokenizer = build(_resume_config(llama_lm, lm_data, out, max_steps=2, save_every=1,
                                              keep_checkpoints=5))
    with caplog.at_level(logging.WARNING, logger="train"):
        assert train_adapters(adapted, tokenizer, out, overwrite=True)["steps"] == 2
    assert "--overwrite: removing the earlier run's checkpoints/step-8, checkpoints/step-4" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert (out / "checkpoint.json").read_bytes() != old_manifest
    assert {k: v for k, v in file_hashes(out).items() if k in user_files} == user_files
    load_checkpoint(out)


# ---- 5. an adapter of another rank than the config names the layer and both shapes ---------------------------
def test_an_adapter_of_another_rank_names_the_layer_and_both_shapes(finished_run: Path, llama_lm: Path,
                                                                   lm_data: dict, tmp_path: Path):
    """The resume path refuses the config first (method.r, test above); restoring the tensors into a model built
    with another rank, as any caller of restore_tensors may, names the layer, the tensor and both shapes."""
    folder = _copy(finished_run, tmp_path) / "checkpoints" / "step-8"
    before = file_hashes(folder)
    other_rank = make_config(llama_lm, "causal-lm", {"name": "lora", "r": 8}, lm_data, tmp_path / "other",
                             max_steps=8)
    adapted, _ = build(other_rank)
    with pytest.raises(CheckpointError) as caught:
        restore_adapters(adapted, folder)
    message = str(caught.value)
    for part in (f"{folder / ADAPTER_FILE}: layer 'model.layers.0.self_attn.q_proj'", "size mismatch for lora_A",
                 "shape torch.Size([4, 32]) from checkpoint", "the shape in current model is torch.Size([8, 32])",
                 "load it with the rank and base model it was saved with"):
        assert part in message, f"{part!r} missing from: {message}"
    assert file_hashes(folder) == before


# ---- 6. saving: fsynced before the manifest; a full disk names the folder and the bytes, and keeps the last -----
def test_files_and_folders_are_fsynced_before_the_manifest_and_the_rename(llama_lm: Path, lm_data: dict,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    adapted, _ = build(_resume_config(llama_lm, lm_data, tmp_path / "run"))
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    root = tmp_path / "run" / "checkpoints"
    save_training_checkpoint(adapted, root, 1, {"step": 1, "moments": torch.ones(3)}, keep=2)
    monkeypatch.undo()

    def first(kind: str, match) -> int:
        return next(i for i, (k, path) in enumerate(events) if k == kind and match(Path(path)))

    manifest = first("replace", lambda p: p.name == MANIFEST_FILE)
    tmp_folder = Path(events[manifest][1]).parent
    for name in (ADAPTER_FILE, CONFIG_FILE):
        written = first("replace", lambda p, n=name: p.name == n)
        assert first("fsync", lambda p, n=name: p.name.startswith(f".{n}.")) < written, f"{name} fsynced, renamed"
    assert first("fsync", lambda p: p.name == STATE_FILE) < manifest
    last_file = first("replace", lambda p: p.name == CONFIG_FILE)
    assert any(k == "fsync" and Path(p) == tmp_folder for k, p in events[last_file:manifest]), "folder fsynced"
    moved = first("rename", lambda p: p == root / "step-1")
    assert manifest < moved and any(k == "fsync" and Path(p) == root for k, p in events[moved:]), "root fsynced"
    check_folder(root / "step-1")


def _full_disk_while_writing(target: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """After the step-2 checkpoint, the write of ``target`` puts half its bytes on disk and fails with ENOSPC."""
    seen: dict = {}

    def write_then_fail(handle_or_path) -> None:
        seen.setdefault("step-2", file_hashes(out / "checkpoints" / "step-2"))
        if hasattr(handle_or_path, "write"):
            handle_or_path.write(b"\0" * 512)
        else:
            Path(handle_or_path).write_bytes(b"\0" * 512)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if target == "trainer_state.pt":
        real = torch.save

        def save(obj, handle, *args, **kwargs):
            if not (out / "checkpoints" / "step-2").exists():
                return real(obj, handle, *args, **kwargs)
            write_then_fail(handle)

        monkeypatch.setattr(torch, "save", save)
    else:
        real_file = surgery.checkpoint.save_file

        def save_file(tensors, path, metadata=None):
            if not (out / "checkpoints" / "step-2").exists():
                return real_file(tensors, path, metadata=metadata)
            write_then_fail(path)

        monkeypatch.setattr(surgery.checkpoint, "save_file", save_file)
    return seen


@pytest.mark.parametrize("target", ["trainer_state.pt", "adapter.safetensors"])
def test_a_full_disk_names_the_folder_and_the_bytes_and_keeps_the_last_checkpoint(
    target: str, llama_lm: Path, lm_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "run"
    config = _resume_config(llama_lm, lm_data, out, max_steps=6, save_every=2)
    adapted, tokenizer = build(config)
    seen = _full_disk_while_writing(target, out, monkeypatch)
    with pytest.raises(DiskFullError) as caught:
        train_adapters(adapted, tokenizer, out)
    monkeypatch.undo()

    message = str(caught.value)
    assert re.fullmatch(
        rf"step 4: cannot save into {re.escape(str(out / 'checkpoints'))}, the disk is full \(\[Errno 28\] No space "
        rf"left on device\): the checkpoint needs at least [0-9,]+ bytes, [0-9,]+ are free there; free space, or move "
        rf"output_dir to a disk with room; the last good checkpoint is {re.escape(str(out / 'checkpoints'))}/step-2, "
        rf"continue from it with --resume", message), message
    assert "inline_container" not in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"], "no half-written folder is left"
    assert file_hashes(out / "checkpoints" / "step-2") == seen["step-2"]
    load_checkpoint(out / "checkpoints" / "step-2")
    resumed, _ = build(config, seed=1)
    assert train_adapters(resumed, tokenizer, out, resume=True)["steps"] == 6


def test_a_surgery_only_run_refuses_an_earlier_checkpoint_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Without a train section surgery.apply saves the freshly initialised adapters: into a folder holding a trained
    checkpoint that would replace it."""
    import yaml

    base = tiny_base(tmp_path, "bert", "seq-cls")
    out = tmp_path / "run"
    config = {"model": {"name_or_path": str(base), "task": "seq-cls", "num_labels": 2}, "targets": ["query"],
              "method": {"name": "lora", "r": 2}, "output_dir": str(out)}
    path = tmp_path / "surgery.yaml"
    path.write_text(yaml.safe_dump(config))
    assert apply_main([str(path)]) == 0
    before = file_hashes(out)
    capsys.readouterr()
    assert apply_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} holds an earlier run's checkpoints" in err and "--overwrite" in err
    assert file_hashes(out) == before
    assert apply_main([str(path), "--overwrite"]) == 0 and (out / MANIFEST_FILE).is_file()
