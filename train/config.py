"""The ``train:`` section of the YAML config, validated before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: Path = Field(description="JSONL/CSV/Parquet file or a `datasets` folder saved with save_to_disk")
    eval: Path | None = Field(None, description="held-out file; when omitted, a seeded split of `train`")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of `train` held out when `eval` is omitted")
    max_length: int = Field(128, gt=0, description="tokens per example after truncation")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig
    epochs: float | None = Field(None, gt=0, description="passes over the data (or set max_steps)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, gt=0, description="examples per device per forward pass")
    grad_accum: int = Field(1, gt=0, description="forward passes per optimizer step")
    lr: float = Field(2.0e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of steps with linear warm-up")
    warmup_steps: int | None = Field(None, ge=0, description="warm-up steps; overrides warmup_ratio")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null turns it off")
    mixed_precision: str = Field("no", pattern="^(no|bf16|fp16)$", description="autocast where the device has it")
    seed: int = 0
    save_every: int | None = Field(None, gt=0, description="checkpoint every N optimizer steps (and at the end)")
    log_every: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _length_given(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("train: set `epochs` or `max_steps` (neither was given)")
        return self
