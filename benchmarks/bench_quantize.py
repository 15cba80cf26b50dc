"""Quantized exports (issue 14): int8 MiniLM demo against fp32, int4 decoders, size and speed.

    python -m benchmarks.bench_quantize                    # the demo checkpoint (make demo) + a tiny int4 Llama
    python -m benchmarks.bench_quantize --llama            # also TinyLlama-1.1B's shape, random weights, int4 (~10 GB)

1. The demo checkpoint (ProDA on all-MiniLM-L6-v2, ``runs/demo``) exported three times through ``export.onnx``'s one
   pipeline: the folded fp32 export, ``--quantize int8`` (its task-level check: eval accuracy on the checkpoint's own
   eval data, label agreement with fp32), and the base model (no adapter) in fp32, the latency reference. A fourth
   graph quantizes the residual paths too (no nodes kept float), to show what keeping them float buys. Latency: batch
   8 x seq 128, the graphs interleaved round by round (``benchmarks.common.interleaved``), one onnxruntime session
   each with the export's SessionOptions and ``--threads`` intra-op threads. Whether the CPU has VNNI (the int8 dot
   product instructions onnxruntime's int8 MatMul uses) is read from /proc/cpuinfo and named in the results.
2. A 2-layer random Llama with ProDA on q_proj, v_proj (a residual path in a decoder): ``--quantize int4``; it must
   export, verify (perplexity ratio, greedy agreement) and generate through ``export.run``'s pipeline.
3. ``--llama``: TinyLlama-1.1B's shape (bench_scale's builder, random float32 weights, LoRA r=8 on all-linear), fp32
   and int4 exports: sizes, the int4 check, and greedy tokens/s of each (batch 1, a 16-token prompt, 32 new tokens,
   the KV cache), interleaved.

Targets (issue 14): int8 eval accuracy within 1 point of fp32, int8 latency <= 0.7x the fp32 base export at 8 x 128
(on a CPU with VNNI; without it the figure is reported), int8 size <= 0.3x fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Column, Target, interleaved, machine_info, python_command, run_child, write_results

REPO = Path(__file__).resolve().parent.parent
SCRATCH = REPO / "benchmarks" / "results" / "tmp" / "quantize"
BATCH, SEQ = 8, 128
ACCURACY_POINTS, LATENCY_RATIO, SIZE_RATIO = 1.0, 0.7, 0.3


def vnni() -> str:
    """The VNNI flags /proc/cpuinfo lists (avx512_vnni, avx_vnni), or 'none'."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= {f for f in line.split(":", 1)[1].split() if f in ("avx512_vnni", "avx_vnni")}
    except OSError:
        return "unknown"
    return ", ".join(sorted(flags)) or "none"


def quiet(_: str) -> None:
    pass


def graph_of(report: dict[str, Any], folder: Path):
    from export.exporters import ExportedGraph

    return ExportedGraph(folder, folder / report["files"]["model"], report["backend"], report["task"],
                         report["with_past"], report["opset"])


def session(path: Path, threads: int):
    from export.latency import ort_session, session_options

    return ort_session(path, "cpu", session_options(threads))


# ---- 1. the int8 demo ---------------------------------------------------------------------------------------------
def residual_quantized_too(fp32_file: Path, folder: Path) -> Path:
    """The int8 graph with nothing kept float (the ablation): export.quantize's own preparation and quantizer."""
    from export.quantize import prepare, quantize_int8

    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "fp32.onnx"
    shutil.copyfile(fp32_file, copy)
    quantize_int8(prepare(copy, False, quiet), folder / "model.onnx", [], False)
    return folder / "model.onnx"


def ablation_quality(ckpt: Path, fp32_file: Path, quantized: Path, tokenizer_folder: Path) -> dict[str, Any]:
    from export.quality import encoder_batches, eval_rows, load_tokenizer_from, max_tokens, seq_cls_quality
    from surgery.checkpoint import read_config
    from transformers import AutoConfig

    config = read_config(ckpt, None)
    records, source = eval_rows(config)
    limit = max_tokens(config, AutoConfig.from_pretrained(tokenizer_folder))
    batches = encoder_batches(records, load_tokenizer_from(tokenizer_folder), limit)
    return {"data": source, **seq_cls_quality(fp32_file, quantized, batches, [int(r["label"]) for r in records])}


def demo(ckpt: Path, rounds: int, threads: int) -> tuple[list[dict[str, Any]], list[Target], dict[str, Any]]:
    from export.onnx import export_base, export_checkpoint
    from export.quantize import model_bytes
    from export.reference import sample_inputs
    from export.decode import onnx_feed
    from surgery.checkpoint import read_config

    root = SCRATCH / "demo"
    shutil.rmtree(root, ignore_errors=True)
    fp32 = export_checkpoint(ckpt, root / "fp32", latency=False, fp16_check=False, log=quiet)
    int8 = export_checkpoint(ckpt, root / "int8", quantize="int8", latency=False, fp16_check=False, log=print)
    base_file = export_base(read_config(ckpt, None), graph_of(fp32, root / "fp32"), "fp32", root / "base")
    all_int8 = residual_quantized_too(root / "fp32" / "model.onnx", root / "int8_all")
    ablation = ablation_quality(ckpt, root / "fp32" / "model.onnx", all_int8, root / "fp32")

    files = {"int8": root / "int8" / "model.onnx", "fp32 (folded)": root / "fp32" / "model.onnx",
             "fp32 base": base_file, "int8, residual paths int8 too": all_int8}
    vocab = json.loads((root / "fp32" / "config.json").read_text())["vocab_size"]
    inputs = sample_inputs(vocab, BATCH, SEQ, seed=7)
    sessions = {name: session(path, threads) for name, path in files.items()}
    feeds = {name: onnx_feed(s, inputs) for name, s in sessions.items()}
    timings = interleaved({name: (lambda n=name: sessions[n].run(None, feeds[n])) for name in files}, rounds,
                          warmup=2)
    quality = int8["quantization"]["quality"]
    fp32_bytes = model_bytes(files["fp32 (folded)"])
    rows = []
    for name, path in files.items():
        row = {"model": f"MiniLM demo, {name}", "size_mib": model_bytes(path) / 2**20,
               "size_ratio": model_bytes(path) / fp32_bytes, "ms": timings.median(name),
               "vs_base": timings.ratio(name, "fp32 base"), "spread": timings.spread(name)}
        if name == "int8":
            row.update(accuracy_fp32=quality["accuracy_fp32"], accuracy=quality["accuracy_quantized"],
                       agreement=quality["label_agreement"], logit_diff=quality["logit_max_abs_diff"])
        elif name.startswith("int8,"):
            row.update(accuracy_fp32=ablation["accuracy_fp32"], accuracy=ablation["accuracy_quantized"],
                       agreement=ablation["label_agreement"], logit_diff=ablation["logit_max_abs_diff"])
        elif name == "fp32 (folded)":
            row.update(accuracy=quality["accuracy_fp32"])
        rows.append(row)
    targets = [
        Target("int8 eval accuracy loss vs fp32 (points)", max(0.0, -quality["accuracy_delta_points"]),
               ACCURACY_POINTS, "points"),
        Target(f"int8 latency / fp32 base export at {BATCH} x {SEQ} (CPU VNNI: {vnni()})",
               timings.ratio("int8", "fp32 base"), LATENCY_RATIO, "x"),
        Target("int8 size / fp32 export", rows[0]["size_ratio"], SIZE_RATIO, "x"),
    ]
    extra = {"int8_report": {k: int8["quantization"][k] for k in ("settings", "size", "quality", "ops")},
             "float_nodes": {k: len(v) for k, v in int8["quantization"]["float_nodes"]["layers"].items()},
             "ablation": ablation, "samples_ms": timings.samples_ms}
    return rows, targets, extra


# ---- 2 and 3. int4 decoders ---------------------------------------------------------------------------------------
def llama_checkpoint(shape: str, method: str, folder: Path) -> Path:
    """bench_scale's random Llama of ``shape``, surgery (a child process) and random adapter values."""
    from benchmarks.bench_scale import Setting, randomise_adapters, write_config, write_random_llama

    setting = Setting(dtype="float32", method=method)
    model_dir = write_random_llama(shape, folder / "model", "float32")
    config = write_config(model_dir, folder, setting)
    child = run_child(python_command("surgery.apply", str(config)), cwd=REPO)
    if child.returncode != 0:
        raise RuntimeError(f"surgery on {shape} failed: {child.stderr[-2000:]}")
    randomise_adapters(folder / "ckpt")
    return folder / "ckpt"


def tokens_per_second(files: dict[str, Path], threads: int, rounds: int, new_tokens: int = 32) -> dict[str, float]:
    from export.decode import greedy

    sessions = {name: session(path, threads) for name, path in files.items()}
    prompt = np.arange(3, 19, dtype=np.int64)[None, :]
    timings = interleaved({name: (lambda n=name: greedy(sessions[n], prompt, new_tokens, suppress_eos=True))
                           for name in files}, rounds, warmup=1)
    return {name: new_tokens / (timings.median(name) / 1000) for name in files}


def decoder(shape: str, method: str, rounds: int, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from export.onnx import export_checkpoint
    from export.quantize import model_bytes
    from export.run import OnnxPipeline

    root = SCRATCH / shape
    shutil.rmtree(root, ignore_errors=True)
    ckpt = llama_checkpoint(shape, method, root)
    started = time.perf_counter()
    fp32 = export_checkpoint(ckpt, root / "fp32", latency=False, fp16_check=False, log=print)
    fp32_s = time.perf_counter() - started
    started = time.perf_counter()
    int4 = export_checkpoint(ckpt, root / "int4", quantize="int4", latency=False, fp16_check=False, log=print)
    int4_s = time.perf_counter() - started
    pipeline = OnnxPipeline.from_dir(root / "int4") if (root / "int4" / "tokenizer_config.json").is_file() else None
    generated = None
    if pipeline is not None:
        generated = pipeline.generate_ids(np.arange(3, 11, dtype=np.int64)[None, :], 8)[0].tolist()
    else:  # the random Llama has no tokenizer: greedy on token ids, as export.run's pipeline does
        from export.decode import greedy
        generated = greedy(session(root / "int4" / "model.onnx", threads), np.arange(3, 11)[None, :], 8)[0].tolist()
    files = {"fp32": root / "fp32" / "model.onnx", "int4": root / "int4" / "model.onnx"}
    speed = tokens_per_second(files, threads, rounds)
    quality = int4["quantization"]["quality"]
    row = {"model": f"{shape}, {method}, int4 (block {int4['quantization']['settings']['block_size']})",
           "size_mib": model_bytes(files["int4"]) / 2**20, "size_ratio": int4["quantization"]["size"]["ratio"],
           "fp32_mib": model_bytes(files["fp32"]) / 2**20 if files["fp32"].is_file() else None,
           "tokens_s_fp32": speed["fp32"], "tokens_s": speed["int4"], "speedup": speed["int4"] / speed["fp32"],
           "ppl_ratio": quality["perplexity_ratio"], "greedy_agreement": quality["greedy_agreement"],
           "export_s_fp32": fp32_s, "export_s_int4": int4_s, "passed": int4["passed"] and fp32["passed"]}
    extra = {"generated_ids": generated, "quality": quality, "ops": int4["quantization"]["ops"],
             "float_nodes": {k: len(v) for k, v in int4["quantization"]["float_nodes"]["layers"].items()}}
    if shape != "tiny-llama":
        shutil.rmtree(root / "model", ignore_errors=True)
    return row, extra


# ---- main ---------------------------------------------------------------------------------------------------------
ENCODER_COLUMNS = [Column("model", "graph"), Column("size_mib", "MiB", "{:,.1f}"),
                   Column("size_ratio", "size / fp32", "{:.3f}"), Column("ms", f"ms ({BATCH} x {SEQ})", "{:.1f}"),
                   Column("vs_base", "latency / fp32 base", "{:.3f}"), Column("spread", "IQR / median", "{:.2f}"),
                   Column("accuracy_fp32", "fp32 eval acc", "{:.4f}"), Column("accuracy", "eval acc", "{:.4f}"),
                   Column("agreement", "labels = fp32", "{:.1%}"),
                   Column("logit_diff", "max |logit - fp32|", "{:.3f}")]
DECODER_COLUMNS = [Column("model", "export"), Column("fp32_mib", "fp32 MiB", "{:,.1f}"),
                   Column("size_mib", "int4 MiB", "{:,.1f}"), Column("size_ratio", "size / fp32", "{:.3f}"),
                   Column("tokens_s_fp32", "fp32 tok/s", "{:.1f}"), Column("tokens_s", "int4 tok/s", "{:.1f}"),
                   Column("speedup", "speed-up", "{:.2f}x"), Column("ppl_ratio", "ppl ratio", "{:.4f}"),
                   Column("greedy_agreement", "greedy agree", "{:.1%}"), Column("passed", "passed")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=REPO / "runs" / "demo", help="the demo checkpoint (make demo)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--llama", action="store_true", help="also TinyLlama-1.1B's shape (random weights)")
    parser.add_argument("--skip-demo", action="store_true", help="only the decoders")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the demo config names its data relative to the repository
    machine = {**machine_info(), "vnni": vnni(), "onnxruntime_threads": args.threads}
    settings = {"batch": BATCH, "seq": SEQ, "rounds": args.rounds, "threads": args.threads, "ckpt": str(args.ckpt)}
    notes = [f"CPU VNNI flags: {machine['vnni']} (onnxruntime's int8 MatMul on x86 is fastest with VNNI; without "
             f"it the u8 x s8 products go through AVX2's vpmaddubsw)"]
    rows, targets, extra = [], [], {}
    if not args.skip_demo:
        rows, targets, extra["demo"] = demo(args.ckpt, args.rounds, args.threads)
    decoder_rows = []
    shapes = [("tiny-llama", "proda")] + ([("llama-1.1b", "lora")] if args.llama else [])
    for shape, method in shapes:
        row, extra[shape] = decoder(shape, method, max(3, args.rounds // 4), args.threads)
        decoder_rows.append(row)
    name = "quantize" + ("_llama" if args.llama else "") + (f"_threads{args.threads}" if args.threads != 1 else "")
    json_path, md_path = write_results(name, "Quantized exports: int8 encoder, int4 decoders", machine, settings,
                                       rows or decoder_rows, ENCODER_COLUMNS if rows else DECODER_COLUMNS, targets,
                                       notes)
    details = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**details, "decoder_rows": decoder_rows, "details": extra}, indent=2,
                                    default=str) + "\n")
    if rows and decoder_rows:  # the decoder table after the encoder one
        from benchmarks.common import markdown_table

        md_path.write_text(md_path.read_text() + "\n## int4 decoders\n\n" + markdown_table(decoder_rows,
                                                                                         DECODER_COLUMNS) + "\n")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
