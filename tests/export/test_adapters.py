"""``python -m export.onnx CKPT [CKPT ...] --adapters``: one unfolded base graph plus one ``.onnx_adapter`` per checkpoint
(export.adapters), run with ``export.run --adapter NAME``.

Each adapter active must give its own checkpoint's outputs (the folded export of the same checkpoint, at shapes the
exporter never traced, at the float32 MODEL tolerance; greedy tokens with the KV cache for decoders), no adapter the
base model's; sets that cannot share a graph are refused naming the difference, with nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.adapters import (ADAPTERS_FILE, AdapterSession, AdapterSetError, export_adapters, load_adapter,
                             quiet_options)
from export.decode import greedy
from export.onnx import export_checkpoint, main
from export.run import ExportFolderError, OnnxPipeline
from export.run import main as run_main
from export.verify import compare, onnx_feed, sample_inputs
from surgery.checkpoint import save_checkpoint
from surgery.config import ModelConfig, parse_config
from surgery.methods import METHODS
from surgery.model import load_model
from surgery.rewrite import apply_surgery
from surgery.tolerances import MODEL
from tests.export.checkpoints import (  # noqa: F401  (single_torch_thread: a fixture)
    adapted_model,
    make_checkpoint,
    save_lively_base,
    single_torch_thread,
)
from tests.fs import tree_digest
from tests.method_configs import small_method

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOL = MODEL[torch.float32]
SHAPES = ((3, 11), (1, 6))  # (batch, seq): the torch exporter traced (2, 8)
QUALIFYING = sorted(name for name, layer in METHODS.items() if layer.noop_params is not None)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def bases(root: Path) -> dict[str, Path]:
    return {"bert": save_lively_base("bert", root / "base_bert"),
            "bert_other": save_lively_base("bert", root / "base_bert_other", seed=7),
            "llama": save_lively_base("llama", root / "base_llama")}


def checkpoints(base: Path, method: str | dict, folder: Path, arch: str, count: int) -> list[Path]:
    """``count`` checkpoints of one method on one base, each with its own random (non-trivial) adapter weights."""
    return [make_checkpoint(base, method, folder / f"task{i}", arch, seed=20 + i) for i in range(count)]


@pytest.fixture(scope="module")
def encoder_set(root: Path, bases: dict[str, Path]) -> tuple[list[Path], Path, dict]:
    """Three LoRA checkpoints of the BERT classifier exported as one graph."""
    ckpts = checkpoints(bases["bert"], "lora", root / "bert_lora", "bert", 3)
    report = export_adapters(ckpts, root / "bert_lora_out", log=quiet)
    return ckpts, root / "bert_lora_out", report


@pytest.fixture(scope="module")
def decoder_set(root: Path, bases: dict[str, Path]) -> tuple[list[Path], Path, dict]:
    """Two ProDA checkpoints of the Llama decoder (with its KV cache) exported as one graph."""
    ckpts = checkpoints(bases["llama"], "proda", root / "llama_proda", "llama", 2)
    report = export_adapters(ckpts, root / "llama_proda_out", log=quiet)
    return ckpts, root / "llama_proda_out", report


def folded(ckpt: Path) -> Path:
    """The folded export of ``ckpt`` (made once)."""
    out = ckpt.parent / f"{ckpt.name}_folded"
    if not (out / "model.onnx").is_file():
        export_checkpoint(ckpt, out, merge=True, latency=False, fp16_check=False, log=quiet)
    return out / "model.onnx"


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), quiet_options(), providers=["CPUExecutionProvider"])


def first_output(sess: ort.InferenceSession | AdapterSession, batch: int, seq: int, seed: int = 4) -> np.ndarray:
    return sess.run(None, onnx_feed(sess, sample_inputs(128, batch, seq, seed)))[0]


def with_adapter(out: Path, name: str | None) -> AdapterSession:
    adapter = None if name is None else load_adapter(out / f"{name}.onnx_adapter")
    return AdapterSession(session(out / "model.onnx"), adapter)


# ---- the export ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["encoder_set", "decoder_set"])
def test_report_passes_and_lists_every_adapter(which: str, request: pytest.FixtureRequest) -> None:
    ckpts, out, report = request.getfixturevalue(which)
    assert report["passed"] and not report["errors"]
    names = [ckpt.name for ckpt in ckpts]
    assert list(report["adapters"]["adapters"]) == names
    assert sorted(p.name for p in out.glob("*.onnx_adapter")) == sorted(f"{n}.onnx_adapter" for n in names)
    cases = [case["case"] for case in report["parity"]["cases"]]
    for label in [*names, "(no adapter: base model)"]:  # each adapter and the base verified against PyTorch
        assert any(case.startswith(label) for case in cases), label
    listing = json.loads((out / ADAPTERS_FILE).read_text())
    assert listing["adapters"][names[0]]["file"] == f"{names[0]}.onnx_adapter"


@pytest.mark.parametrize("which", ["encoder_set", "decoder_set"])
def test_each_adapter_matches_its_folded_export(which: str, request: pytest.FixtureRequest) -> None:
    ckpts, out, _ = request.getfixturevalue(which)
    outputs = {}
    for ckpt in ckpts:
        reference = session(folded(ckpt))
        active = with_adapter(out, ckpt.name)
        for batch, seq in SHAPES:
            expected = first_output(reference, batch, seq)
            difference = compare(f"{ckpt.name} {batch}x{seq}", first_output(active, batch, seq), expected, TOL)
            assert difference.within, difference
        outputs[ckpt.name] = first_output(active, *SHAPES[0])
    base = first_output(with_adapter(out, None), *SHAPES[0])
    values = [base, *outputs.values()]
    for i in range(len(values)):  # non-trivial adapters: every output differs from the others and the base
        for j in range(i + 1, len(values)):
            assert np.abs(values[i] - values[j]).max() > 100 * TOL.atol


def test_no_adapter_is_the_base_model(decoder_set, bases: dict[str, Path]) -> None:
    """The decoder has no trained head, so the base model is the plain pretrained model: PyTorch's logits."""
    _, out, _ = decoder_set
    model = load_model(ModelConfig(name_or_path=str(bases["llama"]), task="causal-lm")).eval()
    for batch, seq in SHAPES:
        inputs = sample_inputs(128, batch, seq, 4)
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(inputs["input_ids"]),
                             attention_mask=torch.from_numpy(inputs["attention_mask"])).logits.numpy()
        actual = first_output(with_adapter(out, None), batch, seq)
        assert compare("base", actual, expected, TOL, inputs["attention_mask"]).within


def test_decoder_greedy_tokens_match_the_folded_export(decoder_set) -> None:
    ckpts, out, _ = decoder_set
    prompt = sample_inputs(128, 2, 5, 9)["input_ids"]
    tokens = {}
    for ckpt in ckpts:
        expected = greedy(session(folded(ckpt)), prompt, 12)
        actual = greedy(with_adapter(out, ckpt.name), prompt, 12)  # with the KV cache, one token a step
        np.testing.assert_array_equal(actual, expected)
        tokens[ckpt.name] = actual
    assert not np.array_equal(*tokens.values())  # the two adapters generate differently


@pytest.mark.parametrize("method", [m for m in QUALIFYING if m not in ("lora", "proda")])
def test_every_qualifying_method_exports_swappable(method: str, root: Path, bases: dict[str, Path]) -> None:
    ckpts = checkpoints(bases["bert"], small_method(method), root / f"bert_{method}", "bert", 2)
    out = root / f"bert_{method}_out"
    report = export_adapters(ckpts, out, log=quiet)
    assert report["passed"], report["errors"]
    for ckpt in ckpts:
        expected = first_output(session(folded(ckpt)), *SHAPES[0])
        assert compare(method, first_output(with_adapter(out, ckpt.name), *SHAPES[0]), expected, TOL).within


@pytest.mark.parametrize("method", QUALIFYING)
def test_zero_noop_params_switch_the_adapter_off_exactly(method: str, bases: dict[str, Path]) -> None:
    """The method's declaration (surgery/methods/*.py noop_params): zeros there make delta exactly 0 whatever the
    other adapter tensors hold."""
    config = parse_config({"model": {"name_or_path": str(bases["bert"]), "task": "seq-cls"}, "targets": ["query"],
                           "method": small_method(method), "output_dir": "unused"})
    adapted = apply_surgery(load_model(config.model), config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=generator)
    for layer in adapted.layers.values():
        layer.randomize_(generator, std=0.5)
        with torch.no_grad():
            for name in type(layer).noop_params:
                layer.adapter_params()[name].zero_()
            assert torch.equal(layer.delta(x), torch.zeros_like(layer.delta(x)))


def test_non_qualifying_methods_say_why() -> None:
    for name, layer in METHODS.items():
        if layer.noop_params is None:
            assert "declares no adapter parameters" not in layer.not_swappable, name  # a reason of its own


# ---- running ------------------------------------------------------------------------------------------------------
def test_run_selects_the_adapter_per_call(encoder_set, capsys: pytest.CaptureFixture) -> None:
    ckpts, out, _ = encoder_set
    pipeline = OnnxPipeline.from_dir(out)
    texts = ["w1 w2 w3", "w4 w5"]
    results = {}
    for name in [None, *(c.name for c in ckpts), None]:
        pipeline.use_adapter(name)
        results.setdefault(name, pipeline.classify(texts))
        assert pipeline.classify(texts) == results[name]  # switching back and forth gives the same answers
    fresh = OnnxPipeline.from_dir(out, adapter=ckpts[1].name)
    assert fresh.classify(texts) == results[ckpts[1].name]
    probs = [results[name][0]["probs"] for name in results]
    assert len({tuple(p.values()) for p in probs}) == len(probs)
    assert run_main([str(out), "--text", "w1 w2", "--adapter", ckpts[2].name]) == 0
    assert "LABEL_" in capsys.readouterr().out


def test_run_refuses_an_unknown_adapter(encoder_set, capsys: pytest.CaptureFixture) -> None:
    ckpts, out, _ = encoder_set
    assert run_main([str(out), "--text", "w1 w2", "--adapter", "nope"]) == 2
    message = capsys.readouterr().err
    assert "'nope'" in message and all(c.name in message for c in ckpts)
    with pytest.raises(ExportFolderError, match="no adapter 'nope'"):
        OnnxPipeline.from_dir(out, adapter="nope")


def test_command_line_writes_the_set(root: Path, bases: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    ckpts = checkpoints(bases["bert"], "proda", root / "cli_proda", "bert", 2)
    out = root / "cli_proda_out"
    assert main([*map(str, ckpts), "--adapters", "--out", str(out)]) == 0
    assert "adapters: task0, task1" in capsys.readouterr().out
    assert (out / "task0.onnx_adapter").is_file() and (out / "task1.onnx_adapter").is_file()


# ---- refusals -----------------------------------------------------------------------------------------------------
def refused(ckpts: list[Path], root: Path, match: str, capsys: pytest.CaptureFixture) -> str:
    """The export is refused with exit 2 and a message matching ``match``; nothing under ``root`` changed."""
    before = tree_digest(root)
    out = root / "refused_out"
    assert main([*map(str, ckpts), "--adapters", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert match in message, message
    assert tree_digest(root) == before and not out.exists()
    return message


@pytest.fixture
def mismatch_root(root: Path, bases: dict[str, Path]) -> Path:
    folder = root / "mismatch"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    return folder


def test_refuses_checkpoints_of_different_methods(mismatch_root, bases, capsys) -> None:
    lora = make_checkpoint(bases["bert"], "lora", mismatch_root / "a", "bert")
    proda = make_checkpoint(bases["bert"], "proda", mismatch_root / "b", "bert")
    message = refused([lora, proda], mismatch_root, "differ in method.name ('lora' vs 'proda')", capsys)
    assert str(lora) in message and str(proda) in message and "method.name" in message


def test_refuses_checkpoints_of_different_ranks(mismatch_root, bases, capsys) -> None:
    r4 = make_checkpoint(bases["bert"], {"name": "lora", "r": 4}, mismatch_root / "a", "bert")
    r2 = make_checkpoint(bases["bert"], {"name": "lora", "r": 2}, mismatch_root / "b", "bert")
    refused([r4, r2], mismatch_root, "differ in method (r: 4 vs 2)", capsys)


def test_refuses_checkpoints_of_different_base_models(mismatch_root, bases, capsys) -> None:
    first = make_checkpoint(bases["bert"], "lora", mismatch_root / "a", "bert")
    other = make_checkpoint(bases["bert_other"], "lora", mismatch_root / "b", "bert")
    refused([first, other], mismatch_root, "differ in base model", capsys)


def test_refuses_checkpoints_of_different_targets(mismatch_root, bases, capsys) -> None:
    first = make_checkpoint(bases["bert"], "lora", mismatch_root / "a", "bert")
    query_only = save_checkpoint(adapted_model(bases["bert"], "lora", "seq-cls", ["query"]), mismatch_root / "b")
    message = refused([first, query_only], mismatch_root, "differ in adapted layers", capsys)
    assert "attention.self.value" in message  # the layer one of them lacks


def test_refuses_a_method_that_cannot_swap(mismatch_root, bases, capsys) -> None:
    ckpts = [make_checkpoint(bases["bert"], small_method("c3la"), mismatch_root / f"t{i}", "bert", seed=i)
             for i in range(2)]
    refused(ckpts, mismatch_root, "'c3la' cannot be served as swappable adapters: its finished links", capsys)


def test_refuses_two_checkpoints_of_one_name(mismatch_root, bases, capsys) -> None:
    first = make_checkpoint(bases["bert"], "lora", mismatch_root / "a" / "final", "bert")
    second = make_checkpoint(bases["bert"], "lora", mismatch_root / "b" / "final", "bert", seed=5)
    refused([first, second], mismatch_root, "would both be adapter 'final'", capsys)


def test_several_checkpoints_need_adapters(encoder_set, capsys: pytest.CaptureFixture) -> None:
    ckpts, _, _ = encoder_set
    with pytest.raises(SystemExit) as exit_info:
        main([str(ckpts[0]), str(ckpts[1]), "--merge"])
    assert exit_info.value.code == 2
    assert "only with --adapters" in capsys.readouterr().err


def test_refuses_fp16(encoder_set, root: Path) -> None:
    ckpts, _, _ = encoder_set
    with pytest.raises(ValueError, match="--dtype fp16 with --adapters"):
        export_adapters(ckpts, root / "fp16_out", dtype="fp16", log=quiet)
    assert not (root / "fp16_out").exists()


def test_adapter_set_error_is_a_value_error() -> None:
    assert issubclass(AdapterSetError, ValueError)  # export.onnx exits 2 on it (USER_ERRORS)
