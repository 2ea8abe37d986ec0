"""Ray: corpus-scale embedding on Ray Data (the ``distributed`` extra) and ``jv5fast serve --replicas`` on Ray Serve
(the ``serve-ray`` extra). Importing ``jv5fast`` never imports Ray.

dataset.py   ``embed_dataset(ds, model, ...)``: a Ray Dataset plus an ``embedding`` column from Engine actors
plan.py      embed-corpus planning: the input files, each one's sha256, rows and bad rows, its units
manifest.py  embed-corpus's output folder: manifest format and checks, part files, lock, atomic writes
corpus.py    ``run_corpus``: resume checks, the ``UnitWorker`` actors, commits; re-exports the two above
             (the ``jv5fast embed-corpus`` command itself is jv5fast/cli/embed_corpus.py; cli.py here is its old path)
serve.py     ``app(model, ...)`` (a bound Ray Serve application) and ``run(...)`` (what ``jv5fast serve --replicas`` calls)
serve_replica.py  a replica: one Engine and the very app of ``jv5fast serve``; the Registry of replica states
serve_front.py    the HTTP ingress: forwards to a replica, retries on a dead one, bounded wait; /health, /metrics
Ray is imported only when a dataset is built, a run starts or a Serve application is built.
"""
from .dataset import embed_dataset

__all__ = ["embed_dataset"]
