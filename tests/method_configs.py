"""Small valid settings of every method for tiny test models (hidden 32), so tests can loop over METHODS."""

from __future__ import annotations

from typing import Any

from surgery.methods import METHODS

# Keys beyond `name` per method; every method not listed runs with its defaults and r=4.
SMALL: dict[str, dict[str, Any]] = {
    "lora": {"r": 4},
    "proda": {"r": 4, "d_b": 4, "dropout": 0.0},
    "pera": {"r": 4},
    "loda": {"r": 4},
    "loda_plus": {"r": 4},
    "r_loda": {"r": 4, "approx_rank": 8},
    "r_loda_plus": {"r": 4, "approx_rank": 8},
    "s_loda": {"r": 4, "keep": 0.5},
    "s_loda_plus": {"r": 4, "keep": 0.5},
    "cla": {"r": 4, "columns": "random"},
    "c3la": {"r": 4, "chain_length": 2, "chain_every": 2},
}


def small_method(name: str) -> dict[str, Any]:
    return {"name": name, **SMALL.get(name, {"r": 4})}


def registered_methods() -> list[str]:
    return sorted(METHODS)
