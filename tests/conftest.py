"""Test-session setup. Without a GPU, Triton kernels can only run in the interpreter, and Triton reads
TRITON_INTERPRET when a kernel is defined, so it must be set before any kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
