"""Triton kernels (GPU), installed as ``jv5fast.kernels``.

Each op lives in its own file beside its plain-PyTorch ``*_ref``; model code reaches them only
through ``jv5fast.ops``. Importing this package never requires Triton: each kernel module imports
it lazily and the references work everywhere.
"""
