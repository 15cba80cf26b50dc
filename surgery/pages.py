"""Advice to the kernel about a tensor's pages (Linux ``madvise``), for code that keeps memory to one copy."""

from __future__ import annotations

import ctypes
import sys

import torch

PAGE = 4096
MADV_DONTNEED = 4  # drop the pages: file-backed ones reload from the file, anonymous ones read back as ZEROS
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim them now; file-backed clean pages are dropped, nothing is ever lost


def advise(tensor: torch.Tensor, advice: int) -> None:
    """``madvise(advice)`` on the pages lying wholly inside ``tensor``'s bytes; elsewhere than Linux, for a tensor
    not on the CPU or under one page, nothing happens."""
    start = -(-tensor.data_ptr() // PAGE) * PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // PAGE * PAGE
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or end <= start:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(advice))
