"""The ``train:`` section of the YAML config, validated before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: Path = Field(description="JSONL/CSV/Parquet file or a `datasets` folder saved with save_to_disk")
    eval: Path | None = Field(None, description="held-out file; when omitted, a seeded split of `train`")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of `train` held out when `eval` is omitted")
    max_length: int = Field(128, gt=0, description="tokens per example after truncation")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig = Field(description="the data files (section `train.data`)")
    epochs: float | None = Field(None, gt=0, description="passes over the data (or set max_steps)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, gt=0, description="examples per device per forward pass")
    eval_batch_size: int | None = Field(None, gt=0, description="examples per device in evaluation; batch_size if null")
    grad_accum: int = Field(1, gt=0, description="forward passes per optimizer step")
    lr: float = Field(2.0e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay on matrices (not on vectors)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of steps with linear warm-up")
    warmup_steps: int | None = Field(None, ge=0, description="warm-up steps (instead of warmup_ratio)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null turns it off")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy loss")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast where the device has it (a warning, and float32, where it has not)"
    )
    seed: int = Field(0, description="seeds data order, dropout and the eval split; same seed, same run")
    save_every: int | None = Field(
        None, gt=0, description="checkpoint every N optimizer steps; null: at every epoch end (always at the end)"
    )
    keep_checkpoints: int = Field(2, gt=0, description="periodic checkpoints kept in output_dir/checkpoints")
    eval_before_training: bool = Field(True, description="evaluate once before the first step (the baseline)")
    log_every: int = Field(10, gt=0, description="log the training loss every N optimizer steps")

    @model_validator(mode="after")
    def _length_given(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("train: set `epochs` or `max_steps` (neither was given)")
        return self

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set:
            raise ValueError("train: warmup_steps and warmup_ratio are both set; keep one of them")
        return self

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps for a run of ``total_steps`` optimizer steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_ratio * total_steps)
