"""AdamW over exactly the parameters the adapters declare (and the modules trained in full), the linear schedule,
and the optimizer-state reset that c3LA's chain switches ask for."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup

from surgery.rewrite import AdaptedModel
from train.config import TrainConfig

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def param_groups(adapted: AdaptedModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """One AdamW group per (learning-rate scale, decay) pair.

    The scale is each adapter's ``lr_scale`` (LoRA+ trains B at ``lora_plus_ratio`` times A's rate). Weight decay
    applies to matrices only: biases, norms, ProDA's profile vectors and gate scalars are not decayed.
    """
    scales = adapted.lr_scales()
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, param in adapted.trainable_parameters().items():
        if id(param) in seen:
            continue
        seen.add(id(param))
        scale, decay = scales[name], (weight_decay if param.ndim >= 2 else 0.0)
        group = groups.setdefault(
            (scale, decay), {"params": [], "lr": lr * scale, "weight_decay": decay, "lr_scale": scale}
        )
        group["params"].append(param)
    if not groups:
        raise ValueError("nothing to train: the adapters declare no parameters and no module is trained in full")
    return list(groups.values())


def build_optimizer(adapted: AdaptedModel, config: TrainConfig) -> AdamW:
    return AdamW(param_groups(adapted, config.lr, config.weight_decay), lr=config.lr)


def build_scheduler(optimizer: Optimizer, config: TrainConfig, total_steps: int) -> LambdaLR:
    """Linear warm-up from 0 to each group's rate, then linear decay to 0 at ``total_steps``."""
    return get_linear_schedule_with_warmup(optimizer, config.warmup_for(total_steps), total_steps)


def set_peak_lr(optimizer: Optimizer, scheduler: LambdaLR, lr: float) -> None:
    """Make ``lr`` the peak rate of a restored optimizer and schedule (a resume with ``--override train.lr``):
    each group runs at ``lr`` times its ``lr_scale`` times the schedule's factor at the current step. With the
    saved ``lr`` it recomputes the rates the restored state already holds."""
    scheduler.base_lrs = [lr * group["lr_scale"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


@torch.no_grad()
def reset_optimizer_state(optimizer: Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Make AdamW treat ``params`` as freshly added: moments to zero and the per-parameter ``step`` to 0, so the
    next update's bias correction is that of a first step (a zeroed moment with a large step count would make the
    first update ~3x too large). The learning-rate schedule is global and keeps running. Returns how many
    parameters had state to reset (none before their first step)."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    reset = 0
    for param in params:
        if id(param) not in owned:
            raise ValueError(f"an adapter asked to reset a parameter of shape {tuple(param.shape)} that the optimizer "
                             f"does not train; after_optimizer_step may only return declared adapter parameters")
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in MOMENTS:
            if key in state:
                state[key].zero_()
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
        reset += 1
    return reset
