"""``embed-corpus``: Parquet / JSON Lines in, Parquet parts plus ``manifest.json`` out, resumable, exactly once.

The driver plans (plan.py), Ray embeds (here), the driver commits (manifest.py). Units not yet in the
manifest stream through Ray Data, one block per unit, to the ``UnitWorker`` actor pool, which reads and
embeds each unit's rows; the driver gathers each unit's rows by id and commits it. A rerun refuses any
recorded input whose sha256 changed once a part exists, checks each committed unit's row count and id
digest against the new plan, and does only what the manifest lacks. Callers import ``run_corpus`` and the
public names of plan.py and manifest.py from here; Ray pickles ``UnitWorker`` by this module's path.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from .manifest import (
    ERRORS,
    FORMAT,
    LOCK,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SETTING_FLAGS,
    VERSION,
    Output,
    ids_digest,
    validate_manifest,
)
from .plan import INPUT_FORMATS, MAX_LINE_BYTES, CorpusError, InputPlan, Planner, Unit, find_inputs

__all__ = ["ERRORS", "FORMAT", "INPUT_FORMATS", "LOCK", "MANIFEST", "MAX_LINE_BYTES", "MAX_MANIFEST_BYTES",
           "SETTING_FLAGS", "VERSION", "CorpusError", "InputPlan", "Output", "Planner", "Unit", "UnitWorker",
           "find_inputs", "ids_digest", "part_table", "resolve_engine", "run_corpus", "validate_manifest"]


# ---- one unit in one actor: read it (the input path must be readable on every node), embed it ------------
class UnitWorker:
    """A Ray actor (built on ``EmbedWorker``) taking unit descriptors: reads each unit's good rows itself, so
    no extra reader processes compete with the actors for cores, and yields them embedded, ``batch_size``
    rows at a time, as (id, _unit, embedding, _num_tokens)."""

    def __init__(self, settings, engine_kwargs=None, threads=None, batch_size=256):
        from .dataset import EmbedWorker
        self.worker = EmbedWorker(settings, engine_kwargs, threads, count_tokens=True)
        self.batch_size = batch_size

    def __call__(self, batch):
        for u in batch.to_pylist():
            rows = _read_one(u)
            for lo in range(0, rows.num_rows, self.batch_size):
                chunk = rows.slice(lo, self.batch_size)
                yield self.worker.embed_table(chunk, "text", "id").drop_columns(["text"])


def _read_one(u):
    import pyarrow as pa
    st = os.stat(u["path"])
    if (st.st_size, st.st_mtime_ns) != (u["size"], u["mtime_ns"]):
        raise RuntimeError(f"{u['path']} changed while embed-corpus was running (size/mtime differ from the plan)")
    skip = set(u["skip"])
    ids, texts = [], []
    if u["format"] == "jsonl":
        with open(u["path"], "rb") as f:
            f.seek(u["offset"])
            for n in range(u["start"], u["stop"]):
                raw = f.readline()
                if n in skip:
                    continue
                obj = json.loads(raw.decode("utf-8"))
                ids.append(obj[u["id_column"]])
                texts.append(obj[u["text_column"]])
    else:
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(u["path"])
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > u["start"] and row < u["stop"]:
                groups.append(g)
                first = row if first is None else first
            row += n
        t = pf.read_row_groups(groups, columns=[u["id_column"], u["text_column"]])
        t = t.slice(u["start"] - first, u["stop"] - u["start"])
        keep = [i for i in range(t.num_rows) if u["start"] + i not in skip]
        if len(keep) != t.num_rows:
            t = t.take(pa.array(keep, pa.int64()))
        ids, texts = t.column(0).to_pylist(), t.column(1).to_pylist()
    id_type = pa.int64() if u["id_type"] == "int64" else pa.string()
    return pa.table({"id": pa.array(ids, id_type), "text": pa.array(texts, pa.string()),
                     "_unit": pa.array([u["unit"]] * len(ids), pa.int64())})



# ---- the run ---------------------------------------------------------------------------------------------
def part_table(unit: Unit, slices, settings):
    """The unit's rows from the gathered result slices, matched by id and put in input order; None while
    some id is still missing. Rows Ray delivered twice (a retried task) are taken once."""
    import pyarrow as pa

    from .dataset import embedding_type
    t = pa.concat_tables(slices)
    pos = {}
    for i, ident in enumerate(t.column("id").to_pylist()):
        pos.setdefault(ident, i)
    if len(pos) < len(unit.ids):
        return None
    extra = set(pos) - set(unit.ids)
    if extra:
        raise RuntimeError(f"rows with ids {sorted(extra, key=str)[:5]} came back for {unit.input} rows "
                           f"{unit.start}..{unit.stop}, which does not hold them")
    order = pa.array([pos[i] for i in unit.ids], pa.int64())
    emb = t.column("embedding").take(order).combine_chunks()
    if emb.type != embedding_type(settings):
        raise RuntimeError(f"embedding column came back as {emb.type}, expected {embedding_type(settings)}")
    return pa.table({"id": t.column("id").take(order).combine_chunks(), "embedding": emb})


def resolve_engine(engine_kwargs, num_gpus_per_worker, checkpoint_folder):
    """(engine_kwargs for the actors, the manifest's ``engine`` record): the device and compute dtype made
    explicit (Engine would pick bfloat16 on CUDA, float32 on CPU, so a resumed run with other GPUs would mix
    them), plus a fingerprint of the checkpoint's files."""
    import torch

    from ..engine import _resolve_dtype
    from .dataset import checkpoint_fingerprint
    kw = dict(engine_kwargs or {})
    if "device" not in kw or kw["device"] is None:
        kw["device"] = "cuda" if num_gpus_per_worker else "cpu"
    device = torch.device(kw["device"]) if isinstance(kw["device"], str) else kw["device"]
    if not isinstance(device, torch.device):
        raise TypeError(f"engine_kwargs device must be a str or torch.device, got {kw['device']!r}")
    dtype = str(_resolve_dtype(kw.get("dtype"), device)).removeprefix("torch.")
    kw["dtype"] = dtype
    record = {"device": device.type, "dtype": dtype, "max_length": kw.get("max_length")}
    for k in ("backend", "quantize", "onnx_quantize"):  # other choices that change the vectors
        if kw.get(k) is not None:
            record[k] = kw[k]
    try:
        json.dumps(record)
    except TypeError:
        raise ValueError(f"engine_kwargs {record} must be plain values (str, int)") from None
    record["checkpoint"] = checkpoint_fingerprint(checkpoint_folder)
    return kw, record


def run_corpus(*, model, input, output, text_column="text", id_column="id", task="retrieval",
               prompt_name="document", truncate_dim=None, precision="float32", concurrency=1, num_gpus_per_worker=0.0,
               cpus_per_worker=None, batch_size=256, rows_per_part=None, on_error="fail", engine_kwargs=None,
               progress=True, log=None, connect=None):
    """Embed ``input`` into ``output``. ``connect()`` is called once there is work for Ray (after planning, so
    mistakes surface before a cluster is joined); without it, this process must already be connected
    (``ray.init``). Returns a summary dict. Raises CorpusError (bad arguments, input or folder), RuntimeError (a failure
    while running; what was committed stays and a rerun resumes), KeyboardInterrupt."""
    from .dataset import _check_positive, resolve_settings_and_folder
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if on_error not in ("fail", "skip"):
        raise CorpusError(f"--on-error must be 'fail' or 'skip', got {on_error!r}")
    if rows_per_part is not None and (isinstance(rows_per_part, bool) or not isinstance(rows_per_part, int)
                                      or rows_per_part <= 0):
        raise CorpusError(f"--rows-per-part must be a positive integer, got {rows_per_part!r}")
    _check_positive("num_gpus_per_worker", num_gpus_per_worker, float, allow_zero=True)
    settings, folder = resolve_settings_and_folder(model, task=task, prompt_name=prompt_name,
                                                   truncate_dim=truncate_dim, precision=precision,
                                                   text_column=text_column, id_column=id_column)
    engine_kwargs, engine = resolve_engine(engine_kwargs, num_gpus_per_worker, folder)
    files = find_inputs(input, output, log)
    out = Output(output, settings, engine, rows_per_part, log)
    try:
        return _run(out, files, settings, engine_kwargs, on_error=on_error, concurrency=concurrency,
                    num_gpus=num_gpus_per_worker, cpus=cpus_per_worker, batch_size=batch_size,
                    rows_per_part=rows_per_part or out.manifest["rows_per_part"] or 50_000, progress=progress, log=log,
                    connect=connect)
    finally:
        out.close()


def _plan(out, files, rows_per_part):
    """Scan the inputs (recorded ones first, in their recorded order, so duplicate resolution never changes
    between runs). Once any part is committed, every recorded input must be present and unchanged: which
    copy of a duplicate id wins, and so what every later unit holds, depends on all the inputs before it."""
    m = out.manifest
    recorded = {r["path"]: r for r in m["inputs"]}
    missing = [p for p in recorded if p not in set(files)]
    if missing and m["parts"]:
        raise CorpusError(f"{missing[0]} was embedded into {out.folder} but is not in this run's --input; give the "
                          f"same inputs (new files may be added), or another --output folder")
    order = [p for p in recorded if p not in missing] + [f for f in files if f not in recorded]
    planner = Planner(out.settings["id_column"], out.settings["text_column"], rows_per_part,
                      m["id_type"] if m["parts"] else None)
    plans = []
    for path in order:
        plan = planner.scan(path)
        old = recorded.get(path)
        if old is not None and old["sha256"] != plan.sha256 and m["parts"]:
            raise CorpusError(f"{path} changed since it was embedded into {out.folder} (sha256 {old['sha256'][:12]}… "
                              f"→ {plan.sha256[:12]}…, size {old['size']} → {plan.size}); the committed parts were "
                              f"planned from the old contents (which copy of a duplicate id wins depends on every "
                              f"input). Restore the file, or embed into another --output folder")
        plans.append(plan)
    return plans, planner


def _run(out, files, settings, engine_kwargs, *, on_error, concurrency, num_gpus, cpus, batch_size, rows_per_part,
         progress, log, connect):
    m = out.manifest
    m["rows_per_part"] = rows_per_part
    plans, planner = _plan(out, files, rows_per_part)
    if planner.errors and on_error == "fail":
        e = planner.errors[0]
        where = f"line {e['line']}" if "line" in e else f"row {e['row']}"
        ident = "" if e["id"] is None else f" (id {e['id']!r})"
        more = f"; {len(planner.errors) - 1} more bad rows" if len(planner.errors) > 1 else ""
        raise CorpusError(f"{e['file']} {where}{ident}: {e['reason']}{more}. --on-error skip writes bad rows to "
                          f"{os.path.join(out.folder, ERRORS)} and embeds the rest")
    units = [u for p in plans for u in p.units]
    done = out.committed()
    planned = {u.key: u for u in units}
    for key, part in done.items():
        u = planned.get(key)
        if u is None:  # cannot happen while inputs, rows_per_part and the ordering rule are fixed
            raise CorpusError(f"{out.folder}/{MANIFEST} lists {part['file']} for {key[0]} rows {key[1]}..{key[2]}, "
                              f"a unit this run does not plan; give another --output folder")
        if part["rows"] != len(u.ids) or part["ids_sha256"] != ids_digest(u.ids):
            raise CorpusError(f"{out.folder}/{part['file']} holds {part['rows']} rows of {key[0]} rows "
                              f"{key[1]}..{key[2]}, but this run plans {len(u.ids)} rows there"
                              f"{'' if part['rows'] != len(u.ids) else ' with other ids'}; the inputs or the rules "
                              f"for bad rows changed since. Give another --output folder")
    todo = [u for u in units if u.key not in done]
    # the manifest first, then errors.jsonl: a folder with our errors file but no manifest would be refused
    had_errors = m["errors"] is not None
    m.update(inputs=[p.record() for p in plans], id_type=planner.id_type, error_rows=len(planner.errors),
             errors=ERRORS if planner.errors or had_errors else None, complete=False)
    out.write_manifest()
    if planner.errors:
        out.write_errors(planner.errors)
    elif had_errors:
        out.write_errors([])  # the inputs have no bad rows now (an earlier run's file was ours): empty it
    total = sum(len(u.ids) for u in units)
    for u in [u for u in todo if not u.ids]:  # nothing to embed (all bad or blank): commit an empty part
        out.commit(u, _empty_table(settings, planner.id_type))
    todo = [u for u in todo if u.ids]
    rows_todo = sum(len(u.ids) for u in todo)
    stats = {"rows": total, "rows_embedded_now": 0, "tokens_now": 0, "seconds": 0.0, "parts": 0,
             "error_rows": len(planner.errors), "resumed": bool(done)}
    if todo:
        if done:
            log(f"resuming: {len(done)} of {len(units)} units already in {out.folder}; embedding {rows_todo} rows")
        if connect is not None:
            connect()
        stats.update(_embed_units(out, todo, settings, engine_kwargs, planner.id_type, concurrency=concurrency,
                                  num_gpus=num_gpus, cpus=cpus, batch_size=batch_size, progress=progress))
    written = sum(p["rows"] for p in m["parts"])
    if written != total or len(m["parts"]) != len(units):
        raise RuntimeError(f"{out.folder}: {written} rows in {len(m['parts'])} parts, expected {total} rows in "
                           f"{len(units)} parts; rerun to finish")
    m["complete"] = True
    out.write_manifest()
    stats["parts"] = len(m["parts"])
    return stats


def _empty_table(settings, id_type):
    import pyarrow as pa

    from .dataset import embedding_type
    return pa.table({"id": pa.array([], pa.int64() if id_type == "int64" else pa.string()),
                     "embedding": pa.array([], embedding_type(settings))})


def _embed_units(out, todo, settings, engine_kwargs, id_type, *, concurrency, num_gpus, cpus, batch_size, progress):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data
    from tqdm.auto import tqdm

    from .dataset import map_embed
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the one bar
    ctx.print_on_execution_start = False
    if cpus is None:  # CPU workers share the node's cores; a GPU worker needs one core to feed it
        total = int(ray.cluster_resources().get("CPU", 1))
        cpus = 1 if num_gpus else max(1, total // concurrency)
    desc = [{"path": u.input, "format": INPUT_FORMATS[os.path.splitext(u.input)[1].lower()], "start": u.start,
             "stop": u.stop, "offset": u.offset, "skip": u.skip, "unit": i, "id_type": id_type,
             "size": os.stat(u.input).st_size, "mtime_ns": os.stat(u.input).st_mtime_ns,
             "id_column": settings["id_column"], "text_column": settings["text_column"]} for i, u in enumerate(todo)]
    ds = ray.data.from_items(desc, override_num_blocks=len(desc))  # one block per unit
    ds = map_embed(ds, settings, concurrency=concurrency, num_gpus=num_gpus, num_cpus=cpus, batch_size=1,
                   engine_kwargs=engine_kwargs, threads=max(1, int(cpus)), worker=UnitWorker,
                   worker_kwargs={"batch_size": batch_size})
    pending = {}  # unit index -> [result slices]
    counts = {}
    rows = tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(len(u.ids) for u in todo), unit="row", desc="embed-corpus", file=sys.stderr,
               disable=not progress, smoothing=0.1)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its "execution finished" lines would break the bar
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            unit_col = batch.column("_unit").to_numpy()
            n_tok = int(pc.sum(batch.column("_num_tokens")).as_py() or 0)
            rows, tokens = rows + batch.num_rows, tokens + n_tok
            for ui in np.unique(unit_col):
                mask = unit_col == ui
                part = batch if mask.all() else batch.filter(pa.array(mask))
                pending.setdefault(int(ui), []).append(part.select(["id", "embedding"]))
                counts[int(ui)] = counts.get(int(ui), 0) + part.num_rows
                unit = todo[int(ui)]
                if counts[int(ui)] >= len(unit.ids):
                    table = part_table(unit, pending[int(ui)], settings)
                    if table is not None:
                        out.commit(unit, table)
                        del pending[int(ui)]
            dt = time.perf_counter() - t0
            bar.update(batch.num_rows)
            bar.set_postfix_str(f"{tokens / dt:,.0f} tokens/s", refresh=False)
    finally:
        bar.close()
    missing = [todo[i] for i in range(len(todo)) if todo[i].key not in out.committed()]
    if missing:
        u = missing[0]
        raise RuntimeError(f"Ray returned {counts.get(todo.index(u), 0)} of {len(u.ids)} rows for {u.input} rows "
                           f"{u.start}..{u.stop} ({len(missing)} units incomplete); rerun to finish")
    return {"rows_embedded_now": rows, "tokens_now": tokens, "seconds": time.perf_counter() - t0}
