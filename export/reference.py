"""The PyTorch side of verification, recorded before anything is folded: outputs only, no second model.

An export is verified against the unfolded model as trained. Keeping that model beside the folded one (or reloading
it after the export) costs a second copy of the weights, so the unfolded model runs once, before the fold, on the
verification inputs, and only its outputs are kept (a few MB even for a 7B model):

- parity: the main output (logits or last_hidden_state) at ``PARITY_SHAPES`` (batch, sequence), shapes the
  exporters never traced; encoders get a right-padded last row;
- decoders: the logits of ``CACHE_STEP_TOKENS`` more tokens on each parity input, computed on the whole sequence
  (the export runs them as one cached step), and ``GREEDY_TOKENS`` greedy tokens from ``generate``.

A half-precision model computes its reference in float32 (:func:`float32_compute`: each module's weights are
upcast exactly while it runs, one module at a time), the values the fold starts from, so the export differs from
the reference only by its own arithmetic and the tolerance is the export dtype's alone.

For a half-precision export the same inputs also run with the model stored in that dtype (:func:`half_storage`:
weights and every module's outputs rounded to it, one module at a time): the *floor*, how far that dtype's own
rounding lands from float32 on this model.
Deep, wide models drift further in float16 than a fixed tolerance can know; surgery.tolerances' float16 entry
accepts an export whose error stays within a factor of the floor (``export.verify.compare``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from export.decode import position_ids
from export.exporters import CAUSAL_LM, FEATURES, output_name
from surgery.rewrite import adapter_layers

PARITY_SHAPES = ((1, 5), (3, 11))  # (batch, sequence): neither is the exporters' trace shape (2 x 8, 2 x 16)
PARITY_SEED = 2024
CACHE_STEP_TOKENS = 2
GREEDY_TOKENS = 20
GREEDY_SHAPE = (3, 6)
GREEDY_SEED = 7


@dataclass(frozen=True)
class ParityCase:
    """One verification input and what the unfolded model answered."""

    inputs: dict[str, np.ndarray]  # input_ids, attention_mask (batch, seq)
    expected: np.ndarray  # the main output
    token_mask: np.ndarray | None  # token-level outputs: the positions compared (padding left out)
    step_ids: np.ndarray | None = None  # decoders: CACHE_STEP_TOKENS more tokens (batch, CACHE_STEP_TOKENS)
    step_logits: np.ndarray | None = None  # their logits, computed on the whole sequence
    floor: np.ndarray | None = None  # the main output with PyTorch computing in the export's half dtype
    step_floor: np.ndarray | None = None  # the step's logits, likewise

    @property
    def name(self) -> str:
        batch, seq = self.inputs["input_ids"].shape
        return f"batch {batch} x seq {seq}"


@dataclass(frozen=True)
class GreedyCase:
    prompt: np.ndarray  # (batch, seq)
    tokens: np.ndarray  # generate's new tokens (batch, GREEDY_TOKENS), end-of-sequence suppressed
    eos_ids: list[int]
    pad_id: int
    scores: np.ndarray  # the (GREEDY_TOKENS, batch, vocab) scores each token was the argmax of (near-tie judging)


@dataclass(frozen=True)
class Reference:
    """Everything verification needs from the PyTorch model, without the model."""

    task: str
    config: Any  # the model's transformers config (vocabulary, positions: small)
    cases: list[ParityCase]
    greedy: GreedyCase | None

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)


def sample_inputs(vocab: int, batch: int, seq: int, seed: int, pad_last_row: bool = False) -> dict[str, np.ndarray]:
    """input_ids in [3, vocab), attention_mask (the last row right-padded by 2 when asked), token_type_ids 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(3, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    if pad_last_row and batch > 1 and seq > 3:
        mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@torch.no_grad()
def record_reference(model: nn.Module, task: str, greedy: bool = True,
                     floor_dtype: torch.dtype | None = None) -> Reference:
    """Run ``model`` (unfolded, eval mode) on the verification inputs; returns its outputs (see the module doc).
    ``floor_dtype`` (a half dtype) also records each case computed in that dtype."""
    vocab = int(model.config.vocab_size)
    cases = []
    with float32_compute(model):
        for i, (batch, seq) in enumerate(PARITY_SHAPES):
            inputs = sample_inputs(vocab, batch, seq, PARITY_SEED + i, pad_last_row=task != CAUSAL_LM)
            inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
            expected = main_output(model, inputs, task)
            token_mask = inputs["attention_mask"] if task in (CAUSAL_LM, FEATURES) else None
            step = cached_step(model, inputs, PARITY_SEED + 10 + i) if task == CAUSAL_LM else (None, None)
            cases.append(ParityCase(inputs, expected, token_mask, *step))
        tokens = greedy_case(model) if greedy and task == CAUSAL_LM else None
    if floor_dtype is not None:
        with half_storage(model, floor_dtype):
            cases = [with_floor(model, case, task) for case in cases]
    return Reference(task, model.config, cases, tokens)


def with_floor(model: nn.Module, case: ParityCase, task: str) -> ParityCase:
    """``case`` with the floor: the same inputs (and cached-step tokens) through ``model`` as it computes now."""
    floor = main_output(model, case.inputs, task)
    step_floor = None if case.step_ids is None else main_output(model, step_inputs(case.inputs, case.step_ids),
                                                                task)[:, case.inputs["input_ids"].shape[1]:]
    return dataclasses.replace(case, floor=floor, step_floor=step_floor)


@torch.no_grad()
def main_output(model: nn.Module, inputs: dict[str, np.ndarray] | dict[str, torch.Tensor], task: str) -> np.ndarray:
    """The model's main output as float32 numpy; decoders get position_ids from the mask (as the exports do)."""
    feed = {key: torch.as_tensor(np.ascontiguousarray(value)) for key, value in inputs.items()}
    extra: dict[str, Any] = {}
    if task == CAUSAL_LM:
        mask = feed["attention_mask"].numpy()
        extra = {"use_cache": False, "position_ids": torch.from_numpy(position_ids(mask))}
    out = model(**feed, **extra, return_dict=True)[output_name(task)]
    return out.float().numpy()


def cached_step(model: nn.Module, inputs: dict[str, np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CACHE_STEP_TOKENS new tokens after ``inputs`` and their logits, the whole sequence run at once."""
    batch, seq = inputs["input_ids"].shape
    new = sample_inputs(int(model.config.vocab_size), batch, CACHE_STEP_TOKENS, seed)["input_ids"]
    return new, main_output(model, step_inputs(inputs, new), CAUSAL_LM)[:, seq:]


def step_inputs(inputs: dict[str, np.ndarray], new: np.ndarray) -> dict[str, np.ndarray]:
    """``inputs`` followed by the ``new`` tokens, all attended."""
    ids = np.concatenate([inputs["input_ids"], new], axis=1)
    return {"input_ids": ids, "attention_mask": np.ones(ids.shape, dtype=np.int64)}


def greedy_case(model: nn.Module) -> GreedyCase:
    batch, seq = GREEDY_SHAPE
    prompt = torch.from_numpy(sample_inputs(int(model.config.vocab_size), batch, seq, GREEDY_SEED)["input_ids"])
    pad = pad_id(model)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                         max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, pad_token_id=pad,
                         output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores).float().numpy()
    return GreedyCase(prompt.numpy(), out.sequences[:, seq:].numpy(), eos_ids(model), pad, scores)


def eos_ids(model: nn.Module) -> list[int]:
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    return [] if value is None else list(value) if isinstance(value, list) else [int(value)]


def pad_id(model: nn.Module) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(source, key, None)
            if value is not None:
                return value[0] if isinstance(value, list) else int(value)
    return 0


# ---- float32 compute without a float32 copy -----------------------------------------------------------------------
def float32_compute(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Run ``model`` in float32 although its weights are half precision, holding one module's float32 copy at a time.

    Each module whose own parameters or floating buffers are not float32 gets them upcast (exactly) right before its
    forward and restored right after; its outputs are then float32 and so is everything downstream. A float32 model
    runs as it is. Everything is restored on exit, also after an error.
    """
    return cast_while_running(model, lambda t: t.float(), half_tensors)


@contextmanager
def half_storage(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run ``model`` as it computes stored in ``dtype`` (a half dtype), at float32 speed: every base weight (all
    parameters but the adapters', and the buffers derived from the base: R-/S-LoDA's approximations) rounded to
    ``dtype`` while its module runs, and every module's floating outputs rounded to ``dtype``; the arithmetic in
    between is float32, as onnxruntime's CPU provider computes a float16 MatMul and GPUs accumulate. Adapters keep
    float32 (surgery's design for half bases) until their layer's output is rounded. PyTorch's own float16 kernels
    would give the same kind of error but take minutes per forward of a 7B model on a CPU. Restored on exit."""
    adapters = {id(p) for layer in adapter_layers(model).values() for p in layer.adapter_params().values()}
    derived = {id(t) for module in model.modules() if hasattr(module, "derived_tensors")
               for t in module.derived_tensors().values()}

    def stored(module: nn.Module) -> list[torch.Tensor]:
        params = [p for p in module._parameters.values() if p is not None and id(p) not in adapters]
        buffers = [b for b in module._buffers.values() if b is not None and id(b) in derived]
        return [t for t in params + buffers if t.is_floating_point()]

    def other_half(module: nn.Module) -> list[torch.Tensor]:  # e.g. a half model's other buffers: upcast exactly
        chosen = {id(t) for t in stored(module)}
        return [t for t in half_tensors(module) if id(t) not in chosen]

    def rounded(_module: nn.Module, _args: Any, output: Any) -> Any:
        return round_outputs(output, dtype)

    hooks = [module.register_forward_hook(rounded) for module in model.modules()]
    try:
        with cast_while_running(model, lambda t: t.to(dtype).float(), stored), \
                cast_while_running(model, lambda t: t.float(), other_half):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def round_outputs(output: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``output`` (a tensor, or a plain tuple or list of them) rounded to ``dtype`` and back."""
    if isinstance(output, torch.Tensor):
        return output.to(dtype).to(output.dtype) if output.is_floating_point() else output
    if type(output) in (tuple, list):
        return type(output)(round_outputs(item, dtype) for item in output)
    return output


@contextmanager
def cast_while_running(model: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor],
                       select: Callable[[nn.Module], list[torch.Tensor]]) -> Iterator[None]:
    """Each module's ``select``-ed own tensors replaced by ``convert(tensor)`` right before its forward, restored
    right after. An adapter layer holds its whole subtree's (it may read its base's weight and bias without running
    the base)."""
    owners = cast_owners(model, select)
    if not owners:
        yield
        return
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cast(tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if id(tensor) not in saved:
                saved[id(tensor)] = (tensor, tensor.data)
                tensor.data = convert(tensor.data)

    def restore(tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if id(tensor) in saved:
                tensor.data = saved.pop(id(tensor))[1]

    handles = []
    for module, tensors in owners:
        handles.append(module.register_forward_pre_hook(lambda _m, _a, t=tensors: cast(t)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, t=tensors: restore(t)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for tensor, data in saved.values():
            tensor.data = data


def cast_owners(model: nn.Module, select: Callable[[nn.Module], list[torch.Tensor]]
                ) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    """(module, its tensors to cast) pairs: adapter layers with their subtree's, every other module with its own."""
    layers = {id(layer) for layer in adapter_layers(model).values()}
    inside = {id(m) for layer in adapter_layers(model).values() for m in layer.modules() if m is not layer}
    owners = []
    for module in model.modules():
        if id(module) in inside:
            continue
        members = list(module.modules()) if id(module) in layers else [module]
        if chosen := [t for member in members for t in select(member)]:
            owners.append((module, chosen))
    return owners


def half_tensors(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s own (not its children's) floating parameters and buffers in a dtype other than float32/64."""
    own = itertools.chain(module._parameters.values(), module._buffers.values())
    return [t for t in own if t is not None and t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)]
