"""Corpus-scale embedding on Ray Data (the ``distributed`` extra). Importing ``jv5fast`` never imports Ray.

``embed_dataset(ds, model, ...)``: a Ray Dataset plus an ``embedding`` column, from a pool of actors that
each load one ``Engine`` (jv5fast/distributed/dataset.py). ``jv5fast embed-corpus``: Parquet / JSON Lines
in, Parquet parts and a manifest out, resumable (jv5fast/distributed/corpus.py, cli.py). Ray is imported
only when a dataset is built or a run starts.
"""
from .dataset import embed_dataset

__all__ = ["embed_dataset"]
