"""What pinning every base tensor costs: seconds per GB of surgery.fingerprint.base_digest (issue 13).

    python -m benchmarks.bench_fingerprint            # a random Llama of ~1 GB in float16 (4 layers of hidden 4096)
    python -m benchmarks.bench_fingerprint --layers 8 --hidden 4096

Every checkpoint save and load digests every tensor of the base model (SHA-256 of its bytes, read in place) and
checks every floating parameter for NaN and inf (one thread: a thread pool's malloc arenas cost the export more
memory than its speed was worth). Measured on a model already in memory, the SHA-256 alone and the finiteness
check alone beside the whole: the seconds per GB say what a 70B model (140 GB in bfloat16) adds to a load.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import GIB, Column, machine_info, write_results
from surgery.fingerprint import base_digest, is_finite, tensor_digest

REPEATS = 3


def random_llama(layers: int, hidden: int) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(torch.float16))
    return model


def best_of(run, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(model: torch.nn.Module) -> list[dict]:
    tensors = list(model.state_dict().values())
    gb = sum(t.numel() * t.element_size() for t in tensors) / 1e9
    trusted = base_digest(model).tensors
    candidates = {
        "at save: base_digest (SHA-256 + finiteness of every tensor)": lambda: base_digest(model),
        "at load: base_digest with the saved digests trusted (SHA-256 only)": lambda: base_digest(model,
                                                                                                  trusted=trusted),
        "SHA-256 alone": lambda: [tensor_digest(t) for t in tensors],
        "finiteness alone": lambda: [is_finite(t) for t in tensors],
    }
    rows = []
    for name, run in candidates.items():
        seconds = best_of(run)
        rows.append({"what": name, "seconds": round(seconds, 3), "s_per_gb": round(seconds / gb, 3),
                     "s_for_70b_bf16": round(seconds / gb * 140, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fingerprint", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args(argv)
    machine = machine_info()
    model = random_llama(args.layers, args.hidden)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows = measure(model)
    columns = [Column("what", "what"), Column("seconds", "s (best of 3)", "{:.3f}"),
               Column("s_per_gb", "s / GB", "{:.3f}"), Column("s_for_70b_bf16", "s for 140 GB (70B bf16)", "{:.0f}")]
    notes = [f"model: random Llama, {args.layers} layers of hidden {args.hidden}, float16, {size / GIB:.2f} GiB "
             f"in memory (page cache effects left out: a cold load reads the files once anyway)",
             "surgery (and every save) digests and checks every base tensor; a load (export.onnx, export.hf, resume) digests "
             "them and checks only those whose digest differs from the checkpoint's (an error then anyway)"]
    _, md = write_results("fingerprint", "Pinning every base tensor: seconds per GB", machine,
                          {"layers": args.layers, "hidden": args.hidden, "repeats": REPEATS}, rows, columns,
                          notes=notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
