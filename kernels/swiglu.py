"""SwiGLU activation on the fused gate/up projection output.

gate_up (T, 2F) holds [gate | up] along the last axis; out = silu(gate) * up, shape (T, F).
"""
from __future__ import annotations

import torch.nn.functional as F


def swiglu_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
