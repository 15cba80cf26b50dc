"""Training the surgered model: ``train.trainer.train_adapters`` (called by ``python -m surgery.apply``), the data
it reads (``train.data``, ``train.encode``), its loss, optimizer, schedule, evaluation and checkpoints."""
