"""Write the cross-version set: tiny base model folders, LoRA and c3LA checkpoints on them, and what each computes.

    python -m tests.compat.write_checkpoints [ROOT]      # ROOT defaults to $CROSS_DIR, else build/cross

writes ``ROOT/v<transformers major>/``, replacing what was there:

    set.json                        the versions that wrote the set and its cases
    llama/, bert/, llama-rope/      base folders (config.json, model.safetensors, tokenizer), save_pretrained as is
    <case>/                         a checkpoint (adapter.safetensors, surgery.yaml, checkpoint.json) plus
      expected.safetensors          input_ids, the base model's logits and the adapted model's logits on them,
                                    token_ids of TEXT through the base's tokenizer

CI writes one set per transformers major (make test: 5.x, make test-compat: 4.x) and tests/compat/test_cross_read.py
in the other environment loads each checkpoint from its base folder and compares against these logits.
``llama-rope`` is the Llama with rope_theta 500000 (Llama 3's): transformers 5 writes it as ``rope_parameters``,
which 4.x does not read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from surgery.checkpoint import major, save_checkpoint
from surgery.model import load_model, load_tokenizer
from surgery.rewrite import AdaptedModel
from surgery.tolerances import model_tolerance
from tests.export.checkpoints import TARGETS, adapted_model, save_lively_base, task_of
from tests.tiny_models import random_ids

ROOT = Path(__file__).resolve().parents[2] / "build" / "cross"
SET_FILE = "set.json"
EXPECTED_FILE = "expected.safetensors"
TEXT = "the cat sat on the mat and it was good"
ROPE_THETA = 500000.0  # Llama 3's; the default is 10000


@dataclass(frozen=True)
class Case:
    name: str
    arch: str  # the architecture of the base (targets and task follow from it)
    base: str  # the base folder in the set
    method: str


CASES = (
    Case("llama-lora", "llama", "llama", "lora"),
    Case("llama-c3la", "llama", "llama", "c3la"),
    Case("bert-lora", "bert", "bert", "lora"),
    Case("bert-c3la", "bert", "bert", "c3la"),
    Case("llama-rope-lora", "llama", "llama-rope", "lora"),
)


def cross_root() -> Path:
    """Where the sets live: $CROSS_DIR (the Makefile exports it), else build/cross in the repository."""
    return Path(os.environ.get("CROSS_DIR") or ROOT)


def set_folder(root: Path, transformers_major: int) -> Path:
    return root / f"v{transformers_major}"


def fixed_inputs() -> torch.Tensor:
    """(2, 12) token ids: long enough for the rotary frequencies to matter."""
    return random_ids(2, 12, vocab=128, seed=11)


def save_rope_base(llama: Path, folder: Path) -> Path:
    """The ``llama`` base with rope_theta 500000, in whichever key this transformers writes it."""
    config = AutoConfig.from_pretrained(llama)
    if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers 5
        config.rope_parameters["rope_theta"] = ROPE_THETA
    else:  # transformers 4.x
        config.rope_theta = ROPE_THETA
    model = AutoModelForCausalLM.from_pretrained(llama, config=config).eval()
    default = AutoModelForCausalLM.from_pretrained(llama).eval()
    moved = (logits(model, fixed_inputs()) - logits(default, fixed_inputs())).abs().max().item()
    assert moved > 100 * model_tolerance(torch.float32).atol, f"rope_theta {ROPE_THETA} changed nothing ({moved:.2e})"
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(llama).save_pretrained(folder)
    return folder


def with_links(adapted: AdaptedModel) -> AdaptedModel:
    """c3LA with one finished link folded into the base and a fresh random B on the next window (as mid-chain)."""
    generator = torch.Generator().manual_seed(17)
    for layer in adapted.layers.values():
        if hasattr(layer, "switch_link"):
            layer.switch_link()
            layer.randomize_(generator, std=0.2)
    return adapted


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float().contiguous()


def write_case(case: Case, out: Path, base: Path) -> None:
    """The checkpoint of ``case`` on ``base`` and its expected.safetensors."""
    adapted = with_links(adapted_model(base, case.method, task_of(case.arch), TARGETS[case.arch], out=out))
    save_checkpoint(adapted, out)
    input_ids = fixed_inputs()
    base_model = load_model(adapted.config.model)
    expected = {"input_ids": input_ids, "base_logits": logits(base_model, input_ids),
                "logits": logits(adapted.model, input_ids),
                "token_ids": torch.tensor(load_tokenizer(adapted.config.model)(TEXT)["input_ids"])}
    tolerance = model_tolerance(torch.float32)
    lively = (expected["logits"] - expected["base_logits"]).abs().max().item()
    assert lively > 100 * tolerance.atol, f"{case.name}: the adapters barely change the logits ({lively:.2e})"
    save_file(expected, out / EXPECTED_FILE, metadata={"transformers": transformers.__version__})


def write_set(root: Path) -> Path:
    """Write this transformers major's set under ``root`` (replacing it) and return its folder."""
    folder = set_folder(root, major(transformers.__version__))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("llama", "bert"):
        save_lively_base(name, folder / name)
    save_rope_base(folder / "llama", folder / "llama-rope")
    for case in CASES:
        write_case(case, folder / case.name, folder / case.base)
    manifest = {"transformers": transformers.__version__, "torch": torch.__version__,
                "cases": [asdict(case) for case in CASES]}
    (folder / SET_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)  # tiny models; two spinning threads only slow a shared 2-core machine
    folder = write_set(Path(args[0]) if args else cross_root())
    print(f"wrote the cross-version set of transformers {transformers.__version__} to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
