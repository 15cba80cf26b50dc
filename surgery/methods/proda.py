"""ProDA (proda.txt, eq. 2-6): LoRA plus an additive profile P and a gated interaction with BA.

    P        = b_c 1^T + 1 b_r^T                                  (never materialised in the forward)
    gamma(x) = gamma_g + sigmoid(W_up relu(W_down x))             one scalar per token
    delta(x) = s B A x~ + P x + gamma(x) s (B A (.) P) x~,        x~ = drop(x)

with ``P x = b_c sum(x) + (b_r . x) 1`` and ``(B A (.) P) x = b_c (B A x) + B A (b_r x)``. The profile and the
controller see the undropped ``x``; only the low-rank paths see ``x~``. Fold: ``W' = W0 + s B A + P +
gamma_g s (B A (.) P)``; the input-dependent part of gamma stays, fused into the static matmul, as
:class:`ProDAFolded`.

Sibling targets that read one input (q, k, v; gate, up: ``surgery.groups``) compute that residual's down-projection
and gate once per group after the fold (``group_siblings``, on by default): one stacked down-projection
``d_in -> G (2r + d_b)``, one gate block, and each member's ``2r`` gated columns into its own static matmul
(:class:`ProDASiblingGroup`). Exact: every entry is the per-layer form's (the gate's block matrix adds only zeros).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.groups import InputMemo, SiblingMember, sibling_groups
from surgery.layers import weight_out_in
from surgery.methods.base import AdapterLayer, Fold, Macs, MethodConfig, kaiming_
from surgery.tolerances import layer_tolerance


class ProDAConfig(MethodConfig):
    name: Literal["proda"] = "proda"
    r: int = Field(8, gt=0, description="adapter rank (the paper's default 8)")
    alpha: float | None = Field(16.0, gt=0, description="scaling numerator (the paper's 16); 2r when null")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the low-rank paths' input, training only")
    d_b: int = Field(8, gt=0, description="bottleneck width of the gate controller W_up relu(W_down x)")
    group_siblings: bool = Field(True, description="after the fold, targets that read one input (q, k, v; gate, up) "
                                                   "share one stacked down-projection and gate (exact)")


class ProDALayer(AdapterLayer):
    config_class = ProDAConfig
    noop_params = ("lora_B", "profile_col", "profile_row")  # B = 0 and P = 0: every term of delta is 0

    siblings: tuple[str, ...] | None = None  # the sibling targets sharing this layer's input (wrap_targets)

    def __init__(self, base: nn.Module, config: ProDAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        self.lora_A = self.new_param(config.r, self.d_in)  # A: (r, d_in)
        self.lora_B = self.new_param(self.d_out, config.r)  # B: (d_out, r)
        self.profile_col = self.new_param(self.d_out)  # b_c: (d_out,)
        self.profile_row = self.new_param(self.d_in)  # b_r: (d_in,)
        self.gamma_global = self.new_param(1)  # gamma_g: (1,), broadcasts against the (..., 1) gate
        self.controller_down = self.new_param(config.d_b, self.d_in)  # W_down: (d_b, d_in)
        self.controller_up = self.new_param(1, config.d_b)  # W_up: (1, d_b)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.lora_B.zero_()
            self.profile_col.zero_()
            self.profile_row.zero_()
            self.gamma_global.zero_()
            kaiming_(self.controller_down)
            kaiming_(self.controller_up)

    @classmethod
    def wrap_targets(cls, targets: dict[str, nn.Module], config: MethodConfig,
                     model: nn.Module | None = None) -> dict[str, nn.Module]:
        """Each target alone; with ``group_siblings``, each layer also learns its sibling targets (the fold hands
        them to :class:`ProDAFolded`, which ``export.fold`` links into one :class:`ProDASiblingGroup`)."""
        layers = super().wrap_targets(targets, config, model=model)
        if isinstance(config, ProDAConfig) and config.group_siblings:
            for group in sibling_groups(layers):
                for name in group:
                    layers[name].siblings = group
        return layers

    # ---- forward -----------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        x_drop = self.dropout(x)
        low_rank, row_scaled = (x_drop @ self.stacked_down().t()).chunk(2, dim=-1)  # A x~, A (b_r x~): (..., r)
        ba_x = low_rank @ self.lora_B.t()  # B A x~: (..., d_out)
        interaction = self.profile_col * ba_x + row_scaled @ self.lora_B.t()  # (B A (.) P) x~: (..., d_out)
        gamma = self.gamma_global + self.gate(x)  # (..., 1)
        return self.scaling * (ba_x + gamma * interaction) + self.profile(x)

    def stacked_down(self) -> torch.Tensor:
        """[A ; A diag(b_r)]: (2r, d_in), formed once per call, not per token."""
        return torch.cat([self.lora_A, self.lora_A * self.profile_row], dim=0)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(W_up relu(W_down x)), the input-dependent part of gamma. x: (..., d_in) -> (..., 1)"""
        return torch.sigmoid(torch.relu(x @ self.controller_down.t()) @ self.controller_up.t())

    def profile(self, x: torch.Tensor) -> torch.Tensor:
        """P x = b_c sum(x) + (b_r . x) 1 without forming P. x: (..., d_in) -> (..., d_out)"""
        return self.profile_col * x.sum(dim=-1, keepdim=True) + (x @ self.profile_row).unsqueeze(-1)

    # ---- trainable parameters ----------------------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {
            "lora_A": self.lora_A,
            "lora_B": self.lora_B,
            "profile_col": self.profile_col,
            "profile_row": self.profile_row,
            "gamma_global": self.gamma_global,
            "controller_down": self.controller_down,
            "controller_up": self.controller_up,
        }

    # ---- costs -------------------------------------------------------------------------------------
    @classmethod
    def count_params(cls, d_in: int, d_out: int, config: MethodConfig) -> int:
        assert isinstance(config, ProDAConfig)
        # A, B; b_c, b_r; W_down, W_up, gamma_g
        return config.r * (d_in + d_out) + (d_in + d_out) + config.d_b * d_in + config.d_b + 1

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        assert isinstance(config, ProDAConfig)
        r, d_b = config.r, config.d_b
        # METHODS.md's per-token cost: one down-projection d_in -> 2r + d_b ([A ; A diag(b_r) ; W_down]), the gate's
        # W_up (d_b), one up-projection 2r -> d_out. Element-wise products with vectors and the scalar gate are not
        # counted (as in LoRA's count), so the unmerged adapter and the fold's residual cost the same.
        return Macs(base=d_in * d_out, adapter=(2 * r + d_b) * d_in + 2 * r * d_out + d_b)

    # ---- fold --------------------------------------------------------------------------------------
    def static_update(self, dtype: torch.dtype) -> torch.Tensor:
        """s B A + P + gamma_g s (B A (.) P): (d_out, d_in) in ``dtype``, the static part of gamma included."""
        lora_A, lora_B = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        col, row = self.profile_col.detach().to(dtype), self.profile_row.detach().to(dtype)
        ba = lora_B @ lora_A  # (d_out, d_in)
        profile = col.unsqueeze(1) + row.unsqueeze(0)  # P: (d_out, d_in); the fold forms W' anyway
        gamma_global = self.gamma_global.detach().to(dtype)
        return self.scaling * ba + profile + gamma_global * self.scaling * (ba * profile)

    def fold(self) -> Fold:
        dtype = self.fold_dtype()
        lora_A, lora_B = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        col, row = self.profile_col.detach().to(dtype), self.profile_row.detach().to(dtype)
        static = self.merged_layer(self.static_update(dtype))
        folded = ProDAFolded.from_factors(
            weight_out_in(static).detach(), self.base_bias, lora_A, lora_B, col, row,
            self.controller_down.detach().to(dtype), self.controller_up.detach().to(dtype), self.scaling,
        )
        folded.siblings = self.siblings
        r, d_b = self.config.r, folded.d_b
        macs = self.macs_per_token(self.d_in, self.d_out, self.config)  # the residual costs what the adapter did
        shared = "" if not self.siblings else (
            f"; down-projection and gate computed once for the sibling group "
            f"({', '.join(name.rpartition('.')[2] for name in self.siblings)})")
        return Fold(
            module=folded,
            residual=f"sigmoid(W_up relu(W_down x)) * s (BA (.) P) x, fused: d_in -> 2r+d_b={2 * r + d_b}, gate, "
                     f"then [W' | up] [x ; gate * low_rank] in the static matmul (K = d_in + {2 * r}){shared}",
            note="dense",
            macs_per_token=macs.base + macs.adapter,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_b={self.config.d_b}"


class ProDAFolded(SiblingMember, nn.Module):
    """ProDA after the fold: ``W' x + b + sigmoid(W_up relu(W_down x)) * s [diag(b_c) B | B] [A ; A diag(b_r)] x``.

    Fused as METHODS.md asks, one step further: one down-projection ``d_in -> 2r + d_b`` (rows ``A``,
    ``A diag(b_r)``, ``W_down``), a split, the gate on the ``d_b`` part, the scalar gate times the ``2r`` low-rank
    part, and the up-projection ``s [diag(b_c) B | B]`` rides in the static matmul as ``K`` columns:
    ``[W' | up] [x ; gate * low_rank] + b``. So the export adds no ``d_out``-wide matmul, multiply or add to the
    base layer (measured: 2 points less latency over the base on MiniLM than a separate up-projection and add).
    x: (..., d_in) -> (..., d_out). Frozen, in the base layer's dtype.

    Linked with its siblings (:meth:`link_siblings`), the gated low-rank part comes from their shared
    :class:`ProDASiblingGroup` (held by the first member as a submodule, by the others as a plain reference), except
    for inference tensors, which have no version counter to key the group's memo on: then each member computes its own.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, gate_up: torch.Tensor,
                 rank: int) -> None:
        super().__init__()
        d_b, d_in = gate_up.shape[1], down.shape[1]
        if down.shape[0] != 2 * rank + d_b or weight.shape[1] != d_in + 2 * rank or gate_up.shape[0] != 1:
            raise ValueError(f"ProDAFolded: weight {tuple(weight.shape)}, down {tuple(down.shape)} and gate "
                             f"{tuple(gate_up.shape)} do not fit r={rank}, d_b={d_b}")
        self.rank, self.d_b, self.d_in = rank, d_b, d_in
        self.down = frozen_linear(down)  # (2r + d_b, d_in)
        self.gate_up = frozen_linear(gate_up)  # (1, d_b)
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)  # (d_out, d_in + 2r)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.sibling_index = 0  # this member's place in its sibling group (set by link_siblings)

    @classmethod
    def from_factors(cls, static_weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, profile_col: torch.Tensor, profile_row: torch.Tensor,
                     controller_down: torch.Tensor, controller_up: torch.Tensor, scaling: float) -> ProDAFolded:
        """Stack the factors (all in one accumulation dtype), round them once to the static weight's dtype."""
        dtype = static_weight.dtype
        down = torch.cat([lora_A, lora_A * profile_row, controller_down], dim=0)  # (2r + d_b, d_in)
        up = scaling * torch.cat([profile_col.unsqueeze(1) * lora_B, lora_B], dim=1)  # (d_out, 2r)
        weight = torch.cat([static_weight, up.to(dtype)], dim=1)  # (d_out, d_in + 2r)
        bias = None if bias is None else bias.detach().to(dtype)
        return cls(weight, bias, down.to(dtype), controller_up.to(dtype), rank=lora_A.shape[0])

    @property
    def static_weight(self) -> torch.Tensor:
        """``W'`` (d_out, d_in): what the fold merged."""
        return self.weight[:, : self.d_in]

    def gated_low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``gate(x) * [A ; A diag(b_r)] x``: x (..., d_in) -> (..., 2r); through the sibling group when linked."""
        group = getattr(self, "sibling_group", None)
        if group is not None and group.shares(x):
            return group(x)[self.sibling_index]
        return self.own_gated_low_rank(x)

    def own_gated_low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """The per-layer form of :meth:`gated_low_rank`. x (..., d_in) -> (..., 2r)."""
        low_rank, hidden = self.down(x).split([2 * self.rank, self.d_b], dim=-1)  # (..., 2r), (..., d_b)
        gate = torch.sigmoid(self.gate_up(torch.relu(hidden)))  # (..., 1)
        return gate * low_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        return F.linear(torch.cat([x, self.gated_low_rank(x)], dim=-1), self.weight, self.bias)

    @classmethod
    def link_siblings(cls, members: list[nn.Module]) -> None:
        """One :class:`ProDASiblingGroup` for ``members`` (folded siblings reading one input, in group order),
        checked against each member's own form on random inputs; the first member holds it as a submodule (so
        ``.to()``, the state dict and the exporter's weight inputs see its tensors once), the others refer to it."""
        folded = [m for m in members if isinstance(m, ProDAFolded)]
        group = ProDASiblingGroup.from_members(folded)
        group.check(folded)
        for index, member in enumerate(folded):
            member.sibling_index = index
            if index == 0:
                member.sibling_group = group  # registered: a submodule of the first member
            else:
                member.__dict__["sibling_group"] = group  # a plain reference, not a second registration


class ProDASiblingGroup(nn.Module):
    """The gated low-rank part of G folded sibling ProDA layers (same input, rank and d_b), computed once per input.

    ``down`` stacks the members' down-projections as ``[A_1 ; A_1 diag(b_r,1) ; ... ; A_G ; A_G diag(b_r,G) ;
    W_down,1 ; ... ; W_down,G]`` (``G (2r + d_b)`` rows): one matmul. ``gate`` is ``(G 2r, G d_b)``, member i's
    ``W_up`` in the 2r rows of its low-rank entries and its d_b columns, zero elsewhere, so ``sigmoid(gate
    relu(hidden))`` is each member's gate repeated over its 2r entries: one matmul, one sigmoid, one multiply for the
    group. Exact against the per-layer form: the same products, the zeros add nothing. It costs
    ``(G 2r)(G d_b) - G d_b`` MACs per token more than G separate gates (1128 for q, k, v at r = d_b = 8).
    x: (..., d_in) -> G tensors (..., 2r), memoised per input (:class:`surgery.groups.InputMemo`).
    """

    def __init__(self, down: torch.Tensor, gate: torch.Tensor, rank: int, members: int) -> None:
        super().__init__()
        d_b = gate.shape[1] // members
        if down.shape[0] != members * (2 * rank + d_b) or gate.shape != (members * 2 * rank, members * d_b):
            raise ValueError(f"ProDASiblingGroup: down {tuple(down.shape)} and gate {tuple(gate.shape)} do not fit "
                             f"{members} members of r={rank}, d_b={d_b}")
        self.rank, self.d_b, self.members = rank, d_b, members
        self.down = frozen_linear(down)  # (G (2r + d_b), d_in)
        self.gate = frozen_linear(gate)  # (G 2r, G d_b)
        self.memo = InputMemo(members)

    @classmethod
    def from_members(cls, members: list[ProDAFolded]) -> ProDASiblingGroup:
        """Stack the members' folded down-projections and gates (copies of their values: nothing is rounded)."""
        first = members[0]
        shapes = {(m.rank, m.d_b, m.d_in, m.down.weight.dtype, m.down.weight.device) for m in members}
        if len(members) < 2 or len(shapes) != 1:
            raise ValueError(f"ProDA sibling group {first.siblings}: the members must be two or more with one rank, "
                             f"d_b, d_in, dtype and device, got {sorted(map(str, shapes))}; set "
                             f"method.group_siblings: false to fold them one by one")
        r2, d_b, count = 2 * first.rank, first.d_b, len(members)
        weights = [m.down.weight.detach() for m in members]
        down = torch.cat([w[:r2] for w in weights] + [w[r2:] for w in weights])  # (G (2r + d_b), d_in)
        gate = weights[0].new_zeros(count * r2, count * d_b)
        for i, member in enumerate(members):
            gate[i * r2:(i + 1) * r2, i * d_b:(i + 1) * d_b] = member.gate_up.weight.detach()  # W_up: (1, d_b)
        return cls(down, gate, first.rank, count)

    def shares(self, x: torch.Tensor) -> bool:
        """Whether the memo can key ``x`` (not an inference tensor)."""
        return self.memo.shares(x, (self.down.weight, self.gate.weight))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: (..., d_in) -> G x (..., 2r)
        return self.memo(x, (self.down.weight, self.gate.weight), lambda: self.compute(x))

    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """No memo. x: (..., d_in) -> G x (..., 2r)"""
        low_rank, hidden = self.down(x).split([self.members * 2 * self.rank, self.members * self.d_b], dim=-1)
        gated = low_rank * torch.sigmoid(self.gate(torch.relu(hidden)))  # (..., G 2r)
        return gated.split(2 * self.rank, dim=-1)

    @torch.no_grad()
    def check(self, members: list[ProDAFolded], tokens: int = 16, seed: int = 0) -> None:
        """A ValueError naming the group when its output differs from the members' own forms beyond
        ``surgery.tolerances.LAYER`` of their dtype, on N(0, 1) inputs."""
        weight = self.down.weight
        if weight.is_meta:
            return
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, weight.shape[1], generator=generator, dtype=torch.float64).to(weight.device,
                                                                                            weight.dtype)
        tol = layer_tolerance(weight.dtype)
        names = members[0].siblings or tuple(f"member {i}" for i in range(len(members)))
        for name, member, shared in zip(names, members, self.compute(x), strict=True):
            own = member.own_gated_low_rank(x).double()
            diff = (shared.double() - own).abs()
            if not bool((diff <= tol.atol + tol.rtol * own.abs()).all()):
                raise ValueError(
                    f"ProDA sibling group {names}: the shared residual differs from {name!r}'s own by max |diff| = "
                    f"{float(diff.max()):.3g}; a bug in ProDASiblingGroup; set method.group_siblings: false to fold "
                    f"the members one by one")


def frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free frozen nn.Linear holding ``weight`` (d_out, d_in) as is (its dtype and device)."""
    d_out, d_in = weight.shape
    layer = nn.Linear(d_in, d_out, bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    return layer
