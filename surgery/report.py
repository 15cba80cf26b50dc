"""The surgery plan: per-layer and per-group parameter and MAC counts, as a table and as JSON."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from surgery.methods import method_class
from surgery.methods.base import AdapterLayer, ApproximatedLayer
from surgery.rewrite import AdaptedModel


def layer_rows(adapted: AdaptedModel) -> list[dict[str, Any]]:
    """One row per layer the surgery replaced, in the model's order, counted by the method's own formulas: each
    adapted layer, and each layer approximated without adapter (R-/S-LoDA's untargeted q/k/v sibling)."""
    method = adapted.config.method
    rows = []
    for name, layer in adapted.model.named_modules():
        if isinstance(layer, AdapterLayer):
            trainable = type(layer).count_params(layer.d_in, layer.d_out, layer.config)
        elif isinstance(layer, ApproximatedLayer):
            trainable = 0
        else:
            continue
        macs = layer.layer_macs()
        rows.append({
            "name": name,
            "method": method.name,
            "adapter": isinstance(layer, AdapterLayer),
            "d_in": layer.d_in,
            "d_out": layer.d_out,
            "trainable_params": trainable,
            "base_macs_per_token": macs.base,
            "adapter_macs_per_token": macs.adapter,
        })
    return rows


def build_report(adapted: AdaptedModel) -> dict[str, Any]:
    """The ``--report`` JSON: totals plus one entry per replaced layer (see :func:`layer_rows`) and per fully trained
    module."""
    rows = layer_rows(adapted)
    trained = {
        name: sum(p.numel() for p in module.parameters()) for name, module in adapted.trained_modules.items()
    }
    method = adapted.config.method
    trainable = sum(r["trainable_params"] for r in rows) + sum(trained.values())
    return {
        "method": method.name,
        "trainable_params": trainable,
        "adapter_params": sum(r["trainable_params"] for r in rows),
        "trained_module_params": trained,
        "base_params": adapted.base_params,
        "percent_of_model": percent_of_model(trainable, adapted.base_params, trainable),
        "base_macs_per_token": sum(r["base_macs_per_token"] for r in rows),
        "adapter_macs_per_token": sum(r["adapter_macs_per_token"] for r in rows),
        "modules": rows,
        "schedule": method_class(method.name).schedule_note(method, adapted.config.train),
    }


def percent_of_model(params: int, base_params: int, trainable_params: int) -> float:
    """``params`` as "% of the model" (METHODS.md): over every parameter of the pretrained model (embeddings and head
    included) plus the run's trainable ones, ``base + trainable``; that is how the papers' percentages come out."""
    return 100 * params / max(base_params + trainable_params, 1)


def group_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows summed per target group (the layer's last name component, e.g. q_proj), then trained modules."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in report["modules"]:
        group = groups[row["name"].rsplit(".", 1)[-1]]
        group["layers"] += 1
        for key in ("trainable_params", "base_macs_per_token", "adapter_macs_per_token"):
            group[key] += row[key]
    out = [{"group": name, **values} for name, values in groups.items()]
    for name, count in report["trained_module_params"].items():
        out.append({"group": f"{name} (trained in full)", "layers": 1, "trainable_params": count,
                    "base_macs_per_token": 0, "adapter_macs_per_token": 0})
    return out


def format_table(report: dict[str, Any]) -> str:
    def percent(params: int) -> str:
        return f"{percent_of_model(params, report['base_params'], report['trainable_params']):.4f}"

    header = ("group", "layers", "trainable", "% of model", "base MACs/tok", "adapter MACs/tok")
    lines = [header]
    for row in group_rows(report):
        lines.append((row["group"], str(row["layers"]), f"{row['trainable_params']:,}",
                      percent(row["trainable_params"]), f"{row['base_macs_per_token']:,}",
                      f"{row['adapter_macs_per_token']:,}"))
    lines.append(("total", str(len(report["modules"])), f"{report['trainable_params']:,}",
                  percent(report["trainable_params"]), f"{report['base_macs_per_token']:,}",
                  f"{report['adapter_macs_per_token']:,}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                for line in lines]
    rendered.insert(1, "-" * len(rendered[0]))
    title = f"method {report['method']}: {report['trainable_params']:,} trainable of {report['base_params']:,} base parameters"
    schedule = [f"schedule: {report['schedule']}"] if report.get("schedule") else []
    return "\n".join([title, *rendered, *schedule])


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
