"""R-LoDA(+) (loda.txt, section 2.2): LoDA(+) trained on the frozen rank-R truncated SVD of W0.

    W0 ~ U_R V_R,   U_R = U[:, :R] sqrt(S_R)  (d_out, R),   V_R = sqrt(S_R) V[:, :R]^T  (R, d_in)
    y  = U_R (V_R x) + b + delta(x),                            delta as LoDA(+) in ``loda.py``

The singular values are split evenly between the factors (balanced factors keep both in a similar range, which
matters once they are rounded to half precision), and each component's sign is fixed so that the largest entry
of its ``U`` column is positive: the SVD runs in float64 on the CPU, so the factors are reproducible and their
checkpoint hash is stable. ``approx_scope: qkv`` factors the stacked ``[Wq; Wk; Wv]`` once (shared ``V_R``, each
layer its row block of ``U_R``); a sibling that is not a target becomes a :class:`LowRankLayer` without adapter. The
group computes ``V_R x`` once (:class:`GroupProjection`), so it costs ``R (d_in + d_q + d_k + d_v)`` MACs per token
as METHODS.md's stacked layer does; its ``R d_in`` is counted once, by its first member without adapter if it has one
(that one stays unfolded in every export), else by its first member.

Fold: ``y = [U_R | s B] [V_R ; A] x + b + residual`` as :class:`LowRankLoDAFold`: two thin matmuls of inner size
``R + r``, the non-linear path reading the ``A x`` rows of the first.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from surgery.groups import InputMemo
from surgery.layers import layer_bias, weight_out_in
from surgery.methods.base import ApproximatedLayer, Fold, Macs, MethodConfig, require
from surgery.methods.loda import (
    Approximation,
    ApproxLoDALayer,
    ApproxScope,
    F2Path,
    FrozenF1,
    LoDAConfig,
    LoDAPlusConfig,
    adapter_macs,
    frozen_linear,
)


class RankApproxFields(MethodConfig):
    approx_rank: int = Field(gt=0, description="R: rank of the frozen SVD approximation of W0, below min(d_in, d_out)")
    approx_scope: ApproxScope = Field("layer", description="layer: each target alone; qkv: q, k, v jointly")


class RLoDAConfig(RankApproxFields, LoDAConfig):
    name: Literal["r_loda"] = "r_loda"


class RLoDAPlusConfig(RankApproxFields, LoDAPlusConfig):
    name: Literal["r_loda_plus"] = "r_loda_plus"


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-R factors of weight (m, n): (m, R) and (R, n), each component's sign fixed."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    pivot = U.abs().argmax(dim=0)  # (R,): the largest entry of each column (first one on ties)
    signs = torch.where(U[pivot, torch.arange(rank)] < 0, -1.0, 1.0).to(U.dtype)  # (R,)
    U, Vh = U * signs, signs.unsqueeze(1) * Vh  # U S Vh is unchanged
    root = S.sqrt()  # (R,)
    return U * root, root.unsqueeze(1) * Vh


class GroupProjection(InputMemo):
    """``V_R x`` for the members of one qkv group, computed once per input (``surgery.groups.InputMemo``).

    The attention calls q, k and v one after another on the same hidden states, and they share ``V_R``: the first
    call computes ``V_R x``, the others reuse it, the last releases it. Exact: the same product of the same tensors.
    The memo is keyed on the identity and version of ``x`` and of ``V_R``, on grad mode and on autocast, so another
    input (cross-attention's k and v, the next step, a cast copy of ``V_R``) computes anew; inference tensors (no
    version counter) compute alone. A copy or a pickle starts empty (the copies of one group's members still share
    one).
    """

    def __call__(self, x: torch.Tensor, V_R: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # x: (..., d_in) -> (..., R)
        return super().__call__(x, (V_R,), lambda: F.linear(x, V_R))


class SharesProjection:
    """``V_R x`` for a layer holding ``V_R`` (R, d_in): alone, or through its qkv group's :class:`GroupProjection`."""

    V_R: torch.Tensor
    d_in: int
    d_out: int
    group_projection: GroupProjection | None = None  # set by :meth:`RLoDALayer.link_group`
    counts_projection: bool = True  # whether this layer's MACs include the R d_in of V_R x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., R)
        if self.group_projection is None:
            return F.linear(x, self.V_R)
        return self.group_projection(x, self.V_R)

    def low_rank_macs(self) -> int:
        """MACs per token of ``U_R (V_R x)`` here: ``R d_out``, plus ``R d_in`` where this layer counts V_R x."""
        return self.V_R.shape[0] * ((self.d_in if self.counts_projection else 0) + self.d_out)


class LowRankLayer(SharesProjection, ApproximatedLayer):
    """A frozen layer replaced by its rank-R factors, without adapter (approx_scope: qkv's untargeted sibling).
    x: (..., d_in) -> (..., d_out). ``base`` is kept frozen for its bias and the model's state_dict layout."""

    def __init__(self, base: nn.Module, U_R: torch.Tensor, V_R: torch.Tensor) -> None:
        super().__init__(base)
        self.register_buffer("U_R", U_R, persistent=False)  # (d_out, R)
        self.register_buffer("V_R", V_R, persistent=False)  # (R, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.project(x), self.U_R, layer_bias(self.base))

    def layer_macs(self) -> Macs:
        return Macs(base=self.low_rank_macs(), adapter=0)

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        return {"U_R": self.U_R, "V_R": self.V_R}

    def extra_repr(self) -> str:
        return f"rank={self.V_R.shape[0]}, d_in={self.d_in}, d_out={self.d_out}"


class RLoDALayer(SharesProjection, ApproxLoDALayer):
    """R-LoDA, or R-LoDA+ (:class:`RLoDAPlusLayer`) when the config has ``f2``."""

    config_class = RLoDAConfig

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., R) -> (..., d_out)
        return F.linear(self.project(x), self.U_R, self.base_bias)

    @classmethod
    def check_approximation(cls, d_in: int, d_out: int, config: MethodConfig, layer_name: str) -> None:
        rank = config.approx_rank
        require(rank < min(d_in, d_out), layer_name,
                f"approx_rank={rank} must be below min(d_in, d_out)={min(d_in, d_out)} (d_in={d_in}, "
                f"d_out={d_out}), else the factors are no cheaper than W0; lower method.approx_rank or exclude "
                f"this layer")

    @classmethod
    def approximate(cls, layers: dict[str, nn.Module], config: MethodConfig) -> dict[str, Approximation]:
        weights = [weight_out_in(layer).detach() for layer in layers.values()]  # each (d_out_i, d_in)
        rows = [w.shape[0] for w in weights]
        like, rank = weights[0], config.approx_rank
        if any(w.is_meta for w in weights):  # dry run: shapes only
            U_R = torch.empty(sum(rows), rank, dtype=like.dtype, device="meta")
            V_R = torch.empty(rank, like.shape[1], dtype=like.dtype, device="meta")
        else:
            stacked = torch.cat([w.to("cpu", torch.float64) for w in weights])  # (sum d_out_i, d_in)
            U_R, V_R = (t.to(like.device, like.dtype) for t in truncated_svd(stacked, rank))
        return {name: {"U_R": block, "V_R": V_R} for name, block in zip(layers, U_R.split(rows), strict=True)}

    @classmethod
    def approximated_layer(cls, base: nn.Module, approximation: Approximation, config: MethodConfig) -> LowRankLayer:
        return LowRankLayer(base, approximation["U_R"], approximation["V_R"])

    @classmethod
    def link_group(cls, members: dict[str, nn.Module]) -> None:
        """One ``V_R x`` for the group; its ``R d_in`` MACs counted by the first member without adapter (it stays
        unfolded in every export, where the folded members compute their own), else by the first member."""
        projection = GroupProjection(len(members))
        counter = next((m for m in members.values() if not isinstance(m, RLoDALayer)), next(iter(members.values())))
        for member in members.values():
            member.group_projection = projection
            member.counts_projection = member is counter

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        """A layer approximated alone: ``R (d_in + d_out)``; :meth:`layer_macs` gives a qkv group member's share."""
        return Macs(base=config.approx_rank * (d_in + d_out), adapter=adapter_macs(d_in, d_out, config))

    def layer_macs(self) -> Macs:
        return Macs(base=self.low_rank_macs(), adapter=adapter_macs(self.d_in, self.d_out, self.config))

    def static_update(self, dtype: torch.dtype) -> None:
        """None: the fold keeps the rank-R factors and s B A as two thin matmuls, no dense weight."""
        return None

    def fold(self) -> Fold:
        dtype, out_dtype = self.fold_dtype(), self.base_weight.dtype
        A, M1, M2, B = (t.detach().to(dtype) for t in (self.loda_A, self.loda_M1, self.loda_M2, self.loda_B))
        down = torch.cat([self.V_R.to(dtype), A])  # [V_R ; A]: (R + r, d_in)
        up = torch.cat([self.U_R.to(dtype), self.scaling * B], dim=1)  # [U_R | s B]: (d_out, R + r)
        bias = self.base_bias
        f2_path = F2Path(B.to(out_dtype), self.scaling, self.f2) if self.f2 else None
        module = LowRankLoDAFold(frozen_linear(down.to(out_dtype)),
                                 frozen_linear(up.to(out_dtype), None if bias is None else bias.to(out_dtype)),
                                 FrozenF1(M1.to(out_dtype), M2.to(out_dtype)), f2_path)
        rank, r = self.config.approx_rank, self.config.r
        extra = r * self.d_out if self.f2 else 0  # LoDA+: B once more for f2(B f1(u))
        return Fold(
            module=module,
            residual=module.describe(),
            note=f"rank-{rank} factors fused with the adapter: d_in -> R+r={rank + r} -> d_out",
            macs_per_token=(rank + r) * (self.d_in + self.d_out) + 2 * r * r + extra,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approx_rank={self.config.approx_rank}, scope={self.config.approx_scope}"


class RLoDAPlusLayer(RLoDALayer):
    config_class = RLoDAPlusConfig


class LowRankLoDAFold(nn.Module):
    """Folded R-LoDA(+): ``z = [V_R ; A] x`` (R + r), then ``[U_R | s B] z' + b`` where ``z'`` is ``z`` with
    f1 added to its last r rows (LoDA: ``s B (u + f1(u))`` rides in the up-projection), or ``z`` itself plus
    ``s f2(B f1(u))`` (LoDA+). x: (..., d_in) -> (..., d_out)."""

    def __init__(self, down: nn.Linear, up: nn.Linear, f1: FrozenF1, f2_path: F2Path | None) -> None:
        super().__init__()
        self.down = down  # (R + r, d_in), no bias
        self.up = up  # (d_out, R + r), the base bias
        self.f1 = f1
        self.f2_path = f2_path
        self.rank = f1.m1.in_features  # r
        self.approx_rank = down.out_features - self.rank  # R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.down(x)  # (..., R + r)
        head, u = z.split([self.approx_rank, self.rank], dim=-1)  # V_R x: (..., R); A x: (..., r)
        hidden = self.f1(u)  # (..., r)
        if self.f2_path is None:
            return self.up(torch.cat([head, u + hidden], dim=-1))
        return self.up(z) + self.f2_path(hidden)

    def describe(self) -> str:
        if self.f2_path is None:
            return "s B f1(A x) through the up-projection, f1 = M2 LN(leaky(M1 .)) on the A x rows"
        return f"s f2(B f1(A x)), f1 = M2 LN(leaky(M1 .)) on the A x rows, f2 = {self.f2_path.kind}"

