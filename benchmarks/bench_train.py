"""Training step time and memory of every method against PEFT's LoRA, and s-cLA's gather against a 0/1 GEMM.

    python -m benchmarks.bench_train                      # MiniLM seq-cls, batch 16 x 128, on the CPU
    python -m benchmarks.bench_train --device cuda        # MiniLM and a random GPT-2 small, on the GPU
    python -m benchmarks.bench_train --model gpt2-small   # GPT-2 small causal-lm, batch 8 x 128
    python -m benchmarks.bench_train --quick              # smoke run: small batch, 2 rounds, results/tmp/
    python -m benchmarks.bench_train --threads 1 --clock cpu   # steadier on a busy machine
    python -m benchmarks.bench_train --profile lora,peft_lora,cla   # torch.profiler's top operators

One step is forward + backward + AdamW over the trainable parameters. Two scales, two result files:
``train_MODEL`` times the whole model (each candidate holds its own copy), ``train_layer_MODEL`` one target layer
alone on the same tokens (backward to the input, as inside a model), where an adapter's own cost is not diluted by
the frozen model. All candidates of a scale run round-robin: medians, and ratios taken within each round. Memory
comes from a separate pass, one fresh process per candidate: on the CPU the RSS growth from the built model to
the peak of two steps (glibc's mmap threshold pinned so freed tensors leave the RSS), on CUDA
``max_memory_allocated`` above the built model. Every method runs at rank 8 (cLA too, though its default is 16,
so that both adapters see the same r) with dropout 0 (PEFT's LoRA as well).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.candidates import (
    BASELINE,
    CANDIDATES,
    FLOOR,
    GEMM_CLA,
    IMPL,
    RANK,
    SPECS,
    ModelSpec,
    adapt_layer,
    adapt_model,
    base_model,
    layer_inputs,
    layer_step,
    make_batch,
    model_step,
    vocab_size,
)
from benchmarks.common import (
    MIB,
    RESULTS,
    Column,
    Target,
    Timings,
    bar_plot,
    check_device,
    interleaved,
    machine_info,
    peak_rss_bytes,
    python_command,
    reset_peak_rss,
    rss_bytes,
    run_child,
    synchronizer,
    write_results,
)

QUICK_MEMORY = (BASELINE, "lora", "cla")  # --quick measures memory for these only
REPO = Path(__file__).resolve().parent.parent


# ---- memory: one fresh process per candidate -----------------------------------------------------
def measure_memory(candidate: str, spec: ModelSpec, device: str, batch: int, seq: int, steps: int = 2) -> dict:
    """Run in a fresh process: memory of ``steps`` training steps above the built model, and the peak."""
    model, params = adapt_model(candidate, base_model(spec, device), spec)
    step = model_step(model, params, make_batch(spec, vocab_size(model), device, batch, seq))
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
        if not reset_peak_rss():
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux >= 4.0")
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()
    return {"train_memory_bytes": peak - before, "peak_bytes": peak}


def memory_pass(candidates: list[str], spec: ModelSpec, args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Each candidate in its own child process (``--memory-child``), one after the other."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big tensors mmapped: freed memory leaves the RSS
    results = {}
    for candidate in candidates:
        command = python_command("benchmarks.bench_train", "--memory-child", candidate, "--model", spec.name,
                                 "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
                                 "--threads", str(torch.get_num_threads()))
        child = run_child(command, cwd=REPO, env=env)
        if child.returncode != 0:
            raise RuntimeError(f"memory pass for {candidate} failed ({child.returncode}):\n{child.stderr[-3000:]}")
        results[candidate] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  memory {candidate}: {results[candidate]['train_memory_bytes'] / MIB:.1f} MiB", flush=True)
    return results


# ---- timing: all candidates round-robin ----------------------------------------------------------
def model_pass(candidates: list[str], spec: ModelSpec, args: argparse.Namespace) -> tuple[Timings, dict[str, int]]:
    """Build every candidate on its own copy of the model, then time their steps round-robin."""
    template = base_model(spec, args.device)
    batch = make_batch(spec, vocab_size(template), args.device, args.batch, args.seq)
    steps, trainable = {}, {}
    for candidate in candidates:
        model, params = adapt_model(candidate, copy.deepcopy(template), spec)
        steps[candidate] = model_step(model, params, batch)
        trainable[candidate] = sum(p.numel() for p in params)
    del template
    timings = interleaved(steps, args.rounds, args.warmup, sync=synchronizer(args.device), clock=args.clock)
    return timings, trainable


def layer_pass(candidates: list[str], spec: ModelSpec, args: argparse.Namespace) -> tuple[Timings, dict[str, int]]:
    """One target layer per candidate on batch x seq tokens, timed round-robin."""
    steps, trainable = {}, {}
    for candidate in candidates:
        layer, params = adapt_layer(candidate, spec, args.device)
        steps[candidate] = layer_step(layer, params, *layer_inputs(spec, args.device, args.batch, args.seq))
        trainable[candidate] = sum(p.numel() for p in params)
    timings = interleaved(steps, args.layer_rounds, args.warmup + 2, sync=synchronizer(args.device),
                          clock=args.clock)
    return timings, trainable


# ---- results -------------------------------------------------------------------------------------
def adapter_cost_vs_lora(timings: Timings, candidate: str) -> float | None:
    """(candidate - floor) / (lora - floor) from per-round differences: the adapter's own cost against LoRA's."""
    if not {FLOOR, "lora"} <= set(timings.samples_ms) or candidate == FLOOR:
        return None
    lora = timings.difference("lora", FLOOR)
    return timings.difference(candidate, FLOOR) / lora if lora > 0 else None


def timing_row(candidate: str, timings: Timings) -> dict[str, Any]:
    found = set(timings.samples_ms)
    return {
        "method": candidate,
        "impl": IMPL.get(candidate, "ours"),
        "ms_per_step": timings.median(candidate),
        "spread": timings.spread(candidate),
        "ratio_vs_peft_lora": timings.ratio(candidate, BASELINE),
        "ratio_vs_lora": timings.ratio(candidate, "lora") if "lora" in found else None,
        "ratio_vs_cla_gemm": (timings.ratio(candidate, GEMM_CLA)
                              if candidate in ("cla", GEMM_CLA) and {"cla", GEMM_CLA} <= found else None),
        "adapter_ms": timings.difference(candidate, FLOOR) if FLOOR in found else None,
        "adapter_cost_vs_lora": adapter_cost_vs_lora(timings, candidate),
    }


def memory_row(candidate: str, memory: dict[str, dict[str, int]]) -> dict[str, Any]:
    if candidate not in memory or BASELINE not in memory:
        return {}
    used, reference = memory[candidate]["train_memory_bytes"], memory[BASELINE]["train_memory_bytes"]
    return {"train_memory_mib": used / MIB, "memory_ratio_vs_peft_lora": used / reference,
            "peak_mib": memory[candidate]["peak_bytes"] / MIB}


def result_rows(timings: Timings, trainable: dict[str, int], memory: dict[str, dict[str, int]]) -> list[dict]:
    return [{**timing_row(c, timings), **memory_row(c, memory), "trainable_params": trainable[c]}
            for c in timings.samples_ms]


def check_targets(timings: Timings, scope: str) -> list[Target]:
    """The issue's two training targets, on ``scope`` (the model, or one layer alone)."""
    found = set(timings.samples_ms)
    out = []
    if "lora" in found:
        out.append(Target(f"{scope}: our LoRA step / PEFT LoRA step", timings.ratio("lora", BASELINE), 1.00))
    if {"cla", "lora"} <= found:
        out.append(Target(f"{scope}: s-cLA step / our LoRA step", timings.ratio("cla", "lora"), 0.95))
    return out


def floor_note(timings: Timings) -> list[str]:
    if not {FLOOR, "lora"} <= set(timings.samples_ms):
        return []
    return [f"{FLOOR} / our LoRA = {timings.ratio(FLOOR, 'lora'):.3f}: the step ratio over LoRA that an adapter "
            f"costing nothing would reach"]


COLUMNS = [
    Column("method", "method"),
    Column("impl", "impl"),
    Column("ms_per_step", "ms/step (median)", "{:.2f}"),
    Column("spread", "IQR/median", "{:.2f}"),
    Column("ratio_vs_peft_lora", "time / PEFT LoRA", "{:.3f}"),
    Column("ratio_vs_lora", "time / our LoRA", "{:.3f}"),
    Column("ratio_vs_cla_gemm", "time / cLA GEMM", "{:.3f}"),
    Column("adapter_ms", "ms over no_adapter", "{:.2f}"),
    Column("adapter_cost_vs_lora", "adapter cost / LoRA's", "{:.2f}"),
    Column("train_memory_mib", "train memory MiB", "{:.1f}"),
    Column("memory_ratio_vs_peft_lora", "memory / PEFT LoRA", "{:.3f}"),
    Column("peak_mib", "peak MiB", "{:.0f}"),
    Column("trainable_params", "trainable params", "{:,}"),
]
NOTES = [
    "time ratios are medians over rounds of the within-round ratio; IQR/median shows each candidate's noise",
    f"every method at r={RANK} and dropout 0 (cLA's default is r=16; r=8 here so cLA and LoRA see the same r)",
    f"{FLOOR}: no adapter; in the model only the first LayerNorm (and the head) trains, so backward crosses every "
    "layer. 'ms over no_adapter' is the adapter's own cost (median of per-round differences); 'adapter cost / "
    "LoRA's' compares it with our LoRA's",
    f"{GEMM_CLA}: the same cLA layer computed as a GEMM with a dense 0/1 selector (a baseline in this script)",
    "c3la: one link, no switch (switches happen in the trainer's hook, which a step benchmark does not call)",
]


def settings_of(spec: ModelSpec, args: argparse.Namespace, scale: str) -> dict[str, Any]:
    settings = {"model": spec.name_or_path, "task": spec.task, "targets": list(spec.targets), "rank": RANK,
                "batch": args.batch, "seq": args.seq, "clock": args.clock, "threads": torch.get_num_threads()}
    if scale == "layer":
        return {**settings, "layer": f"{spec.d_in} -> {spec.d_out}", "rounds": args.layer_rounds}
    memory = "RSS growth, fresh process per candidate" if args.device == "cpu" else "max_memory_allocated growth"
    return {**settings, "rounds": args.rounds, "warmup": args.warmup,
            "memory": memory if args.memory else "not measured"}


def report(name: str, title: str, machine: dict, settings: dict, timings: Timings, trainable: dict[str, int],
           memory: dict, out_dir: Path, scope: str) -> list[dict[str, Any]]:
    rows = result_rows(timings, trainable, memory)
    write_results(name, title, machine, settings, rows, COLUMNS, check_targets(timings, scope),
                  [*NOTES, *floor_note(timings)], results_dir=out_dir)
    print((out_dir / f"{name}.md").read_text(), flush=True)
    return rows


def run_benchmark(spec: ModelSpec, args: argparse.Namespace) -> None:
    candidates = [c for c in CANDIDATES if c in args.methods or c == BASELINE]
    print(f"bench_train {spec.name}: {len(candidates)} candidates, batch {args.batch} x {args.seq}", flush=True)
    machine = machine_info(args.device)
    layer_timings, layer_trainable = layer_pass(candidates, spec, args)
    layer_rows = report(f"train_layer_{spec.name}", f"Training step of one {spec.d_in} -> {spec.d_out} target "
                        f"layer vs PEFT LoRA ({spec.name})", machine, settings_of(spec, args, "layer"),
                        layer_timings, layer_trainable, {}, args.out_dir, scope="one layer")
    machine = machine_info(args.device)
    measured = [c for c in candidates if c in QUICK_MEMORY] if args.quick else candidates
    memory = memory_pass(measured, spec, args) if args.memory else {}
    timings, trainable = model_pass(candidates, spec, args)
    rows = report(f"train_{spec.name}", f"Training step: every method vs PEFT LoRA ({spec.name})", machine,
                  settings_of(spec, args, "model"), timings, trainable, memory, args.out_dir, scope="model")
    panels = {"model step time / PEFT LoRA": [r["ratio_vs_peft_lora"] for r in rows],
              "one layer's step time / PEFT LoRA": [r["ratio_vs_peft_lora"] for r in layer_rows]}
    if memory:
        panels["train memory / PEFT LoRA"] = [r.get("memory_ratio_vs_peft_lora", 0.0) for r in rows]
    bar_plot(args.out_dir / f"train_{spec.name}.png", f"{spec.name}, batch {args.batch}x{args.seq}, "
             f"{machine['device_name']}", [r["method"] for r in rows], panels)


# ---- profile -------------------------------------------------------------------------------------
def profile(candidates: list[str], spec: ModelSpec, args: argparse.Namespace, steps: int = 3) -> None:
    """Print torch.profiler's operators by self time for each candidate's model step (after a warm-up step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    template = base_model(spec, args.device)
    batch = make_batch(spec, vocab_size(template), args.device, args.batch, args.seq)
    for candidate in candidates:
        step = model_step(*adapt_model(candidate, copy.deepcopy(template), spec), batch)
        step()
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            synchronizer(args.device)()
        print(f"==== {candidate} ({steps} steps)")
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=18))


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--model", choices=[*SPECS, "all"],
                        help="default: minilm on the CPU, all on CUDA (GPT-2 small takes seconds a step on a CPU)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(CANDIDATES),
                        help=f"comma-separated subset of {','.join(CANDIDATES)} ({BASELINE} always runs)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 4 x 32, 2 rounds, memory of peft_lora, lora, cla only, results in tmp/")
    parser.add_argument("--rounds", type=int, help="timed rounds of the model steps (default 10, quick 2)")
    parser.add_argument("--layer-rounds", type=int, help="timed rounds of the layer steps (default 100, quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per candidate first (default 2, quick 1)")
    parser.add_argument("--batch", type=int, help="default: the model's (16 MiniLM, 8 GPT-2), quick 4")
    parser.add_argument("--seq", type=int, help="default 128, quick 32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, the core count)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, steadier on a busy machine (with --threads 1 on the CPU)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory pass")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results (quick: benchmarks/results/tmp)")
    parser.add_argument("--profile", type=lambda s: s.split(","), help="print profiles of these candidates only")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.methods + (args.profile or [])) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown candidates {sorted(unknown)}; choose from {', '.join(CANDIDATES)}")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures host CPU time; use --clock wall with --device cuda")
    return args


def fill_defaults(args: argparse.Namespace, spec: ModelSpec) -> argparse.Namespace:
    """The per-model defaults the command line left open (``--quick`` shrinks them)."""
    args = copy.copy(args)
    args.rounds = args.rounds or (2 if args.quick else 10)
    args.layer_rounds = args.layer_rounds or (5 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.batch = args.batch or (4 if args.quick else spec.batch)
    args.seq = args.seq or (32 if args.quick else spec.seq)
    args.out_dir = args.out_dir or (RESULTS / "tmp" if args.quick else RESULTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or ("all" if args.device.startswith("cuda") else "minilm")
    specs = list(SPECS.values()) if model == "all" else [SPECS[model]]
    for spec in specs:
        filled = fill_defaults(args, spec)
        if args.memory_child:
            print(json.dumps(measure_memory(args.memory_child, spec, args.device, filled.batch, filled.seq)))
        elif args.profile:
            profile(args.profile, spec, filled)
        else:
            run_benchmark(spec, filled)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
