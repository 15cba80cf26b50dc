"""Training cost on a GPU: step time and peak CUDA memory of LoRA (ours and PEFT's), s-cLA, ProDA and LoDA on a ~1B
random Llama in bfloat16, and a CUDA fold-fidelity check (fold in float32 on the device, round once to bfloat16).

    python -m benchmarks.gpu_train                          # TinyLlama-1.1B's shape, bf16, on CUDA (a few minutes)
    python -m benchmarks.gpu_train --targets all-linear     # every Linear of the blocks (the paper's Table 14)
    python -m benchmarks.gpu_train --device cpu --tiny      # the CI smoke run: 2 layers of hidden 64, results in tmp/
    python -m benchmarks.gpu_train --methods lora,cla --steps 50 --batch 16 --seq 256

Why a GPU: the cLA paper's cost claims (beyond-lora-cla.txt, appendix E.3, Table 15: s-cLA 8-10% faster and 5-15%
less peak GPU memory than LoRA, rank 16 on the query and value projections, one H100) are GPU claims. On the project's
2-core CPU the frozen model is ~98% of a step, so no adapter's own cost can show there (benchmarks/bench_train.py).

The model: a random-initialised Llama of TinyLlama-1.1B's published shape (``bench_scale.SHAPES["llama-1.1b"]``:
hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocabulary 32000; 1.1B parameters), built once on
the CPU in bfloat16 with seed 0, so every method starts from the same weights. ``--tiny``: bench_scale's 2-layer
``tiny-llama`` (hidden 64). Every method runs at rank 16 (the paper's cost tables), alpha 2r, dropout 0, on the query
and value projections by default (Table 15's set-up, which the 8-10% / 5-15% claim is about; ``--targets all-linear``
is Table 14's). cLA reads the first r input columns and gathers them (the paper's s-cLA); ProDA's controller has
d_b = 8. ``peft_lora`` is PEFT's LoRA at the same rank, alpha, dropout and targets.

One step is the trainer's (train.trainer.optimizer_step, without accelerate): bf16 autocast over the forward
(``mixed_precision: bf16``, what the paper configs for Llama use), the causal-LM loss of train.loss summed over tokens
and divided by their count, backward, gradient clipping at norm 1, AdamW over the declared adapter parameters
(train.optim.build_optimizer; adapter tensors live in float32 next to the bf16 base), the linear schedule, zero_grad,
and the loss read back to check that it is finite (a host sync, as the trainer's). Tokens are random, labels = inputs.

Three passes:

1. memory: one candidate at a time on the device (its own copy of the base, everything of the previous candidate
   freed and the cache emptied first): ``torch.cuda.reset_peak_memory_stats``, then warm-up + 3 steps, then
   ``torch.cuda.max_memory_allocated`` (the paper's "peak allocated GPU memory"; weights included) and the growth
   above the built model. On the CPU there is no CUDA allocator: the CUDA columns stay empty and the process's peak
   RSS (VmHWM, reset per candidate) is reported instead, clearly labelled: a smoke figure, not comparable;
2. time: every candidate on its own copy of the base, resident together, steps timed round-robin
   (benchmarks.common.interleaved, ``torch.cuda.synchronize`` after each step); medians, and ratios taken within
   each round;
3. fold fidelity (ours only): every adapter of the timed models gets random non-zero values (``randomize_``: a fold
   of zeros proves nothing), then each layer is copied to float32 on the device (exact: an upcast), folded there
   (the method's own ``fold()``) and rounded once to bfloat16, as export.fold does (re-done here: export/fold.py
   imports onnx through export/weights.py). On 64 tokens x ~ N(0, 1), computed in float32: the max |folded - unfolded|,
   whether every element is within ``surgery.tolerances.LAYER[bfloat16]``; beside it, the max error of PEFT's merge
   (``W0 + delta.to(bf16)`` added in bf16: two roundings; fully merged methods only), and the yardstick "rounding
   the base weight alone": the output error of rounding a float32 weight like W0 (W0 jittered off the bf16 grid by
   up to one bf16 spacing) once to bfloat16, i.e. what storing the base in bfloat16 costs by itself.

On the GPU machine (an image with torch+CUDA, transformers 5.x, safetensors, accelerate, PyYAML, psutil and PEFT,
but possibly no pydantic): this module imports only torch, transformers, accelerate, psutil, PyYAML, pydantic, the
project's surgery/ and train/ packages, benchmarks/ (bench_scale's shapes, which reads export.report's file name:
json only) and PEFT when present; never onnx, onnxruntime or export's folding and exporting modules. Where pydantic
is missing, carry its wheels (pydantic, pydantic-core (a small compiled wheel: match the machine's Python, e.g. cp312
manylinux x86_64), annotated-types, typing-inspection, and typing-extensions where the image's is older than
pydantic asks for; about 3 MB together) and put them on PYTHONPATH. Where PEFT is missing, the ``peft_lora`` row
is skipped with a note; PEFT is a pure-Python wheel that can be carried the same way. Then, from the repository
root: ``python -m benchmarks.gpu_train`` (writes benchmarks/results/gpu_train.{json,md}; about 2-4 minutes, most of
it the CPU-side model copies and surgery's digest of each copy's base weights).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.bench_scale import SHAPES
from benchmarks.common import (
    MIB,
    RESULTS,
    Column,
    Target,
    Timings,
    interleaved,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    synchronizer,
    write_results,
)
from surgery.config import parse_config
from surgery.methods.base import AdapterLayer
from surgery.rewrite import adapter_layers, apply_surgery
from surgery.tolerances import layer_tolerance
from train.config import DataConfig, TrainConfig
from train.loss import example_losses, target_count
from train.optim import build_optimizer, build_scheduler

NAME = "gpu_train"
PEFT_LORA = "peft_lora"
CANDIDATES = (PEFT_LORA, "lora", "cla", "proda", "loda")
IMPL = {PEFT_LORA: "peft"}  # everything else: "ours"
LABELS = {PEFT_LORA: "LoRA (PEFT)", "lora": "LoRA (ours)", "cla": "s-cLA", "proda": "ProDA", "loda": "LoDA"}
RANK = 16  # beyond-lora-cla.txt, E.3: the cost tables run every method at r = 16
TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}  # Table 15 (the claim), Table 14
SHAPE, TINY_SHAPE = "llama-1.1b", "tiny-llama"
DTYPE = torch.bfloat16
LR = 2e-4  # the trainer's default; random tokens, so any rate that stays finite does
MAX_GRAD_NORM = 1.0  # the trainer's default clipping
WARMUP_STEPS = 2  # untimed steps per candidate before timing (AdamW's state is allocated by the first)
MEMORY_STEPS = 3  # steps measured in the memory pass, after the warm-up
FOLD_TOKENS = 64  # random input rows per layer in the fold check (export.fold's CHECK_TOKENS)
JITTER = 2.0**-8  # relative jitter that takes W0 off the bf16 grid: half to one bf16 spacing (2^-8 to 2^-7 relative)
# The paper's claims at r = 16 (beyond-lora-cla.txt, E.3), per target set: (step ratio, peak ratio, what it says).
CLAIMS = {"qv": (0.92, 0.95, "Table 15: 8-10% faster, 5-15% less peak memory"),
          "all-linear": (0.90, 0.85, "Table 14: 10-15% faster, 15-40% less peak memory")}


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    device: str
    shape: str
    targets: str  # a key of TARGETS
    rank: int
    batch: int
    seq: int
    steps: int  # timed rounds
    autocast: bool  # bf16 autocast over the forward (the trainer's mixed_precision: bf16)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# ---- the model -------------------------------------------------------------------------------------
def base_model(shape: str) -> nn.Module:
    """A random Llama of ``shape`` in bfloat16 on the CPU, seed 0, SDPA attention, in training mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape])
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPE, attn_implementation="sdpa")
    return model.train()


def method_section(method: str, rank: int) -> dict[str, Any]:
    """The ``method:`` section: rank ``rank``, alpha 2r, dropout 0; s-cLA on the first r columns; ProDA d_b 8."""
    section: dict[str, Any] = {"name": method, "r": rank, "alpha": 2 * rank, "dropout": 0.0}
    if method == "cla":
        section["columns"] = "first"
    if method == "proda":
        section["d_b"] = 8
    return section


def train_config(settings: Settings) -> TrainConfig:
    """The ``train:`` section the step follows (no data is read: the batch is random tokens)."""
    return TrainConfig(data=DataConfig(train=Path("random-tokens")), max_steps=10_000, lr=LR,
                       max_grad_norm=MAX_GRAD_NORM, mixed_precision="bf16" if settings.autocast else "no")


@dataclass
class Candidate:
    """One method on its own copy of the base, on the device, with its optimizer and schedule."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[nn.Parameter]

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def trained_dtypes(self) -> list[str]:
        """The dtypes the trained tensors live in (float32 for ours and PEFT's next to a bf16 base)."""
        return sorted({str(p.dtype).removeprefix("torch.") for p in self.params})


def build_candidate(name: str, template: nn.Module, settings: Settings) -> Candidate:
    """``name`` on a copy of ``template``: surgery (or PEFT) on the CPU, then the model moved to the device."""
    config = train_config(settings)
    model = copy.deepcopy(template)
    torch.manual_seed(0)
    if name == PEFT_LORA:
        from peft import LoraConfig, get_peft_model

        peft = LoraConfig(task_type="CAUSAL_LM", r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
                          target_modules=TARGETS[settings.targets])
        model = get_peft_model(model, peft).to(settings.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        surgery = parse_config({"model": {"name_or_path": f"random {settings.shape}", "task": "causal-lm",
                                          "dtype": "bfloat16"},
                                "targets": TARGETS[settings.targets], "method": method_section(name, settings.rank)},
                               source=f"gpu_train {name}")
        adapted = apply_surgery(model, surgery)
        model = adapted.model.to(settings.device)  # in place: the parameters the optimizer holds move with it
        params = list(adapted.trainable_parameters().values())
        optimizer = build_optimizer(adapted, config)
    scheduler = build_scheduler(optimizer, config, config.max_steps)
    return Candidate(name, model.train(), optimizer, scheduler, params)


def random_batch(vocab: int, settings: Settings) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (settings.batch, settings.seq), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    return {name: tensor.to(settings.device) for name, tensor in batch.items()}


def trainer_step(candidate: Candidate, batch: dict[str, torch.Tensor], settings: Settings) -> Callable[[], None]:
    """A closure running one of the trainer's optimizer steps (one micro-batch, one process)."""
    device_type = torch.device(settings.device).type
    count = target_count(batch, "causal-lm").clamp(min=1)

    def step() -> None:
        with torch.autocast(device_type, dtype=DTYPE, enabled=settings.autocast):
            loss_sum = example_losses(candidate.model, batch, "causal-lm").loss.sum()
        (loss_sum / count).backward()
        loss = (loss_sum.detach() / count).item()  # the trainer reads each step's loss back: a host sync
        if not math.isfinite(loss):
            raise FloatingPointError(f"{candidate.name}: the training loss became {loss}; lower the learning rate")
        nn.utils.clip_grad_norm_(candidate.params, MAX_GRAD_NORM)
        candidate.optimizer.step()
        candidate.scheduler.step()
        candidate.optimizer.zero_grad(set_to_none=True)

    return step


def vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def free_device(settings: Settings) -> None:
    """Give the previous candidate's device memory back (on the CPU nothing: a collection there costs seconds of
    transformers' objects and the RSS figure is a smoke figure anyway)."""
    if settings.cuda:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- pass 1: memory, one candidate at a time ------------------------------------------------------
def measure_memory(name: str, template: nn.Module, settings: Settings) -> dict[str, Any]:
    """Peak memory of warm-up + MEMORY_STEPS steps of ``name`` alone on the device (CUDA), or peak RSS (CPU)."""
    free_device(settings)
    if settings.cuda:
        torch.cuda.reset_peak_memory_stats(settings.device)
    elif not reset_peak_rss():
        raise SystemExit("gpu_train --device cpu: cannot reset the peak RSS (/proc/self/clear_refs); run on Linux")
    candidate = build_candidate(name, template, settings)
    step = trainer_step(candidate, random_batch(vocab_size(template), settings), settings)
    built = torch.cuda.memory_allocated(settings.device) if settings.cuda else None
    for _ in range(WARMUP_STEPS + MEMORY_STEPS):
        step()
    synchronizer(settings.device)()
    row: dict[str, Any] = {"peak_cuda_mib": None, "train_cuda_mib": None, "cpu_peak_rss_mib": None}
    if settings.cuda:
        peak = torch.cuda.max_memory_allocated(settings.device)
        row.update(peak_cuda_mib=peak / MIB, train_cuda_mib=(peak - built) / MIB)
    else:
        row["cpu_peak_rss_mib"] = peak_rss_bytes() / MIB
    del candidate, step
    free_device(settings)
    return row


# ---- pass 2: time, every candidate resident, round-robin -------------------------------------------
def time_steps(names: list[str], template: nn.Module, settings: Settings) -> tuple[Timings, dict[str, Candidate]]:
    candidates = {name: build_candidate(name, template, settings) for name in names}
    batch = random_batch(vocab_size(template), settings)
    steps = {name: trainer_step(candidate, batch, settings) for name, candidate in candidates.items()}
    timings = interleaved(steps, settings.steps, WARMUP_STEPS, sync=synchronizer(settings.device))
    return timings, candidates


# ---- pass 3: fold fidelity -------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFidelity:
    """One layer's fold against its unfolded self, both computed in float32 on the device."""

    fold_error: float  # max |bf16 fold (x) - unfolded (x)|
    within: bool  # every element within LAYER[bfloat16]
    peft_merge_error: float | None  # W0 + delta.to(bf16) in bf16 (two roundings); None where a residual stays
    base_rounding_error: float  # one bf16 rounding of a float32 weight like W0


def float32_copy(module: nn.Module) -> nn.Module:
    """``module`` with every floating tensor upcast to float32 (exact from bfloat16), in eval mode."""
    return copy.deepcopy(module).float().eval()


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max())


@torch.no_grad()
def layer_fidelity(layer: AdapterLayer, generator: torch.Generator) -> LayerFidelity:
    """Fold ``layer`` in float32 on its device, round once to bfloat16, and compare with the unfolded layer."""
    tol = layer_tolerance(DTYPE)
    exact = float32_copy(layer)
    fold = exact.fold()
    rounded = fold.module.to(DTYPE)  # the one rounding
    x = torch.randn(FOLD_TOKENS, layer.d_in, generator=generator).to(layer.device)
    expected = exact(x)
    actual = float32_copy(rounded)(x)
    diff = (actual.double() - expected.double()).abs()
    within = bool((diff <= tol.atol + tol.rtol * expected.double().abs()).all())
    bias = exact.base_bias
    peft_error = None
    update = exact.static_update(torch.float32)
    if update is not None and fold.residual is None:
        peft_weight = layer.merge_base.detach() + update.to(DTYPE)  # added in bf16: PEFT's merge
        peft_error = max_error(F.linear(x, peft_weight.float(), bias), expected)
    w0 = exact.merge_base
    jitter = torch.rand(w0.shape, generator=generator).to(w0.device) * 2 - 1
    off_grid = w0 * (1 + JITTER * jitter)  # float32, off the bf16 grid
    base_error = max_error(F.linear(x, off_grid.to(DTYPE).float()), F.linear(x, off_grid))
    return LayerFidelity(float(diff.max()), within, peft_error, base_error)


def fold_fidelity(candidate: Candidate) -> dict[str, Any]:
    """The worst layer of ``candidate`` (ours only) after giving every adapter random non-zero values."""
    layers = adapter_layers(candidate.model)
    if not layers:
        return {}
    generator = torch.Generator().manual_seed(0)
    results = {}
    for name, layer in layers.items():
        layer.randomize_(generator)
        results[name] = layer_fidelity(layer, generator)
    worst = max(results, key=lambda name: results[name].fold_error)
    peft = [r.peft_merge_error for r in results.values() if r.peft_merge_error is not None]
    fold_max = results[worst].fold_error
    base_max = max(r.base_rounding_error for r in results.values())
    return {"fold_layers": len(results), "fold_max_abs": fold_max, "fold_worst_layer": worst,
            "fold_within_tolerance": all(r.within for r in results.values()),
            "peft_merge_max_abs": max(peft) if peft else None, "base_rounding_max_abs": base_max,
            "fold_vs_base_rounding": fold_max / base_max if base_max > 0 else None}


# ---- results ---------------------------------------------------------------------------------------
def baseline_of(names: list[str]) -> str:
    """What the ratios divide by: PEFT's LoRA (the paper's LoRA) when it ran, else ours."""
    return PEFT_LORA if PEFT_LORA in names else "lora"


def ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def result_rows(timings: Timings, candidates: dict[str, Candidate], memory: dict[str, dict[str, Any]],
                fidelity: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    names = list(timings.samples_ms)
    rows = []
    for name in names:
        row = {"method": name, "label": LABELS[name], "impl": IMPL.get(name, "ours"),
               "trainable_params": candidates[name].trainable, "trained_dtypes": candidates[name].trained_dtypes,
               "ms_per_step": timings.median(name),
               "spread": timings.spread(name),
               "time_vs_peft_lora": timings.ratio(name, PEFT_LORA) if PEFT_LORA in names else None,
               "time_vs_lora": timings.ratio(name, "lora") if "lora" in names else None, **memory[name]}
        for reference in (PEFT_LORA, "lora"):
            peak = memory.get(reference, {}).get("peak_cuda_mib")
            row[f"peak_vs_{reference}"] = ratio(row["peak_cuda_mib"], peak)
        row.update({"fold_layers": None, "fold_max_abs": None, "fold_worst_layer": None,
                    "fold_within_tolerance": None, "peft_merge_max_abs": None, "base_rounding_max_abs": None,
                    "fold_vs_base_rounding": None, **fidelity.get(name, {})})
        rows.append(row)
    return rows


def claim_targets(rows: list[dict[str, Any]], settings: Settings) -> list[Target]:
    """The paper's claim, on CUDA only (a CPU run cannot show it): s-cLA's step and peak over LoRA's."""
    by_name = {row["method"]: row for row in rows}
    if not settings.cuda or "cla" not in by_name:
        return []
    reference = baseline_of(list(by_name))
    cla, label = by_name["cla"], LABELS[reference]
    time_limit, memory_limit, claim = CLAIMS[settings.targets]
    out = [Target(f"s-cLA step / {label} step (paper, {claim})", cla[f"time_vs_{reference}"], time_limit)]
    if cla[f"peak_vs_{reference}"] is not None:
        out.append(Target(f"s-cLA peak / {label} peak (paper, {claim})", cla[f"peak_vs_{reference}"], memory_limit))
    return out


COLUMNS = [
    Column("label", "method"),
    Column("impl", "impl"),
    Column("trainable_params", "trainable params", "{:,}"),
    Column("ms_per_step", "ms/step (median)", "{:.2f}"),
    Column("spread", "IQR/median", "{:.2f}"),
    Column("time_vs_peft_lora", "time / PEFT LoRA", "{:.3f}"),
    Column("time_vs_lora", "time / our LoRA", "{:.3f}"),
    Column("peak_cuda_mib", "peak CUDA MiB", "{:.0f}"),
    Column("train_cuda_mib", "CUDA MiB above the built model", "{:.0f}"),
    Column("peak_vs_peft_lora", "peak / PEFT LoRA", "{:.3f}"),
    Column("peak_vs_lora", "peak / our LoRA", "{:.3f}"),
    Column("cpu_peak_rss_mib", "CPU smoke: process peak RSS MiB", "{:.0f}"),
    Column("fold_max_abs", "fold: max abs error (bf16, 1 rounding)", "{:.2e}"),
    Column("peft_merge_max_abs", "PEFT-style merge: max abs error (2 roundings)", "{:.2e}"),
    Column("base_rounding_max_abs", "base weight rounded alone: max abs error", "{:.2e}"),
    Column("fold_within_tolerance", "fold within LAYER[bf16]"),
]


def notes_for(settings: Settings, skipped: list[str]) -> list[str]:
    tol = layer_tolerance(DTYPE)
    notes = [
        f"every method at r={settings.rank}, alpha 2r, dropout 0, on {settings.targets} "
        f"({'Table 15 of the cLA paper: query and value' if settings.targets == 'qv' else 'Table 14: every Linear'});"
        f" s-cLA reads the first r columns by a gather; ProDA d_b 8",
        "one step = the trainer's: bf16 autocast forward, token-mean causal-LM loss, backward, clip at 1, AdamW "
        "(float32 adapters), linear schedule, loss read back",
        f"time ratios: medians over {settings.steps} rounds of the within-round ratio, after {WARMUP_STEPS} warm-up "
        "steps each; IQR/median is each method's noise",
        "peak CUDA memory: torch.cuda.max_memory_allocated over warm-up + "
        f"{MEMORY_STEPS} steps, each method alone on the device (weights included: the paper's 'peak allocated')",
        f"fold: every adapter randomised, each layer folded in float32 on {settings.device} and rounded once to "
        f"bfloat16; errors on {FOLD_TOKENS} tokens x ~ N(0, 1) in float32 against the unfolded layer; tolerance "
        f"LAYER[bfloat16] = atol {tol.atol:g} + rtol {tol.rtol:g} |y|. 'base weight rounded alone': the error of "
        "one bf16 rounding of a float32 weight like W0 (W0 jittered off the bf16 grid), the yardstick",
    ]
    if not settings.cuda:
        notes.append("CPU run: no CUDA allocator, so the CUDA columns are empty; the process's peak RSS (VmHWM, "
                     "reset per method) is a smoke figure, not a measurement of the methods")
    notes += [f"{name}: skipped ({why})" for name, why in skipped]
    return notes


# ---- the run -------------------------------------------------------------------------------------
def available(names: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The candidates that can run here, and (name, why) for those that cannot (PEFT not installed)."""
    if PEFT_LORA not in names:
        return names, []
    try:
        import peft  # noqa: F401
    except ImportError:
        why = "PEFT is not installed; it is a pure-Python wheel: carry it along and put it on PYTHONPATH"
        return [n for n in names if n != PEFT_LORA], [(PEFT_LORA, why)]
    return names, []


def run(settings: Settings, names: list[str], out_dir: Path) -> list[dict[str, Any]]:
    names, skipped = available(names)
    for name, why in skipped:
        print(f"gpu_train: {name} skipped: {why}", flush=True)
    start = time.perf_counter()
    machine = machine_info(settings.device)
    template = base_model(settings.shape)
    print(f"gpu_train {settings.shape} ({sum(p.numel() for p in template.parameters()):,} parameters, bf16) on "
          f"{machine['device_name']}: {', '.join(names)}; batch {settings.batch} x {settings.seq}", flush=True)
    memory = {}
    for name in names:
        memory[name] = measure_memory(name, template, settings)
        print(f"  memory {name}: {memory[name]}", flush=True)
    timings, candidates = time_steps(names, template, settings)
    del template
    fidelity = {name: fold_fidelity(candidate) for name, candidate in candidates.items()}
    rows = result_rows(timings, candidates, memory, fidelity)
    del candidates
    free_device(settings)
    fields = {"device": settings.device, "shape": settings.shape, "dtype": "bfloat16", "targets": settings.targets,
              "rank": settings.rank, "batch": settings.batch, "seq": settings.seq, "rounds": settings.steps,
              "warmup": WARMUP_STEPS, "memory_steps": MEMORY_STEPS, "autocast": "bf16" if settings.autocast else "no",
              "baseline": baseline_of(names), "wall_time_s": round(time.perf_counter() - start, 1)}
    write_results(NAME, f"Training cost on a GPU: {settings.shape} in bfloat16, rank {settings.rank} on "
                  f"{settings.targets}", machine, fields, rows, COLUMNS, claim_targets(rows, settings),
                  notes_for(settings, skipped), results_dir=out_dir)
    print((out_dir / f"{NAME}.md").read_text(), flush=True)
    return rows


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the CI smoke run)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"bench_scale's {TINY_SHAPE} (2 layers, hidden 64), batch 2 x 16, 3 rounds, results "
                             "in benchmarks/results/tmp/")
    parser.add_argument("--steps", type=int, help="timed rounds per method (default 20, tiny 3)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8, tiny 2)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 512, tiny 16)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(CANDIDATES),
                        help=f"comma-separated subset of {','.join(CANDIDATES)}")
    parser.add_argument("--targets", choices=list(TARGETS), default="qv",
                        help="qv: q_proj, v_proj (the paper's Table 15, default); all-linear (Table 14)")
    parser.add_argument("--rank", type=int, default=RANK, help=f"every method's r (default {RANK}, the paper's)")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false",
                        help="no bf16 autocast: the float32 adapters compute in float32")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results (tiny: benchmarks/results/tmp)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(CANDIDATES))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(CANDIDATES)}")
    for key in ("steps", "batch", "seq", "rank"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be at least 1 (got {value})")
    if args.seq is not None and args.seq < 2:
        parser.error(f"--seq must be at least 2: the causal-LM loss predicts token t + 1 (got {args.seq})")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(device=args.device, shape=TINY_SHAPE if args.tiny else SHAPE, targets=args.targets,
                    rank=args.rank, batch=args.batch or (2 if args.tiny else 8),
                    seq=args.seq or (16 if args.tiny else 512), steps=args.steps or (3 if args.tiny else 20),
                    autocast=args.autocast)


def check_cuda(device: str) -> None:
    """No CUDA device and no ``--device cpu``: say so, and what to run instead."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gpu_train --device {device}: this torch ({torch.__version__}) sees no CUDA device. The "
                         "benchmark's figures are GPU figures; run it on a machine with a GPU, or use "
                         "--device cpu --tiny for the smoke run")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_cuda(args.device)  # before anything is built or written
    if not args.device.startswith("cuda") and not args.tiny:
        print(f"gpu_train: --device {args.device} without --tiny runs the 1.1B model on the CPU: minutes a step",
              flush=True)
    settings = settings_of(args)
    if settings.cuda and torch.device(settings.device).index is not None:
        torch.cuda.set_device(torch.device(settings.device))  # cuda:N: synchronize() and the memory stats follow it
    out_dir = args.out_dir or (RESULTS / "tmp" if args.tiny else RESULTS)
    run(settings, list(dict.fromkeys(args.methods)), out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
