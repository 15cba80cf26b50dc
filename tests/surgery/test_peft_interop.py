"""Our LoRA against PEFT's: same weights, same outputs; PEFT folders in and out."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from surgery.checkpoint import load_checkpoint
from surgery.peft_interop import PeftFormatError, export_peft, import_peft, main
from surgery.tolerances import layer_tolerance
from tests.tiny_models import random_ids, save_tiny_model, tiny_config, tiny_model

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


# ---- modules_to_save: imported as trained modules, logits equal PEFT's ------------------------------------
SAVED_CASES = {  # name -> (arch, task, num_labels, targets, modules_to_save, module keys our checkpoint must hold)
    "bert-pooler": ("bert", TaskType.SEQ_CLS, 2, ["query", "value"], ["pooler.dense"],
                    ["bert.pooler.dense.weight", "classifier.weight"]),
    "llama-3-labels": ("llama", TaskType.SEQ_CLS, 3, ["q_proj", "v_proj"], None, ["score.weight"]),
    # PEFT matches plain suffixes: "norm" takes model.norm and every input_/post_attention_layernorm
    "llama-norm": ("llama", TaskType.CAUSAL_LM, 2, ["q_proj"], ["norm"],
                   ["model.norm.weight", "model.layers.0.input_layernorm.weight",
                    "model.layers.1.post_attention_layernorm.weight"]),
    "gpt2-ln_f": ("gpt2", TaskType.CAUSAL_LM, 2, ["c_attn"], ["ln_f"], ["transformer.ln_f.weight"]),
}


def base_with_labels(arch: str, task: TaskType, num_labels: int) -> torch.nn.Module:
    """A tiny random model of ``num_labels`` labels (seq-cls) or a causal LM, seed 0."""
    if task == TaskType.CAUSAL_LM:
        return tiny_model(arch, task="causal-lm")
    config = tiny_config(arch)
    config.num_labels = num_labels
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()


def peft_with_saved_modules(case: str, root: Path) -> tuple[PeftModel, torch.nn.Module, Path]:
    """(PEFT model with random LoRA and modules_to_save, an untouched copy of its base, the saved base folder)."""
    arch, task, num_labels, targets, saved, _ = SAVED_CASES[case]
    base = base_with_labels(arch, task, num_labels)
    base.save_pretrained(root / "base", safe_serialization=True)
    reference = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=targets, task_type=task, modules_to_save=saved,
                        fan_in_fan_out=arch == "gpt2")
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(param + torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(root / "peft")
    return peft_model.eval(), reference, root / "base"


@pytest.mark.parametrize("case", sorted(SAVED_CASES))
def test_modules_to_save_import_as_trained_modules(case: str, tmp_path: Path) -> None:
    """Every module PEFT saved becomes a trained module of the checkpoint: the reloaded checkpoint computes PEFT's
    logits (the seq-cls head's label count, 3 here for llama, is read from the saved head)."""
    peft_model, reference, base = peft_with_saved_modules(case, tmp_path)
    ours = import_peft(tmp_path / "peft", tmp_path / "ckpt", base=str(base))
    saved, base_state = load_file(tmp_path / "ckpt" / "adapter.safetensors"), reference.state_dict()
    for key in SAVED_CASES[case][-1]:  # held, and trained (not the base's values)
        assert f"module.{key}" in saved, sorted(saved)
        assert not torch.equal(saved[f"module.{key}"], base_state[key]), key
    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        reloaded = load_checkpoint(tmp_path / "ckpt").model.eval()
        torch.testing.assert_close(ours.model.eval()(input_ids=ids).logits, expected, atol=TOL.atol, rtol=TOL.rtol)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=TOL.atol, rtol=TOL.rtol)
        assert not torch.allclose(expected, reference(input_ids=ids).logits, atol=1e-3)


def test_cli_num_labels_imports_a_three_label_classifier(tmp_path: Path) -> None:
    peft_model, _, base = peft_with_saved_modules("llama-3-labels", tmp_path)
    argv = ["import", str(tmp_path / "peft"), "--out", str(tmp_path / "ckpt"), "--base", str(base),
            "--num-labels", "3"]
    assert main(argv) == 0
    reloaded = load_checkpoint(tmp_path / "ckpt")
    assert reloaded.config.model.num_labels == 3
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=TOL.atol, rtol=TOL.rtol)
