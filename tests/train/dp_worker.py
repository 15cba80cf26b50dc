"""One training run from a YAML config, as ``surgery.apply`` does it but with the adapter initialisation seeded:
the data-parallel test launches it with ``accelerate launch`` (2 processes) and runs it once on its own.

    python -m tests.train.dp_worker CONFIG.yaml
"""

from __future__ import annotations

import sys

from surgery.config import load_config
from tests.train.helpers import build
from train.trainer import train_adapters

if __name__ == "__main__":
    config = load_config(sys.argv[1])
    adapted, tokenizer = build(config, seed=0)
    train_adapters(adapted, tokenizer, config.output_dir)
