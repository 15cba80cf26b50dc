"""LoDA and LoDA+ (loda.txt, eq. 1-2, section 3.1): LoRA with a low-dimensional non-linear path.

    u        = A x~                                   (r),  x~ = drop(x)
    f1(u)    = M2 LN(leaky(M1 u))                     M1, M2: (r, r); leaky slope 0.8; LN over r, no affine
    LoDA:  delta(x) = s B (u + f1(u))
    LoDA+: delta(x) = s (B u + f2(B f1(u)))           f2 = leaky (default) or ln_leaky (LN over d_out, then leaky)

B starts at zero, so delta = 0 at initialisation (f2(0) = 0: LN of a zero vector is 0 thanks to its eps).
Fold: ``W' = W0 + s B A``; :class:`LoDAResidual` keeps ``s B f1(A x)`` (LoDA) or ``s f2(B f1(A x))`` (LoDA+).

The second half of this file is shared by R-LoDA(+) and S-LoDA(+) (``r_loda.py``, ``s_loda.py``):
:class:`ApproxLoDALayer` trains the same adapter on a frozen approximation of W0, per layer or jointly over a
layer's q, k, v siblings (``approx_scope: qkv``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from surgery.layers import is_adaptable, layer_dims
from surgery.methods.base import (
    AdapterLayer,
    ApproximatedLayer,
    Fold,
    Macs,
    MethodConfig,
    ResidualLayer,
    kaiming_,
    require,
)

LEAKY_SLOPE = 0.8  # loda.txt section 3.1: "LeakyReLU with a fixed slope of 0.8"
LN_EPS = 1e-5  # METHODS.md: PyTorch's default (the paper gives none); the LayerNorms have no affine
F2Kind = Literal["leaky", "ln_leaky"]
ApproxScope = Literal["layer", "qkv"]


class LoDAConfig(MethodConfig):
    name: Literal["loda"] = "loda"


class LoDAPlusConfig(MethodConfig):
    name: Literal["loda_plus"] = "loda_plus"
    f2: F2Kind = Field("leaky", description="non-linearity on B f1(u): leaky, or ln_leaky (LN over d_out, then leaky)")


# ---- the non-linearities ---------------------------------------------------------------------------------
def leaky(h: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(h, LEAKY_SLOPE)


def plain_layer_norm(h: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension without affine parameters; a constant row maps to 0, never NaN."""
    # int(): the ONNX tracer would otherwise record the width as a dynamic value and fail to export it
    return F.layer_norm(h, (int(h.shape[-1]),), eps=LN_EPS)


def apply_f2(h: torch.Tensor, kind: F2Kind) -> torch.Tensor:
    """LoDA+'s f2 on (..., d_out); f2(0) = 0 for both kinds."""
    return leaky(plain_layer_norm(h)) if kind == "ln_leaky" else leaky(h)


def loda_f2(config: MethodConfig) -> F2Kind | None:
    """The config's f2, or None for plain LoDA (and R-/S-LoDA without the plus)."""
    return getattr(config, "f2", None)


def adapter_macs(d_in: int, d_out: int, config: MethodConfig) -> int:
    """Per-token MACs of the unmerged LoDA(+) path: A, M1, M2, then B once (LoDA) or twice (LoDA+).
    Element-wise leaky and LN are not counted (as LoRA's count leaves out additions)."""
    r = config.r
    b_products = 2 if loda_f2(config) else 1
    return r * d_in + 2 * r * r + b_products * r * d_out


def residual_macs(d_in: int, d_out: int, config: MethodConfig) -> int:
    """Per-token MACs of :class:`LoDAResidual` without its linear path: A, M1, M2, B."""
    r = config.r
    return r * d_in + 2 * r * r + r * d_out


# ---- the adapter -----------------------------------------------------------------------------------------
class LoDALayer(AdapterLayer):
    """LoDA (``config.f2`` absent) or LoDA+ (``config.f2`` set) around a frozen base layer."""

    config_class = LoDAConfig
    noop_params = ("loda_B",)  # B = 0: s B (u + f1(u)) = 0; LoDA+: s (B u + f2(B f1(u))) = f2(0) = 0

    def __init__(self, base: nn.Module, config: MethodConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        r = config.r
        self.loda_A = self.new_param(r, self.d_in)  # A: (r, d_in)
        self.loda_M1 = self.new_param(r, r)  # M1: (r, r)
        self.loda_M2 = self.new_param(r, r)  # M2: (r, r)
        self.loda_B = self.new_param(self.d_out, r)  # B: (d_out, r)
        self.f2: F2Kind | None = loda_f2(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.loda_A)
            kaiming_(self.loda_M1)
            kaiming_(self.loda_M2)
            self.loda_B.zero_()

    def f1(self, u: torch.Tensor) -> torch.Tensor:
        # u: (..., r) -> (..., r)
        return plain_layer_norm(leaky(u @ self.loda_M1.t())) @ self.loda_M2.t()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        u = self.dropout(x) @ self.loda_A.t()  # (..., r)
        hidden = self.f1(u)  # (..., r)
        if self.f2 is None:
            return self.scaling * ((u + hidden) @ self.loda_B.t())
        return self.scaling * (u @ self.loda_B.t() + apply_f2(hidden @ self.loda_B.t(), self.f2))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"loda_A": self.loda_A, "loda_M1": self.loda_M1, "loda_M2": self.loda_M2, "loda_B": self.loda_B}

    # ---- costs -------------------------------------------------------------------------------------
    @classmethod
    def count_params(cls, d_in: int, d_out: int, config: MethodConfig) -> int:
        return config.r * (d_in + d_out) + 2 * config.r**2

    @classmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        return Macs(base=d_in * d_out, adapter=adapter_macs(d_in, d_out, config))

    # ---- fold --------------------------------------------------------------------------------------
    def static_update(self, dtype: torch.dtype) -> torch.Tensor | None:
        """s B A in ``dtype``: (d_out, d_in); the non-linear path stays as the residual."""
        return self.scaling * (self.loda_B.detach().to(dtype) @ self.loda_A.detach().to(dtype))

    def frozen_adapter(self, with_linear: bool) -> LoDAResidual:
        """The adapter as a frozen module in the base dtype: the whole delta, or only its non-linear part."""
        dtype = self.base_weight.dtype
        factors = (self.loda_A, self.loda_M1, self.loda_M2, self.loda_B)
        A, M1, M2, B = (t.detach().to(dtype) for t in factors)
        return LoDAResidual(A, M1, M2, B, self.scaling, self.f2, with_linear=with_linear)

    def fold(self) -> Fold:
        residual = self.frozen_adapter(with_linear=False)
        return Fold(
            module=ResidualLayer(self.merged_layer(self.static_update(self.fold_dtype())), residual),
            residual=residual.describe(),
            note="dense",
            macs_per_token=self.d_in * self.d_out + residual_macs(self.d_in, self.d_out, self.config),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, f2={self.f2}"


class LoDAPlusLayer(LoDALayer):
    config_class = LoDAPlusConfig


# ---- frozen modules for folds ----------------------------------------------------------------------------
def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A frozen nn.Linear holding ``weight`` (d_out, d_in) and ``bias`` as they are (dtype and device)."""
    d_out, d_in = weight.shape
    layer = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=False)
    return layer


class FrozenF1(nn.Module):
    """f1(u) = M2 LN(leaky(M1 u)) with frozen M1, M2. u: (..., r) -> (..., r)."""

    def __init__(self, M1: torch.Tensor, M2: torch.Tensor) -> None:
        super().__init__()
        self.m1 = frozen_linear(M1)
        self.m2 = frozen_linear(M2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.m2(plain_layer_norm(leaky(self.m1(u))))


class F2Path(nn.Module):
    """LoDA+'s non-linear output path ``s f2(B h)``. h: (..., r) -> (..., d_out)."""

    def __init__(self, B: torch.Tensor, scaling: float, kind: F2Kind) -> None:
        super().__init__()
        self.up = frozen_linear(B)
        self.scaling, self.kind = scaling, kind

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scaling * apply_f2(self.up(hidden), self.kind)


class LoDAResidual(nn.Module):
    """A frozen LoDA(+) path for folds. x: (..., d_in) -> (..., d_out).

    ``with_linear=False``, what stays once ``s B A`` is merged: ``s B f1(A x)`` (LoDA) or ``s f2(B f1(A x))``
    (LoDA+). ``with_linear=True``, the whole delta (S-LoDA's 2:4 fold keeps it unmerged):
    ``s B (u + f1(u))`` or ``s (B u + f2(B f1(u)))``.
    """

    def __init__(self, A: torch.Tensor, M1: torch.Tensor, M2: torch.Tensor, B: torch.Tensor, scaling: float,
                 f2: F2Kind | None, with_linear: bool) -> None:
        super().__init__()
        self.down = frozen_linear(A)  # (r, d_in)
        self.f1 = FrozenF1(M1, M2)
        self.up = frozen_linear(scaling * B) if (f2 is None or with_linear) else None  # s B: (d_out, r)
        self.f2_path = F2Path(B, scaling, f2) if f2 is not None else None
        self.with_linear = with_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.down(x)  # (..., r)
        hidden = self.f1(u)  # (..., r)
        if self.f2_path is None:  # LoDA: s B (u + f1(u)) or s B f1(u)
            return self.up(u + hidden if self.with_linear else hidden)
        out = self.f2_path(hidden)  # s f2(B f1(u))
        return self.up(u) + out if self.with_linear else out

    def describe(self) -> str:
        linear = "s B A x + " if self.with_linear else ""
        if self.f2_path is None:
            return f"{linear}s B f1(A x), f1 = M2 LN(leaky(M1 .))"
        return f"{linear}s f2(B f1(A x)), f1 = M2 LN(leaky(M1 .)), f2 = {self.f2_path.kind}"


# ---- shared by R-LoDA(+) and S-LoDA(+): LoDA on a frozen approximation of W0 ------------------------------
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
Approximation = dict[str, torch.Tensor]  # one layer's frozen tensors, by buffer name


class ApproxLoDALayer(LoDALayer):
    """LoDA(+) trained on top of a frozen approximation of W0 (R-LoDA: low rank; S-LoDA: pruned).

    Subclasses say how to approximate a stack of weights (:meth:`approximate`), how the approximation computes
    (:meth:`base_forward`), and which frozen module carries an approximated sibling without an adapter. The
    approximation lives in non-persistent buffers, recomputed deterministically from the base at surgery time
    and hashed in the checkpoint through :meth:`derived_tensors`.
    """

    noop_params = None
    not_swappable = ("its frozen base is an approximation of W0 (low-rank or pruned), so with no adapter active the "
                     "graph would not give the base model's outputs")

    def __init__(self, base: nn.Module, config: MethodConfig, layer_name: str = "",
                 approximation: Approximation | None = None) -> None:
        self.check_layer(*layer_dims(base), config, layer_name)
        super().__init__(base, config, layer_name)
        if approximation is None:
            approximation = self.approximate({layer_name: base}, config)[layer_name]
        self.approx_names = tuple(approximation)
        for name, tensor in approximation.items():
            self.register_buffer(name, tensor, persistent=False)

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.approx_names}

    @classmethod
    def check_layer(cls, d_in: int, d_out: int, config: MethodConfig, layer_name: str) -> None:
        super().check_layer(d_in, d_out, config, layer_name)
        cls.check_approximation(d_in, d_out, config, layer_name)

    @classmethod
    @abstractmethod
    def check_approximation(cls, d_in: int, d_out: int, config: MethodConfig, layer_name: str) -> None:
        """Reject a layer (adapted or an approximated sibling) the approximation cannot handle."""

    @classmethod
    @abstractmethod
    def approximate(cls, layers: dict[str, nn.Module], config: MethodConfig) -> dict[str, Approximation]:
        """Approximate the row-stacked weights of ``layers`` (all with the same d_in) jointly; each layer's
        share, by name. On the meta device nothing is computed: meta tensors of the right shapes come back."""

    @classmethod
    @abstractmethod
    def approximated_layer(cls, base: nn.Module, approximation: Approximation,
                           config: MethodConfig) -> ApproximatedLayer:
        """A frozen module computing the approximated layer alone (a q/k/v sibling that is not a target)."""

    @classmethod
    def link_group(cls, members: dict[str, nn.Module]) -> None:
        """Let the replacements of one q, k, v group (adapter layers and approximated siblings, in q, k, v order)
        share work; nothing to share by default (R-LoDA shares ``V_R x``)."""

    @classmethod
    def wrap_targets(cls, targets: dict[str, nn.Module], config: MethodConfig,
                     model: nn.Module | None = None) -> dict[str, nn.Module]:
        """``approx_scope: layer`` wraps each target alone; ``qkv`` approximates each attention's q, k, v
        jointly, wrapping the targets and replacing the other siblings by :meth:`approximated_layer`."""
        if config.approx_scope == "layer":
            return super().wrap_targets(targets, config, model=model)
        replacements: dict[str, nn.Module] = {}
        for group in qkv_groups(targets, model):
            for name, layer in group.items():
                cls.check_approximation(*layer_dims(layer), config, name)
            shares = cls.approximate(group, config)
            members = {
                name: cls(layer, config, layer_name=name, approximation=shares[name]) if name in targets
                else cls.approximated_layer(layer, shares[name], config)
                for name, layer in group.items()
            }
            if len(members) > 1:
                cls.link_group(members)
            replacements.update(members)
        return replacements


def qkv_groups(targets: dict[str, nn.Module], model: nn.Module | None) -> list[dict[str, nn.Module]]:
    """Targets grouped with their q, k, v siblings (``*_proj`` or BERT's query/key/value under one parent);
    every other target (GPT-2's fused ``c_attn``, MLP layers) is a group of one."""
    groups: list[dict[str, nn.Module]] = []
    grouped: set[str] = set()
    for name, layer in targets.items():
        if name in grouped:
            continue
        parent, _, leaf = name.rpartition(".")
        triple = next((t for t in QKV_NAMES if leaf in t), None)
        if triple is None:
            groups.append({name: layer})
            continue
        siblings = [f"{parent}.{s}" if parent else s for s in triple]
        group = {sibling: _find_sibling(sibling, name, targets, model) for sibling in siblings}
        dims = {layer_dims(module)[0] for module in group.values()}
        require(len(dims) == 1, name, f"approx_scope: qkv needs q, k, v with one input size, got d_in {dims}; "
                                      f"use approx_scope: layer")
        groups.append(group)
        grouped.update(siblings)
    return groups


def _find_sibling(sibling: str, target: str, targets: dict[str, nn.Module], model: nn.Module | None) -> nn.Module:
    if sibling in targets:
        return targets[sibling]
    require(model is not None, target, f"approx_scope: qkv needs the model to find the sibling {sibling!r}; "
                                       f"call wrap_targets(..., model=model)")
    try:
        module = model.get_submodule(sibling)
    except AttributeError:
        module = None
    require(module is not None and is_adaptable(module), target,
            f"approx_scope: qkv found no Linear/Conv1D sibling {sibling!r}; use approx_scope: layer")
    return module
