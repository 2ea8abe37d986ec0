"""One check for every ``device=`` a user gives (Engine, Trainer, indexes, CLI): 'cpu', 'cuda' or 'cuda:N'
that exists here, else a ValueError naming the value and the valid choices."""
from __future__ import annotations

import torch


def check_device(device, what: str = "device") -> torch.device:
    """``device`` (str or torch.device) -> torch.device, refusing other kinds, a missing CUDA, or a GPU index
    this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} {device!r} is not a device; choose 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {device!r} is not supported; choose 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device!r} needs CUDA, which is not available here (torch "
                             f"{torch.__version__}); use 'cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{what} {device!r} does not exist: this machine has {n} GPU(s), cuda:0..cuda:{n - 1}")
    return dev
