"""What every benchmark shares: the machine, interleaved timing, peak memory, result files and plots.

Machines are shared and noisy, so candidates run round-robin inside one loop (a slow phase hits all of them alike),
every figure is a ratio measured side by side in one run, and each result file names the machine and the date.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
GIB = 2**30


# ---- the machine -----------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where and when the numbers were taken; the load average says how busy the machine was."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name(device),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


# ---- interleaved timing ----------------------------------------------------------------------------
@dataclass
class Timings:
    """Milliseconds per run and candidate; sample i of every candidate comes from the same round."""

    samples_ms: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples_ms[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of name / baseline within a round (robust to the machine's slow phases)."""
        pairs = zip(self.samples_ms[name], self.samples_ms[baseline], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def difference(self, name: str, baseline: str) -> float:
        """Median over rounds of name - baseline within a round, in milliseconds."""
        pairs = zip(self.samples_ms[name], self.samples_ms[baseline], strict=True)
        return statistics.median(a - b for a, b in pairs)

    def spread(self, name: str) -> float:
        """Interquartile range over the median: how noisy this candidate's runs were."""
        values = self.samples_ms[name]
        if len(values) < 4:
            return (max(values) - min(values)) / self.median(name)
        q1, _, q3 = statistics.quantiles(values, n=4)
        return (q3 - q1) / self.median(name)


CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    clock: str = "wall",
) -> Timings:
    """Warm every candidate up, then run them round-robin ``rounds`` times, rotating who goes first.

    ``clock``: ``wall`` (perf_counter) or ``cpu`` (this process's CPU time: on a busy machine it does not count
    the time the scheduler gave to others; meaningful with one torch thread, since idle threads spin).
    """
    now = CLOCKS[clock]
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0 (got rounds={rounds}, warmup={warmup})")
    for run in candidates.values():
        for _ in range(warmup):
            run()
    sync()
    timings = Timings({name: [] for name in candidates})
    order = list(candidates)
    for i in range(rounds):
        for name in order[i % len(order):] + order[: i % len(order)]:
            start = now()
            candidates[name]()
            sync()
            timings.samples_ms[name].append((now() - start) / 1e6)
    return timings


# ---- memory ----------------------------------------------------------------------------------------
def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """This process's peak RSS since start or since :func:`reset_peak_rss` (VmHWM), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class ChildRun:
    """A finished child process: exit status, wall time, CPU time and peak RSS (its own, from wait4), output."""

    returncode: int
    wall_s: float
    cpu_s: float  # user + system
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_child(command: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``command`` and measure it from outside: wall time, and the child's own CPU time and ru_maxrss via wait4.

    wait4 reports the peak RSS of exactly this child (RUSAGE_CHILDREN would give the maximum over every child
    this process ever waited for). Output goes to temporary files so a full pipe cannot stall the child.
    """
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall_s = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(process.returncode, wall_s, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                        out.read().decode(), err.read().decode())


def python_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


# ---- result files ----------------------------------------------------------------------------------
@dataclass
class Target:
    """One of the issue's targets: ``value`` must stay at or below ``limit``."""

    what: str
    value: float
    limit: float
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "value": self.value, "limit": self.limit, "unit": self.unit, "met": self.met}


@dataclass
class Column:
    """A table column: the row key, its header and how to print its value."""

    key: str
    header: str
    fmt: str = "{}"

    def render(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        return "" if value is None else self.fmt.format(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.render(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['date']}, {machine['device_name']} ({machine['device']}), {machine['cpu']}, "
        f"{machine['cores_logical']} logical cores, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, load average {machine['load_avg_1m_at_start']} at start and "
        f"{machine.get('load_avg_1m_at_end', '?')} at end"
    )


def write_results(
    name: str,
    title: str,
    machine: dict[str, Any],
    settings: dict[str, Any],
    rows: list[dict[str, Any]],
    columns: list[Column],
    targets: Sequence[Target] = (),
    notes: Sequence[str] = (),
    results_dir: Path = RESULTS,
) -> tuple[Path, Path]:
    """``results_dir/NAME.json`` (everything) and ``NAME.md`` (the table, the targets and the notes)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = {**machine, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    payload = {"benchmark": name, "title": title, "machine": machine, "settings": settings, "rows": rows,
               "targets": [t.as_dict() for t in targets], "notes": list(notes)}
    json_path, md_path = results_dir / f"{name}.json", results_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {title}", "", f"Machine: {machine_line(machine)}.", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".", "",
             markdown_table(rows, columns), ""]
    if targets:
        lines += ["Targets:", ""]
        lines += [f"- {t.what}: {t.value:.3g}{t.unit} (limit {t.limit:g}{t.unit}): {'met' if t.met else 'MISSED'}"
                  for t in targets]
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def bar_plot(
    path: Path,
    title: str,
    labels: list[str],
    panels: dict[str, list[float]],
    reference: float | None = 1.0,
) -> Path:
    """Horizontal bars, one panel per metric (e.g. time ratio, memory ratio), a dashed line at ``reference``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.35 * len(labels) + 1.5), sharey=True,
                             squeeze=False)
    for ax, (metric, values) in zip(axes[0], panels.items(), strict=True):
        ax.barh(labels, values, color="tab:blue")
        if reference is not None:
            ax.axvline(reference, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel(metric)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
