"""Model surgery: swap target Linear/Conv1D layers of a transformers model for adapter layers."""
