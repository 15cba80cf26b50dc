"""FSDP version 2 (two CPU processes over gloo, see tests/train/fsdp_worker.py): the sharded run trains the same
adapters as one process at the same global batch, through a c3LA chain switch (the link folded into sharded base
weights, B zeroed, its sharded Adam moments reset), gradient accumulation and clipping; and a run stopped after a
step checkpoint and resumed under FSDP ends where the uninterrupted one does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from surgery.checkpoint import ADAPTER_FILE
from tests.train.helpers import build, make_config
from train.trainer import train_adapters

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
METHOD = {"name": "c3la", "r": 4, "chain_length": 2, "chain_every": 2}
COMMON = {"max_steps": 4, "save_every": 2, "grad_accum": 2, "max_grad_norm": 0.5, "eval_before_training": False}


def _launch(config_file: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [ACCELERATE, "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
               "TRANSFORMER_BASED_WRAP", "--fsdp_cpu_ram_efficient_loading", "false", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "tests.train.fsdp_worker", str(config_file), *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _config_file(llama_lm: Path, lm_data: dict, folder: Path, path: Path) -> Path:
    config = make_config(llama_lm, "causal-lm", METHOD, lm_data, folder, batch_size=2, **COMMON)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _assert_same(actual: Path, expected: Path) -> None:
    got, want = load_file(actual / ADAPTER_FILE), load_file(expected / ADAPTER_FILE)
    assert got.keys() == want.keys()
    assert any(key.endswith("link_delta") and tensor.shape[0] == 1 for key, tensor in got.items()), "no switch ran"
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_fsdp2_equals_one_process_and_resumes(llama_lm: Path, lm_data: dict, tmp_path: Path):
    one = make_config(llama_lm, "causal-lm", METHOD, lm_data, tmp_path / "one", batch_size=4, **COMMON)
    adapted, tokenizer = build(one, seed=0)
    train_adapters(adapted, tokenizer, one.output_dir)

    straight = _config_file(llama_lm, lm_data, tmp_path / "straight", tmp_path / "straight.yaml")
    _launch(straight)
    _assert_same(tmp_path / "straight", tmp_path / "one")

    resumed = _config_file(llama_lm, lm_data, tmp_path / "resumed", tmp_path / "resumed.yaml")
    _launch(resumed, "--stop-after", "2")
    assert not (tmp_path / "resumed" / ADAPTER_FILE).exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step-2").is_dir()
    _launch(resumed, "--resume")
    _assert_same(tmp_path / "resumed", tmp_path / "one")
