"""Surgery, fold and export at scale: wall time and peak RSS of each pipeline command on a random real-size Llama.

    python -m benchmarks.bench_scale              # TinyLlama-1.1B's shape, random float32 weights (4.4 GB)
    python -m benchmarks.bench_scale --shape llama-2-7b --dtype float16 --method proda   # 13.5 GB of float16
    python -m benchmarks.bench_scale --quick      # a ~106M Llama (0.4 GB), results in benchmarks/results/tmp/
    python -m benchmarks.bench_scale --profile    # also profile the export's memory even when the target is met

A random-initialised Llama (TinyLlama-1.1B's published shape: hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocabulary 32000, untied head; 1.1B parameters) is written as float32 safetensors shards into a
scratch folder (``--dtype``: float32, float16 or bfloat16 weights), and a surgery config (``--method``: LoRA r=8 on
all-linear, or ProDA r=8 on q_proj, v_proj; no train section: surgery and save) beside it. Then three fresh child
processes, each measured from outside (wall time; CPU time and peak RSS from wait4, the child's own ru_maxrss):

1. ``python -m surgery.apply CFG --dry-run --report plan.json``: the plan, config.json only;
2. ``python -m surgery.apply CFG --report surgery.json``: load, surgery, save the checkpoint; the benchmark then
   gives the adapters random non-zero values (LoRA's B and ProDA's up-projections start at zero: a fold of zeros
   proves nothing) and rewrites the manifest's file hash, as a training run would have left them;
3. ``python -m export.onnx CKPT --merge --no-latency --no-fp16-check [--dtype fp16]``: load, record the reference
   outputs, fold in place, export (weights in model.onnx_data past 2 GiB), verify (parity, a cached step and greedy
   decoding against the unfolded model's recorded outputs). A float16 base exports fp16, the others fp32.

The same three run first on a 2-layer Llama: their peak RSS is the fixed cost (interpreter, torch, transformers,
onnxruntime), reported beside the ratio issue 10 asks for (peak RSS / the exported weights' bytes, target <= 1.3)
as the marginal ratio (peak - fixed) / exported bytes. When the export misses the target (or with ``--profile``) a fourth
child repeats step 3 in-process with a sampler: peak RSS per pipeline stage (VmHWM reset at each stage) and the
Python stack at the stage's highest sampled RSS, written to ``scale_profile.*``.

Weights: norms 1, matrices N(0, 0.02^2), the head N(0, 0.05^2): logits of std ~2.3, so greedy decoding over 32000
tokens has clear winners (the default init's near-uniform logits let float rounding flip the argmax) while staying
small enough for verification's elementwise tolerance (atol 2e-4 + rtol 1e-3 |x|: with a N(0, 1) head, logits of
std ~45, float32 rounding between onnxruntime and PyTorch alone reaches 6e-4 on logits near 0 and parity fails).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from benchmarks.common import (
    GIB,
    MIB,
    RESULTS,
    ChildRun,
    Column,
    Target,
    bar_plot,
    machine_info,
    peak_rss_bytes,
    python_command,
    reset_peak_rss,
    run_child,
    rss_bytes,
    write_results,
)
from export.report import REPORT_JSON

REPO = Path(__file__).resolve().parent.parent
RSS_LIMIT = 1.3  # issue 10: export peak RSS / the exported weights' bytes
SHARD_BYTES = GIB  # safetensors shards of at most this size (what a hub checkpoint of this size ships)
DISK_FACTOR = 3.0  # model shards + ONNX external data (up to twice a half model's bytes), with room to spare
MEMORY_FACTOR = 1.5  # refuse to start unless this many exported-weight sizes of RAM are available (a shared machine)
METHODS = {"lora": ({"name": "lora", "r": 8}, "all-linear"),  # method, targets
           "proda": ({"name": "proda", "r": 8, "alpha": 16, "d_b": 8}, ["q_proj", "v_proj"])}
EXPORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "fp32"}  # bf16 exports are refused on ORT CPU
ADAPTER_STD = 0.02  # the random adapter values the benchmark writes after surgery (see step 2)
SAMPLE_INTERVAL_S = 0.02

_LLAMA = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "vocab_size": 32000,
          "max_position_embeddings": 2048, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 0}
SHAPES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's published config.json (1,100,048,384 parameters)
    # Llama-2-7B's published config.json (6,738,415,616 parameters)
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                   "rms_norm_eps": 1e-5},
    "llama-1.1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                   "num_attention_heads": 32, "num_key_value_heads": 4},
    # the CI memory test's: 332M parameters (1.3 GB), the head's share of TinyLlama-1.1B's (7%, not llama-106m's
    # 23%): the export's transient costs scale with the largest tensor, the head
    "llama-330m": {**_LLAMA, "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 10,
                   "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 16000},
    "llama-106m": {**_LLAMA, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
                   "num_attention_heads": 12, "num_key_value_heads": 12},
    "tiny-llama": {**_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                   "max_position_embeddings": 64},
}
REFERENCE = "tiny-llama"
STEPS = ("dry-run plan", "surgery + save", "fold + export + verify")


# ---- the model on disk ----------------------------------------------------------------------------
def meta_llama(shape: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))


@dataclass(frozen=True)
class Setting:
    """What one run measures: the stored weights' dtype and the adapter method."""

    dtype: str = "float32"  # of the base weights on disk (model.dtype of the surgery config)
    method: str = "lora"
    latency: bool = False  # the export step also measures latency (a base export made the same way, timed after)

    @property
    def itemsize(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def export_dtype(self) -> str:
        return EXPORT_DTYPE[self.dtype]

    @property
    def export_itemsize(self) -> int:
        return {"fp32": 4, "fp16": 2}[self.export_dtype]


def model_bytes(shape: str, setting: Setting) -> tuple[int, int]:
    """(parameters, bytes of the exported weights) of a shape, from a meta-device model: the ratio's denominator."""
    params = sum(p.numel() for p in meta_llama(shape).parameters())
    return params, setting.export_itemsize * params


HEAD_STD = 0.05  # logits ~N(0, (0.05 sqrt(hidden))^2): std 2.3 at hidden 2048


def random_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Norms 1, the head N(0, HEAD_STD^2), every other matrix N(0, 0.02^2)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = HEAD_STD if name.startswith("lm_head") else 0.02
    return torch.randn(shape, generator=generator) * std


def write_random_llama(shape: str, folder: Path, dtype: str) -> Path:
    """config.json and ``dtype`` safetensors shards (with model.safetensors.index.json), one shard in memory at
    a time, so that this process never holds the model."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**SHAPES[shape], dtype=dtype).save_pretrained(folder)
    itemsize = getattr(torch, dtype).itemsize
    shapes = {name: p.shape for name, p in meta_llama(shape).state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor_shape in shapes.items():
        nbytes = itemsize * tensor_shape.numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], generator).to(getattr(torch, dtype)) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    total = sum(itemsize * s.numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_config(model_dir: Path, folder: Path, setting: Setting) -> Path:
    """The surgery config: the method on its targets, the base's dtype, no train section (surgery and save only)."""
    method, targets = METHODS[setting.method]
    config = {"model": {"name_or_path": str(model_dir), "task": "causal-lm", "dtype": setting.dtype},
              "targets": targets, "method": method, "output_dir": str(folder / "ckpt")}
    path = folder / "surgery.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def check_resources(shape: str, folder: Path, force: bool, setting: Setting) -> None:
    """Refuse to start without the disk the run writes or the RAM it may need (the machine is shared)."""
    _, size = model_bytes(shape, setting)
    free = shutil.disk_usage(folder).free
    if free < DISK_FACTOR * size:
        raise SystemExit(f"bench_scale {shape}: {folder} has {free / GIB:.1f} GiB free, the run writes up to "
                         f"{DISK_FACTOR * size / GIB:.1f} GiB; point --work-dir at a larger disk")
    available = psutil.virtual_memory().available
    if available < MEMORY_FACTOR * size and not force:
        raise SystemExit(f"bench_scale {shape}: {available / GIB:.1f} GiB of RAM available, less than "
                         f"{MEMORY_FACTOR:g} x the model ({MEMORY_FACTOR * size / GIB:.1f} GiB) that the export may "
                         f"need; free memory or pass --force")


# ---- the three commands ---------------------------------------------------------------------------
# A child's ru_maxrss (wait4) is not its own peak on Linux: the child starts on the parent's memory map (vfork,
# or a fork's copy) and exec folds that map's high-water mark into the rusage maxrss, so a child small next to
# this process reports this process's peak (a `python -c pass` spawned after writing a 1 GiB shard reports over
# 1 GiB). VmHWM belongs to the map exec gives the child, so it is the child's own: this wrapper runs the module
# as `python -m` would and writes VmHWM (kB) to a file at exit.
PEAK_WRAPPER = """\
import atexit, runpy, sys
peak_file, module = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
def write_peak():
    with open('/proc/self/status') as status:
        kb = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(peak_file, 'w') as out:
        out.write(kb)
atexit.register(write_peak)
runpy.run_module(module, run_name='__main__', alter_sys=True)
"""


@dataclass
class StepRun:
    """One pipeline command, run as a fresh child: its own peak RSS (VmHWM) beside wait4's figures."""

    step: str
    command: list[str]  # as a user types it: python -m MODULE ARGS
    child: ChildRun
    peak_rss_bytes: int


def commands(config: Path, folder: Path, setting: Setting) -> dict[str, tuple[str, ...]]:
    """Step -> (module, arguments)."""
    return {
        STEPS[0]: ("surgery.apply", str(config), "--dry-run", "--report", str(folder / "plan.json")),
        STEPS[1]: ("surgery.apply", str(config), "--report", str(folder / "surgery.json")),
        STEPS[2]: ("export.onnx", str(folder / "ckpt"), "--merge", *(() if setting.latency else ("--no-latency",)),
                   "--no-fp16-check", "--dtype", setting.export_dtype, "--out", str(folder / "onnx")),
    }


def randomise_adapters(ckpt: Path, seed: int = 0) -> None:
    """Give every adapter tensor of ``ckpt`` random N(0, ADAPTER_STD^2) values added to its own (what training
    would leave; LoRA's B starts at zero) and rewrite the manifest's file hash to match."""
    from safetensors.torch import load_file, save_file

    from surgery.checkpoint import ADAPTER_FILE, MANIFEST_FILE, file_hash

    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(ckpt / ADAPTER_FILE))
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator) * ADAPTER_STD
            tensors[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file(tensors, str(ckpt / ADAPTER_FILE), metadata={"format": "pt"})
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["files"][ADAPTER_FILE] = file_hash(ckpt / ADAPTER_FILE)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def run_measured(step: str, module_args: tuple[str, ...], folder: Path, python: str = sys.executable) -> StepRun:
    """``python -m MODULE ARGS`` in a fresh child through PEAK_WRAPPER; raises when it fails."""
    peak_file = folder / f"peak_{step.replace(' ', '_').replace('+', '')}.txt"
    command = python_command(*module_args)
    child = run_child([python, "-c", PEAK_WRAPPER, str(peak_file), *module_args], cwd=REPO)
    if child.returncode != 0:
        peak = f"{int(peak_file.read_text()) / 1024:,.0f} MiB" if peak_file.is_file() else "unknown"
        raise RuntimeError(f"{step} failed ({child.returncode}, peak RSS {peak}): {' '.join(command)}\n"
                           f"{child.stdout[-2000:]}\n{child.stderr[-3000:]}")
    return StepRun(step, command, child, int(peak_file.read_text()) * 1024)


def run_steps(shape: str, folder: Path, setting: Setting) -> list[StepRun]:
    """Write the model and the config, then the three commands one after the other, each a fresh child."""
    print(f"  {shape}: writing random {setting.dtype} weights into {folder}", flush=True)
    model_dir = write_random_llama(shape, folder / "model", setting.dtype)
    config = write_config(model_dir, folder, setting)
    runs = []
    for step, module_args in commands(config, folder, setting).items():
        run = run_measured(step, module_args, folder)
        if step == STEPS[1]:
            randomise_adapters(folder / "ckpt")
        print(f"  {shape} / {step}: {run.child.wall_s:.1f} s wall, {run.child.cpu_s:.1f} s CPU, "
              f"{run.peak_rss_bytes / MIB:,.0f} MiB peak RSS (wait4's ru_maxrss "
              f"{run.child.peak_rss_bytes / MIB:,.0f} MiB)", flush=True)
        runs.append(run)
    return runs


OPTIMUM_STEP = "optimum-onnx export of the base"
COMPAT_PYTHON = REPO / ".venv-compat" / "bin" / "python"  # make test-compat's: transformers 4.56 + optimum-onnx


def optimum_export(python: Path, folder: Path) -> StepRun:
    """optimum-onnx's own export of the base model (no adapters: it has none of these methods), with the KV cache,
    in the virtualenv that has it; the same peak measurement as ours."""
    args = ("optimum.exporters.onnx", "--model", str(folder / "model"), "--task", "text-generation-with-past",
            str(folder / "onnx_optimum"))
    run = run_measured(OPTIMUM_STEP, args, folder, python=str(python))
    print(f"  {folder.name} / {OPTIMUM_STEP}: {run.child.wall_s:.1f} s wall, {run.peak_rss_bytes / MIB:,.0f} MiB "
          f"peak RSS", flush=True)
    shutil.rmtree(folder / "onnx_optimum", ignore_errors=True)
    return run


def export_files(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted((folder / "onnx").glob("model.onnx*"))}


def export_checks(folder: Path) -> str:
    """The export's own verdict from its report: parity per case (with the float16 floor) and greedy decoding."""
    report = json.loads((folder / "onnx" / REPORT_JSON).read_text())
    parity = report["parity"]
    cases = "; ".join(f"{c['case']}: max |diff| {c['max_abs_diff']:.3g}"
                      + ("" if c.get("floor_abs_diff") is None else f" (stored-in-float16 model: {c['floor_abs_diff']:.3g})")
                      for c in parity["cases"])
    greedy = parity.get("greedy") or {}
    decoding = ("n/a" if not greedy else "identical" if greedy["match"] else
                f"identical up to {len(greedy['divergences'])} near-tie(s)" if greedy["passed"] else "MISMATCH")
    latency = report.get("latency")
    timed = "" if not latency else (f"; latency {latency['ort_ms']:.0f} ms vs the base export's "
                                    f"{latency['base_ort_ms']:.0f} ms ({latency['input']}): overhead "
                                    f"{latency['overhead']:.3f}")
    return (f"export checks ({'passed' if report['passed'] else 'FAILED'}): parity at atol "
            f"{parity['tolerance']['atol']:g} / rtol {parity['tolerance']['rtol']:g}: {cases}; greedy "
            f"{greedy.get('tokens', 0)} tokens x {greedy.get('prompts', 0)} prompts: {decoding}{timed}")


# ---- profile (a child running export_checkpoint in-process) -----------------------------------------
# Functions the profile marks as segments of their own (looked up by name where they are called, so wrapping the
# module attribute catches every call); everything else counts to the enclosing step of export_checkpoint's log.
WATCHED = (
    ("export.onnx", "load_checkpoint"), ("export.onnx", "record_reference"), ("export.onnx", "fold_in_place"),
    ("export.onnx", "export_model"), ("export.onnx", "save_tokenizer"), ("export.onnx", "base_report"),
    ("export.onnx", "verify_export"), ("export.onnx", "tensorrt_section"), ("export.verify", "check_parity"),
    ("export.verify", "check_greedy"), ("export.verify", "session"), ("export.exporters", "float16_graph"),
    ("export.exporters", "attach_weights"), ("torch.onnx", "export"), ("onnx", "load"), ("onnx", "save"),
)


class Segments:
    """A timeline of segments: each numbered step of export_checkpoint's log, and inside it each call of a
    WATCHED function (nested calls nest). At every boundary VmHWM is read into the running segment and reset, so
    each segment gets its exact peak RSS; a sampler thread adds the RSS curve and the main thread's stack at each
    segment's highest sample."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.closed: list[dict[str, Any]] = []
        self.step: str | None = None
        self.calls: list[str] = []
        self.current: dict[str, Any] | None = None
        self.lock = threading.Lock()

    def name(self) -> str:
        return " > ".join([self.step or "before the first step", *self.calls])

    def boundary(self) -> None:
        """Close the running segment (its peak: VmHWM since the last boundary) and open the next one."""
        with self.lock:
            now, rss = time.perf_counter() - self.start, rss_bytes()
            if self.current is not None:
                self.current.update(end_s=now, peak=max(peak_rss_bytes(), self.current["sampled_peak"]),
                                    rss_end=rss)
                self.closed.append(self.current)
            if not reset_peak_rss():
                raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); the profile needs Linux >= 4.0")
            self.current = {"segment": self.name(), "start_s": now, "rss_start": rss, "sampled_peak": rss,
                            "stack_at_peak": []}

    def log(self, line: str) -> None:
        """export_checkpoint's ``log``: a numbered step line starts a step."""
        print(line, flush=True)
        if line.startswith("["):
            self.step = line.split("] ", 1)[1].split(":", 1)[0].split(" (")[0]
            self.boundary()

    def finish(self) -> None:
        self.step, self.calls = "finished", []
        self.boundary()
        self.current = None

    def watch(self, module: Any, attribute: str) -> None:
        """Replace ``module.attribute`` by a wrapper that makes each call a segment."""
        function = getattr(module, attribute)
        label = attribute

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(label)
            self.boundary()
            try:
                return function(*args, **kwargs)
            finally:
                self.calls.pop()
                self.boundary()

        setattr(module, attribute, wrapper)

    def sample(self, main_id: int | None) -> tuple[float, int]:
        with self.lock:
            now, rss = time.perf_counter() - self.start, rss_bytes()
            segment = self.current
            if segment is not None and rss > segment["sampled_peak"]:
                segment["sampled_peak"] = rss
                segment["stack_at_peak"] = main_stack(sys._current_frames().get(main_id))
        return now, rss


class Sampler(threading.Thread):
    """RSS every ``interval`` seconds (the GIL permitting: a long C call that holds it delays the sample, never
    a segment's peak, which comes from VmHWM)."""

    def __init__(self, segments: Segments, interval: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.segments, self.interval = segments, interval
        self.main_id = threading.main_thread().ident
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append(self.segments.sample(self.main_id))
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def main_stack(frame: Any, depth: int = 12) -> list[str]:
    """The innermost ``depth`` frames as 'file:line function', paths shortened to the package; the profiler's
    own wrappers left out."""
    if frame is None:
        return []
    out = []
    for entry in traceback.extract_stack(frame):
        path = entry.filename
        if path.endswith("bench_scale.py"):
            continue
        for marker in ("site-packages/", f"{REPO}/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        out.append(f"{path}:{entry.lineno} {entry.name}")
    return out[-depth:]


def profile_child(ckpt: Path, out: Path, result: Path, dtype: str = "fp32") -> int:
    """``--profile-child``: export_checkpoint as the CLI step runs it, profiled; the timeline into ``result``."""
    import importlib

    from export.onnx import export_checkpoint

    after_imports = rss_bytes()
    segments = Segments()
    for module_name, attribute in WATCHED:
        segments.watch(importlib.import_module(module_name), attribute)
    sampler = Sampler(segments)
    sampler.start()
    try:
        export_checkpoint(ckpt, out, merge=True, dtype=dtype, latency=False, fp16_check=False, log=segments.log)
    finally:
        segments.finish()
        sampler.stop()
    step = max(1, len(sampler.samples) // 3000)
    result.write_text(json.dumps({"rss_after_imports": after_imports, "segments": segments.closed,
                                  "samples": sampler.samples[::step]}) + "\n")
    return 0


def run_profile(folder: Path, setting: Setting) -> tuple[dict[str, Any], ChildRun]:
    result = folder / "profile.json"
    command = python_command("benchmarks.bench_scale", "--profile-child", str(folder / "ckpt"),
                             str(folder / "onnx_profile"), str(result), setting.export_dtype)
    child = run_child(command, cwd=REPO)
    if child.returncode != 0:
        raise RuntimeError(f"profile child failed ({child.returncode}):\n{child.stderr[-3000:]}")
    shutil.rmtree(folder / "onnx_profile", ignore_errors=True)
    return json.loads(result.read_text()), child


# ---- results --------------------------------------------------------------------------------------
def step_rows(shape: str, runs: list[StepRun], fixed: dict[str, int], size: int, params: int,
              setting: Setting) -> list[dict]:
    rows = []
    for run in runs:
        peak = run.peak_rss_bytes
        rows.append({
            "model": shape,
            "method": setting.method,
            "dtype": setting.dtype,
            "export_dtype": setting.export_dtype,
            "step": run.step,
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(run.command)),
            "params": params,
            "model_bytes": size,
            "wall_s": run.child.wall_s,
            "cpu_s": run.child.cpu_s,
            "peak_rss_mib": peak / MIB,
            "ru_maxrss_mib": run.child.peak_rss_bytes / MIB,
            "rss_over_model": peak / size,
            "fixed_rss_mib": fixed[run.step] / MIB,
            "marginal_rss_over_model": (peak - fixed[run.step]) / size,
        })
    return rows


def plan_check(folder: Path) -> dict[str, Any]:
    """The dry-run plan against the real surgery's report: the same counts, or a note saying which differ."""
    plan, real = (json.loads((folder / name).read_text()) for name in ("plan.json", "surgery.json"))
    keys = ("base_params", "trainable_params", "adapter_params", "base_macs_per_token", "adapter_macs_per_token")
    differing = {k: (plan[k], real[k]) for k in keys if plan[k] != real[k]}
    return {"adapted_layers": len(real["modules"]), "plan_layers": len(plan["modules"]),
            **{k: real[k] for k in keys}, "plan_matches_surgery": not differing and
            len(plan["modules"]) == len(real["modules"]), "plan_differences": differing}


COLUMNS = [
    Column("model", "model"),
    Column("step", "step"),
    Column("params", "params", "{:,}"),
    Column("wall_s", "wall s", "{:.1f}"),
    Column("cpu_s", "CPU s", "{:.1f}"),
    Column("peak_rss_mib", "peak RSS MiB", "{:,.0f}"),
    Column("rss_over_model", "peak RSS / model bytes", "{:.2f}"),
    Column("fixed_rss_mib", "fixed cost MiB (2-layer run)", "{:,.0f}"),
    Column("marginal_rss_over_model", "(peak - fixed) / model bytes", "{:.2f}"),
]
PROFILE_COLUMNS = [
    Column("segment", "segment (step > watched call)"),
    Column("start_s", "start s", "{:.1f}"),
    Column("seconds", "s", "{:.1f}"),
    Column("rss_start_mib", "RSS at start MiB", "{:,.0f}"),
    Column("peak_mib", "peak MiB (VmHWM)", "{:,.0f}"),
    Column("peak_over_model", "peak / model bytes", "{:.2f}"),
    Column("growth_over_model", "(peak - start) / model bytes", "{:.2f}"),
    Column("rss_end_mib", "RSS at end MiB", "{:,.0f}"),
    Column("where", "stack at the highest sample (innermost first)"),
]
MIN_SEGMENT_S, MIN_SEGMENT_GROWTH = 0.05, 16 * MIB  # shorter, flatter segments are left out of the table


def profile_rows(profile: dict[str, Any], size: int) -> list[dict[str, Any]]:
    rows = []
    for segment in profile["segments"]:
        seconds, growth = segment["end_s"] - segment["start_s"], segment["peak"] - segment["rss_start"]
        if seconds < MIN_SEGMENT_S and growth < MIN_SEGMENT_GROWTH:
            continue
        rows.append({
            "segment": segment["segment"],
            "start_s": segment["start_s"],
            "seconds": seconds,
            "rss_start_mib": segment["rss_start"] / MIB,
            "peak_mib": segment["peak"] / MIB,
            "peak_over_model": segment["peak"] / size,
            "growth_over_model": growth / size,
            "rss_end_mib": segment["rss_end"] / MIB,
            "sampled_peak_mib": segment["sampled_peak"] / MIB,
            "where": " <- ".join(reversed(segment["stack_at_peak"][-4:])),
            "stack_at_peak": segment["stack_at_peak"],
        })
    return rows


def step_peaks(profile: dict[str, Any]) -> dict[str, int]:
    """Peak RSS per numbered step of export_checkpoint (the maximum over its segments)."""
    peaks: dict[str, int] = {}
    for segment in profile["segments"]:
        step = segment["segment"].split(" > ", 1)[0]
        peaks[step] = max(peaks.get(step, 0), segment["peak"])
    return peaks


def timeline_plot(path: Path, profile: dict[str, Any], size: int, title: str) -> None:
    """RSS over the export's time, each step's start marked and its peak drawn, lines at 1 and RSS_LIMIT model
    sizes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    times = [t for t, _ in profile["samples"]]
    rss = [r / GIB for _, r in profile["samples"]]
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.plot(times, rss, color="tab:blue", linewidth=1, label="RSS (sampled)")
    top = max(rss + [s["peak"] / GIB for s in profile["segments"]] + [RSS_LIMIT * size / GIB]) * 1.3
    for factor, style in ((1.0, ":"), (RSS_LIMIT, "--")):
        ax.axhline(factor * size / GIB, color="black", linestyle=style, linewidth=1)
        ax.text(times[-1] if times else 0, factor * size / GIB, f"{factor:g} x model ", va="bottom", ha="right",
                fontsize=8)
    for segment in profile["segments"]:
        ax.plot([segment["start_s"], segment["end_s"]], [segment["peak"] / GIB] * 2, color="tab:red", linewidth=2)
    steps: dict[str, float] = {}
    for segment in profile["segments"]:
        steps.setdefault(segment["segment"].split(" > ", 1)[0], segment["start_s"])
    for step, start in steps.items():
        ax.axvline(start, color="grey", linewidth=0.5)
        ax.text(start, top, f" {step}", rotation=90, va="top", fontsize=7)
    ax.plot([], [], color="tab:red", linewidth=2, label="segment peak (VmHWM)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, top)
    ax.set_xlabel("seconds since export_checkpoint started")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def notes_of(shape: str, plan: dict[str, Any], files: dict[str, int], export_row: dict[str, Any],
             setting: Setting, checks: str = "") -> list[str]:
    method, targets = METHODS[setting.method]
    notes = [
        f"model: random {shape} ({SHAPES[shape]['num_hidden_layers']} layers, hidden {SHAPES[shape]['hidden_size']},"
        f" intermediate {SHAPES[shape]['intermediate_size']}, vocabulary {SHAPES[shape]['vocab_size']}, untied head),"
        f" {setting.dtype} safetensors shards of <= {SHARD_BYTES / GIB:g} GiB; exported as --dtype "
        f"{setting.export_dtype}: model bytes = {setting.export_itemsize} x parameters (the exported weights)",
        f"surgery: {method['name']} r={method['r']} on {targets} ({plan['adapted_layers']} layers, "
        f"{plan['trainable_params']:,} trainable parameters), adapters then set to random values "
        f"(N(0, {ADAPTER_STD:g}^2) added); the dry-run plan "
        + ("matches the real surgery's report (layers, parameters, MACs)" if plan["plan_matches_surgery"]
           else f"DIFFERS from the real surgery's report: {plan['plan_differences']}"),
        "each step is one fresh child process (`python -m MODULE ARGS` run through a wrapper that writes its VmHWM "
        "at exit); peak RSS is that VmHWM, the child's own. wait4's ru_maxrss (in the JSON) is not: exec folds the "
        "parent's high-water mark into it (see PEAK_WRAPPER). Wall time includes interpreter start and imports; "
        "CPU time is from wait4; the 2-layer Llama's run of the same step gives the fixed cost",
        "export step: " + ("with latency (the base model exported the same streaming way into a temporary folder, "
                           "then the two sessions timed one after the other, never both loaded)" if setting.latency
                           else "--no-latency (export, parity and greedy checks)"),
        checks or "export checks: not recorded",
        "export files: " + ", ".join(f"{name} {size / MIB:,.0f} MiB" for name, size in files.items()),
        f"export: {export_row['wall_s']:.0f} s wall, {export_row['cpu_s']:.0f} s CPU (CPU well below wall x cores "
        "means the child waited: a busy machine, disk)",
    ]
    return notes


def results_name(shape: str, setting: Setting) -> str:
    """scale (TinyLlama-1.1B float32 LoRA, the original run's name) or scale_<shape>_<dtype>_<method>."""
    default = shape == "llama-1.1b" and setting == Setting()
    latency = "_latency" if setting.latency else ""
    return "scale" if default else f"scale_{shape}_{setting.dtype}_{setting.method}{latency}"


def report(shape: str, machine: dict[str, Any], rows: list[dict[str, Any]], plan: dict[str, Any],
           files: dict[str, int], profile: dict[str, Any] | None, out_dir: Path, quick: bool,
           setting: Setting, checks: str = "") -> bool:
    """Write scale*.* (and *_profile.* with a profile); returns whether the export met its target."""
    params, size = model_bytes(shape, setting)
    name = results_name(shape, setting)
    export_row = next(r for r in rows if r["model"] == shape and r["step"] == STEPS[2])
    targets = [Target(f"{shape}: export peak RSS / exported weights' bytes", export_row["rss_over_model"],
                      RSS_LIMIT)]
    method, method_targets = METHODS[setting.method]
    settings = {"model": shape, "params": params, "model_bytes": size, "method": method, "targets": method_targets,
                "dtype": setting.dtype, "export_dtype": setting.export_dtype, "latency": setting.latency, "reference": REFERENCE,
                "quick": quick}
    write_results(name, f"Surgery, fold and export at scale ({shape}, {setting.dtype}, {setting.method}): wall time "
                  f"and peak RSS", machine, settings, rows, COLUMNS, targets,
                  notes_of(shape, plan, files, export_row, setting, checks), results_dir=out_dir)
    print((out_dir / f"{name}.md").read_text(), flush=True)
    measured = [r for r in rows if r["model"] == shape]
    bar_plot(out_dir / f"{name}.png", f"{shape} ({params / 1e9:.2f}B params, {setting.dtype}, --dtype "
             f"{setting.export_dtype}), {machine['device_name']}",
             [r["step"] for r in measured], {"peak RSS / exported bytes": [r["rss_over_model"] for r in measured],
                                             "(peak - fixed) / exported bytes":
                                                 [r["marginal_rss_over_model"] for r in measured]},
             reference=RSS_LIMIT)
    if profile is not None:
        stage_rows = profile_rows(profile, size)
        peaks = step_peaks(profile)
        notes = [*PROFILE_NOTES, "peak RSS per step: " + ", ".join(
            f"{step} {peak / MIB:,.0f} MiB ({peak / size:.2f} x model)" for step, peak in peaks.items())]
        write_results(f"{name}_profile", f"Where the export's memory goes ({shape}, {setting.dtype})", machine,
                      {**settings, "sample_interval_s": SAMPLE_INTERVAL_S,
                       "rss_after_imports_mib": round(profile["rss_after_imports"] / MIB)},
                      stage_rows, PROFILE_COLUMNS, notes=notes, results_dir=out_dir)
        print((out_dir / f"{name}_profile.md").read_text(), flush=True)
        timeline_plot(out_dir / f"{name}_profile.png", profile, size,
                      f"export_checkpoint RSS, {shape} ({size / GIB:.1f} GiB of {setting.export_dtype} weights)")
    return targets[0].met


PROFILE_NOTES = [
    "a separate child runs export.onnx.export_checkpoint (merge, no latency, no fp16 check: what the CLI step "
    "runs); each numbered step of its log starts a segment, and so does each call of a watched function "
    "(" + ", ".join(f"{m}.{a}" for m, a in WATCHED) + "; wrapped in the child only, nothing is edited)",
    "peak: VmHWM, read and reset (/proc/self/clear_refs) at every segment boundary, so it is exact even where the "
    "sampler missed the moment; the stack is the main thread's at the segment's highest RSS *sample* (every "
    f"{SAMPLE_INTERVAL_S * 1000:.0f} ms, when the GIL lets the sampler run); segments under "
    f"{MIN_SEGMENT_S:g} s that grew less than {MIN_SEGMENT_GROWTH / MIB:.0f} MiB are left out of the table",
]


# ---- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="recorded only: the pipeline commands run on the CPU")
    parser.add_argument("--quick", action="store_true", help="a ~106M-parameter Llama, results in tmp/")
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != REFERENCE],
                        help="default llama-1.1b (quick: llama-106m)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="profile the export's memory (default: when the export misses its target, and on "
                             "--quick)")
    parser.add_argument("--work-dir", type=Path, help="where the scratch folder goes (default: the system's temp)")
    parser.add_argument("--force", action="store_true", help="start even with less RAM available than "
                        f"{MEMORY_FACTOR:g} exported-weight sizes")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results (quick: benchmarks/results/tmp)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPE), default="float32",
                        help="dtype of the random weights on disk (float16 exports --dtype fp16, the others fp32)")
    parser.add_argument("--latency", action="store_true", help="the export step measures latency too (same bound)")
    parser.add_argument("--method", choices=sorted(METHODS), default="lora",
                        help="lora: r=8 on all-linear; proda: r=8 on q_proj, v_proj")
    parser.add_argument("--optimum", type=Path, nargs="?", const=COMPAT_PYTHON,
                        help="also measure optimum-onnx's export of the base model, run by this Python (default "
                             f"{COMPAT_PYTHON.relative_to(REPO)}, built by make test-compat); float32 only")
    parser.add_argument("--profile-child", nargs=4, metavar=("CKPT", "OUT", "RESULT", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = args.shape or ("llama-106m" if args.quick else "llama-1.1b")
    args.out_dir = args.out_dir or (RESULTS / "tmp" if args.quick else RESULTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_child:
        ckpt, out, result, dtype = args.profile_child
        return profile_child(Path(ckpt), Path(out), Path(result), dtype)
    setting = Setting(args.dtype, args.method, args.latency)
    params, size = model_bytes(args.shape, setting)
    print(f"bench_scale: {args.shape}, {params:,} parameters in {setting.dtype}, {setting.method}; exported weights "
          f"{size / GIB:.2f} GiB ({setting.export_dtype})", flush=True)
    machine = machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=args.work_dir) as scratch:
        folder = Path(scratch)
        check_resources(args.shape, folder, args.force, setting)
        reference_runs = run_steps(REFERENCE, folder / REFERENCE, setting)
        fixed = {run.step: run.peak_rss_bytes for run in reference_runs}
        runs = run_steps(args.shape, folder / args.shape, setting)
        if args.optimum and setting.export_dtype == "fp32":  # optimum exports fp16 on CUDA only
            reference_runs.append(optimum_export(args.optimum, folder / REFERENCE))
            fixed[OPTIMUM_STEP] = reference_runs[-1].peak_rss_bytes
            runs.append(optimum_export(args.optimum, folder / args.shape))
        rows = step_rows(args.shape, runs, fixed, size, params, setting)
        ref_params, ref_size = model_bytes(REFERENCE, setting)
        rows += step_rows(REFERENCE, reference_runs, fixed, ref_size, ref_params, setting)
        plan = plan_check(folder / args.shape)
        files = export_files(folder / args.shape)
        checks = export_checks(folder / args.shape)
        shutil.rmtree(folder / args.shape / "onnx")  # room on disk for the profile's export
        missed = rows[2]["rss_over_model"] > RSS_LIMIT
        profile = None
        if args.profile or (args.profile is None and (missed or args.quick)):
            print(f"  {args.shape}: profiling the export's memory (a fourth child)", flush=True)
            profile, _ = run_profile(folder / args.shape, setting)
    met = report(args.shape, machine, rows, plan, files, profile, args.out_dir, args.quick, setting, checks)
    print(f"export peak RSS / exported weights' bytes: {rows[2]['rss_over_model']:.2f} (target <= {RSS_LIMIT:g}): "
          f"{'met' if met else 'MISSED'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
