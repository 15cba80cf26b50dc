"""Our LoRA against PEFT's: same weights, same outputs; PEFT folders in and out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from surgery.checkpoint import load_checkpoint
from surgery.peft_interop import PeftFormatError, export_peft, import_peft
from surgery.tolerances import layer_tolerance
from tests.tiny_models import random_ids, save_tiny_model, tiny_model

TOL = layer_tolerance(torch.float32)  # same formula in float32 through 2 layers, different op order

CASES = {  # arch -> (targets, task, fan_in_fan_out)
    "bert": (["query", "value"], TaskType.SEQ_CLS, False),
    "gpt2": (["c_attn", "c_proj"], TaskType.CAUSAL_LM, True),
    "llama": (["q_proj", "v_proj"], TaskType.CAUSAL_LM, False),
}


def trained_peft(arch: str, folder: Path, use_rslora: bool = False) -> PeftModel:
    targets, task, fan_in_fan_out = CASES[arch]
    config = LoraConfig(r=4, lora_alpha=12, target_modules=targets, task_type=task,
                        fan_in_fan_out=fan_in_fan_out, use_rslora=use_rslora)
    peft_model = get_peft_model(tiny_model(arch), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("arch", sorted(CASES))
def test_imported_peft_lora_equals_peft(arch: str, rslora: bool, tmp_path: Path) -> None:
    base = save_tiny_model(arch, tmp_path / "base")
    peft_model = trained_peft(arch, tmp_path / "peft", use_rslora=rslora)
    task = "seq-cls" if arch == "bert" else "causal-lm"
    ours = import_peft(tmp_path / "peft", tmp_path / "ckpt", base=str(base), task=task).model.eval()
    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        base_logits = tiny_model(arch)(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=TOL.atol, rtol=TOL.rtol)
        reloaded = load_checkpoint(tmp_path / "ckpt").model
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=TOL.atol, rtol=TOL.rtol)
    assert not torch.allclose(expected, base_logits, atol=1e-3)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_exported_lora_loads_in_peft(arch: str, tmp_path: Path) -> None:
    base = save_tiny_model(arch, tmp_path / "base")
    trained_peft(arch, tmp_path / "peft")
    task = "seq-cls" if arch == "bert" else "causal-lm"
    ours = import_peft(tmp_path / "peft", tmp_path / "ckpt", base=str(base), task=task)
    export_peft(ours, tmp_path / "peft_again")
    _, peft_task, _ = CASES[arch]
    auto = tiny_model(arch)
    again = PeftModel.from_pretrained(auto, tmp_path / "peft_again").eval()
    ids = random_ids(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours.model(input_ids=ids).logits,
                                   atol=TOL.atol, rtol=TOL.rtol)


def test_non_lora_peft_is_refused(tmp_path: Path) -> None:
    trained_peft("bert", tmp_path / "peft")
    config = (tmp_path / "peft" / "adapter_config.json")
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(PeftFormatError, match="use_dora=True is not plain LoRA"):
        import_peft(tmp_path / "peft", tmp_path / "ckpt", base="unused")


def test_missing_base_is_asked_for(tmp_path: Path) -> None:
    trained_peft("bert", tmp_path / "peft")
    with pytest.raises(PeftFormatError, match="pass --base MODEL"):
        import_peft(tmp_path / "peft", tmp_path / "ckpt")
