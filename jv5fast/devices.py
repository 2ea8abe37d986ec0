"""One check for every ``device=`` a user gives (Engine, Trainer, indexes, CLI): 'cpu', 'cuda' or 'cuda:N'
that exists here, else a ValueError naming the value and the valid choices."""
from __future__ import annotations

import torch


def check_device(device, what: str = "device", quote: bool = True) -> torch.device:
    """``device`` (str or torch.device) -> torch.device, refusing other kinds, a missing CUDA, or a GPU index
    this machine does not have. ``quote=False`` words the choices for a command line."""
    def q(s):
        return f"'{s}'" if quote else s
    choices = f"choose {q('cpu')}, {q('cuda')} or {q('cuda:N')}"
    use_cpu = "use 'cpu'" if quote else f"use {what} cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} {device!r} is not a device; {choices}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {device!r} is not supported; {choices}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device!r} needs CUDA, which is not available here (torch "
                             f"{torch.__version__}); {use_cpu}")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{what} {device!r} does not exist: this machine has {n} GPU(s), cuda:0..cuda:{n - 1}")
    return dev
