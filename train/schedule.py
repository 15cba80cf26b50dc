"""How long a run is, and the adapters' own schedule hooks (c3LA's chain switches) after every optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer

from surgery.methods import AdapterLayer, TrainProgress
from train.config import TrainConfig
from train.optim import reset_optimizer_state
from train.sharding import whole_parameters


@dataclass(frozen=True)
class Plan:
    """Optimizer steps per epoch and in total, from the per-process batch count."""

    steps_per_epoch: int
    total_steps: int
    grad_accum: int

    @classmethod
    def from_config(cls, config: TrainConfig, batches_per_epoch: int) -> Plan:
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        total = config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)
        return cls(steps_per_epoch, max(total, 1), config.grad_accum)

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def progress(self, step: int) -> TrainProgress:
        return TrainProgress(step, self.steps_per_epoch, self.total_steps, self.epochs)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batches_done_in_epoch(self, step: int) -> int:
        """Micro-batches of the current epoch already consumed after ``step`` optimizer steps."""
        return (step % self.steps_per_epoch) * self.grad_accum

    def epoch_ends(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps


def step_adapters(layers: dict[str, AdapterLayer], optimizer: Optimizer, progress: TrainProgress) -> dict[str, int]:
    """Run the ``after_optimizer_step`` hook of every layer whose ``schedule_due`` holds, on whole tensors (gathered
    and written back when FSDP shards them), and reset the optimizer state of the parameters it returns.

    Returns ``layer name -> parameters returned`` for the layers whose hook fired.
    """
    due = {name: layer for name, layer in layers.items() if layer.schedule_due(progress)}
    if not due:
        return {}
    fired: dict[str, int] = {}
    with whole_parameters(due.values(), writeback=True) as originals:
        for name, layer in due.items():
            params = layer.after_optimizer_step(progress)
            if params:
                reset_optimizer_state(optimizer, [originals.get(id(p), p) for p in params])
                fired[name] = len(params)
    return fired
