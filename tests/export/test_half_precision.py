"""Half precision end to end: checkpoints whose base is stored in bfloat16 or float16 fold, export and verify.

What "rounded once to the output dtype" means (METHODS.md: folds accumulate in float32 and round once), per --dtype:
fp32: no rounding of the fold at all, the graph carries W0 (upcast exactly) + delta (float32); fp16: one rounding of
that float32 sum to float16, which the graph's float16 conversion then keeps exactly; bf16: refused, onnxruntime's CPU
provider (which verifies every export) has no bfloat16 MatMul.

References: the export against the unfolded PyTorch model run in float32 with the half-precision base upcast exactly
(so the only differences are the export's own), at MODEL[float32] with identical greedy tokens for fp32 and at
MODEL[float16] for fp16; each folded weight against W0 + delta in float64, next to PEFT's merge (the delta rounded to
the base dtype first): ours is never further. Tiny random Llama (nn.Linear) and GPT-2 (Conv1D), weights ~N(0, 0.3),
adapters randomised to non-trivial values or trained for a few steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from peft import PeftModel
from torch import nn

from export.exporters import CAUSAL_LM, model_task
from export.fold import FoldError, LayerFold, fold_model, static_weight
from export.onnx import (
    EXPORT_DTYPES,
    cpu_bf16_problem,
    export_checkpoint,
    export_tolerance,
    main,
    model_dtype,
)
from export.reference import main_output, record_reference, round_outputs
from surgery.checkpoint import load_checkpoint, save_checkpoint
from surgery.config import parse_config
from surgery.layers import weight_out_in
from surgery.model import load_model
from surgery.peft_interop import export_peft
from surgery.rewrite import AdaptedModel, adapter_layers, apply_surgery
from surgery.tolerances import MODEL
from tests.fs import tree_digest
from tests.export.checkpoints import (  # noqa: F401  (single_torch_thread: a fixture)
    TARGETS, adapted_model, save_lively_base, single_torch_thread, task_of)
from tests.export.tiny_exports import word_tokenizer
from tests.method_configs import small_method
from tests.tiny_models import random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT = dict(backend="torch", latency=False, fp16_check=False, log=lambda _: None)


# ---- bases and checkpoints ----------------------------------------------------------------------------------------
def save_half_base(arch: str, dtype: str, folder: Path) -> Path:
    """A tiny decoder stored in ``dtype`` (a checkpoint as users have them) with a word tokenizer. Weight matrices
    ~N(0, 0.3), as tests.export.checkpoints.save_lively_base: logits reach ~5, so greedy tokens mean something."""
    model = tiny_model(arch, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.to(HALF[dtype]).save_pretrained(folder, safe_serialization=True)
    word_tokenizer(encoder=False).save_pretrained(folder)
    return folder


def surgery_config(base: Path, arch: str, dtype: str, method: str, out: Path, **train: object) -> dict:
    config = {"model": {"name_or_path": str(base), "task": "causal-lm", "dtype": dtype}, "targets": TARGETS[arch],
              "method": small_method(method), "output_dir": str(out)}
    return {**config, "train": train} if train else config


def half_adapted(base: Path, arch: str, dtype: str, method: str, seed: int = 3) -> AdaptedModel:
    """Surgery on the half-precision base (adapters in float32), every adapter parameter randomised (std 0.2)."""
    config = parse_config(surgery_config(base, arch, dtype, method, base / "unused"))
    adapted = apply_surgery(load_model(config.model), config)
    generator = torch.Generator().manual_seed(seed)
    for layer in adapted.layers.values():
        layer.randomize_(generator, std=0.2)
    return adapted


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("half")


@pytest.fixture(scope="module")
def bases(root: Path) -> dict[tuple[str, str], Path]:
    return {(arch, dtype): save_half_base(arch, dtype, root / f"{arch}-{dtype}")
            for arch in ("llama", "gpt2") for dtype in HALF}


def checkpoint(bases: dict, root: Path, arch: str, dtype: str, method: str) -> Path:
    out = root / f"ckpt-{arch}-{dtype}-{method}"
    if not (out / "checkpoint.json").is_file():
        save_checkpoint(half_adapted(bases[arch, dtype], arch, dtype, method), out)
    return out


# ---- the fold: float32 accumulation, one rounding, never worse than PEFT's merge ----------------------------------
def dense_records(layers: list[LayerFold]) -> list[LayerFold]:
    records = [r for r in layers if r.weight_error is not None]
    assert records, "the methods here all merge into a dense weight"
    return records


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16], ids=["base-dtype", "fp32", "fp16"])
@pytest.mark.parametrize("dtype", sorted(HALF))
@pytest.mark.parametrize("arch, method", [("llama", "proda"), ("gpt2", "lora"), ("llama", "pera")])
def test_each_fold_is_never_further_from_float64_than_peft_merge(bases, arch: str, method: str, dtype: str,
                                                                  out_dtype: torch.dtype | None) -> None:
    adapted = half_adapted(bases[arch, dtype], arch, dtype, method)
    folded = fold_model(adapted, dtype=out_dtype)
    for record in dense_records(folded.layers):
        assert adapted.layers[record.name].static_update(torch.float32).abs().max() > 1e-2, "a non-trivial update"
        assert record.base_dtype == dtype
        assert record.weight_dtype == str(out_dtype or HALF[dtype]).removeprefix("torch.")
        assert record.weight_error <= record.peft_weight_error, record
        if out_dtype == torch.float32:  # no rounding at all against PEFT's two to the base dtype
            assert record.weight_error < record.peft_weight_error / 1000, record
        if out_dtype == torch.float16 and dtype == "bfloat16":  # one float16 rounding against bfloat16 ones
            assert record.weight_error < record.peft_weight_error / 4, record


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float32_fold_of_a_bfloat16_base_is_w0_plus_delta_unrounded(bases, arch: str) -> None:
    adapted = half_adapted(bases[arch, "bfloat16"], arch, "bfloat16", "lora")
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    folded = fold_model(adapted, dtype=torch.float32)
    for name, layer in adapted.layers.items():
        weight = static_weight(name, folded.model.get_submodule(name))
        w0, delta = layer.merge_base.detach(), layer.static_update(torch.float32)
        assert weight.dtype == torch.float32 and torch.equal(weight, w0.float() + delta), name
        assert not torch.equal(weight, (w0.float() + delta).bfloat16().float()), "a rounded fold would pass too"
        assert (weight - w0.float()).abs().max() > 1e-2, "the fold differs from the base"
    for key, tensor in adapted.model.state_dict().items():
        assert torch.equal(tensor, before[key]), f"folding changed the unfolded model's {key}"
    embeddings = adapted.model.get_input_embeddings().weight
    assert folded.model.get_input_embeddings().weight is embeddings, "untouched tensors stay shared, in bfloat16"


def test_lora_merge_is_at_least_as_close_to_float64_as_peft_merge_and_unload(bases, root: Path) -> None:
    """The same LoRA adapter on the same bfloat16 Llama: our folds (bfloat16 as PyTorch deploys it, float32 as the fp32
    export carries it) against PEFT's merge_and_unload, unsafe (in-place add) and safe_merge (delta rounded first)."""
    base = bases["llama", "bfloat16"]
    adapted = half_adapted(base, "llama", "bfloat16", "lora")
    peft_dir = export_peft(adapted, root / "peft-llama-bf16")
    exact = {name: layer.merge_base.double() + layer.static_update(torch.float64)
             for name, layer in adapted.layers.items()}

    def worst(model: nn.Module) -> dict[str, float]:
        return {name: float((weight_out_in(model.get_submodule(name)).double() - w).abs().max())
                for name, w in exact.items()}

    peft = {}
    for safe in (False, True):
        peft_model = PeftModel.from_pretrained(load_model(adapted.config.model), peft_dir)
        merged = peft_model.merge_and_unload(safe_merge=safe)
        assert weight_out_in(merged.get_submodule(next(iter(exact)))).dtype == torch.bfloat16
        peft[safe] = worst(merged)
    ours_bf16 = worst(fold_model(adapted).model)
    ours_fp32 = worst(fold_model(adapted, dtype=torch.float32).model)
    for name in exact:
        assert ours_bf16[name] <= min(peft[False][name], peft[True][name]), (name, ours_bf16[name], peft)
        assert ours_fp32[name] < peft[False][name] / 1000, (name, ours_fp32[name], peft[False][name])
    assert any(ours_bf16[n] < peft[True][n] for n in exact), "safe_merge's two roundings lose somewhere"


def test_a_fold_beyond_float16_range_is_refused_naming_the_layer(bases) -> None:
    adapted = half_adapted(bases["llama", "bfloat16"], "llama", "bfloat16", "lora")
    name = next(iter(adapted.layers))
    with torch.no_grad():
        adapted.layers[name].base.weight[0, 0] = 1e5  # fine in bfloat16 (max 3.4e38), beyond float16's 65504
    before = adapted.layers[name].base.weight.clone()
    with pytest.raises(ValueError, match=rf"layer '{name}' \(lora\).*beyond float16's largest value.*--dtype fp32"):
        fold_model(adapted, dtype=torch.float16)
    assert torch.equal(adapted.layers[name].base.weight, before)
    fold_model(adapted, dtype=torch.float32)  # the same model folds where the range allows it


def test_a_wrong_half_precision_fold_still_stops_the_fold(bases, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-layer check keeps its teeth in float32: a fold that rounds the delta away is caught."""
    from surgery.methods.lora import LoRALayer

    monkeypatch.setattr(LoRALayer, "static_update", lambda self, dtype: torch.zeros_like(self.base_weight, dtype=dtype))
    adapted = half_adapted(bases["llama", "bfloat16"], "llama", "bfloat16", "lora")
    with pytest.raises(FoldError, match="differs from the unfolded layer"):
        fold_model(adapted, dtype=torch.float32)


# ---- the tolerance and the reference ------------------------------------------------------------------------------
def test_export_tolerance_is_the_export_dtype_entry_against_a_float32_reference() -> None:
    assert export_tolerance("fp32") == MODEL[torch.float32]
    assert export_tolerance("fp16") == MODEL[torch.float16]
    for dtype, tolerance in MODEL.items():
        assert tolerance.reason, f"MODEL[{dtype}] has no reason"
    bf16, fp16 = MODEL[torch.bfloat16], MODEL[torch.float16]
    ratio = torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float16).eps  # 8: the entry's derivation
    assert (bf16.atol, bf16.rtol) == pytest.approx((ratio * fp16.atol, ratio * fp16.rtol))


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_the_reference_of_a_half_base_computes_in_float32_without_a_float32_copy(bases, dtype: str) -> None:
    """record_reference upcasts each module's weights while it runs: the outputs of the whole model upcast (exactly
    equal), the half weights back in place afterwards, and never more than one module's float32 copy at a time."""
    adapted = half_adapted(bases["llama", dtype], "llama", dtype, "lora")
    model = adapted.model.eval()
    assert model_dtype(model) == HALF[dtype], "the stored weights' dtype, not the float32 adapters'"
    stored = {name: (param.data_ptr(), param.dtype) for name, param in model.named_parameters()}
    float32_at_once: list[int] = []

    def count(*_):  # float32 elements held by parameters stored in half precision, as each module returns (the
        # float32_compute hooks come after this one: a module's own upcast weights are still float32 then)
        float32_at_once.append(sum(p.numel() for n, p in model.named_parameters()
                                   if p.dtype == torch.float32 and stored[n][1] != torch.float32))

    hooks = [module.register_forward_hook(count) for module in model.modules()]
    ours = record_reference(model, CAUSAL_LM)
    for hook in hooks:
        hook.remove()
    assert all((param.data_ptr(), param.dtype) == stored[name] for name, param in model.named_parameters()), \
        "the half weights are back in place"
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert 0 < max(float32_at_once) <= largest, "one module's float32 copy at a time"
    upcast = record_reference(copy.deepcopy(model).float(), CAUSAL_LM)
    for a, b in zip(ours.cases, upcast.cases, strict=True):
        np.testing.assert_array_equal(a.expected, b.expected)
        np.testing.assert_array_equal(a.step_logits, b.step_logits)
    np.testing.assert_array_equal(ours.greedy.tokens, upcast.greedy.tokens)
    half = main_output(model, ours.cases[0].inputs, CAUSAL_LM)  # the model computing in its own dtype
    assert not np.array_equal(half, ours.cases[0].expected), "the reference is computed upcast, not in half"


FLOOR_CASES = [("llama", "lora"), ("bert", "s_loda")]  # S-LoDA reads its base's bias without running the base


@pytest.mark.parametrize("arch, method", FLOOR_CASES, ids=[f"{a}-{m}" for a, m in FLOOR_CASES])
def test_the_float16_floor_is_the_model_stored_in_float16(root: Path, arch: str, method: str) -> None:
    """record_reference(floor_dtype=float16) runs a float32 model as if stored in float16 (base weights and every
    module's outputs rounded; adapters float32, surgery's design for half bases), one module at a time: exactly a
    copy rounded that way, the float32 weights back in place after."""
    base = save_lively_base(arch, root / f"floor-{arch}")
    model = adapted_model(base, method, task_of(arch), TARGETS[arch]).model.eval()
    stored = {name: (param.data_ptr(), param.dtype) for name, param in model.named_parameters()}
    task = model_task(model)
    reference = record_reference(model, task, greedy=False, floor_dtype=torch.float16)
    assert all((param.data_ptr(), param.dtype) == stored[name] for name, param in model.named_parameters()), \
        "the float32 weights are back in place"
    rounded = copy.deepcopy(model)
    layers = adapter_layers(rounded)
    adapters = {id(p) for layer in layers.values() for p in layer.adapter_params().values()}
    derived = {id(t) for layer in layers.values() for t in layer.derived_tensors().values()}
    for tensor in [*rounded.parameters(), *rounded.buffers()]:
        if tensor.is_floating_point() and (id(tensor) in derived or
                                           (isinstance(tensor, nn.Parameter) and id(tensor) not in adapters)):
            tensor.data = tensor.data.half().float()
    for module in rounded.modules():
        module.register_forward_hook(lambda _m, _a, out: round_outputs(out, torch.float16))
    for case in reference.cases:
        np.testing.assert_array_equal(case.floor, main_output(rounded, case.inputs, task))
        assert np.abs(case.floor - case.expected).max() > 0, "float16 rounding moved the outputs"


def test_the_float16_floor_is_the_size_of_pytorchs_own_float16_error(bases) -> None:
    """The floor stands for float16 inference: on a float16 Llama it lands within a small factor of PyTorch running
    the model in float16 itself (slow on CPUs at 7B, which is why the floor rounds instead)."""
    model = half_adapted(bases["llama", "float16"], "llama", "float16", "lora").model.eval()
    reference = record_reference(model, CAUSAL_LM, greedy=False, floor_dtype=torch.float16)
    for case in reference.cases:
        floor = np.abs(case.floor - case.expected).max()
        native = np.abs(main_output(model, case.inputs, CAUSAL_LM) - case.expected).max()  # float16 kernels
        assert native / 4 <= floor <= native * 4, (case.name, floor, native)


# ---- --dtype bf16 -------------------------------------------------------------------------------------------------
def test_onnxruntime_cpu_cannot_run_a_bfloat16_matmul() -> None:
    """Why --dtype bf16 is refused (onnxruntime 1.32: no bfloat16 MatMul/Gemm/Add kernel on the CPU provider). Should
    a later onnxruntime run it, this fails: then write the bf16 graph conversion and verify at MODEL[bfloat16]."""
    problem = cpu_bf16_problem()
    assert problem is not None and "MatMul" in problem


def test_dtype_bf16_is_refused_before_anything_is_written(bases, root: Path, capsys) -> None:
    ckpt = checkpoint(bases, root, "llama", "bfloat16", "lora")
    out = root / "bf16-refused"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")  # would be cleared by an export that started
    before, before_out = tree_digest(ckpt), tree_digest(out)
    assert main([str(ckpt), "--merge", "--dtype", "bf16", "--out", str(out), "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "--dtype bf16" in err and "CPU execution provider cannot run a bfloat16 graph" in err
    assert "MatMul" in err and "--dtype fp16" in err and "--dtype fp32" in err
    assert tree_digest(ckpt) == before and tree_digest(out) == before_out
    assert "bf16" in EXPORT_DTYPES, "offered by --dtype, so the refusal is ours, with its reason"


# ---- end to end: export, verify, what the graph carries ----------------------------------------------------------
def initializers(path: Path) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


def carries(arrays: list[np.ndarray], weight: torch.Tensor) -> bool:
    """Whether the graph holds ``weight`` (d_out, d_in) exactly, either way round (MatMul takes it transposed)."""
    expected = weight.numpy()
    return any(a.dtype == expected.dtype and a.shape == s and np.array_equal(a, e)
               for a in arrays for e, s in ((expected, expected.shape), (expected.T, expected.T.shape)))


@pytest.mark.parametrize("arch, dtype, method, export_dtype", [
    ("llama", "bfloat16", "lora", "fp32"),
    ("gpt2", "float16", "pera", "fp32"),
    ("llama", "bfloat16", "pera", "fp16"),
    ("gpt2", "bfloat16", "lora", "fp16"),
    ("llama", "float16", "proda", "fp32"),
])
def test_half_base_exports_with_each_fold_rounded_once(bases, root: Path, arch: str, dtype: str, method: str,
                                                       export_dtype: str) -> None:
    ckpt = checkpoint(bases, root, arch, dtype, method)
    out = root / f"onnx-{arch}-{dtype}-{method}-{export_dtype}"
    report = export_checkpoint(ckpt, out, merge=True, dtype=export_dtype, **EXPORT)
    assert report["passed"] and report["with_past"], report["errors"]
    wanted = MODEL[EXPORT_DTYPES[export_dtype]]  # the reference computes in float32: the export dtype's entry
    assert (report["parity"]["tolerance"]["atol"], report["parity"]["tolerance"]["rtol"]) == (wanted.atol, wanted.rtol)
    if export_dtype == "fp32":  # an fp32-exact reference: greedy decoding must agree token for token
        assert report["parity"]["greedy_match"] is True
    else:  # fp16: the reference also ran in float16 (the floor), and the export is no further from float32
        floors = [case["floor_abs_diff"] for case in report["parity"]["cases"]]
        assert all(floor is not None and floor > 0 for floor in floors), report["parity"]["cases"]
        assert report["parity"]["greedy"]["passed"], report["parity"]["greedy"]
    out_dtype = EXPORT_DTYPES[export_dtype]
    for record in report["layers"]:
        assert record["base_dtype"] == dtype and record["weight_dtype"] == str(out_dtype).removeprefix("torch.")
        assert record["weight_error"] <= record["peft_weight_error"], record
    assert json.loads((out / "export_report.json").read_text())["layers"] == report["layers"]
    if method == "proda":  # its static weight rides in one matmul with the residual's up-projection: no plain W'
        return
    arrays = initializers(out / "model.onnx")
    unfolded = load_checkpoint(ckpt)
    for name, layer in unfolded.layers.items():
        exact = layer.merge_base.detach().float() + layer.static_update(torch.float32)  # W0 upcast + delta
        assert (exact - layer.merge_base.float()).abs().max() > 1e-2, f"{name}: the fold differs from the base"
        assert carries(arrays, exact.to(out_dtype)), f"{name}: the graph lacks W0 + delta rounded once to {out_dtype}"
        assert not carries(arrays, exact.to(HALF[dtype]).to(out_dtype)), f"{name}: the fold was rounded to {dtype}"


def test_trained_bfloat16_llama_exports_fp32_with_greedy_tokens_equal(bases, root: Path) -> None:
    """A few real optimizer steps (the project's trainer) on a bfloat16 base, then the fp32 export."""
    from surgery.model import load_tokenizer
    from tests.train.helpers import task_files
    from train.trainer import train_adapters

    base, out = bases["llama", "bfloat16"], root / "trained"
    train = {"data": task_files(root / "data", "causal-lm", n_train=16, n_eval=8), "max_steps": 4,
             "batch_size": 8, "lr": 1e-2, "eval_before_training": False, "log_every": 1000}
    config = parse_config(surgery_config(base, "llama", "bfloat16", "lora", out, **train))
    torch.manual_seed(0)
    adapted = apply_surgery(load_model(config.model), config)
    train_adapters(adapted, load_tokenizer(config.model), out)
    trained = load_checkpoint(out)
    assert all(layer.lora_B.abs().max() > 1e-3 for layer in trained.layers.values()), "B left its zero init"
    assert all(layer.base_weight.dtype == torch.bfloat16 for layer in trained.layers.values())
    report = export_checkpoint(out, out / "onnx", merge=True, dtype="fp32", **EXPORT)
    assert report["passed"] and report["parity"]["greedy_match"] is True
    assert report["parity"]["tolerance"]["atol"] == MODEL[torch.float32].atol
    assert all(r["weight_error"] < r["peft_weight_error"] for r in report["layers"])


def test_fp16_export_of_weights_beyond_float16_range_exits_2_and_writes_nothing(bases, root: Path, capsys) -> None:
    """A bfloat16 base may hold values float16 cannot (|w| > 65504): the fold says which layer, nothing is written."""
    name = "model.layers.0.self_attn.q_proj"
    huge_base = root / "llama-bfloat16-huge"
    model = load_model(parse_config(surgery_config(bases["llama", "bfloat16"], "llama", "bfloat16", "lora",
                                                   root / "unused")).model)
    with torch.no_grad():
        model.get_submodule(name).weight[0, 0] = 1e5
    model.save_pretrained(huge_base, safe_serialization=True)
    word_tokenizer(encoder=False).save_pretrained(huge_base)
    ckpt = root / "ckpt-huge"
    save_checkpoint(half_adapted(huge_base, "llama", "bfloat16", "lora"), ckpt)
    out = root / "huge-onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    before, before_out = tree_digest(ckpt), tree_digest(out)
    code = main([str(ckpt), "--merge", "--dtype", "fp16", "--out", str(out), "--backend", "torch", "--no-latency",
                 "--no-fp16-check", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"layer '{name}' (lora)" in err and "beyond float16's largest value" in err and "--dtype fp32" in err
    assert tree_digest(ckpt) == before and tree_digest(out) == before_out
