"""Backbones. Both released families (Qwen3 for small, EuroBERT for nano) are Llama-style pre-norm
transformers that differ in two switches, so one module serves both: see ``backbone.py``."""
from .backbone import Backbone

__all__ = ["Backbone"]
