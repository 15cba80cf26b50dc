"""One training run under FSDP version 2 on CPU, for the sharded-training test:

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m tests.train.fsdp_worker CONFIG.yaml
        [--resume] [--stop-after STEP]

accelerate turns ``--use_fsdp`` into FSDP only on accelerators (on CPU it falls back to plain data parallelism),
while PyTorch's FSDP2 itself shards over gloo on CPU. So this worker labels the CPU process group as a multi-GPU
one before the trainer's ``Accelerator`` is built; from there on accelerate's own FSDP2 preparation runs (the
model's blocks and root are ``fully_shard``-ed, parameters become DTensors, the optimizer is re-pointed) and the
trainer runs unchanged. ``--stop-after STEP`` ends every process right after the step checkpoint of ``STEP`` is
written, as a killed job would stop.
"""

from __future__ import annotations

import argparse
import os

from accelerate import PartialState
from accelerate.utils import DistributedType

import train.trainer
from surgery.config import load_config
from tests.train.helpers import build
from train.trainer import train_adapters


def stop_after(step: int) -> None:
    real_save = train.trainer.save

    def save_then_stop(run: train.trainer.Run) -> None:
        real_save(run)
        if run.step == step:
            os._exit(0)

    train.trainer.save = save_then_stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int)
    args = parser.parse_args()
    state = PartialState(cpu=True)  # gloo over the CPU processes torchrun started
    assert state.num_processes > 1, "launch with accelerate launch --num_processes 2"
    state.distributed_type = DistributedType.MULTI_GPU  # see the module docstring
    if args.stop_after is not None:
        stop_after(args.stop_after)
    config = load_config(args.config)
    adapted, tokenizer = build(config, seed=0)
    metrics = train_adapters(adapted, tokenizer, config.output_dir, resume=args.resume)
    assert PartialState().distributed_type == DistributedType.FSDP and metrics["steps"] > 0


if __name__ == "__main__":
    main()
