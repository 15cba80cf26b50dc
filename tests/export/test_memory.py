"""The export's peak memory, measured from outside as ``benchmarks/bench_scale.py`` does (issue 10's 1.3x bound).

A random 332M-parameter Llama (hidden 1536, 10 layers, vocabulary 16000: 1.3 GB of float32 safetensors; the head
holds 7% of the weights, as in TinyLlama-1.1B, since the export's transient costs scale with the largest tensor)
gets LoRA on all-linear with random adapter values and goes through ``python -m export.onnx CKPT --merge
--no-latency --no-fp16-check`` in a fresh child whose VmHWM is its peak RSS. The same run on a 2-layer Llama gives
the fixed cost (interpreter, torch, transformers, onnxruntime: ~450 MB, a third of this model); the bound is on what
the model adds: (peak - fixed) / the exported weights' bytes <= 1.3. The 1.1B and 7B figures are in
benchmarks/results (scale*.md), where the fixed cost is a few percent of the model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.bench_scale import REFERENCE, RSS_LIMIT, STEPS, Setting, model_bytes, run_steps

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                   reason="reads VmHWM from /proc")]


def test_a_330m_llama_export_adds_at_most_1_3x_its_weights_to_the_peak(tmp_path: Path) -> None:
    setting = Setting("float32", "lora")
    peaks = {shape: run_steps(shape, tmp_path / shape, setting)[STEPS.index("fold + export + verify")].peak_rss_bytes
             for shape in (REFERENCE, "llama-330m")}
    _, size = model_bytes("llama-330m", setting)
    added = (peaks["llama-330m"] - peaks[REFERENCE]) / size
    assert (tmp_path / "llama-330m" / "onnx" / "model.onnx_data").stat().st_size >= size, "weights streamed out"
    assert added <= RSS_LIMIT, (f"the export of a {size / 2**20:.0f} MiB model added {added:.2f}x its weights to the "
                                f"peak RSS ({peaks['llama-330m'] / 2**20:.0f} MiB, fixed cost "
                                f"{peaks[REFERENCE] / 2**20:.0f} MiB); see benchmarks/bench_scale.py --quick --profile")


FLOAT16_SESSION_PROBE = """
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
from export.latency import lean_float16_options, session_options
d, layers, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
nodes, weights, prev = [], [], "x"
for i in range(layers):  # x + x @ W_i: float16 MatMuls, which onnxruntime's CPU provider computes in float32
    weights.append(numpy_helper.from_array((np.random.randn(d, d) * 0.02).astype(np.float16), f"w{i}"))
    nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [prev, f"m{i}"], [f"h{i}"])]
    prev = f"h{i}"
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, ["b", "s", d]) for n in ("x", prev)]
model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], weights), opset_imports=[helper.make_opsetid("", 17)])
onnx.save(model, folder + "/m.onnx", save_as_external_data=True, location="m.data")
del model, weights
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
session = ort.InferenceSession(folder + "/m.onnx", lean_float16_options(session_options(2)), providers=["CPUExecutionProvider"])
for shape in ((3, 11, d), (3, 1, d)):
    session.run(None, {"x": np.random.randn(*shape).astype(np.float16)})
print(status("VmHWM:") - before)
"""


def test_a_float16_session_on_the_cpu_holds_one_float32_weight_at_a_time(tmp_path: Path) -> None:
    """onnxruntime's CPU provider casts each float16 weight to float32 for its MatMul. With the default execution
    order every Cast runs before the first MatMul (all float32 copies at once: ~3x the float16 bytes); the lean
    options' priority-based order casts each weight just before its use and frees it after (issue 10)."""
    import subprocess

    d, layers = 2048, 16  # 16 float16 weights of 8 MiB: 128 MiB; their float32 copies would add 256 MiB
    out = subprocess.run([sys.executable, "-c", FLOAT16_SESSION_PROBE, str(d), str(layers), str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    added = int(out.stdout.split()[-1])
    weights, one_float32 = layers * d * d * 2, d * d * 4
    assert added <= weights + 4 * one_float32, (f"the session's peak grew by {added / 2**20:.0f} MiB for "
                                                f"{weights / 2**20:.0f} MiB of float16 weights")
