"""Sibling layers that read one input (an attention's q, k, v; a gated MLP's gate and up), and sharing work among them.

A method whose per-layer work starts with a projection of the layer's input can do that projection once for the
siblings: stack their matrices, multiply once, and give each member its slice. Three pieces, none naming a method:

- :func:`sibling_groups`: which of a model's target names are siblings, by the conventional leaf names
  (``SIBLING_LEAVES``) under one parent. GPT-2's ``c_attn`` is one layer already and has no siblings; so has every
  layer whose leaf is not listed.
- :class:`InputMemo`: a value computed from one input tensor, shared by the calls of a group's members on that same
  tensor: the first call computes, the others reuse, the last releases it. Exact: the same product of the same
  tensors. The model calls its siblings one after another on the same tensor; under the TorchScript tracer the reuse
  becomes one value read by every member in the graph.
- :func:`link_sibling_groups`: after a fold, the folded modules that declare their siblings (:class:`SiblingMember`)
  are handed to their class's ``link_siblings`` once per group, so that they compute through one shared module.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Leaf names of layers that read the same input tensor, in the order their group stacks them.
SIBLING_LEAVES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma, ...
    ("query", "key", "value"),  # BERT, RoBERTa
    ("gate_proj", "up_proj"),  # the gated MLP of Llama and its kin
)


def sibling_groups(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups of two or more of ``names`` that are siblings: the same parent, leaves from one ``SIBLING_LEAVES`` tuple,
    in that tuple's order. A name without a target sibling is in no group. E.g. ``[a.query, a.value, a.dense]`` ->
    ``[(a.query, a.value)]``."""
    present = set(names)
    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for name in sorted(present):
        parent, _, leaf = name.rpartition(".")
        leaves = next((t for t in SIBLING_LEAVES if leaf in t), None)
        if leaves is None or name in seen:
            continue
        members = tuple(m for m in (f"{parent}.{s}" if parent else s for s in leaves) if m in present)
        seen.update(members)
        if len(members) > 1:
            groups.append(members)
    return groups


class InputMemo:
    """A value computed from ``x`` and some weights, computed once for the ``members`` calls on that same ``x``.

    Keyed on the identity and version of ``x`` and of each weight, on grad mode and on autocast, so another input
    (cross-attention's k and v, the next step), a changed weight or a cast copy computes anew. Inference tensors
    have no version counter to key on: :meth:`shares` is False for them and the caller computes alone. The entry is
    one tuple, read and replaced whole, so replicas sharing it in threads can miss, never mix. A copy or a pickle
    starts empty.
    """

    def __init__(self, members: int) -> None:
        self.members = members
        self._entry: tuple[Any, ...] | None = None  # (x ref, weight refs, key, value, uses left)

    @staticmethod
    def shares(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> bool:
        """Whether a value computed from ``x`` and ``weights`` can be keyed (no inference tensor among them)."""
        return not (x.is_inference() or any(w.is_inference() for w in weights))

    def __call__(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
        """``compute()``, or the value the previous member computed from this ``x`` and these ``weights``."""
        if not self.shares(x, weights):
            return compute()
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        key = (x._version, tuple(w._version for w in weights), torch.is_grad_enabled(), autocast)
        entry = self._entry
        if (entry is not None and entry[0]() is x and len(entry[1]) == len(weights)
                and all(ref() is w for ref, w in zip(entry[1], weights)) and entry[2] == key):
            uses_left = entry[4] - 1
            self._entry = (*entry[:4], uses_left) if uses_left > 0 else None
            return entry[3]
        value = compute()
        self._entry = (weakref.ref(x), tuple(weakref.ref(w) for w in weights), key, value, self.members - 1)
        return value

    def __deepcopy__(self, memo: dict[int, Any]) -> InputMemo:
        return type(self)(self.members)

    def __getstate__(self) -> dict[str, Any]:
        return {"members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.members, self._entry = state["members"], None


class SiblingMember:
    """A (folded) module that may share work with its siblings.

    ``siblings``: the group's member names in the model (its own among them), or None. After a fold,
    :func:`link_sibling_groups` calls ``link_siblings`` on the class with the members in that order, once per group.
    """

    siblings: tuple[str, ...] | None = None

    @classmethod
    def link_siblings(cls, members: list[nn.Module]) -> None:
        raise NotImplementedError


def link_sibling_groups(model: nn.Module) -> int:
    """Link every complete group of :class:`SiblingMember` modules in ``model`` (found by their names); returns how
    many groups were linked. A group whose members are not all there, or not all of one class, stays unlinked: each
    member then computes alone, as exactly."""
    found: dict[tuple[str, ...], dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        siblings = getattr(module, "siblings", None) if isinstance(module, SiblingMember) else None
        if siblings and name in siblings:
            found.setdefault(siblings, {})[name] = module
    linked = 0
    for names, members in found.items():
        if set(members) != set(names) or len({type(m) for m in members.values()}) != 1:
            continue
        ordered = [members[name] for name in names]
        type(ordered[0]).link_siblings(ordered)
        linked += 1
    return linked
