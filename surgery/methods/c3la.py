"""c3LA and r-c3LA (beyond-lora-cla.txt, section 2.3, algorithms 3-4): a chain of cLA links.

Each link trains ``B`` on one window of ``r`` input columns, as cLA does. At a link switch the link is folded into
the frozen base in place (``W0[:, idx] += s B``, accumulated in float32 and rounded once), recorded as
``(idx_j, s B_j)``, ``B`` is zeroed (the trainer resets its AdamW moments) and the window moves on:

- ``columns: first`` (c3LA): window j is columns ``[j r, (j + 1) r)`` modulo d_in, so every column is reachable;
- ``columns: random`` (r-c3LA): window j is a random block-aligned window not used yet: the blocks
  ``[b r, (b + 1) r)`` modulo d_in for b < ceil(d_in / r) (the last one wraps), visited in a random order from the
  layer's generator, then cycled in the same order.

Schedule: a chain of ``k = chain_length`` links has ``k - 1`` switches (the paper's proposition: d_in = k r
columns are covered by k windows). A switch happens after optimizer step ``(j + 1) P`` for link j, where P is
``chain_every`` steps, ``chain_every_epochs`` epochs, or by default (METHODS.md) ``floor(E / k)`` epochs, or, when
the planned epochs E are fewer than k, ``floor(T / k)`` optimizer steps of the run's T, so that the chain has its k
links (at least one step: a run of fewer than k steps gets one link per step); never after the last step, and
never more than ``k - 1`` times. The plan prints the schedule (:meth:`C3LALayer.schedule_note`).

The checkpoint keeps every finished link as ``link_idx`` (n, r) and ``link_delta`` (n, d_out, r), never a dense
d_out x d_in copy. Loading into a model built from the untouched base and calling :meth:`on_checkpoint_loaded`
replays the links into the base in the same order and dtype, so the trained weights come back bit for bit.
Links not yet in the base (loaded but not replayed) are still added in ``delta`` and in the fold, so the layer's
function always follows its state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.layers import weight_out_in
from surgery.methods.base import Fold, MethodConfig, TrainProgress, require
from surgery.methods.cla import CLAConfig, CLALayer, column_update, gather_linear, layer_generator

if TYPE_CHECKING:
    from train.config import TrainConfig


def default_switch_period(steps_per_epoch: int, total_steps: int, chain_length: int) -> int:
    """Optimizer steps per link by default (METHODS.md): ``floor(E / k)`` epochs of the planned ``E = T /
    steps_per_epoch``, or, when ``E < k``, ``floor(T / k)`` steps, so that the chain has its k links; at least 1."""
    epochs = total_steps / steps_per_epoch
    if epochs >= chain_length:
        return math.floor(epochs / chain_length) * steps_per_epoch
    return max(1, total_steps // chain_length)


class C3LAConfig(CLAConfig):
    name: Literal["c3la"] = "c3la"  # type: ignore[assignment]
    columns: Literal["first", "random"] = Field(  # type: ignore[assignment]
        "first", description="first: c3LA, consecutive windows modulo d_in; random: r-c3LA, random block-aligned "
        "windows without replacement, then cycled"
    )
    chain_length: int = Field(4, ge=1, description="k: links in the chain (k - 1 switches over the run)")
    chain_every: int | None = Field(None, gt=0, description="switch links every this many optimizer steps")
    chain_every_epochs: int | None = Field(
        None, gt=0, description="switch links every this many epochs; default floor(epochs / chain_length), or "
        "floor(steps / chain_length) steps when epochs < chain_length"
    )

    @model_validator(mode="after")
    def _one_switch_period(self) -> C3LAConfig:
        if self.chain_every is not None and self.chain_every_epochs is not None:
            raise ValueError(
                "method.chain_every and method.chain_every_epochs are both set; give one of them (steps or "
                "epochs), or neither for the default floor(epochs / chain_length) epochs"
            )
        return self


class C3LALayer(CLALayer):
    """x: (..., d_in) -> (..., d_out); cLA on the current window, finished links live in the base weight."""

    config_class = C3LAConfig
    noop_params = None
    not_swappable = ("its finished links are added into the base weight itself (W0[:, idx] += s B), so the base "
                     "differs per checkpoint")

    def __init__(self, base: nn.Module, config: C3LAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        r = config.r
        self.register_buffer("link_idx", torch.zeros(0, r, dtype=torch.long, device=self.device))  # (n, r)
        self.register_buffer(
            "link_delta", torch.zeros(0, self.d_out, r, dtype=self.adapter_dtype, device=self.device)
        )  # (n, d_out, r): s B_j of each finished link
        self.links_in_base = 0  # how many recorded links the base weight holds (not saved: it describes the base)

    # ---- windows -----------------------------------------------------------------------------------
    def initial_columns(self) -> torch.Tensor:
        return self.window(0)

    def window(self, link: int) -> torch.Tensor:
        """(r,) int64 on the CPU: the input columns of link ``link`` (0-based)."""
        r, d_in = self.config.r, self.d_in
        block = link
        if self.config.columns == "random":
            order = torch.randperm(math.ceil(d_in / r), generator=layer_generator(self.config.seed, self.layer_name))
            block = int(order[link % len(order)])
        return (block * r + torch.arange(r)) % d_in

    @property
    def n_links(self) -> int:
        """Finished links recorded so far."""
        return self.link_idx.shape[0]

    # ---- forward -----------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out); links not yet replayed into the base count here (frozen, no dropout)
        out = super().delta(x)
        for j in range(self.links_in_base, self.n_links):
            out = out + gather_linear(x, self.link_idx[j], self.link_delta[j])
        return out

    # ---- the chain ---------------------------------------------------------------------------------
    @torch.no_grad()
    def switch_link(self) -> None:
        """Fold the current link into the base in place, record it, zero B and move to the next window."""
        self.apply_pending_links()
        link_delta = self.scaling * self.cla_B.detach()  # (d_out, r)
        self.add_to_base(self.cla_idx, link_delta)
        self.link_idx = torch.cat([self.link_idx, self.cla_idx[None]])
        self.link_delta = torch.cat([self.link_delta, link_delta[None]])
        self.links_in_base = self.n_links
        self.cla_B.zero_()
        self.cla_idx.copy_(self.window(self.n_links))

    @torch.no_grad()
    def add_to_base(self, idx: torch.Tensor, columns: torch.Tensor) -> None:
        """W0[:, idx] += columns in place (through the (d_out, d_in) view, so Conv1D too); one rounding."""
        weight = weight_out_in(self.base)  # (d_out, d_in) view of the stored tensor
        dtype = self.fold_dtype()
        updated = weight.index_select(1, idx).to(dtype) + columns.to(dtype)  # (d_out, r)
        weight.index_copy_(1, idx, updated.to(weight.dtype))

    @torch.no_grad()
    def apply_pending_links(self) -> None:
        """Replay the recorded links the base does not hold yet, in order (idempotent)."""
        for j in range(self.links_in_base, self.n_links):
            self.add_to_base(self.link_idx[j], self.link_delta[j])
        self.links_in_base = self.n_links

    def switch_period(self, progress: TrainProgress) -> int:
        """Optimizer steps per link."""
        cfg = self.config
        if cfg.chain_every is not None:
            return cfg.chain_every
        if cfg.chain_every_epochs is not None:
            return cfg.chain_every_epochs * progress.steps_per_epoch
        return default_switch_period(progress.steps_per_epoch, progress.total_steps, cfg.chain_length)

    @classmethod
    def schedule_note(cls, config: MethodConfig, train: TrainConfig | None) -> str | None:
        assert isinstance(config, C3LAConfig)
        k = config.chain_length
        if k == 1:
            return "c3LA chain of 1 link: no switch (plain cLA)"
        switches = f"{k - 1} switch" if k == 2 else f"{k - 1} switches"
        head = f"c3LA chain of {k} links: {switches} (never after the last step), "
        if config.chain_every is not None:
            return head + f"every {config.chain_every} optimizer steps"
        if config.chain_every_epochs is not None:
            return head + f"every {config.chain_every_epochs} epoch(s)"
        if train is not None and train.max_steps is None:
            epochs = train.epochs
            if epochs >= k:
                return head + f"every floor(E / k) = {math.floor(epochs / k)} epoch(s) (E = {epochs:g})"
            return head + (f"every floor(T / k) optimizer steps, T the run's steps (E = {epochs:g} epochs < k = {k}; "
                           f"T is known once the data is read)")
        steps = "" if train is None else f", T = {train.max_steps}: {max(1, train.max_steps // k)} steps"
        return head + f"every floor(E / k) epochs, or floor(T / k) optimizer steps when E < k{steps}"

    def schedule_due(self, progress: TrainProgress) -> bool:
        return self.switch_due(progress)

    def switch_due(self, progress: TrainProgress) -> bool:
        return (
            self.n_links < self.config.chain_length - 1
            and progress.step < progress.total_steps
            and progress.step >= (self.n_links + 1) * self.switch_period(progress)
        )

    def after_optimizer_step(self, progress: TrainProgress) -> list[nn.Parameter]:
        if not self.switch_due(progress):
            return []
        self.switch_link()
        return [self.cla_B]

    # ---- checkpoint --------------------------------------------------------------------------------
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resize the link buffers to the checkpoint's chain, then load; the base is touched only by
        :meth:`on_checkpoint_loaded`."""
        link_idx, link_delta = state.get("link_idx"), state.get("link_delta")
        require(
            link_idx is not None and link_delta is not None,
            self.layer_name,
            "checkpoint has no link_idx/link_delta; was it saved with another method?",
        )
        n, r, d_out = link_idx.shape[0], self.config.r, self.d_out
        require(
            tuple(link_idx.shape) == (n, r) and tuple(link_delta.shape) == (n, d_out, r),
            self.layer_name,
            f"checkpoint links have shapes {tuple(link_idx.shape)} and {tuple(link_delta.shape)}, expected "
            f"(n, {r}) and (n, {d_out}, {r}); was it saved with another rank or model?",
        )
        self.check_base_links(link_idx, link_delta)
        self.link_idx = torch.empty_like(link_idx, dtype=torch.long, device=self.device)
        self.link_delta = torch.empty_like(link_delta, dtype=self.adapter_dtype, device=self.device)
        super().load_adapter_state(state)

    def check_base_links(self, link_idx: torch.Tensor, link_delta: torch.Tensor) -> None:
        """The links already in the base must be the checkpoint's first ones (reloading the same chain)."""
        held = self.links_in_base
        same = held <= link_idx.shape[0] and torch.equal(
            self.link_idx[:held].cpu(), link_idx[:held].cpu().long()
        ) and torch.equal(self.link_delta[:held].cpu(), link_delta[:held].cpu().to(self.link_delta.dtype))
        require(
            same,
            self.layer_name,
            f"the base weight already holds {held} c3LA links that differ from the checkpoint's; load the "
            f"checkpoint into a model built from the untouched base",
        )

    def on_checkpoint_loaded(self) -> None:
        self.apply_pending_links()

    # ---- fold --------------------------------------------------------------------------------------
    def static_update(self, dtype: torch.dtype) -> torch.Tensor:
        """(d_out, d_in) in ``dtype``: the current B plus every recorded link the base does not hold yet."""
        dense = super().static_update(dtype)
        for j in range(self.links_in_base, self.n_links):
            dense += column_update(self.link_idx[j], self.link_delta[j].to(dense.dtype), self.d_in)
        return dense

    def fold(self) -> Fold:
        folded = super().fold()
        folded.note = f"dense (W[:, idx_j] += s B_j for {self.n_links + 1} links)"
        return folded

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chain_length={self.config.chain_length}, links={self.n_links}"
