"""jv5fast: a fast, exact inference engine for jina-embeddings-v5-text (small and nano).

    >>> import jv5fast
    >>> eng = jv5fast.Engine("/models/jina-embeddings-v5-text-nano", task="retrieval")
    >>> q = eng.encode_query(["how fast is light?"])           # (1, 768) float32, unit norm
    >>> codes = eng.embed(docs, truncate_dim=256, precision="ubinary")
"""
from .engine import Engine
from .postprocess import PRECISIONS, quantize

__version__ = "0.1.0"


def __getattr__(name):  # heavier modules load on first use
    if name in ("HammingIndex", "EmbeddingIndex", "IndexFileError"):
        from . import index
        return getattr(index, name)
    if name == "export_onnx":
        from .onnx_export import export_onnx
        return export_onnx
    raise AttributeError(f"module 'jv5fast' has no attribute {name!r}")


__all__ = ["Engine", "quantize", "PRECISIONS", "HammingIndex", "EmbeddingIndex", "IndexFileError", "export_onnx",
           "__version__"]
