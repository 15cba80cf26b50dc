"""Every registered method x (BERT encoder, GPT-2 Conv1D decoder with cache, Llama decoder with cache): fold, export,
verify against the unfolded PyTorch model, and compare with the base model's export."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.exporters import export_model
from export.onnx import export_checkpoint
from surgery.config import ModelConfig
from surgery.model import load_model
from surgery.tolerances import LAYER, MODEL
from tests.export.checkpoints import (  # noqa: F401  (single_torch_thread: a fixture)
    make_checkpoint,
    onnx_logits,
    save_lively_base,
    single_torch_thread,
    task_of,
)
from tests.export.tiny_exports import auto_backend
from tests.method_configs import registered_methods, small_method

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ARCHS = ("bert", "gpt2", "llama")
BOOKKEEPING_OPS = {"Identity", "Constant"}  # constant sharing and split sizes: no arithmetic
SHAPE_OPS = {"Shape", "Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape"}  # Conv1D's 2-D Gemm reshapes


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch -> (base model folder, its ONNX export made the way export_checkpoint makes one)."""
    root = tmp_path_factory.mktemp("bases")
    found = {}
    for arch in ARCHS:
        folder = save_lively_base(arch, root / arch)
        model = load_model(ModelConfig(name_or_path=str(folder), task=task_of(arch)))
        graph = export_model(model, root / f"{arch}_onnx", log=quiet)
        found[arch] = (folder, graph.model_file)
    return found


@pytest.fixture(scope="module")
def exported(bases, tmp_path_factory) -> Callable[[str, str], dict]:
    """(method, arch, **method keys) -> the report of a merged export, made once per module."""
    cache: dict[tuple, dict] = {}

    def export(method: str, arch: str, **keys: object) -> dict:
        key = (method, arch, *sorted(keys.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{method}_{arch}")
            ckpt = make_checkpoint(bases[arch][0], {**small_method(method), **keys}, root / "ckpt", arch)
            cache[key] = export_checkpoint(ckpt, root / "onnx", merge=True, latency=False, fp16_check=False,
                                           log=quiet)
            cache[key]["out"] = root / "onnx"
        return cache[key]

    return export


def node_ops(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", registered_methods())
def test_merged_export_verifies_and_differs_from_base(method: str, arch: str, exported, bases) -> None:
    report = exported(method, arch)
    assert report["passed"] and not report["errors"]
    assert report["backend"] == auto_backend() and report["with_past"] == (arch != "bert")
    parity = report["parity"]
    assert parity["max_abs_diff"] <= MODEL[torch.float32].atol + MODEL[torch.float32].rtol * 10
    assert parity["greedy_match"] is (None if arch == "bert" else True)
    assert all(case["within"] for case in parity["cases"])
    assert report["layers"] and all(layer["folded"] for layer in report["layers"])
    assert all(layer["fold_error"] <= LAYER[torch.float32].atol for layer in report["layers"])
    ours, base = onnx_logits(report["out"] / "model.onnx"), onnx_logits(bases[arch][1])
    assert np.abs(ours - base).max() > 100 * MODEL[torch.float32].atol, "the adapter must change the export"
    if all(layer["residual"] is None for layer in report["layers"]):  # fully mergeable: plain layers again
        assert node_ops(report["out"] / "model.onnx") == node_ops(bases[arch][1])
        assert report["macs_per_token"] == report["base_macs_per_token"]


def scope_of(layer_name: str) -> str:
    """The ONNX node-name scope of a module: ``transformer.h.0.attn.c_attn`` -> ``/transformer/h.0/attn/c_attn/``
    (the exporter's wrapper module may add a prefix such as ``/model``)."""
    parts: list[str] = []
    for part in layer_name.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def compute_ops(path: Path, scopes: list[str]) -> tuple[list[Counter], Counter]:
    """Arithmetic ops (no shape bookkeeping) under each scope, and those outside every scope."""
    inside, outside = [Counter() for _ in scopes], Counter()
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in BOOKKEEPING_OPS | SHAPE_OPS:
            continue
        hits = [i for i, scope in enumerate(scopes) if scope in node.name]  # under the exporter's wrapper scope
        (inside[hits[0]] if hits else outside)[node.op_type] += 1
    return inside, outside


@pytest.mark.parametrize("arch", ARCHS)
def test_proda_graph_adds_exactly_the_fused_residual_per_layer(arch: str, exported, bases) -> None:
    report = exported("proda", arch, group_siblings=False)  # the grouped form: tests/surgery/test_proda_groups.py
    scopes = [scope_of(layer["name"]) for layer in report["layers"]]
    ours, ours_rest = compute_ops(report["out"] / "model.onnx", scopes)
    base, base_rest = compute_ops(bases[arch][1], scopes)
    assert ours_rest == base_rest, "the rest of the graph must stay the base graph"
    # per layer: down-projection, split, relu, gate up-projection, sigmoid, gate * low rank, concat [x ; gated
    # low rank], then the static matmul with the up-projection riding in it (K = d_in + 2r) and the base bias:
    # no d_out-wide matmul, multiply or add of its own
    fused = Counter({"MatMul": 3, "Split": 1, "Relu": 1, "Sigmoid": 1, "Mul": 1, "Concat": 1})
    for name, layer_ops, base_ops in zip(scopes, ours, base):
        has_bias = "Gemm" in base_ops or "Add" in base_ops
        assert layer_ops == fused + Counter({"Add": int(has_bias)}), name
    assert all("fused" in layer["residual"] for layer in report["layers"])


# R = 8 (the small test setting) on BERT's and GPT-2's layers; R = 4 on Llama, whose v_proj is only 32 -> 16 wide
R_LODA_CASES = [("bert", {}), ("gpt2", {}), ("llama", {"approx_rank": 4})]


@pytest.mark.parametrize("method", ["r_loda", "r_loda_plus"])
@pytest.mark.parametrize("arch, keys", R_LODA_CASES, ids=[arch for arch, _ in R_LODA_CASES])
def test_r_loda_deploys_fewer_macs_than_the_base(method: str, arch: str, keys: dict, exported) -> None:
    report = exported(method, arch, **keys)
    assert report["passed"]
    assert report["macs_per_token"] < report["base_macs_per_token"]


def test_s_loda_2_4_keeps_the_sparse_weight_for_tensorrt(bases, tmp_path: Path) -> None:
    method = {"name": "s_loda", "r": 4, "pattern": "2:4"}
    ckpt = make_checkpoint(bases["bert"][0], method, tmp_path / "ckpt", "bert")
    report = export_checkpoint(ckpt, tmp_path / "onnx", merge=True, latency=False, log=quiet)
    assert report["passed"]
    assert all(layer["sparse_2_4"] and layer["note"] == "2:4 sparse + low-rank" for layer in report["layers"])
    assert report["tensorrt"]["trtexec"].endswith("--sparsity=enable")
    assert report["tensorrt"]["fp16"]["parity"]["passed"]


@pytest.mark.parametrize("method", registered_methods())
def test_unfolded_export_verifies(method: str, bases, tmp_path: Path) -> None:
    """The adapter graph as trained (no --merge), on BERT; test_cli covers a decoder's."""
    ckpt = make_checkpoint(bases["bert"][0], method, tmp_path / "ckpt", "bert")
    report = export_checkpoint(ckpt, tmp_path / "onnx", merge=False, latency=False, fp16_check=False, log=quiet)
    assert report["passed"]
    assert not any(layer["folded"] or layer["fold_error"] is not None for layer in report["layers"])
    assert report["macs_per_token"] > report["base_macs_per_token"] or method.startswith(("r_", "s_"))
