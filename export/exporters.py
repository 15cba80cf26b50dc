"""Two ways to write a transformers model as ONNX, behind one small interface.

- ``optimum``: optimum-onnx's ``onnx_export_from_model`` for the architectures it has an ONNX config for. Decoders
  export with their KV cache (``past_key_values.*`` in, ``present.*`` out) and the folder loads in
  ``ORTModelForCausalLM``; encoders load in ``ORTModelForSequenceClassification`` / ``ORTModelForFeatureExtraction``.
- ``torch``: plain ``torch.onnx.export`` (TorchScript tracing) of ``input_ids, attention_mask [, token_type_ids]`` ->
  the main output, with dynamic batch and sequence axes; for any other model. Decoders export without a cache.

The backends see only an ``nn.Module`` (folded or not): they know nothing of adapter methods. Either way the folder
gets ``model.onnx``, ``config.json`` and, for generative models, ``generation_config.json``; weights of a model past
protobuf's 2 GiB go to one external file ``model.onnx_data`` beside it.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import onnx
import torch
from torch import nn

SEQ_CLS, CAUSAL_LM, FEATURES = "seq-cls", "causal-lm", "feature-extraction"
OPTIMUM_TASKS = {SEQ_CLS: "text-classification", CAUSAL_LM: "text-generation", FEATURES: "feature-extraction"}
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"  # optimum's name: the graph file's name + "_data"
PROTOBUF_LIMIT = 2**31  # one serialised ModelProto must stay below 2 GiB
TRACE_BATCH, TRACE_SEQUENCE = 2, 8  # the torch backend's example input; verification uses other shapes

Log = Callable[[str], None]


class ExportError(RuntimeError):
    """The model cannot be exported by the requested backend; the message says which model and what to do."""


@dataclass(frozen=True)
class ExportedGraph:
    """Where an export landed and how to feed it."""

    folder: Path
    model_file: Path
    backend: str  # "optimum" or "torch"
    task: str  # seq-cls | causal-lm | feature-extraction
    with_past: bool  # inputs past_key_values.* / outputs present.* (optimum's naming)
    opset: int

    @property
    def external_data(self) -> bool:
        return uses_external_data(self.model_file)


class Backend(Protocol):
    name: str

    def unsupported(self, model: nn.Module, task: str) -> str | None:
        """Why this backend cannot export ``model`` for ``task``; None when it can."""

    def export(self, model: nn.Module, folder: Path, task: str, opset: int) -> ExportedGraph:
        """Write ``folder/model.onnx`` (+ ``model.onnx_data``) and return where it went."""


# ---- which task ---------------------------------------------------------------------------------------------------
def model_task(model: nn.Module) -> str:
    """seq-cls, causal-lm or feature-extraction, from the model class (``*ForSequenceClassification``,
    ``*ForCausalLM`` / ``*LMHeadModel``, anything else)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return SEQ_CLS
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    return FEATURES


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "model_type", None):
        raise ExportError(f"{type(model).__name__} has no transformers config (config.model_type); the exporters "
                          f"take transformers models")
    return config.model_type


# ---- optimum ------------------------------------------------------------------------------------------------------
class OptimumBackend:
    """optimum-onnx's exporter; decoders with their KV cache."""

    name = "optimum"

    def _tasks(self, model: nn.Module) -> set[str]:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager

        try:
            return set(TasksManager.get_supported_tasks_for_model_type(
                model_type(model), "onnx", library_name="transformers"))
        except KeyError:
            return set()

    def optimum_task(self, model: nn.Module, task: str) -> str | None:
        tasks, wanted = self._tasks(model), OPTIMUM_TASKS[task]
        if task == CAUSAL_LM and f"{wanted}-with-past" in tasks:
            return f"{wanted}-with-past"
        return wanted if wanted in tasks else None

    def unsupported(self, model: nn.Module, task: str) -> str | None:
        if self.optimum_task(model, task) is None:
            return (f"optimum-onnx has no ONNX config for model type {model_type(model)!r} and task "
                    f"{OPTIMUM_TASKS[task]!r}")
        return None

    def export(self, model: nn.Module, folder: Path, task: str, opset: int) -> ExportedGraph:
        from optimum.exporters.onnx import onnx_export_from_model

        optimum_task = self.optimum_task(model, task)
        if optimum_task is None:
            raise ExportError(self.unsupported(model, task) or "")
        try:
            with quiet_export():
                onnx_export_from_model(model, output=folder, task=optimum_task, opset=opset, do_validation=False)
        except Exception as error:  # tracing raises many types; re-raised with the model and the first line
            raise export_failure("optimum-onnx", model, error) from error
        path = folder / MODEL_FILE
        if not path.is_file():
            raise ExportError(f"optimum-onnx wrote no {MODEL_FILE} into {folder} "
                              f"(found {sorted(p.name for p in folder.glob('*.onnx'))})")
        return ExportedGraph(folder, path, self.name, task, optimum_task.endswith("-with-past"), opset)


# ---- torch.onnx ---------------------------------------------------------------------------------------------------
class MainOutput(nn.Module):
    """``model(**inputs)`` -> its main output tensor, with the inputs taken positionally for tracing.

    input_ids, attention_mask [, token_type_ids]: (batch, seq) -> logits (batch, labels) or (batch, seq, vocab),
    or last_hidden_state (batch, seq, hidden).
    """

    def __init__(self, model: nn.Module, input_names: list[str], output_name: str, **fixed: object) -> None:
        super().__init__()
        self.model, self.input_names, self.output_name, self.fixed = model, input_names, output_name, fixed

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        outputs = self.model(**dict(zip(self.input_names, tensors, strict=True)), **self.fixed, return_dict=True)
        return outputs[self.output_name]


def torch_input_names(model: nn.Module, task: str) -> list[str]:
    """input_ids, attention_mask, plus token_type_ids for encoders with segment embeddings."""
    names = ["input_ids", "attention_mask"]
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    if task != CAUSAL_LM and accepts and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def output_name(task: str) -> str:
    return "last_hidden_state" if task == FEATURES else "logits"


class TorchOnnxBackend:
    """``torch.onnx.export`` (TorchScript tracer) of the main output; no KV cache."""

    name = "torch"

    def unsupported(self, model: nn.Module, task: str) -> str | None:
        return None if hasattr(model, "config") else f"{type(model).__name__} is not a transformers model"

    def export(self, model: nn.Module, folder: Path, task: str, opset: int) -> ExportedGraph:
        names, output = torch_input_names(model, task), output_name(task)
        fixed = {"use_cache": False} if task == CAUSAL_LM else {}
        wrapper = MainOutput(model, names, output, **fixed).eval()
        example = trace_inputs(model, names)
        batch_seq = {0: "batch_size", 1: "sequence_length"}
        axes = {name: batch_seq for name in names}
        axes[output] = {0: "batch_size"} if task == SEQ_CLS else batch_seq
        with tempfile.TemporaryDirectory(dir=folder, prefix=".torch_onnx.") as scratch:
            traced = Path(scratch) / MODEL_FILE
            try:
                with torch.no_grad(), quiet_export(), traceable_masks():
                    torch.onnx.export(wrapper, example, str(traced), input_names=names, output_names=[output],
                                      dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
            except Exception as error:  # tracing raises many types; re-raised with the model and the first line
                raise export_failure("torch.onnx.export", model, error) from error
            save_single_file(traced, folder / MODEL_FILE)
        save_configs(model, folder)
        return ExportedGraph(folder, folder / MODEL_FILE, self.name, task, False, opset)


@contextmanager
def traceable_masks() -> Iterator[None]:
    """transformers >= 4.53 builds attention masks with ``torch.vmap``, which the TorchScript tracer cannot record;
    while tracing, the sdpa and eager mask builders are replaced by the same masks built by broadcasting (what
    optimum's model patcher does for its own exports)."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # older transformers build masks without vmap
        yield
        return
    originals = {name: ALL_MASK_ATTENTION_FUNCTIONS[name] for name in ("sdpa", "eager")}
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", broadcast_sdpa_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register("eager", broadcast_eager_mask)
    try:
        yield
    finally:
        for name, function in originals.items():
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, function)


def broadcast_sdpa_mask(batch_size: int, cache_position: torch.Tensor, kv_length: int, kv_offset: int = 0,
                        mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                        local_size: int | None = None, allow_is_causal_skip: bool = True,
                        **kwargs: object) -> torch.Tensor | None:
    """transformers' ``sdpa_mask`` with the mask function applied to broadcast index tensors instead of vmap:
    a boolean (batch, 1, q, kv) mask, True where attention is allowed; None where ``is_causal`` suffices."""
    from transformers import masking_utils as mu

    mask_function = mask_function or mu.causal_mask_function
    q_length = cache_position.shape[0]
    padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, kv_offset, local_size):
        return None
    if padding_mask is not None:
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding_mask))
    device = cache_position.device
    batch = torch.arange(batch_size, device=device)[:, None, None, None]
    head = torch.arange(1, device=device)[None, :, None, None]
    kv = torch.arange(kv_length, device=device)[None, None, None, :] + kv_offset
    mask = mask_function(batch, head, cache_position[None, None, :, None], kv)
    return mask.expand(batch_size, -1, q_length, kv_length)


def broadcast_eager_mask(*args: object, dtype: torch.dtype = torch.float32, **kwargs: object) -> torch.Tensor:
    """transformers' ``eager_mask``: the sdpa mask as 0 (attend) / dtype's minimum (masked)."""
    kwargs.pop("allow_is_causal_skip", None)
    mask = broadcast_sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
    return torch.where(mask, torch.tensor(0.0, device=mask.device, dtype=dtype), torch.finfo(dtype).min)


def trace_inputs(model: nn.Module, names: list[str]) -> tuple[torch.Tensor, ...]:
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(min(3, vocab - 1), vocab, (TRACE_BATCH, TRACE_SEQUENCE), generator=generator)
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[name] for name in names)


def save_configs(model: nn.Module, folder: Path) -> None:
    """config.json, and generation_config.json for models that generate (what optimum writes itself)."""
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)


def export_failure(exporter: str, model: nn.Module, error: Exception, limit: int = 1200) -> ExportError:
    """An ExportError naming the model, with the first line of the exporter's error (the tracer's names the module
    scope and source line of the node it could not convert; the rest is a dump of the whole graph)."""
    first_line = str(error).strip().split("\n", 1)[0]
    if len(first_line) > limit:
        first_line = first_line[:limit] + " ..."
    return ExportError(f"{exporter} failed for {type(model).__name__} ({model_type(model)}): "
                       f"{type(error).__name__}: {first_line}")


# ---- external data ------------------------------------------------------------------------------------------------
def uses_external_data(path: Path) -> bool:
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def save_single_file(source: Path, target: Path) -> None:
    """Move an exported graph to ``target``; its weights go to ``model.onnx_data`` when the exporter kept them
    outside (one file per tensor) or they pass 2 GiB."""
    external = uses_external_data(source) or source.stat().st_size >= PROTOBUF_LIMIT
    if not external:
        shutil.move(source, target)
        return
    model = onnx.load(str(source), load_external_data=True)
    data = target.with_name(target.name + "_data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024, convert_attribute=True)


# ---- choosing a backend -------------------------------------------------------------------------------------------
BACKENDS: dict[str, Backend] = {"optimum": OptimumBackend(), "torch": TorchOnnxBackend()}
BACKEND_CHOICES = ("auto", *BACKENDS)


def choose_backend(model: nn.Module, task: str, backend: str = "auto", log: Log = print) -> Backend:
    """``auto``: optimum where it knows the architecture, torch.onnx otherwise; a named backend or an error."""
    if backend not in BACKEND_CHOICES:
        raise ExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        chosen = BACKENDS[backend]
        reason = chosen.unsupported(model, task)
        if reason:
            raise ExportError(f"{reason}; the {backend} backend cannot export {type(model).__name__}. "
                              f"Use --backend auto (falls back to torch.onnx) or --backend torch")
        return chosen
    reason = BACKENDS["optimum"].unsupported(model, task)
    if reason is None:
        return BACKENDS["optimum"]
    log(f"{reason}: falling back to torch.onnx (no KV cache)")
    return BACKENDS["torch"]


def export_model(
    model: nn.Module, folder: str | Path, opset: int = 18, backend: str = "auto", task: str | None = None,
    log: Log = print,
) -> ExportedGraph:
    """Export ``model`` into ``folder`` with ``backend`` (auto | optimum | torch)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = task or model_task(model)
    chosen = choose_backend(model, task, backend, log)
    return chosen.export(model.eval(), folder, task, opset)


@contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the tracer's warnings and optimum/transformers info logs during an export."""
    loggers = [logging.getLogger(name) for name in ("optimum", "transformers", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
