"""Shared by the kernel files: the output allocator and the test switch that poisons outputs.

With ``POISON_OUTPUTS`` set (tests do, through tests/kernels/conftest.py), every launcher's output starts
as NaN (float) or a marker value (integers) instead of uninitialised memory, so an element no program
writes fails the comparison instead of passing by luck.
"""
from __future__ import annotations

import torch

POISON_OUTPUTS = False


def new_output(shape, dtype, device, int_marker=0xAA):
    """An output buffer: ``torch.empty`` normally, filled with NaN / ``int_marker`` when poisoning."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else int_marker
    return torch.full(shape, fill, dtype=dtype, device=device)
