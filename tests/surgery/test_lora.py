import pytest
import torch

from surgery.methods.lora import LoRAConfig, LoRALayer
from tests.surgery.method_harness import check_all

CONFIGS = [LoRAConfig(r=4), LoRAConfig(r=4, alpha=3.0, rslora=True), LoRAConfig(r=8, lora_plus_ratio=16)]


def lora_reference(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """METHODS.md: delta(x) = s B A x, with s = alpha / r (alpha / sqrt(r) for rsLoRA)."""
    cfg = layer.config
    s = cfg.resolved_alpha / (cfg.r ** 0.5 if cfg.rslora else cfg.r)
    return s * x @ (layer.lora_B.detach().double() @ layer.lora_A.detach().double()).t()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"r{c.r}-rs{c.rslora}")
def test_lora_matches_dense_reference(config: LoRAConfig) -> None:
    check_all(LoRALayer, config, lora_reference)


def test_lora_plus_ratio_scales_only_b() -> None:
    layer = LoRALayer(torch.nn.Linear(8, 6), LoRAConfig(r=2, lora_plus_ratio=16))
    assert layer.lr_scale("lora_B") == 16 and layer.lr_scale("lora_A") == 1


def test_lora_fold_is_plain_layer_of_the_same_type() -> None:
    from transformers.pytorch_utils import Conv1D

    for base in (torch.nn.Linear(8, 6), Conv1D(6, 8)):
        fold = LoRALayer(base, LoRAConfig(r=2)).fold()
        assert type(fold.module) is type(base) and fold.residual is None
