"""Whole tensors out of FSDP2's shards, for the few moments the trainer needs them.

Under ``accelerate launch`` with FSDP version 2, every parameter becomes a ``DTensor`` sharded on dim 0 across the
processes, and AdamW's moments follow. Forward and backward never see that (FSDP gathers each block around its
use), but three things read or write whole tensors:

- a checkpoint (adapter tensors, trained modules, optimizer moments): every process gathers, the main one writes;
- a resume: the saved whole moments are cut back into this process's shards;
- a schedule hook that rewrites weights (c3LA's chain switch folds a link into the frozen base and zeroes ``B``):
  the layers whose hook is due are gathered, the hook runs on whole tensors, and each process copies its own
  rows back into its shard.

Every gather is a collective: all processes call these functions at the same points, in the same order (they run
the same loop). Without sharding (one process, DDP) nothing here copies or communicates: the functions hand the
tensors back as they are, so checkpoints are the same files either way and a run may resume under another
parallelism with the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def whole_parameters(modules: Iterable[nn.Module], writeback: bool = False) -> Iterator[dict[int, nn.Parameter]]:
    """Within the block, every sharded parameter of ``modules`` (and their children) is replaced on its module by a
    plain parameter holding the whole tensor; yields ``id(whole parameter) -> the sharded original`` so callers can
    name the originals (the optimizer knows only those). On a normal exit with ``writeback``, each process copies
    its rows of the whole tensors back into its shards; then the originals are put back. After an exception the
    shards are left untouched."""
    swapped: list[tuple[nn.Module, str, DTensor, nn.Parameter]] = []
    seen: set[int] = set()
    for module in modules:
        for owner in module.modules():
            if id(owner) in seen:
                continue
            seen.add(id(owner))
            for name, param in list(owner._parameters.items()):
                if isinstance(param, DTensor):
                    replacement = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                    owner._parameters[name] = replacement
                    swapped.append((owner, name, param, replacement))
    completed = False
    try:
        yield {id(replacement): original for _, _, original, replacement in swapped}
        completed = True
    finally:
        for owner, name, original, replacement in swapped:
            if completed and writeback:
                copy_into_shard(original, replacement.detach())
            owner._parameters[name] = original


@torch.no_grad()
def copy_into_shard(shard: DTensor, values: torch.Tensor) -> None:
    """Write this process's part of the whole tensor ``values`` into ``shard`` (no communication: every process
    holds the same ``values``)."""
    local = distribute_tensor(values.to(shard.dtype), shard.device_mesh, shard.placements, src_data_rank=None)
    shard.to_local().copy_(local.to_local())


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded moment gathered into a whole tensor (a collective)."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: whole(value) if torch.is_tensor(value) else value for key, value in entry.items()}
                      for index, entry in state["state"].items()}
    return state


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer state (whole tensors) with each moment of a sharded parameter cut to this process's shard,
    ready for ``optimizer.load_state_dict``; unsharded parameters' entries stay as they are."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    sharded = {}
    for index, entry in state["state"].items():
        param = params[index] if index < len(params) else None
        if isinstance(param, DTensor):
            entry = {key: _shard_like(value, param) for key, value in entry.items()}
        sharded[index] = entry
    return {**state, "state": sharded}


def _shard_like(value: Any, param: DTensor) -> Any:
    """A moment (same shape as its parameter) as a shard laid out like ``param``; scalars (``step``) unchanged."""
    if not torch.is_tensor(value) or tuple(value.shape) != tuple(param.shape):
        return value
    return distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements,
                             src_data_rank=None)

