"""The export report: ``export_report.json`` (machine-readable) and ``EXPORT_REPORT.md`` (for people), same content.

Keys every report has: ``parity`` {max_abs_diff, max_rel_diff, tolerance, greedy_match (null for encoders)},
``latency`` {ort_ms, base_ort_ms, overhead} (null when skipped), ``layers``
[{name, method, folded, residual, fold_error, ...}], ``macs_per_token``, ``base_macs_per_token``, ``passed`` and
``errors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_JSON = "export_report.json"
REPORT_MD = "EXPORT_REPORT.md"


def write_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write both files into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ---- markdown -----------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    sections = [
        _header(report),
        _parity(report.get("parity")),
        _latency(report.get("latency")),
        _quantization(report.get("quantization")),
        _adapters(report.get("adapters")),
        _layers(report["layers"]),
        _tensorrt(report.get("tensorrt")),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _header(report: dict[str, Any]) -> str:
    status = "PASSED" if report["passed"] else "FAILED"
    rows = [
        ("checkpoint", report["checkpoint"]),
        ("base model", report["base_model"]),
        ("method", report["method"]),
        ("task", report["task"]),
        ("fold", "merged (--merge)" if report["merge"] else "unfolded adapter graph"),
        ("backend", f"{report['backend']} (opset {report['opset']}, {weights(report)})"),
        ("files", ", ".join(report["files"].values())),
        ("MACs / token", f"{report['macs_per_token']:,} (base {report['base_macs_per_token']:,})"),
    ]
    lines = [f"# Export report: {status}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines += [f"\n**Error:** {error}" for error in report.get("errors", [])]
    return "\n".join(lines)


def _parity(parity: dict[str, Any] | None) -> str:
    if parity is None:
        return ""
    tol = parity["tolerance"]
    greedy = greedy_words(parity, "n/a (encoder)")
    lines = [
        "## Parity: onnxruntime vs the unfolded PyTorch model",
        "",
        f"Tolerance atol {tol['atol']:g}, rtol {tol['rtol']:g} ({tol['reason']}); rule: {tol['rule']}.",
        f"Max abs diff {parity['max_abs_diff']:.3g}, max rel diff {parity['max_rel_diff']:.3g}; greedy 20 tokens: "
        f"{greedy}.",
        "",
        "| case | max abs | max rel | the model stored in the half dtype: max abs | within |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c['case']} | {c['max_abs_diff']:.3g} | {c['max_rel_diff']:.3g} | "
              f"{'n/a' if c.get('floor_abs_diff') is None else format(c['floor_abs_diff'], '.3g')} | "
              f"{'yes' if c['within'] else 'NO'} |" for c in parity["cases"]]
    return "\n".join(lines)


def greedy_words(parity: dict[str, Any], none: str) -> str:
    """"match", "identical up to N near-tie(s)" or "MISMATCH"; ``none`` for encoders."""
    greedy = parity.get("greedy")
    if greedy is None:
        return none
    if greedy["match"]:
        return "match"
    return f"identical up to {len(greedy['divergences'])} near-tie(s)" if greedy["passed"] else "MISMATCH"


def _latency(latency: dict[str, Any] | None) -> str:
    if latency is None:
        return "## Latency\n\nnot measured (--no-latency)"
    rows = [("onnxruntime, this export", latency["ort_ms"]), ("onnxruntime, base model", latency["base_ort_ms"])]
    lines = ["## Latency (median ms after warm-up; one session at a time)", "",
             f"Input {latency.get('input', '')}; overhead (export / base) **{latency['overhead']:.3f}**"
             + (f", limit {latency['max_overhead']:g}" if latency.get("max_overhead") is not None else ""),
             "", "| | ms |", "|---|---|", *(f"| {name} | {ms:.3f} |" for name, ms in rows)]
    return "\n".join(lines)


def _layers(layers: list[dict[str, Any]]) -> str:
    lines = ["## Layers", "", "| layer | method | folded | stored as | residual | fold error | MACs / token |",
             "|---|---|---|---|---|---|---|"]
    for layer in layers:
        error = "" if layer["fold_error"] is None else f"{layer['fold_error']:.2g}"
        lines.append(f"| {layer['name']} | {layer['method']} | {'yes' if layer['folded'] else 'no'} | "
                     f"{layer['note']} | {layer['residual'] or 'none'} | {error} | {layer['macs_per_token']:,} |")
    return "\n".join(lines)


def _tensorrt(trt: dict[str, Any] | None) -> str:
    if trt is None:
        return ""
    lines = ["## TensorRT readiness", "",
             f"Ready: {'yes' if trt['ready'] else 'no'}; opset {trt['graph_opset']} "
             f"({'ok' if trt['opset_ok'] else 'too old'}); ops outside TensorRT's ONNX parser: "
             f"{', '.join(trt['unsupported_ops']) or 'none'}; 2:4 sparse weights: "
             f"{'yes (--sparsity=enable)' if trt['sparse_2_4'] else 'no'}."]
    lines += [f"- {problem}" for problem in trt.get("problems", [])]
    fp16 = trt.get("fp16")
    if fp16:
        parity = fp16["parity"]
        lines.append(f"\nfp16 variant `{fp16['file']}`: max abs diff {parity['max_abs_diff']:.3g} vs the unfolded "
                     f"PyTorch model (tolerance atol {parity['tolerance']['atol']:g}, rtol "
                     f"{parity['tolerance']['rtol']:g}): {'passed' if parity['passed'] else 'FAILED'}.")
    lines += ["", "Dynamic axes and suggested profile (min / opt / max):", ""]
    lines += [f"- `{name}`: {shapes['min']} / {shapes['opt']} / {shapes['max']}"
              for name, shapes in trt["profile"].items()]
    lines += ["", "```sh", trt["trtexec"], "```"]
    return "\n".join(lines)


def weights(report: dict[str, Any]) -> str:
    """The export's dtype, and what quantization made of it (``fp32 -> int8``)."""
    section = report.get("quantization")
    return report["dtype"] + (f" -> {section['settings']['kind']}" if section else "")


def _quantization(section: dict[str, Any] | None) -> str:
    if not section:
        return ""
    return "\n".join(["## Quantization", "", *(f"- {line}" for line in quantization_lines(section)),
                      "", f"Float32 nodes: {section['float_nodes']['reason']}."])


def quantization_lines(section: dict[str, Any]) -> list[str]:
    """The settings, the size and the task-level quality of a quantized export, one line each."""
    settings, size, quality = section["settings"], section["size"], section.get("quality") or {}
    kept = sum(len(names) for names in section["float_nodes"]["layers"].values())
    lines = [f"{settings['kind']}: {settings['method']}, {settings['weights']}; {kept} residual-path nodes float32",
             f"size {size['quantized_bytes'] / 2**20:,.1f} MiB = {size['ratio']:.3f}x the fp32 export "
             f"({size['fp32_bytes'] / 2**20:,.1f} MiB)"]
    if quality.get("label_agreement") is not None:
        accuracy = ("" if quality.get("accuracy_fp32") is None else
                    f"; eval accuracy {quality['accuracy_fp32']:.4f} -> {quality['accuracy_quantized']:.4f} "
                    f"({quality['accuracy_delta_points']:+.2f} points)")
        lines.append(f"labels agreeing with fp32 {quality['label_agreement']:.2%} of {quality['rows']}{accuracy}")
    if quality.get("perplexity_ratio") is not None:
        lines.append(f"perplexity {quality['perplexity_fp32']:.4g} -> {quality['perplexity_quantized']:.4g} "
                     f"(x{quality['perplexity_ratio']:.4f}); greedy tokens agreeing "
                     f"{quality['greedy_agreement']:.1%} (identical for the first "
                     f"{quality.get('greedy_identical_prefix', float('nan')):.1f} of {quality['greedy_new_tokens']})")
    if quality.get("cosine_mean") is not None:
        lines.append(f"embedding cosine vs fp32: mean {quality['cosine_mean']:.5f}, min {quality['cosine_min']:.5f}")
    if quality:
        lines.append(f"data: {quality['data']}")
    return lines


# ---- console summary ----------------------------------------------------------------------------------------------
def _adapters(adapters: dict[str, Any] | None) -> str:
    """An --adapters export: each adapter's file and size (export.adapters)."""
    if not adapters:
        return ""
    lines = ["## Adapters", "", f"One graph, {len(adapters['inputs'])} swappable inputs (their defaults: no adapter, "
             f"the base model); one file per checkpoint, verified with it active.", "",
             "| adapter | file | bytes | checkpoint |", "|---|---|---:|---|"]
    lines += [f"| {name} | {entry['file']} | {entry['bytes']:,} | {entry['checkpoint']} |"
              for name, entry in adapters["adapters"].items()]
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal after an export."""
    parity = report.get("parity")
    lines = [f"export {'passed' if report['passed'] else 'FAILED'}: {report['files']['model']} "
             f"({report['backend']}, opset {report['opset']}, {weights(report)}, task {report['task']})"]
    folded = sum(layer["folded"] for layer in report["layers"])
    residual = sum(layer["residual"] is not None for layer in report["layers"])
    lines.append(f"  layers: {len(report['layers'])} adapted, {folded} folded, {residual} with a residual path; "
                 f"max fold error {_max_fold_error(report['layers'])}")
    if parity:
        greedy = greedy_words(parity, "n/a")
        lines.append(f"  parity: max abs {parity['max_abs_diff']:.3g}, max rel {parity['max_rel_diff']:.3g} "
                     f"(atol {parity['tolerance']['atol']:g}, rtol {parity['tolerance']['rtol']:g}); greedy {greedy}")
    latency = report.get("latency")
    if latency:
        lines.append(f"  latency (ms): onnx {latency['ort_ms']:.3f}, base onnx {latency['base_ort_ms']:.3f}, "
                     f"overhead {latency['overhead']:.3f}")
    if report.get("quantization"):
        lines += [f"  quantized: {line}" for line in quantization_lines(report["quantization"])]
    if report.get("adapters"):
        lines.append(f"  adapters: {', '.join(report['adapters']['adapters'])} (--adapter NAME in export.run; "
                     f"{len(report['adapters']['inputs'])} swappable inputs each, listed in adapters.json)")
    lines.append(f"  MACs/token: {report['macs_per_token']:,} (base {report['base_macs_per_token']:,})")
    trt = report.get("tensorrt")
    if trt:
        lines.append(f"  TensorRT: {'ready' if trt['ready'] else 'not ready'}; {trt['trtexec']}")
    lines += [f"  error: {error}" for error in report.get("errors", [])]
    return "\n".join(lines)


def _max_fold_error(layers: list[dict[str, Any]]) -> str:
    errors = [layer["fold_error"] for layer in layers if layer["fold_error"] is not None]
    return f"{max(errors):.2g}" if errors else "n/a"
