"""Corpus-scale embedding on Ray Data (the ``distributed`` extra). Importing ``jv5fast`` never imports Ray.

dataset.py   ``embed_dataset(ds, model, ...)``: a Ray Dataset plus an ``embedding`` column from Engine actors
plan.py      embed-corpus planning: the input files, each one's sha256, rows and bad rows, its units
manifest.py  embed-corpus's output folder: manifest format and checks, part files, lock, atomic writes
corpus.py    ``run_corpus``: resume checks, the ``UnitWorker`` actors, commits; re-exports the two above
Ray is imported only when a dataset is built or a run starts.
"""
from .dataset import embed_dataset

__all__ = ["embed_dataset"]
