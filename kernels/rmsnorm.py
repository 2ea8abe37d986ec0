"""RMSNorm, optionally fused with the residual add that precedes it.

y = w * cast(x / sqrt(mean(x^2) + eps)), computed in fp32 and cast back to the activation dtype
before the weight multiply (the Qwen3 / EuroBERT / Llama convention; no 1 + w offset).
With ``residual``: h = x + residual, y = rmsnorm(h), and h is returned as the new residual stream.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x, weight, eps, residual=None):
    """Returns y, or (y, h) when ``residual`` is given. Shapes (..., N); weight (N,)."""
    h = x if residual is None else x + residual
    u = h.float()
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * u.to(h.dtype)
    return y if residual is None else (y, h)
