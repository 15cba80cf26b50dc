"""Two CPU processes (accelerate launch, DDP over gloo) train the same adapters as one process at the same global
batch: the gradient is normalised by the global target count, so only the summation order differs."""

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


def _write(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# c3LA: trained B plus a chain switch at step 2 that every process must make identically
METHOD = {"name": "c3la", "r": 4, "chain_length": 2, "chain_every": 2}


def test_two_processes_equal_one(llama_lm: Path, lm_data: dict, tmp_path: Path):
    common = {"max_steps": 4, "eval_before_training": False}
    one = make_config(llama_lm, "causal-lm", METHOD, lm_data, tmp_path / "one", batch_size=8, **common)
    two = make_config(llama_lm, "causal-lm", METHOD, lm_data, tmp_path / "two", batch_size=4, **common)
    adapted, tokenizer = build(one, seed=0)  # in this process, as tests.train.dp_worker does it
    train_adapters(adapted, tokenizer, one.output_dir)
    _run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "-m", "tests.train.dp_worker", str(_write(two, tmp_path / "two.yaml"))])

    single, parallel = load_file(tmp_path / "one" / ADAPTER_FILE), load_file(tmp_path / "two" / ADAPTER_FILE)
    assert single.keys() == parallel.keys()
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    metrics = (tmp_path / "two" / "metrics.json").read_text()
    assert '"steps": 4' in metrics
