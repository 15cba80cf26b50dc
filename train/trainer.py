"""Train a surgered model: ``train_adapters(adapted, tokenizer, output_dir, resume=False, ...) -> metrics``.

An accelerate loop, so the same code runs on one CPU, one GPU, data-parallel (DDP) or fully sharded (FSDP
version 2, see :mod:`train.sharding`) under ``accelerate launch`` (configs/accelerate/):
AdamW over the declared adapter parameters (LoRA+ groups), linear warm-up and decay, gradient accumulation,
clipping, bf16/fp16 autocast where the device has it. Each optimizer step's loss is the sum over every target of
the global batch (all micro-batches, all processes) divided by their count, so accumulation and data parallelism
give the gradient of one big batch. After every step each adapter's schedule hook runs (c3LA's chain switches)
and the optimizer state of what it returns is reset.

Checkpoints go to ``output_dir/checkpoints/step-N`` (see :mod:`train.state`), the final adapter checkpoint and
``metrics.json`` to ``output_dir``. ``resume=True`` continues from the newest intact step folder: same data order,
RNG, optimizer and schedule, so N steps straight and N/2 + resume + N/2 give the same weights; the config must be
the run's in all that decides the result (:mod:`train.resume`), and what the run had pending (an evaluation, the
final checkpoint and metrics.json) is done first. A finished run is left as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, set_seed
from safetensors import SafetensorError
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from surgery.checkpoint import (
    CheckpointError,
    checkpoint_tensors,
    read_config,
    read_manifest,
    save_checkpoint,
    saved_modules,
)
from surgery.methods import AdapterLayer
from surgery.rewrite import AdaptedModel
from train.config import TrainConfig
from train.data import DataError, load_splits
from train.encode import Collator, EpochShuffle, encode_rows
from train.evaluate import evaluate
from train.loss import example_losses, target_count
from train.optim import build_optimizer, build_scheduler, set_peak_lr
from train.report import METRICS_FILE, format_history, write_metrics
from train.resume import ResumeError, check_resumable, data_digests
from train.schedule import Plan, step_adapters
from train.sharding import shard_optimizer_state, whole_optimizer_state, whole_parameters
from train.state import (
    CHECKPOINTS,
    DiskFullError,
    check_start,
    disk_full,
    is_disk_full,
    latest_checkpoint,
    load_trainer_state,
    remove_earlier_run,
    remove_leftovers,
    restore_adapters,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
    tensor_bytes,
)

log = logging.getLogger("train")


def info(message: str, *args: Any) -> None:
    """Log on the main process only (every process runs the same loop)."""
    if PartialState().is_main_process:
        log.info(message, *args)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything one training run needs, after ``accelerator.prepare``."""

    adapted: AdaptedModel
    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any  # accelerate's wrapper around the AdamW below
    adamw: torch.optim.AdamW
    scheduler: LambdaLR
    train_loader: DataLoader
    eval_loader: DataLoader
    plan: Plan
    output_dir: Path
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    loss_sum: float = 0.0  # training loss summed over the steps since the last evaluation
    loss_steps: int = 0
    saved_step: int | None = None  # the step of the newest checkpoint (every process)
    last_saved: Path | None = None  # its folder (main process)
    runtime_before: float = 0.0  # seconds trained before a resume
    data_digests: dict[str, str | None] = field(default_factory=dict)  # SHA-256 of the data, checked on resume
    started: float = field(default_factory=time.perf_counter)
    layers: dict[str, AdapterLayer] = field(init=False)  # looked up once, not per step

    def __post_init__(self) -> None:
        self.layers = self.adapted.layers

    @property
    def task(self) -> str:
        return self.adapted.config.model.task

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / CHECKPOINTS

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def runtime(self) -> float:
        """Seconds of training, the interrupted part of a resumed run included."""
        return self.runtime_before + time.perf_counter() - self.started


# ---- entry point -------------------------------------------------------------------------------------------
def train_adapters(adapted: AdaptedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path,
                   resume: bool = False, overridden: Collection[str] = (), overwrite: bool = False) -> dict[str, float]:
    """Train the adapters as ``adapted.config.train`` says, save the final checkpoint into ``output_dir`` and
    return the final metrics (``eval_loss``, and ``eval_accuracy`` or ``eval_perplexity``, ...).

    ``resume`` continues the run whose checkpoints are in ``output_dir``; the config must be the run's in all that
    decides the result, except the keys in ``overridden`` (``--override``, :data:`train.resume.OVERRIDABLE`).
    Without it, an ``output_dir`` holding an earlier run's checkpoints is refused unless ``overwrite``.
    """
    config = adapted.config.train
    if config is None:
        raise ValueError("the config has no `train:` section; add one to train (see README: Config keys)")
    check_start(Path(output_dir), resume, overwrite)
    check_launch_environment()
    accelerator = make_accelerator(config)
    check_supported(accelerator)
    set_seed(config.seed)
    run = build_run(adapted, tokenizer, config, accelerator, Path(output_dir), resume, overridden)
    try:
        done = finished_results(run) if resume else None
        if done is not None:
            info("--resume: the run in %s finished at step %d; nothing to do, its checkpoints and metrics.json are "
                 "left as they are (to train longer, resume with --override train.max_steps=N or train.epochs=N)",
                 run.output_dir, run.step)
            return done
        train_loop(run)
        return finish(run)
    finally:
        drop_autocast_wrapper(adapted.model)


def make_accelerator(config: TrainConfig) -> Accelerator:
    accelerator = Accelerator(mixed_precision=config.mixed_precision, step_scheduler_with_optimizer=False)
    if config.mixed_precision != "no" and not accelerator.native_amp:
        log.warning("train.mixed_precision=%s is not available on %s; training in float32",
                    config.mixed_precision, accelerator.device)
    return accelerator


FSDP1_ERROR = ("accelerate is configured for FSDP version 1; adapter training shards with FSDP version 2: set "
               "`fsdp_version: 2` in the accelerate config (configs/accelerate/fsdp2.yaml) or pass --fsdp_version 2")
EFFICIENT_LOADING_ERROR = (
    "accelerate is configured for FSDP with cpu_ram_efficient_loading, under which transformers loads the base "
    "model with empty weights on every process but the first and expects accelerate to broadcast them; here every "
    "process loads the base and runs the surgery itself. Set `fsdp_cpu_ram_efficient_loading: false` in the "
    "accelerate config (configs/accelerate/fsdp2.yaml) or pass --fsdp_cpu_ram_efficient_loading false"
)
DEEPSPEED_ERROR = (
    "accelerate is configured for DeepSpeed, which this trainer does not drive (its engine owns the optimizer "
    "state that checkpoints save and c3LA switches reset); to shard a model across GPUs use FSDP version 2 "
    "(accelerate launch --config_file configs/accelerate/fsdp2.yaml -m surgery.apply CONFIG), or data "
    "parallelism (configs/accelerate/ddp.yaml); see README: Several processes and GPUs"
)


def check_launch_environment(env: Mapping[str, str] | None = None) -> None:
    """Refuse, from the variables ``accelerate launch`` sets and before any model is loaded, the set-ups this
    trainer does not implement: DeepSpeed, FSDP version 1, and FSDP's cpu_ram_efficient_loading."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError(DEEPSPEED_ERROR)
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if env.get("FSDP_VERSION", "1") != "2":
        raise ValueError(FSDP1_ERROR)
    if env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        raise ValueError(EFFICIENT_LOADING_ERROR)


def check_supported(accelerator: Accelerator) -> None:
    """The same refusals for an ``Accelerator`` built in code (plugins rather than environment variables).
    FSDP version 2 shards into DTensors, which :mod:`train.sharding` gathers where whole tensors are needed."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(DEEPSPEED_ERROR)
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise ValueError(FSDP1_ERROR)
    if accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
        raise ValueError(EFFICIENT_LOADING_ERROR)


# ---- set-up ------------------------------------------------------------------------------------------------
def build_run(adapted: AdaptedModel, tokenizer: PreTrainedTokenizerBase, config: TrainConfig,
              accelerator: Accelerator, output_dir: Path, resume: bool, overridden: Collection[str] = ()) -> Run:
    train_loader, eval_loader = build_loaders(adapted, tokenizer, config)
    digests = data_digests(config.data)
    align_pad_token(adapted, tokenizer)
    folder, state = resume_state(adapted, output_dir / CHECKPOINTS, digests, overridden) if resume else (None, None)
    if accelerator.is_main_process:
        if resume:
            remove_leftovers(output_dir / CHECKPOINTS)
        else:
            remove_earlier_run(output_dir)  # only with --overwrite is there one: check_start refused it
    accelerator.wait_for_everyone()
    adamw = build_optimizer(adapted, config)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(adapted.model, adamw, train_loader, eval_loader)
    plan = Plan.from_config(config, len(train_loader))
    scheduler = build_scheduler(adamw, config, plan.total_steps)
    run = Run(adapted, config, accelerator, model, optimizer, adamw, scheduler, train_loader, eval_loader, plan,
              output_dir, data_digests=digests)
    if state is not None:
        restore_progress(run, state)
        run.last_saved = folder
    return run


def resume_state(adapted: AdaptedModel, checkpoints: Path, digests: dict[str, str | None],
                 overridden: Collection[str]) -> tuple[Path, dict[str, Any]]:
    """Check that this config continues the run of the newest intact step checkpoint, load its adapters into
    ``adapted`` and return that checkpoint's folder and trainer state."""
    folder = latest_checkpoint(checkpoints)
    if folder is None:
        raise CheckpointError(f"--resume: no intact checkpoint under {checkpoints}; run without --resume to start")
    state = load_trainer_state(folder)
    check_resumable(read_config(folder, None), adapted.config, state.get("data"), digests, overridden, folder)
    restore_adapters(adapted, folder)
    info("resuming from %s (step %d)", folder, state["step"])
    return folder, state


def build_loaders(adapted: AdaptedModel, tokenizer: PreTrainedTokenizerBase,
                  config: TrainConfig) -> tuple[DataLoader, DataLoader]:
    """Checked, tokenized train and eval data; the train order is a seeded permutation per epoch."""
    model_config = adapted.config.model
    train_rows, eval_rows = load_splits(config.data, model_config.task, model_config.labels, config.seed)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; set one in the model folder's tokenizer")
    collate = Collator(pad_id)
    train = encode_rows(train_rows, tokenizer, model_config.task, config.data.max_length, "train.data.train")
    held_out = encode_rows(eval_rows, tokenizer, model_config.task, config.data.max_length,
                           "train.data.eval" if config.data.eval is not None else "train.data.train")
    info("data: %d training and %d evaluation examples", len(train), len(held_out))
    # The loaders get their own generators: the global RNG (dropout) then advances identically with or
    # without a resume in the middle of an epoch.
    train_loader = DataLoader(train, batch_size=config.batch_size, sampler=EpochShuffle(len(train), config.seed),
                              collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))
    eval_loader = DataLoader(held_out, batch_size=config.eval_batch_size or config.batch_size, shuffle=False,
                             collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))
    return train_loader, eval_loader


def align_pad_token(adapted: AdaptedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder classifiers find each sequence's last token through ``config.pad_token_id``: give it the
    tokenizer's when the model has none (logged, never silent)."""
    model_config = adapted.model.config
    if adapted.config.model.task == "seq-cls" and getattr(model_config, "pad_token_id", None) is None:
        model_config.pad_token_id = tokenizer.pad_token_id
        info("model.config.pad_token_id was unset; using the tokenizer's (%d)", tokenizer.pad_token_id)


def restore_progress(run: Run, state: dict[str, Any]) -> None:
    """Optimizer, schedule, RNG and counters of a step checkpoint (its adapters are already loaded)."""
    checkpoints, plan = run.checkpoints, run.plan
    if state["steps_per_epoch"] != plan.steps_per_epoch:
        raise CheckpointError(
            f"--resume: the checkpoint in {checkpoints} ran {state['steps_per_epoch']} steps per epoch, this config "
            f"{plan.steps_per_epoch}; the data, batch_size, grad_accum or process count changed. Restore them or "
            f"start a new run"
        )
    if plan.total_steps < state["step"]:
        length = "train.max_steps" if run.config.max_steps is not None else "train.epochs"
        raise ResumeError(f"--resume: the run in {checkpoints} already reached step {state['step']}, this config ends "
                          f"at step {plan.total_steps}; give {length} a length beyond step {state['step']}")
    if state["total_steps"] != plan.total_steps:
        info("--resume: %d steps instead of %d; the learning-rate schedule follows the new length",
             plan.total_steps, state["total_steps"])
    try:
        run.adamw.load_state_dict(shard_optimizer_state(state["optimizer"], run.adamw))
    except ValueError as error:
        raise CheckpointError(f"--resume: the optimizer state in {checkpoints} does not fit this run ({error}); "
                              f"did weight_decay or LoRA+ settings change? Restore them or start a new run") from None
    run.scheduler.load_state_dict(state["scheduler"])
    set_peak_lr(run.adamw, run.scheduler, run.config.lr)  # the saved state holds the run's lr: --override's wins
    run.step, run.saved_step, run.history = state["step"], state["step"], list(state["history"])
    run.loss_sum, run.loss_steps = state["loss_sum"], state["loss_steps"]
    run.runtime_before = state.get("train_runtime_s", 0.0)  # absent in checkpoints written before it was saved
    set_rng_state(state["rng"])


def finished_results(run: Run) -> dict[str, float] | None:
    """The final metrics of a run that already finished at its last checkpoint's step (its final checkpoint and
    metrics.json written); None when something is left to do."""
    if run.step < run.plan.total_steps:
        return None
    try:
        manifest = read_manifest(run.output_dir)
        metrics = json.loads((run.output_dir / METRICS_FILE).read_text())
    except (CheckpointError, OSError, ValueError):  # not written yet, or damaged: finish() writes them again
        return None
    training = manifest.get("training")
    if not isinstance(training, dict) or training.get("steps") != run.step or not isinstance(metrics, dict):
        return None
    return {key: value for key, value in metrics.items() if key != "history"}


# ---- the loop ----------------------------------------------------------------------------------------------
def train_loop(run: Run) -> None:
    if evaluation_pending(run):
        record_evaluation(run)
    run.model.train()
    bar = tqdm(total=run.plan.total_steps, initial=run.step, desc="train", unit="step",
               disable=not run.is_main or None)
    while run.step < run.plan.total_steps:
        for micro_batches in chunked(epoch_batches(run), run.plan.grad_accum):
            loss = optimizer_step(run, micro_batches)
            after_step(run, loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if run.step >= run.plan.total_steps:
                break
        end_of_epoch(run)
    bar.close()


def evaluation_pending(run: Run) -> bool:
    """At the start of the loop: the baseline before the first step, or, after a resume, the evaluation that the
    interrupted run had due at its checkpoint's step (a checkpoint every ``save_every`` steps is written before
    the evaluation at the end of the same step's epoch, so a run killed in between has not recorded it)."""
    if run.step == 0:
        return run.config.eval_before_training
    recorded = bool(run.history) and run.history[-1]["step"] == run.step
    return run.plan.epoch_ends(run.step) and not recorded


def epoch_batches(run: Run) -> Iterable[dict[str, torch.Tensor]]:
    """The current epoch's micro-batches, skipping those consumed before a resume."""
    skip = run.plan.batches_done_in_epoch(run.step)
    loader = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    loader.set_epoch(run.plan.epoch_of(run.step))
    return loader


def chunked(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def optimizer_step(run: Run, micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """One optimizer step over ``micro_batches``; returns the step's mean loss per target (all processes)."""
    accelerator, task = run.accelerator, run.task
    count = accelerator.reduce(sum(target_count(b, task) for b in micro_batches), "sum").clamp(min=1)
    scale = accelerator.num_processes / count  # DDP and FSDP average over processes; undo that, divide by all targets
    total = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(run.model):
            loss_sum = example_losses(run.model, batch, task, run.config.label_smoothing).loss.sum()
            accelerator.backward(loss_sum * scale)
        total += loss_sum.detach()
    step_loss = (accelerator.reduce(total, "sum") / count).item()
    if not math.isfinite(step_loss):
        raise non_finite(run, step_loss)
    if run.config.max_grad_norm is not None:
        accelerator.clip_grad_norm_(trained_parameters(run), run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss


def trained_parameters(run: Run) -> list[torch.nn.Parameter]:
    return [p for group in run.adamw.param_groups for p in group["params"]]


def non_finite(run: Run, value: float) -> NonFiniteLossError:
    """The error of a NaN or infinite loss, with advice that works when followed: a resume applies a lower lr or
    a clipping norm given with --override (the data cannot change in a resumed run)."""
    config = run.config
    lower_lr = f"--override train.lr={config.lr / 10:g}"
    clip = f"--override train.max_grad_norm={config.max_grad_norm / 10 if config.max_grad_norm else 1.0:g}"
    if run.last_saved is None:
        return NonFiniteLossError(
            f"step {run.step + 1}: the training loss is {value}; training stopped before the update and no checkpoint "
            f"was saved yet. Lower train.lr (now {config.lr:g}), set train.max_grad_norm (now "
            f"{config.max_grad_norm}) or check the data, then start again"
        )
    return NonFiniteLossError(
        f"step {run.step + 1}: the training loss is {value}; training stopped before the update and the last good "
        f"checkpoint is {run.last_saved}. Continue from it with a lower learning rate (--resume {lower_lr}; it is "
        f"{config.lr:g}) or clipping ({clip}; it is {config.max_grad_norm}), or check the data and start a new run "
        f"(--overwrite)"
    )


def after_step(run: Run, loss: float) -> None:
    run.step += 1
    run.loss_sum += loss
    run.loss_steps += 1
    fired = step_adapters(run.layers, run.adamw, run.plan.progress(run.step))
    if fired:
        log_switch(run, fired)
    if run.step % run.config.log_every == 0:
        group = run.adamw.param_groups[0]
        info("step %d/%d  epoch %.2f  loss %.4f  lr %.3g", run.step, run.plan.total_steps,
             run.step / run.plan.steps_per_epoch, loss, group["lr"] / group["lr_scale"])
    if run.config.save_every is not None and run.step % run.config.save_every == 0:
        save(run)


def log_switch(run: Run, fired: dict[str, int]) -> None:
    name = next(iter(fired))
    info("step %d: schedule hook fired in %d adapter layer(s) (%s: %s); optimizer state of %d parameter(s) "
         "reset, learning-rate schedule unchanged", run.step, len(fired), name, run.layers[name].extra_repr(),
         sum(fired.values()))


def end_of_epoch(run: Run) -> None:
    if not run.plan.epoch_ends(run.step):
        return
    record_evaluation(run)
    if run.config.save_every is None and run.step < run.plan.total_steps:
        save(run)


def record_evaluation(run: Run) -> None:
    metrics = evaluate(run.accelerator, run.model, run.eval_loader, run.task)
    train_loss = run.loss_sum / run.loss_steps if run.loss_steps else None
    epoch = round(run.step / run.plan.steps_per_epoch, 4)
    row = {"epoch": epoch, "step": run.step, "train_loss": train_loss, **metrics}
    run.history.append(row)
    run.loss_sum, run.loss_steps = 0.0, 0
    info("eval at step %d: %s", run.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


# ---- saving ------------------------------------------------------------------------------------------------
def trainer_state(run: Run) -> dict[str, Any]:
    return {
        "step": run.step,
        "steps_per_epoch": run.plan.steps_per_epoch,
        "total_steps": run.plan.total_steps,
        "optimizer": whole_optimizer_state(run.adamw),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(),
        "history": run.history,
        "loss_sum": run.loss_sum,
        "loss_steps": run.loss_steps,
        "train_runtime_s": run.runtime,
        "data": run.data_digests,
    }


def save(run: Run) -> None:
    """A step checkpoint, written by the main process while the others wait (every process takes part in
    gathering sharded tensors first)."""
    with whole_parameters(saved_parts(run.adapted)):
        state = trainer_state(run)
        if run.is_main:
            try:
                run.last_saved = save_training_checkpoint(run.adapted, run.checkpoints, run.step, state,
                                                          run.config.keep_checkpoints)
            except DiskFullError as error:
                kept = f"the last good checkpoint is {run.last_saved}" if run.last_saved else "none was saved before"
                raise DiskFullError(f"step {run.step}: {error}; {kept}, continue from it with --resume") from None
            info("checkpoint saved: %s", run.last_saved)
    run.saved_step = run.step
    run.accelerator.wait_for_everyone()


def saved_parts(adapted: AdaptedModel) -> list[torch.nn.Module]:
    """The modules whose tensors a checkpoint holds: the adapter layers and the trained modules (task head)."""
    return [*adapted.layers.values(), *saved_modules(adapted).values()]


def drop_autocast_wrapper(model: torch.nn.Module) -> None:
    """Give the model back its own ``forward`` (accelerate's mixed-precision prepare wraps it in autocast and keeps
    the original; its ``unwrap_model`` would also strip transformers' own forward decorators)."""
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        model.forward = original


def write_results(run: Run, metrics: dict[str, float]) -> None:
    """The final adapter checkpoint and metrics.json in ``output_dir``; a full disk names what is kept."""
    try:
        save_checkpoint(run.adapted, run.output_dir, extra={"training": {"steps": run.step, "metrics": metrics}})
        write_metrics(run.output_dir, metrics, run.history)
    except (OSError, SafetensorError) as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(
            f"step {run.step}: training finished and its last step checkpoint {run.last_saved} is saved, but "
            f"{disk_full(run.output_dir, tensor_bytes(checkpoint_tensors(run.adapted)), error)}; then run again "
            f"with --resume to write the final checkpoint and metrics.json"
        ) from None


def finish(run: Run) -> dict[str, float]:
    """Save the last step checkpoint and the final adapter checkpoint, write metrics.json, print the summary."""
    if run.saved_step != run.step:
        save(run)
    final = {k: v for k, v in run.history[-1].items() if k not in ("epoch", "step") and v is not None}
    metrics = {**final, "steps": run.step, "epochs": round(run.plan.epochs, 4),
               "train_runtime_s": round(run.runtime, 2)}
    if run.history[0]["step"] == 0:
        metrics.update({f"initial_{k}": v for k, v in run.history[0].items() if k.startswith("eval_")})
    with whole_parameters(saved_parts(run.adapted)):
        if run.is_main:
            write_results(run, metrics)
            info("training summary\n%s", format_history(run.history))
    run.accelerator.wait_for_everyone()
    return metrics
