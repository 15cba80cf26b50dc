"""The adapter protocol every method implements, and the config fields every method shares.

A method is one file in ``surgery/methods/``: a pydantic config class (its keys and defaults), an
:class:`AdapterLayer` subclass (forward, declared trainable parameters, fold), and the two cost functions
``count_params`` and ``macs_per_token``. The pipeline (surgery, train, export) only ever talks to this
protocol, never to a method by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from surgery.layers import build_like, layer_bias, layer_dims, weight_out_in

if TYPE_CHECKING:
    from train.config import TrainConfig


class MethodConfig(BaseModel):
    """Keys shared by every method. Subclasses fix ``name`` to a Literal and may change the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float | None = Field(None, gt=0, description="scaling numerator; the method's default when omitted")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input, training only")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) instead of alpha / r")

    default_alpha: ClassVar[str] = "2r"  # "2r" (alpha = 2 r) or "r" (alpha = r)

    @property
    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return float(2 * self.r if self.default_alpha == "2r" else self.r)

    @property
    def scaling(self) -> float:
        denominator = math.sqrt(self.r) if self.rslora else self.r
        return self.resolved_alpha / denominator


@dataclass(frozen=True)
class Macs:
    """Multiply-accumulates per token of one adapted layer.

    ``base``: the layer as it is deployed without the adapter (R-LoDA: ``R (d_in + d_out)``; S-LoDA:
    ``keep d_in d_out``; otherwise ``d_in d_out``). ``adapter``: the unmerged adapter's extra cost.
    """

    base: int
    adapter: int


@dataclass(frozen=True)
class TrainProgress:
    """Where training stands after an optimizer step; handed to every adapter's schedule hook."""

    step: int  # optimizer steps completed so far (1 after the first step)
    steps_per_epoch: int
    total_steps: int
    epochs: float  # planned epochs (total_steps / steps_per_epoch)


@dataclass
class Fold:
    """What a method's fold hands the exporter: a drop-in replacement for the adapted layer.

    ``module`` computes the layer's whole output ``y(x)``: a plain Linear/Conv1D where everything merged,
    otherwise the folded static part plus a small residual module. ``residual`` describes what stays
    input-dependent (None when fully merged); ``note`` says how the static weight is stored.
    """

    module: nn.Module
    residual: str | None
    note: str
    macs_per_token: int


class AdapterLayer(nn.Module, ABC):
    """A frozen base layer (``self.base``, Linear or Conv1D) plus a trainable adapter ``delta(x)``.

    x: (..., d_in) -> (..., d_out). Adapter tensors live in float32 when the base is half precision (they are
    small, and training them in half loses updates); the delta is cast back to the input dtype.
    """

    config_class: ClassVar[type[MethodConfig]]
    # The adapter parameters whose zeros make delta(x) exactly 0 for every x, whatever the others hold: the default an
    # unmerged graph serving many adapters falls back to when none is active (export.adapters). None when the method's
    # unmerged form is no fixed graph with per-adapter tensors; ``not_swappable`` then says why.
    noop_params: ClassVar[tuple[str, ...] | None] = None
    not_swappable: ClassVar[str] = "it declares no adapter parameters whose zeros switch its path off (noop_params)"

    def __init__(self, base: nn.Module, config: MethodConfig, layer_name: str = "") -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.config = config
        self.layer_name = layer_name
        self.d_in, self.d_out = layer_dims(base)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    # ---- shapes and dtypes -------------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        """W0 as (d_out, d_in)."""
        return weight_out_in(self.base)

    @property
    def base_bias(self) -> torch.Tensor | None:
        return layer_bias(self.base)

    @property
    def device(self) -> torch.device:
        return self.base_weight.device

    @property
    def adapter_dtype(self) -> torch.dtype:
        dtype = self.base_weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def new_param(self, *shape: int) -> nn.Parameter:
        """An (uninitialised) trainable tensor on the base layer's device in the adapter dtype."""
        return nn.Parameter(torch.empty(*shape, device=self.device, dtype=self.adapter_dtype))

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        y = self.base_forward(x)
        delta = self.delta(x.to(self.adapter_dtype))
        return y + delta.to(y.dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part. R-/S-LoDA override it with their approximation of W0."""
        return self.base(x)

    @abstractmethod
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for x: (..., d_in) in the adapter dtype -> (..., d_out)."""

    # ---- trainable parameters ----------------------------------------------------------------------
    @abstractmethod
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this adapter trains, by attribute name (torchtune's protocol)."""

    def lr_scale(self, param_name: str) -> float:
        """Learning-rate multiplier for one adapter parameter (LoRA+ gives B a larger one)."""
        return 1.0

    @torch.no_grad()
    def randomize_(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Fill every adapter parameter with non-zero random values (tests and benchmarks only)."""
        for param in self.adapter_params().values():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_((noise * std).to(param.dtype))

    # ---- checkpoint --------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Tensors that define this adapter in a checkpoint: its state_dict without the frozen base."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`adapter_state`; methods with variable-size state override it."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise KeyError(
                f"layer {self.layer_name!r}: checkpoint tensors do not match the {self.config.name} adapter "
                f"(missing {missing}, unexpected {unexpected}); was it saved with another method or rank?"
            )

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        """Frozen tensors recomputed from the base at load time (R-/S-LoDA's approximation), hashed in
        the checkpoint so a different base or a changed algorithm is caught."""
        return {}

    # ---- surgery hooks -----------------------------------------------------------------------------
    @classmethod
    def check_layer(cls, d_in: int, d_out: int, config: MethodConfig, layer_name: str) -> None:
        """Reject a layer the method cannot adapt, before anything is allocated (dry runs call it too)."""
        require(
            config.r <= min(d_in, d_out),
            layer_name,
            f"r={config.r} is larger than the layer's dimensions (d_in={d_in}, d_out={d_out}); "
            f"lower method.r or exclude this layer",
        )

    @classmethod
    def wrap_targets(
        cls, targets: dict[str, nn.Module], config: MethodConfig, model: nn.Module | None = None
    ) -> dict[str, nn.Module]:
        """Replacement modules by qualified name. The default wraps each target alone; methods that
        act on groups (R-/S-LoDA with ``approx_scope: qkv``) override it, look up siblings in ``model``
        and may replace them too."""
        return {name: cls(layer, config, layer_name=name) for name, layer in targets.items()}

    @classmethod
    def schedule_note(cls, config: MethodConfig, train: TrainConfig | None) -> str | None:
        """What :meth:`after_optimizer_step` will do over the run, in words, for the plan; None when nothing."""
        return None

    def schedule_due(self, progress: TrainProgress) -> bool:
        """Whether :meth:`after_optimizer_step` has work after this step. The trainer calls the hook only then,
        with this layer's tensors whole (gathered first when FSDP shards them); most methods never have any."""
        return False

    def after_optimizer_step(self, progress: TrainProgress) -> list[nn.Parameter]:
        """Training schedule hook, called after an optimizer step for which :meth:`schedule_due` holds. Returns
        the parameters whose optimizer state the trainer must reset (c3LA's B at a chain switch)."""
        return []

    def on_checkpoint_loaded(self) -> None:
        """Called after :meth:`load_adapter_state` (c3LA re-applies its finished links to the base)."""

    # ---- costs and fold ----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def count_params(cls, d_in: int, d_out: int, config: MethodConfig) -> int:
        """Trainable parameters of one layer, from METHODS.md's formula."""

    @classmethod
    @abstractmethod
    def macs_per_token(cls, d_in: int, d_out: int, config: MethodConfig) -> Macs:
        """Per-token MACs of the deployed base layer and of the unmerged adapter."""

    def layer_macs(self) -> Macs:
        """This layer's MACs per token as built: :meth:`macs_per_token` unless the layer shares work with others
        (R-LoDA's qkv group computes ``V_R x`` once) or its cost depends on its weights (S-LoDA's kept count)."""
        return type(self).macs_per_token(self.d_in, self.d_out, self.config)

    @abstractmethod
    def fold(self) -> Fold:
        """Fold what merges into the static weight (accumulating in float32 or float64, rounding once).

        The module comes back in the base dtype: ``merge_base`` upcast exactly to :meth:`fold_dtype`, plus
        ``static_update(fold_dtype())``, rounded once (``merged_layer``). ``export.fold`` folds an exactly upcast copy
        of the layer when it wants another output dtype, so a method never rounds for it."""

    @abstractmethod
    def static_update(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The dense (d_out, d_in) update the fold adds to :attr:`merge_base`, computed in ``dtype`` from the adapter's
        tensors (the fold's own dtype; float64 for the export report's reference). None when the fold merges nothing
        into a dense weight (R-LoDA keeps factors, S-LoDA with 2:4 keeps W_s sparse)."""

    @property
    def merge_base(self) -> torch.Tensor:
        """The stored (d_out, d_in) weight a dense fold adds :meth:`static_update` to: W0 (S-LoDA: its pruned W_s)."""
        return self.base_weight

    # ---- helpers for folds -------------------------------------------------------------------------
    def fold_dtype(self) -> torch.dtype:
        """float64 stays float64 (tests); everything else accumulates in float32."""
        return torch.float64 if self.base_weight.dtype == torch.float64 else torch.float32

    def merged_layer(self, delta_weight: torch.Tensor) -> nn.Module:
        """The base layer's type with ``merge_base + delta_weight`` (delta in the fold dtype; the stored weight upcast
        exactly to it), rounded once to the base dtype."""
        w0 = self.merge_base.detach().to(delta_weight.dtype)
        return build_like(self.base, w0 + delta_weight, self.base_bias, dtype=self.base_weight.dtype)

    def extra_repr(self) -> str:
        return f"method={self.config.name}, d_in={self.d_in}, d_out={self.d_out}, r={self.config.r}"


class ApproximatedLayer(nn.Module, ABC):
    """A frozen layer a method replaced by an approximation without adding an adapter (R-/S-LoDA's untargeted q/k/v
    sibling under ``approx_scope: qkv``). ``base`` stays for its bias and the model's state_dict layout; the plan
    and the export count it by :meth:`layer_macs`, not as the dense layer it replaced. x: (..., d_in) -> (..., d_out).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.d_in, self.d_out = layer_dims(base)

    @abstractmethod
    def layer_macs(self) -> Macs:
        """MACs per token of the approximation (``adapter`` is 0)."""

    @abstractmethod
    def derived_tensors(self) -> dict[str, torch.Tensor]:
        """The frozen tensors computed from the base (hashed like an adapter layer's)."""


class ResidualLayer(nn.Module):
    """A folded layer whose output is ``static(x) + residual(x)``; x: (..., d_in) -> (..., d_out)."""

    def __init__(self, static: nn.Module, residual: nn.Module) -> None:
        super().__init__()
        self.static = static
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.static(x) + self.residual(x)

    @property
    def static_weight(self) -> torch.Tensor:
        """``W'`` (d_out, d_in): the static layer's weight, what the fold merged."""
        return weight_out_in(self.static)


def kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT initialise A."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def require(condition: bool, layer_name: str, message: str) -> None:
    """Raise a ValueError naming the layer when a method's shape constraint fails."""
    if not condition:
        raise ValueError(f"layer {layer_name!r}: {message}")


__all__ = [
    "AdapterLayer",
    "ApproximatedLayer",
    "Fold",
    "Macs",
    "MethodConfig",
    "ResidualLayer",
    "TrainProgress",
    "kaiming_",
    "model_validator",
    "require",
]
