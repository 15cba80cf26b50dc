"""``python -m export.onnx CKPT [CKPT ...] --adapters``: one unmerged base graph, one ``.onnx_adapter`` per checkpoint.

onnxruntime (1.20+) runs one graph with adapter tensors swapped per call: the swappable tensors are graph inputs
with initializers of the same name as defaults, an ``.onnx_adapter`` file holds values for some of them
(``onnxruntime.AdapterFormat``), and ``RunOptions.add_active_adapter`` feeds one file's values on a run. Here:

1. :meth:`AdapterSet.check`: the checkpoints agree on the base model (fingerprint), task and labels, the adapted
   layers and their shapes, the method and its settings, the trained modules and every tensor's shape; otherwise an
   :class:`AdapterSetError` names the two checkpoints and the difference, before anything is written. A method
   qualifies when its layer class declares ``noop_params`` (``surgery/methods/base.py``): the adapter parameters
   whose zeros switch its path off exactly.
2. The first checkpoint goes through ``export.onnx.export_checkpoint`` unfolded (``merge=False``), while its
   swappable tensors (every adapter layer's ``adapter_params()`` and the trained modules: a classifier's head) hold
   distinct marker bit patterns (:func:`marked`), so that each initializer of the written graph is found by its
   values (:func:`locate`), whatever name or transpose the exporter gave it.
3. :meth:`AdapterSet.finish`: those initializers become graph inputs whose defaults switch every adapter off
   (``noop_params`` zero; the other adapter parameters keep the first checkpoint's values; a trained module takes the
   base model's own tensors), so the graph with no adapter active computes the base model. Each checkpoint's tensors,
   permuted as the graph stores them, go to ``NAME.onnx_adapter`` (NAME: the checkpoint folder's name), listed in
   ``adapters.json``. Then every adapter is verified against its own PyTorch model (parity, a cached step and greedy
   tokens for decoders, at the export dtype's tolerance) and the graph without adapter against the base model.

Tensors that are part of the adapter but not trained (cLA's column indices) are baked into the graph: they must be
equal across the set. Methods that do not qualify (their ``not_swappable`` says why): c3LA (its finished links are
added into the base weight), R-LoDA(+) and S-LoDA(+) (their frozen base is an approximation of W0). v1: float32
weights, one adapter per call (a batch cannot mix adapters).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors import safe_open
from torch import nn

from export.decode import greedy, onnx_feed, run_named
from export.exporters import CAUSAL_LM, ExportedGraph, output_name
from export.latency import ort_session
from export.reference import Reference, record_reference
from export.verify import Difference, Parity, cached_step, compare, greedy_comparison, session_options
from export.weights import release_memory
from surgery.checkpoint import ADAPTER_FILE, load_checkpoint, read_config, read_manifest, saved_modules
from surgery.config import SurgeryConfig
from surgery.methods import method_class
from surgery.model import load_model
from surgery.rewrite import AdaptedModel
from surgery.tolerances import Tolerance

ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTERS_FILE = "adapters.json"
ADAPTERS_FORMAT = 1
MARK_START = 0x3F800001  # marker bit patterns: float32 values just above 1.0, counting up one ulp per element
MARK_END = 0x7F800000  # +inf: the first pattern that is not a finite float
TRAINING_ONLY = ("dropout",)  # method settings that do not change the exported graph


class AdapterSetError(ValueError):
    """The checkpoints cannot share one base graph; the message names the checkpoints and the difference."""


# ---- the set ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """One checkpoint of the set: its folder, adapter name, config and manifest."""

    folder: Path
    name: str
    config: SurgeryConfig
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Slot:
    """Where one swappable tensor sits in the graph: the initializer's name, the checkpoint key it comes from
    (``adapter.LAYER.PARAM`` or ``module.NAME.KEY``, as in ``adapter.safetensors``) and the permutation the exporter
    applied (None: as it is)."""

    initializer: str
    key: str
    perm: tuple[int, ...] | None


def member(folder: Path, model_path: str | None) -> Member:
    return Member(folder, folder.resolve().name, read_config(folder, model_path), read_manifest(folder))


def graph_settings(checkpoint: Member) -> dict[str, Any]:
    """What the shared graph depends on, by the name a user knows it by."""
    config, manifest = checkpoint.config, checkpoint.manifest
    method = {k: v for k, v in config.method.model_dump().items() if k not in (*TRAINING_ONLY, "name")}
    return {  # in the order they are compared: the first difference found is the one reported
        "model.task": config.model.task,
        "model.num_labels": config.model.num_labels,
        "model.dtype": config.model.dtype,
        "method.name": config.method.name,
        "method": method,
        "adapted layers (checkpoint.json layers)": manifest.get("layers"),
        "train_head": config.train_head,
        "modules_to_train": config.modules_to_train,
        "base model (checkpoint.json base_fingerprint)": manifest["base_fingerprint"],
    }


def tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """adapter.safetensors' keys -> (shape, dtype), read from its header."""
    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as handle:
        return {key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()}


def first_difference(a: Any, b: Any) -> str:
    """A short description of where two settings differ (the first differing key of two dicts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                return f"{key}: {a.get(key, '<absent>')!r} vs {b.get(key, '<absent>')!r}"
    return f"{a!r} vs {b!r}"


def set_error(first: Member, other: Member, what: str, detail: str) -> AdapterSetError:
    return AdapterSetError(
        f"checkpoints {first.folder} and {other.folder} differ in {what} ({detail}); the adapters of one --adapters "
        f"export share one base graph, so they must come from the same base model, method, settings and layers: "
        f"export such checkpoints in separate --adapters sets")


class AdapterSet:
    """The checkpoints of one ``--adapters`` export and the stages that make the adapter files (see the module)."""

    def __init__(self, members: list[Member], model_path: str | None) -> None:
        self.members, self.model_path = members, model_path
        self.swappable: dict[str, torch.Tensor] = {}  # the first checkpoint's tensors by key, while it is exported
        self.noop: set[str] = set()
        self.first_values: dict[str, np.ndarray] = {}

    # -- stage 1: before anything is loaded or written ---------------------------------------------------------------
    @classmethod
    def check(cls, checkpoints: Sequence[str | Path], model_path: str | None = None) -> AdapterSet:
        """Refuse a set that cannot share one graph (AdapterSetError naming the difference)."""
        folders = [Path(c) for c in checkpoints]
        if not folders:
            raise AdapterSetError("--adapters needs at least one checkpoint folder")
        members = [member(folder, model_path) for folder in folders]
        names: dict[str, Path] = {}
        for m in members:
            if m.name in names:
                raise AdapterSetError(f"checkpoints {names[m.name]} and {m.folder} would both be adapter {m.name!r} "
                                      f"(adapters are named by their folder): rename or copy one of the folders")
            names[m.name] = m.folder
        layer_class = method_class(members[0].config.method.name)
        if layer_class.noop_params is None:
            raise AdapterSetError(
                f"{members[0].folder}: method {members[0].config.method.name!r} cannot be served as swappable "
                f"adapters: {layer_class.not_swappable}; export each checkpoint on its own (--merge)")
        first, first_settings, first_shapes = members[0], graph_settings(members[0]), tensor_shapes(members[0].folder)
        for other in members[1:]:
            settings = graph_settings(other)
            for what, value in first_settings.items():
                if settings[what] != value:
                    raise set_error(first, other, what, first_difference(value, settings[what]))
            shapes = tensor_shapes(other.folder)
            for key in sorted(set(first_shapes) | set(shapes)):
                if first_shapes.get(key) != shapes.get(key):
                    raise set_error(first, other, f"tensor {key} of {ADAPTER_FILE}",
                                    f"{described(first_shapes.get(key))} vs {described(shapes.get(key))}")
        return cls(members, model_path)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    # -- stage 2: the first checkpoint, loaded ----------------------------------------------------------------------
    def check_loaded(self, adapted: AdaptedModel) -> None:
        """Keep the first checkpoint's swappable tensors; refuse a set whose baked tensors (adapter state that is not
        trained, e.g. cLA's columns) differ. Nothing is written yet."""
        self.swappable, self.noop = swappable_tensors(adapted)
        self.first_values = {key: tensor.detach().float().numpy().copy() for key, tensor in self.swappable.items()}
        baked = [f"adapter.{name}.{key}" for name, layer in adapted.layers.items()
                 for key in layer.adapter_state() if key not in layer.adapter_params()]
        self.check_baked(baked)

    def check_baked(self, keys: list[str]) -> None:
        first = self.members[0]
        with safe_open(str(first.folder / ADAPTER_FILE), framework="pt") as handle:
            expected = {key: handle.get_tensor(key) for key in keys}
        for other in self.members[1:]:
            with safe_open(str(other.folder / ADAPTER_FILE), framework="pt") as handle:
                for key in keys:
                    if not torch.equal(handle.get_tensor(key), expected[key]):
                        raise set_error(first, other, f"tensor {key}",
                                        "it is part of the graph, not a trained tensor, so it must be equal")

    @contextmanager
    def marked(self) -> Iterator[None]:
        """The first checkpoint's swappable tensors hold marker patterns while the graph is written."""
        with marked(self.swappable):
            yield

    # -- stage 3: after the export -------------------------------------------------------------------------------------
    def finish(self, graph: ExportedGraph, reference: Reference, tolerance: Tolerance,
               log: Callable[[str], None]) -> Parity:
        """Swappable inputs with no-op defaults, one adapter file per checkpoint, every adapter verified; returns one
        Parity over them all (case names prefixed by the adapter)."""
        slots = locate(graph.model_file, marker_layout(self.swappable))
        self.swappable = {}  # the first checkpoint's model goes with the export stage
        log(f"{len(slots)} swappable tensors in the graph; base model for the no-adapter defaults")
        base = load_model(self.members[0].config.model).eval()
        base_reference = record_reference(base, reference.task)
        defaults = no_op_defaults(self.first_values, self.noop, base)
        del base
        release_memory()
        make_swappable(graph.model_file, slots, defaults)
        references = {self.members[0].name: reference}
        write_adapter(graph.folder, self.members[0], 1, slots, self.first_values)
        self.first_values = {}
        for version, other in enumerate(self.members[1:], start=2):
            log(f"adapter {other.name}: loading {other.folder}")
            adapted = load_checkpoint(other.folder, model_path=self.model_path)
            references[other.name] = record_reference(adapted.model.eval(), reference.task)
            tensors, _ = swappable_tensors(adapted)
            write_adapter(graph.folder, other, version, slots,
                          {key: tensor.detach().float().numpy() for key, tensor in tensors.items()})
            del adapted, tensors
            release_memory()
        write_listing(graph.folder, self.members, slots)
        return verify_adapters(graph, references, base_reference, tolerance, log)

    def section(self, folder: Path) -> dict[str, Any]:
        """The report's ``adapters`` section: names, files and sizes."""
        listing = json.loads((folder / ADAPTERS_FILE).read_text())
        return {"file": ADAPTERS_FILE, **listing}


def described(shape: tuple[tuple[int, ...], str] | None) -> str:
    return "absent" if shape is None else f"shape {list(shape[0])} {shape[1]}"


def swappable_tensors(adapted: AdaptedModel) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every per-checkpoint tensor by its checkpoint key: each adapter layer's declared ``adapter_params()`` and the
    floating tensors of the trained modules; and the keys of the method's ``noop_params``."""
    tensors: dict[str, torch.Tensor] = {}
    noop: set[str] = set()
    for name, layer in adapted.layers.items():
        if type(layer).noop_params is None:
            raise AdapterSetError(f"layer {name!r}: method {layer.config.name!r} cannot be served as swappable "
                                  f"adapters: {type(layer).not_swappable}")
        for key, param in layer.adapter_params().items():
            tensors[f"adapter.{name}.{key}"] = param
            if key in type(layer).noop_params:
                noop.add(f"adapter.{name}.{key}")
    for name, module in saved_modules(adapted).items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                tensors[f"module.{name}.{key}"] = tensor
    return tensors, noop


def no_op_defaults(first: dict[str, np.ndarray], noop: set[str], base: nn.Module) -> dict[str, np.ndarray]:
    """The graph's values with no adapter active: zeros for the method's ``noop_params`` (its path is then exactly
    zero), the first checkpoint's values for the other adapter parameters (any finite value will do), the base
    model's own tensors for trained modules (``module.classifier.weight`` -> the base's ``classifier.weight``)."""
    base_state = base.state_dict()
    defaults = {}
    for key, value in first.items():
        if key in noop:
            defaults[key] = np.zeros_like(value)
        elif key.startswith("module."):
            defaults[key] = base_state[key.removeprefix("module.")].detach().float().numpy()
        else:
            defaults[key] = value
    return defaults


# ---- markers ------------------------------------------------------------------------------------------------------
def marker_layout(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Each key's first marker pattern and shape, in order; refuses more elements than there are patterns."""
    layout, offset = {}, MARK_START
    for key, tensor in tensors.items():
        layout[key] = (offset, tuple(tensor.shape))
        offset += tensor.numel()
    if offset > MARK_END:
        raise AdapterSetError(f"{offset - MARK_START:,} swappable values: more than the {MARK_END - MARK_START:,} "
                              f"marker patterns this exporter can tell apart")
    return layout


def marker(offset: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor whose elements' bit patterns count up from ``offset`` (row-major)."""
    count = int(np.prod(shape, dtype=np.int64))
    return torch.arange(offset, offset + count, dtype=torch.int32).view(torch.float32).reshape(shape)


@contextmanager
def marked(tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, each tensor's data is its marker (see :func:`marker_layout`); restored afterwards."""
    saved = {}
    for key, (offset, shape) in marker_layout(tensors).items():
        saved[key] = tensors[key].data
        tensors[key].data = marker(offset, shape)  # float32 whatever the tensor's dtype: the export writes float32
    try:
        yield
    finally:
        for key, data in saved.items():
            tensors[key].data = data


def first_pattern(tensor: onnx.TensorProto, folder: Path) -> int | None:
    """The bit pattern of a float32 initializer's first element (inline or external), None when empty."""
    if tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in tensor.external_data}
        with open(folder / info["location"], "rb") as handle:
            handle.seek(int(info.get("offset", 0)))
            raw = handle.read(4)
    else:
        raw = tensor.raw_data[:4] if tensor.raw_data else np.array(tensor.float_data[:1], np.float32).tobytes()
    return int(np.frombuffer(raw, dtype="<i4")[0]) if len(raw) == 4 else None


def locate(model_file: Path, layout: dict[str, tuple[int, tuple[int, ...]]]) -> list[Slot]:
    """The initializers that hold a marker, each with its key and the permutation the exporter applied."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    starts = sorted((offset, key) for key, (offset, _) in layout.items())
    offsets = [offset for offset, _ in starts]
    known = set(offsets)
    slots = []
    for tensor in graph.initializer:
        pattern = first_pattern(tensor, model_file.parent)
        if pattern is None or pattern not in known:
            continue
        key = starts[offsets.index(pattern)][1]
        perm = matching_perm(onnx.numpy_helper.to_array(tensor, str(model_file.parent)), *layout[key])
        if perm is not False:
            slots.append(Slot(tensor.name, key, perm))
    found = [slot.key for slot in slots]
    twice = sorted({key for key in found if found.count(key) > 1})
    if twice:
        raise AdapterSetError(f"{model_file}: tensors {twice} appear in more than one initializer; the exporter copied "
                              f"them, so one adapter file cannot override them")
    return slots


def matching_perm(values: np.ndarray, offset: int, shape: tuple[int, ...]) -> tuple[int, ...] | None | bool:
    """The permutation taking the marker of ``shape`` to ``values`` (None: none needed), or False: not a marker."""
    expected = marker(offset, shape).numpy().view(np.int32)
    got = np.ascontiguousarray(values, dtype=np.float32).view(np.int32)
    for perm in itertools.permutations(range(len(shape))):
        candidate = expected.transpose(perm)
        if candidate.shape == got.shape and np.array_equal(candidate, got):
            return None if perm == tuple(range(len(shape))) else perm
    return False


# ---- writing ------------------------------------------------------------------------------------------------------
def arranged(value: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    return np.ascontiguousarray((value if perm is None else value.transpose(perm)).astype(np.float32))


def make_swappable(model_file: Path, slots: list[Slot], defaults: dict[str, np.ndarray]) -> None:
    """Each slot's initializer takes its no-op default (inline) and becomes a graph input of the same name: what
    onnxruntime's adapters override."""
    model = onnx.load(str(model_file), load_external_data=False)
    by_name = {tensor.name: tensor for tensor in model.graph.initializer}
    for slot in slots:
        value = arranged(defaults[slot.key], slot.perm)
        tensor = by_name[slot.initializer]
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = value.tobytes()
        model.graph.input.append(onnx.helper.make_tensor_value_info(slot.initializer, onnx.TensorProto.FLOAT,
                                                                    list(value.shape)))
    temporary = model_file.with_name(model_file.name + ".tmp")
    onnx.save(model, str(temporary))
    os.replace(temporary, model_file)


def adapter_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{ADAPTER_SUFFIX}"


def write_adapter(folder: Path, owner: Member, version: int, slots: list[Slot],
                  values: dict[str, np.ndarray]) -> Path:
    """``NAME.onnx_adapter``: the checkpoint's value of every slot, arranged as the graph stores it."""
    missing = [slot.key for slot in slots if slot.key not in values]
    if missing:
        raise AdapterSetError(f"{owner.folder}: no tensors {missing[:5]} for the graph's swappable inputs")
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(version)
    adapter.set_model_version(ADAPTERS_FORMAT)
    arrays = {slot.initializer: arranged(values[slot.key], slot.perm) for slot in slots}  # alive until written:
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array)  # an OrtValue only points at the array
                            for name, array in arrays.items()})
    path = adapter_path(folder, owner.name)
    temporary = path.with_name(path.name + ".tmp")
    adapter.export_adapter(str(temporary))
    os.replace(temporary, path)
    return path


def write_listing(folder: Path, members: list[Member], slots: list[Slot]) -> None:
    """``adapters.json``: each adapter's file, checkpoint and size, and the swappable inputs by checkpoint key."""
    listing = {
        "format": ADAPTERS_FORMAT,
        "adapters": {m.name: {"file": adapter_path(folder, m.name).name, "checkpoint": str(m.folder),
                              "bytes": adapter_path(folder, m.name).stat().st_size} for m in members},
        "inputs": {slot.initializer: {"key": slot.key, "perm": slot.perm} for slot in slots},
    }
    (folder / ADAPTERS_FILE).write_text(json.dumps(listing, indent=2) + "\n")


# ---- running ------------------------------------------------------------------------------------------------------
class AdapterSession:
    """An onnxruntime session with one adapter active on every run (None: the graph's no-op defaults, the base
    model). Everything else is the session's; callers that take a session (export.decode, export.verify) take it."""

    def __init__(self, session: ort.InferenceSession, adapter: ort.LoraAdapter | None = None) -> None:
        self.session, self.adapter = session, adapter
        self.run_options = ort.RunOptions()
        if adapter is not None:
            self.run_options.add_active_adapter(adapter)

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray], run_options: Any = None) -> list:
        return self.session.run(output_names, feed, self.run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def available(folder: Path) -> dict[str, Path]:
    """Adapter name -> file, from ``adapters.json`` (empty when the folder has none)."""
    path = folder / ADAPTERS_FILE
    if not path.is_file():
        return {}
    listing = json.loads(path.read_text())
    return {name: folder / entry["file"] for name, entry in listing["adapters"].items()}


def load_adapter(path: Path) -> ort.LoraAdapter:
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    return adapter


def quiet_options() -> ort.SessionOptions:
    """Verification's options without onnxruntime's warning per overridable initializer."""
    options = session_options()
    options.log_severity_level = 3
    return options


# ---- verification -------------------------------------------------------------------------------------------------
def verify_adapters(graph: ExportedGraph, references: dict[str, Reference], base_reference: Reference,
                    tolerance: Tolerance, log: Callable[[str], None]) -> Parity:
    """Each adapter active against its checkpoint's PyTorch outputs, then no adapter against the base model's."""
    session = ort_session(graph.model_file, "cpu", quiet_options())
    parity = Parity(tolerance)
    greedy_sections: dict[str, Any] = {}
    runs = [(name, AdapterSession(session, load_adapter(adapter_path(graph.folder, name))), reference)
            for name, reference in references.items()]
    runs.append(("(no adapter: base model)", AdapterSession(session), base_reference))
    for name, adapted_session, reference in runs:
        cases, greedy_section = check_one(adapted_session, graph, reference, tolerance, name)
        parity.cases.extend(cases)
        if greedy_section is not None:
            greedy_sections[name] = greedy_section
        worst = max(case.max_abs_diff for case in cases)
        log(f"{name}: max |diff| {worst:.3g}" + ("" if greedy_section is None else
                                                  f", greedy {'match' if greedy_section['match'] else 'differs'}"))
    if greedy_sections:
        parity.greedy = {"passed": all(s["passed"] for s in greedy_sections.values()),
                         "match": all(s["match"] for s in greedy_sections.values()), "adapters": greedy_sections}
        parity.greedy_match = parity.greedy["match"]
    return parity


def check_one(session: AdapterSession, graph: ExportedGraph, reference: Reference, tolerance: Tolerance,
              name: str) -> tuple[list[Difference], dict[str, Any] | None]:
    """Parity cases (+ a cached step each for decoders) and greedy tokens of one adapter (or none)."""
    cases = []
    for case in reference.cases:
        outputs = run_named(session, onnx_feed(session, case.inputs))
        cases.append(compare(f"{name} {case.name}", outputs[output_name(graph.task)], case.expected, tolerance,
                             case.token_mask))
        if graph.with_past:
            step = cached_step(session, case, outputs, tolerance)
            cases.append(Difference(f"{name} {step.case}", step.max_abs_diff, step.max_rel_diff, step.within))
    greedy_section = None
    if graph.task == CAUSAL_LM and reference.greedy is not None:
        case = reference.greedy
        tokens = greedy(session, case.prompt, case.tokens.shape[1], case.eos_ids, suppress_eos=True,
                        pad_id=case.pad_id)
        greedy_section = greedy_comparison(tokens, case.tokens, case.scores, tolerance)
    return cases, greedy_section


def export_adapters(checkpoints: Sequence[str | Path], out: str | Path | None = None,
                    **options: Any) -> dict[str, Any]:
    """The ``--adapters`` export: :meth:`AdapterSet.check`, then ``export.onnx.export_checkpoint`` of the first
    checkpoint unfolded with this set's stages plugged in. ``options``: export_checkpoint's (opset, backend,
    model_path, overwrite, log)."""
    from export.onnx import export_checkpoint

    if options.get("dtype", "fp32") != "fp32":
        raise ValueError(f"--dtype {options['dtype']} with --adapters: v1 writes float32 graphs and adapters only")
    if options.get("backend", "torch") not in ("auto", "torch"):
        raise ValueError(f"--backend {options['backend']} with --adapters: the adapter graph is written by torch.onnx "
                         f"(--backend torch or auto)")
    options["backend"] = "torch"
    adapter_set = AdapterSet.check(checkpoints, options.get("model_path"))
    first = Path(checkpoints[0])
    out = Path(out) if out is not None else first / "onnx_adapters"
    return export_checkpoint(first, out, merge=False, latency=False, fp16_check=False, adapters=adapter_set,
                             **options)
