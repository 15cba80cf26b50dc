"""Fold, export, verify and run adapted models: ``python -m export.onnx CKPT --merge`` (see export/onnx.py)."""
