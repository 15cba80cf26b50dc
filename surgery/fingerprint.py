"""What pins a checkpoint to its base model: a digest of every tensor, and the check that none is NaN or infinite.

Surgery reads every tensor of the base model once: each tensor's SHA-256 over its name-independent shape, dtype and
bytes (hashed in place, no copy), and whether each floating parameter is finite. The checkpoint keeps the per-tensor digests (a few hundred short strings even for a 70B model),
so loading against another base names the tensors that differ, and a fingerprint over all of them.
``benchmarks/bench_fingerprint.py`` measures the cost in seconds per GB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.pages import MADV_PAGEOUT, advise

META = "meta"  # the fingerprint of a weightless (meta-device) model: --dry-run
SHOWN = 5  # tensors named in a message


class BaseModelError(ValueError):
    """The base model's tensors are unusable (NaN or infinite values)."""


@dataclass(frozen=True)
class BaseDigest:
    """Every tensor of a base model: name -> digest, and the fingerprint over all of them."""

    fingerprint: str
    tensors: dict[str, str] = field(default_factory=dict)
    non_finite: list[str] = field(default_factory=list)  # floating parameters holding NaN or inf

    def differences(self, saved: dict[str, str]) -> list[str]:
        """What differs from ``saved`` (name -> digest), as phrases naming the tensors; [] when identical."""
        changed = sorted(name for name in saved.keys() & self.tensors.keys() if saved[name] != self.tensors[name])
        missing = sorted(saved.keys() - self.tensors.keys())
        extra = sorted(self.tensors.keys() - saved.keys())
        return [phrase for phrase in (listed(changed, "with other values or shapes"), listed(missing, "missing"),
                                      listed(extra, "not in the saved base")) if phrase]


def listed(names: list[str], what: str) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
    return f"{len(names)} tensor(s) {what}: {shown}"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's shape, dtype and bytes, read in place (a copy only for a non-contiguous tensor)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}:{data.dtype}".encode())
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``. A NaN or inf makes the sum NaN or inf, so a finite sum (one pass, no
    allocation: 2x faster than isfinite on half tensors) settles it; a non-finite sum is checked element by element
    (finite values whose sum overflows are fine)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    accumulate = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate))) or bool(torch.isfinite(tensor).all())


def base_digest(model: nn.Module, skip: Collection[str] = (), trusted: Mapping[str, str] | None = None
                ) -> BaseDigest:
    """Digest every tensor of ``model``'s state dict but ``skip`` (tied tensors once) and find non-finite
    parameters. A tensor whose digest ``trusted`` holds (a checkpoint's base, checked when it was saved) is not
    checked again: on half tensors the check costs twice the digest."""
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in skip}
    if any(tensor.is_meta for tensor in state.values()):
        return BaseDigest(META)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    first: dict[tuple, str] = {}  # storage, offset, shape, dtype -> the first name holding it (tied weights)
    for name, tensor in state.items():
        first.setdefault(storage_key(tensor), name)
    unique = sorted(set(first.values()))

    def scan(name: str) -> tuple[str, bool]:
        tensor = state[name]
        digest = tensor_digest(tensor)
        known = trusted is not None and trusted.get(name) == digest
        return digest, known or name not in parameters or is_finite(tensor)

    # one thread: a pool of two hashed ~1.4x faster but its threads' malloc arenas kept ~120 MiB (measured on the
    # 332M Llama export: 1.24x -> 1.14x of the weights at the peak), and memory is the export's bound
    results = {}
    for name in unique:
        results[name] = scan(name)
        page_out(state[name])
    tensors = {name: results[first[storage_key(tensor)]][0] for name, tensor in sorted(state.items())}
    non_finite = sorted(name for name, (_, finite) in results.items() if not finite)
    return BaseDigest(fingerprint_of(tensors), tensors, non_finite)


def page_out(tensor: torch.Tensor) -> None:
    """Give back the pages the digest just read where the kernel can reload them (a base weight still only in the
    memory-mapped safetensors file: an embedding table the model reads a few rows of would otherwise stay resident
    from here to the export's peak). Data-safe: written or anonymous pages stay (without swap) or are swapped."""
    advise(tensor, MADV_PAGEOUT)


def storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype


def fingerprint_of(tensors: dict[str, str]) -> str:
    """SHA-256 over the sorted (name, digest) pairs."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}={tensors[name]};".encode())
    return digest.hexdigest()


def non_finite_error(names: list[str], where: str, remedy: str) -> str:
    return f"{where}: {listed(names, 'hold NaN or infinite values')}; {remedy}"
