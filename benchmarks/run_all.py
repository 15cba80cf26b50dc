"""Rerun every benchmark: ``python -m benchmarks.run_all [--device cpu|cuda] [--quick] [--only NAME,...]``.

Runs each ``benchmarks/bench_*.py`` present, the known ones first (train, plan, inference, scale), then any other
in name order. Every benchmark module exposes ``main(argv: list[str] | None = None) -> int`` and accepts
``--device`` and ``--quick``; each writes ``benchmarks/results/NAME.json``, ``NAME.md`` and, where a picture reads
better than a table, ``NAME.png`` (``--quick`` writes under ``benchmarks/results/tmp/``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KNOWN_ORDER = ("bench_train", "bench_plan", "bench_inference", "bench_scale")
# The published CPU runs (the README's figures), where they differ from a benchmark's defaults: training steps on one
# thread and process CPU time (the steadiest setting on a small shared machine), and a second inference run of ProDA
# at its paper's targets (query, value) beside the all-linear one; the quality table on one thread.
CPU_RUNS: dict[str, list[list[str]]] = {
    "bench_train": [["--threads", "1", "--clock", "cpu", "--rounds", "16"]],
    "bench_inference": [[], ["--model", "minilm", "--methods", "proda", "--targets", "query,value"]],
    "bench_quality": [["--threads", "1"]],  # ~2.5 h on 2 cores: 12 rows x (3 lr + 2 seeds) x 570 steps
}


def benchmark_modules() -> list[str]:
    """Module names of the benchmarks present, the known ones in their order first."""
    present = sorted(path.stem for path in HERE.glob("bench_*.py"))
    return [name for name in KNOWN_ORDER if name in present] + [n for n in present if n not in KNOWN_ORDER]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda, handed to every benchmark")
    parser.add_argument("--quick", action="store_true", help="smoke runs (results under benchmarks/results/tmp/)")
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated module names, e.g. bench_plan")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = benchmark_modules()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"--only: no benchmark {unknown}; present: {', '.join(names)}", file=sys.stderr)
            return 2
        names = [name for name in names if name in args.only]
    forwarded = ["--device", args.device] + (["--quick"] if args.quick else [])
    published = args.device == "cpu" and not args.quick
    failed = []
    for name in names:
        for extra in CPU_RUNS.get(name, [[]]) if published else [[]]:
            print(f"==== {name} {' '.join(forwarded + extra)}", flush=True)
            start = time.perf_counter()
            code = importlib.import_module(f"benchmarks.{name}").main(forwarded + extra)
            print(f"==== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
            if code:
                failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
