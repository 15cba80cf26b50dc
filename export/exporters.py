"""Two ways to write a transformers model as ONNX, behind one small interface.

- ``torch`` (always there): ``torch.onnx.export`` (TorchScript tracing) with dynamic batch and sequence axes. Encoders
  take ``input_ids, attention_mask [, token_type_ids]`` and give their main output; decoders export WITH their KV
  cache: ``input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value`` in, ``logits,
  present.{i}.key/.value`` out (optimum's names, so the folder also loads in optimum's ``ORTModelForCausalLM``).
  Runs on transformers 4.46+ and 5.x.
- ``optimum`` (the ``[optimum]`` extra, transformers < 4.58 only): optimum-onnx's ``onnx_export_from_model`` for the
  architectures it has an ONNX config for.

``auto`` takes optimum where it is installed and knows the architecture, else torch. The backends see only an
``nn.Module`` (folded or not): they know nothing of adapter methods. Either way the folder gets ``model.onnx``,
``config.json`` and, for generative models, ``generation_config.json``; the torch backend streams weights past
128 MiB to one external file ``model.onnx_data`` beside it (optimum past protobuf's 2 GiB).
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
from typing import Any, Protocol

import onnx
import torch
from torch import nn

from export.weights import PROTOBUF_LIMIT, attach_weights, named_parameters, stand_in_parameters, swapped_state

SEQ_CLS, CAUSAL_LM, FEATURES = "seq-cls", "causal-lm", "feature-extraction"
OPTIMUM_TASKS = {SEQ_CLS: "text-classification", CAUSAL_LM: "text-generation", FEATURES: "feature-extraction"}
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"  # optimum's name: the graph file's name + "_data"
TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST = 2, 8, 3  # the torch backend's example input (and cached
# positions); verification uses other shapes

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

    def export(self, model: nn.Module, folder: Path, task: str, opset: int,
               dtype: torch.dtype = torch.float32) -> ExportedGraph:
        """Write ``folder/model.onnx`` (+ ``model.onnx_data``) with weights in ``dtype`` (float32 inputs and
        outputs either way) and return where it went."""


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

    @staticmethod
    def missing() -> str | None:
        """Why optimum-onnx cannot be used in this environment; None when it can."""
        try:
            import optimum.exporters.onnx  # noqa: F401
        except ImportError as error:
            return (f"optimum-onnx is not installed ({error.msg}); it is the optional [optimum] extra "
                    f"(pip install -e '.[optimum]', which needs transformers<4.58)")
        return None

    def optimum_task(self, model: nn.Module, task: str) -> str | None:
        tasks, wanted = self._tasks(model), OPTIMUM_TASKS[task]
        if task == CAUSAL_LM and f"{wanted}-with-past" in tasks:
            return f"{wanted}-with-past"
        return wanted if wanted in tasks else None

    def unsupported(self, model: nn.Module, task: str) -> str | None:
        missing = self.missing()
        if missing:
            return missing
        if self.optimum_task(model, task) is None:
            return (f"optimum-onnx has no ONNX config for model type {model_type(model)!r} and task "
                    f"{OPTIMUM_TASKS[task]!r}")
        return None

    def export(self, model: nn.Module, folder: Path, task: str, opset: int,
               dtype: torch.dtype = torch.float32) -> ExportedGraph:
        """optimum's float32 export (of a float32 model), converted afterwards when ``dtype`` is float16."""
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
        if dtype == torch.float16:
            to_float16_in_place(path)
        return ExportedGraph(folder, path, self.name, task, optimum_task.endswith("-with-past"), opset)


def to_float16_in_place(path: Path) -> None:
    """Replace the graph at ``path`` by its float16 conversion (float32 inputs and outputs)."""
    from export.tensorrt import fp16_variant

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fp16.") as scratch:
        converted = fp16_variant(path, Path(scratch) / path.name)
        path.with_name(path.name + "_data").unlink(missing_ok=True)
        save_single_file(converted, path)


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


class CausalLMWithCache(nn.Module):
    """A causal LM with its KV cache as flat tensors, for tracing.

    input_ids (batch, new), attention_mask (batch, past + new), position_ids (batch, new),
    2 x layers tensors past_key_values.{i}.key/.value (batch, kv_heads, past, head_dim)
    -> logits (batch, new, vocab), 2 x layers tensors present.{i}.key/.value (batch, kv_heads, past + new, head_dim).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache_from_tensors(pairs), use_cache=True,
                             return_dict=True)
        return (outputs.logits, *cache_tensors(outputs.past_key_values))


def cache_from_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> object:
    """A DynamicCache holding ``pairs`` (key, value) per layer: transformers 5 takes them in the constructor,
    4.x through ``from_legacy_cache``. Every layer keeps all positions, sliding-window layers too (built without
    the config, which would crop them to the window and break ``present`` = past + new): the attention mask applies
    the window, so the outputs are the same."""
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(pairs))
    return DynamicCache(pairs)


def cache_tensors(cache: object) -> list[torch.Tensor]:
    """key_0, value_0, key_1, ... of a returned cache (transformers 5 cache layers, 4.x key/value lists, or the
    legacy tuple of pairs)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:
        pairs = [tuple(pair[:2]) for pair in cache]
    return [tensor for pair in pairs for tensor in pair]


@dataclass(frozen=True)
class CacheShape:
    """What one decoder's cache looks like: (kv_heads, head_dim) per layer, from a probe forward."""

    layers: tuple[tuple[int, int], ...]

    @classmethod
    def probe(cls, model: nn.Module) -> CacheShape | None:
        """Run two tokens through ``model`` with the cache on; None when it returns no cache."""
        ids = torch.full((1, 2), min(3, int(model.config.vocab_size) - 1), dtype=torch.long)
        try:
            with torch.no_grad(), quiet_export():
                outputs = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, return_dict=True)
            cache = getattr(outputs, "past_key_values", None)
        except (TypeError, ValueError):  # a forward without a cache argument
            return None
        if cache is None:
            return None
        tensors = cache_tensors(cache)
        if not tensors or any(t.dim() != 4 for t in tensors):
            return None
        return cls(tuple((int(t.shape[1]), int(t.shape[3])) for t in tensors[::2]))

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}{i}.{kind}" for i in range(len(self.layers)) for kind in ("key", "value")]

    def example(self, batch: int, past: int, dtype: torch.dtype, seed: int = 1234) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randn(batch, heads, past, head_dim, generator=generator).to(dtype)
                for heads, head_dim in self.layers for _ in ("key", "value")]


def torch_input_names(model: nn.Module, task: str) -> list[str]:
    """input_ids, attention_mask, plus token_type_ids for encoders with segment embeddings."""
    names = ["input_ids", "attention_mask"]
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    if task != CAUSAL_LM and accepts and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def output_name(task: str) -> str:
    return "last_hidden_state" if task == FEATURES else "logits"


@dataclass(frozen=True)
class TraceSpec:
    """Everything torch.onnx.export needs besides the file: module, example inputs, names and dynamic axes."""

    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    with_past: bool


BATCH_SEQ = {0: "batch_size", 1: "sequence_length"}
TOTAL_SEQUENCE = "past_sequence_length + sequence_length"  # optimum's name; TensorRT profiles read it as a sum


def main_output_spec(model: nn.Module, task: str) -> TraceSpec:
    """input_ids, attention_mask [, token_type_ids] -> the main output; no cache."""
    names, output = torch_input_names(model, task), output_name(task)
    fixed = {"use_cache": False} if task == CAUSAL_LM else {}
    axes = {name: BATCH_SEQ for name in names}
    axes[output] = {0: "batch_size"} if task == SEQ_CLS else BATCH_SEQ
    return TraceSpec(MainOutput(model, names, output, **fixed).eval(), trace_inputs(model, names), names, [output],
                     axes, with_past=False)


def cached_decoder_spec(model: nn.Module, cache: CacheShape) -> TraceSpec:
    """The decoder with its cache; traced with a non-empty past (TRACE_PAST positions) so that every length,
    zero included, follows the same graph."""
    past_names, present_names = cache.names("past_key_values."), cache.names("present.")
    ids = trace_inputs(model, ["input_ids"])[0]
    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_SEQUENCE, dtype=torch.long)
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQUENCE).expand(TRACE_BATCH, -1)
    axes = {"input_ids": BATCH_SEQ, "position_ids": BATCH_SEQ, "logits": BATCH_SEQ,
            "attention_mask": {0: "batch_size", 1: TOTAL_SEQUENCE}}
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names})
    axes.update({name: {0: "batch_size", 2: TOTAL_SEQUENCE} for name in present_names})
    past = cache.example(TRACE_BATCH, TRACE_PAST, torch.float32)  # traced in float32 (export.weights)
    return TraceSpec(CausalLMWithCache(model).eval(), (ids, mask, positions, *past),
                     ["input_ids", "attention_mask", "position_ids", *past_names],
                     ["logits", *present_names], axes, with_past=True)


class WeightsAsInputs(nn.Module):
    """``inner`` with its state (parameters, persistent buffers) passed as trailing forward arguments.

    Traced this way the weights are graph inputs the exporter knows by shape only. Left as module state they would be
    parameters, whose values the exporter's shape inference propagates: it computes the transpose of every Linear
    weight, a float32 copy of the whole model held until the export ends.
    """

    def __init__(self, inner: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.inner, self.names = inner, tuple(names)

    def forward(self, *args: torch.Tensor) -> Any:
        split = len(args) - len(self.names)
        with swapped_state(self.inner, dict(zip(self.names, args[split:], strict=True))):
            return self.inner(*args[:split])


class TorchOnnxBackend:
    """``torch.onnx.export`` (TorchScript tracer); decoders with their KV cache."""

    name = "torch"

    def unsupported(self, model: nn.Module, task: str) -> str | None:
        return None if hasattr(model, "config") else f"{type(model).__name__} is not a transformers model"

    def trace_spec(self, model: nn.Module, task: str) -> TraceSpec:
        cache = CacheShape.probe(model) if task == CAUSAL_LM else None
        return cached_decoder_spec(model, cache) if cache else main_output_spec(model, task)

    def export(self, model: nn.Module, folder: Path, task: str, opset: int,
               dtype: torch.dtype = torch.float32) -> ExportedGraph:
        """Trace without weights (``export.weights``), convert the small weightless graph to ``dtype``, then write
        the weights tensor by tensor in ``dtype``: the model's weights exist once in memory throughout."""
        with tempfile.TemporaryDirectory(dir=folder, prefix=".torch_onnx.") as scratch:
            traced = Path(scratch) / MODEL_FILE
            try:
                with torch.no_grad(), quiet_export(), traceable_masks(), stand_in_parameters(model):
                    spec = self.trace_spec(model, task)  # the cache probe too runs on the float32 stand-ins
                    state = named_parameters(spec.module)
                    torch.onnx.export(WeightsAsInputs(spec.module, list(state)).eval(),
                                      (*spec.example, *(tensor.detach() for tensor in state.values())), str(traced),
                                      input_names=[*spec.input_names, *state], output_names=spec.output_names,
                                      dynamic_axes=spec.dynamic_axes, opset_version=opset, export_params=False,
                                      do_constant_folding=False, dynamo=False)
            except Exception as error:  # tracing raises many types; re-raised with the model and the first line
                raise export_failure("torch.onnx.export", model, error) from error
            weightless = onnx.load(str(traced))
        if dtype == torch.float16:
            weightless = float16_graph(weightless)
        attach_weights(weightless, state, folder / MODEL_FILE, dtype)
        save_configs(model, folder)
        return ExportedGraph(folder, folder / MODEL_FILE, self.name, task, spec.with_past, opset)


def float16_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's float16 conversion of a weightless graph: float inputs and outputs stay float32 (weight inputs
    too, each behind a Cast that ``attach_weights`` replaces by a float16 initializer); ops on the converter's block
    list stay float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=sorted(DEFAULT_OP_BLOCK_LIST))


@contextmanager
def traceable_masks() -> Iterator[None]:
    """transformers 4.53-4.57 build attention masks with ``torch.vmap``, which the TorchScript tracer cannot record;
    while tracing, the sdpa and eager mask builders are replaced by the same masks built by broadcasting (what
    optimum's model patcher does for its own exports)."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # older transformers build masks without vmap
        yield
        return
    if "cache_position" not in inspect.signature(sdpa_mask).parameters:  # transformers 5 broadcasts by default
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
    """config.json, and generation_config.json for models that generate (what optimum writes itself). The config
    names the exported class (as save_pretrained does): a base saved as BertModel and loaded for seq-cls would
    otherwise tell export.run it is a feature extractor."""
    model.config.architectures = [type(model).__name__]
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
    """``auto``: optimum where it is installed and knows the architecture, torch.onnx otherwise; a named backend
    or an error."""
    if backend not in BACKEND_CHOICES:
        raise ExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        chosen = BACKENDS[backend]
        reason = chosen.unsupported(model, task)
        if reason:
            raise ExportError(f"{reason}; the {backend} backend cannot export {type(model).__name__}. "
                              f"Use --backend auto (falls back to torch.onnx) or --backend torch")
        return chosen
    if OptimumBackend.missing():
        return BACKENDS["torch"]
    reason = BACKENDS["optimum"].unsupported(model, task)
    if reason is None:
        return BACKENDS["optimum"]
    log(f"{reason}: exporting with torch.onnx")
    return BACKENDS["torch"]


def export_model(
    model: nn.Module, folder: str | Path, opset: int = 18, backend: str = "auto", task: str | None = None,
    log: Log = print, dtype: torch.dtype = torch.float32,
) -> ExportedGraph:
    """Export ``model`` into ``folder`` with ``backend`` (auto | optimum | torch), weights in ``dtype`` (float32 or
    float16)."""
    if dtype not in (torch.float32, torch.float16):
        raise ExportError(f"cannot write ONNX weights in {dtype}; use torch.float32 or torch.float16")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = task or model_task(model)
    chosen = choose_backend(model, task, backend, log)
    return chosen.export(model.eval(), folder, task, opset, dtype)


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
