"""``jv5fast.Engine``: load a checkpoint once, then ``embed`` texts exactly as the released reference does.

text → prompt prefix → token ids (truncated, specials kept) → length-sorted token-budget batches →
packed varlen forward → last token (after the final norm) → Matryoshka truncation → L2 normalize →
precision, with results restored to input order. A text longer than ``max_length`` is truncated, refused,
or embedded in windows whose vectors are averaged (``overflow=``, jv5fast/overflow.py).

Task adapters: the base linear weights stay in memory in their storage dtype next to each adapter's
(A, B) factors; switching task re-merges W + s·B·A in fp32 and casts once (no disk access). One lock
serialises the forward pass, so one engine may be shared by several threads.

What runs the packed batch is a backend from ``jv5fast.backends.BACKENDS`` (torch, onnx, int8): the
engine asks it where the model is and to load it. What stays here is the one difference the API shows:
a checkpoint switches task adapters (``checkpoint.merge``), an export holds one task merged in.
"""
from __future__ import annotations

import contextlib
import logging
import os
import reprlib
import threading
import warnings

import numpy as np
import torch

from . import ops, st_compat
from .backends import BACKENDS, DTYPES, choose
from .backends import resolve_dtype as _resolve_dtype  # the name jv5fast.distributed imports
from .batching import PackedBatch, plan_batches
from .checkpoint import check_task, check_truncate_dim, default_task, merge
from .checkpoint import merged_task_from_name  # noqa: F401 (jv5fast.engine.merged_task_from_name: public)
from .config import load_model_args
from .devices import check_device
from .loading import load_prompts
from .overflow import Splitter, check_chunk_options, embed_chunked, group_budget, plan_prompts, resolve_overflow
from .postprocess import check_precision, output_layout, quantize
from .tokenizer import Tokenizer

log = logging.getLogger("jv5fast")

_UNMERGED = object()  # Engine._active while no task is (consistently) merged into the layers

_PROGRESS_MIN_BATCHES = 8  # show_progress_bar=None shows a bar beyond this many batches
# On CPU, fp32 GEMMs and the memory-bound elementwise ops run fastest on ~512-token batches (they stay
# in cache): measured 1.19x faster than 16,384-token batches on full-size nano (bench/bench_engine.py).
CPU_BATCH_TOKENS = 512


def _free_memory(device: torch.device) -> int:
    """Bytes free now on ``device`` (CPU: MemAvailable of /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Engine:
    """Embedding engine for jina-embeddings-v5-text small / nano checkpoints (base or per-task merged)."""

    _splitter = None  # overflow='chunk': an overflow.Splitter of this engine's tokenizer, built on first use

    def __init__(self, model_name_or_path, *, task=None, device=None, dtype=None, max_length=None,
                 max_batch_tokens=16384, backend="torch", onnx_quantize=None, cuda_graphs=None, quantize=None,
                 cpu_precision="fp32"):
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"model_name_or_path must be a str or os.PathLike (a checkpoint folder, an ONNX export "
                            f"folder or a hub id), got {type(model_name_or_path).__name__}: "
                            f"{reprlib.repr(model_name_or_path)}")
        locate, load = BACKENDS[choose(backend, quantize)]  # jv5fast/backends.py
        if cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be None (auto), True or False; got {cuda_graphs!r}")
        if cuda_graphs and backend != "torch":
            raise ValueError(f"cuda_graphs=True needs backend='torch' on a CUDA device; this engine is "
                             f"backend={backend!r}")
        if cpu_precision not in ("fp32", "bf16"):
            raise ValueError(f"cpu_precision must be 'fp32' or 'bf16' (opt-in: bf16 GEMMs, fp32 elsewhere); got "
                             f"{cpu_precision!r}")
        options = dict(task=task, device=device, dtype=dtype, backend=backend, quantize=quantize,
                       onnx_quantize=onnx_quantize, cuda_graphs=cuda_graphs)
        src = locate(model_name_or_path, options)  # int8: its cached export, built on first use
        self.cpu_precision = cpu_precision
        self.backend = backend = src.backend
        self.path = folder = src.folder
        meta = src.meta  # an ONNX export's record: it fixes the dtype and the default length
        self.args = args = load_model_args(folder)
        device = src.device if src.device is not None else device
        self.device = check_device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() and backend == "torch" else "cpu"))
        if meta is not None:
            if dtype is not None and _resolve_dtype(dtype, self.device) != DTYPES[meta["dtype"]]:
                raise ValueError(f"{folder} was exported in {meta['dtype']}; dtype={dtype!r} cannot change that")
            dtype = meta["dtype"]
        self.dtype = _resolve_dtype(dtype, self.device)
        if max_length is None:
            max_length = meta["max_length"] if meta is not None else args.max_position_embeddings
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if max_length > args.max_position_embeddings:
            warnings.warn(f"max_length={max_length} exceeds the model's max_position_embeddings="
                          f"{args.max_position_embeddings}; positions beyond it were never trained", stacklevel=2)
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
        self.max_length, self.max_batch_tokens = max_length, max_batch_tokens
        self.tokenizer = Tokenizer(folder, max_length)
        self.prompts, self.default_prompt_name = load_prompts(folder)
        self._lock = threading.RLock()
        self._active = _UNMERGED
        self._export_dim = meta.get("truncate_dim") if meta is not None else None
        self._graphs = None
        self._resident = None  # task -> its merged projections, when kept resident (keep_tasks_resident)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device; this engine is on {self.device}")
        if cuda_graphs and not ops.uses_triton(self.device):
            raise ValueError(f"cuda_graphs=True needs the Triton kernels on CUDA (the torch references "
                             f"synchronise with the host and cannot be captured): install triton and leave "
                             f"JV5FAST_BACKEND unset or 'triton' (it is {ops.backend()!r})")

        loaded = load(src, args, self.device, self.dtype)
        self.model, self._adapters, self._base, self._merged_task, self.int8_quality = loaded
        # the task merged into the weights (an export, a merged repo) or an adapter's, switched per call
        self.task = default_task(self._adapters, self._merged_task) if task is None else self._check_task(task)
        if backend == "onnx":  # one task is merged into the graph; it is the only valid task
            self._active = self.task
            return
        self._activate(self.task)
        if cpu_precision != "fp32" and (backend != "torch" or self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(f"cpu_precision={cpu_precision!r} applies to the torch backend on CPU in float32; this "
                             f"engine is backend={backend!r}, device={self.device}, dtype={self.dtype}")
        if self.device.type == "cpu" and self.dtype == torch.float32:
            packed = self.model.pack_linears(precision=cpu_precision)  # prepacked GEMMs: faster at every size
            if not packed and cpu_precision != "fp32":
                raise RuntimeError(f"cpu_precision={cpu_precision!r} needs oneDNN's bf16 linear through torch and "
                                   f"packed weights (JV5FAST_CPU_PACK=0 turns them off)")
        if not self._adapters:
            self._base = {}
        if cuda_graphs or (cuda_graphs is None and self.device.type == "cuda" and ops.uses_triton(self.device)):
            from .graphs import CudaGraphRunner
            self._graphs = CudaGraphRunner(self.model)

    @classmethod
    def from_onnx(cls, folder, *, device="cpu", quantize=None, max_length=None, max_batch_tokens=16384):
        """An engine over a folder written by ``jv5fast.export_onnx`` (onnxruntime; CPU, or CUDA with
        onnxruntime-gpu). ``quantize="int8"`` runs the dynamically quantized graph."""
        return cls(folder, device=device, max_length=max_length, max_batch_tokens=max_batch_tokens,
                   backend="onnx", onnx_quantize=quantize, task=None)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """The width ``embed`` returns by default: the model's hidden size, or the dimension an ONNX export
        was made for (``export_onnx(truncate_dim=...)``), which is then also the largest one served."""
        return self._export_dim or self.args.hidden_size

    @property
    def tasks(self) -> tuple:
        """The tasks this engine can serve: its adapters, or the one task merged into the weights when the
        checkpoint (or its released name, for a merged repo) records it; () when unknown."""
        if not self._adapters:
            return (self._merged_task,) if self._merged_task else ()
        return tuple(self._adapters)

    def __repr__(self):
        return (f"Engine({self.path!r}, family={self.args.family}, dim={self.dim}, task={self.task!r}, "
                f"device={self.device}, dtype={self.dtype}, max_length={self.max_length})")

    def describe(self) -> dict:
        """What runs where: device, dtype, backend and, for the CPU fp32 torch path, the ISA of jv5fast's C++
        kernels, the forward path, and per projection shape the GEMM it runs and why (with the timings in ms
        that chose it). ``str(...)`` of it is one line per item (``jv5fast.cpu_tuning.format_description``)."""
        from . import cpu_tuning
        return cpu_tuning.describe(self)

    # ---- adapters ------------------------------------------------------------------------------
    def _check_task(self, task):
        """``task`` if this engine can serve it (None: the engine's own), else a ValueError naming what the
        model holds. A model whose weights have one task merged in serves only that task; when it does not
        record which (a merged repo under another name), only ``task=None`` is accepted."""
        if task is None:
            return self.task
        if self.backend == "onnx" and isinstance(task, str) and task not in self.tasks:
            holds = (f"this ONNX export holds only the {self._merged_task!r} adapter, merged into its graph"
                     if self._merged_task else "this ONNX export was made from a merged checkpoint whose task "
                     "is not recorded")
            raise ValueError(f"task {task!r} requested, but {holds} ({self.path}); pass task=None, or export "
                             f"the task you need")
        return check_task(task, self._adapters, self._merged_task, self.path)

    def _activate(self, task):
        """Make the model's linear weights base + adapter(task), merged in fp32 and cast once.

        All or nothing: layers are overwritten one by one, so until the last one is written the engine is
        marked as holding no consistent task. A switch that fails part-way (out of memory, Ctrl-C) leaves
        that mark, and the next call re-merges every layer before it runs."""
        if task == self._active or self.backend == "onnx":
            return
        if not self._adapters and self._active is not _UNMERGED:
            return  # a merged checkpoint: its weights were set once and there is nothing to switch
        if self._resident is not None and task in self._resident:
            ws, packed = self._resident[task]
            self._active = _UNMERGED
            self.model.use_linears(ws, packed, in_place=self._graphs is not None)
            self._active = task
            return
        adapter = self._adapters.get(task) if task is not None else None
        self._active = _UNMERGED
        merge(self.model, self._base, adapter, keep_base=bool(self._adapters))
        self._active = task

    def keep_tasks_resident(self, enable="auto") -> bool:
        """Hold every adapter's merged weights in memory at once, so that a task switch swaps tensors (or,
        under CUDA graphs, copies them into place) instead of re-merging: what mixed-task serving needs.
        Costs one copy of the projection weights per task (two on CPU fp32, with the prepacked copy).
        ``"auto"``: only when that fits in half the memory free now. ``False`` drops them. Returns whether
        the tasks are resident. The weights are the ones a switch would merge, so results do not change."""
        if enable not in (True, False, "auto"):
            raise ValueError(f"enable must be True, False or 'auto', got {enable!r}")
        with self._lock, self._on_device():
            if not enable or self.backend != "torch" or len(self._adapters) < 2:
                self._resident = None
                return False
            if self._resident is not None:
                return True
            ws, packed = self.model.linears()
            per_task = sum(w.numel() * w.element_size() for w in ws.values()) * (2 if packed else 1)
            need, free = per_task * len(self._adapters), _free_memory(self.device)
            if enable == "auto" and need > free // 2:
                log.info("task weights not kept resident: %.1f GiB needed, %.1f GiB free", need / 2**30, free / 2**30)
                return False
            resident = {}
            for task in self._adapters:
                self._activate(task)
                ws, packed = self.model.linears()
                resident[task] = ({key: w.clone() for key, w in ws.items()}, packed)
            self._resident, self._active = resident, _UNMERGED
            self._activate(self.task)
            return True

    # ---- embedding -----------------------------------------------------------------------------
    def embed(self, texts, *, prompt_name=None, prompt=None, task=None, truncate_dim=None, normalize=True,
              precision="float32", truncate=None, overflow=None, chunk_overlap=0, return_chunks=False,
              show_progress_bar=None, convert_to_tensor=False):
        """Embed ``texts`` (a str or a list of str). Returns (N, D') numpy (or torch with
        ``convert_to_tensor``); a single str returns (D',). See README for every option.

        ``overflow``: what happens to a text over ``max_length`` tokens: "truncate" (the default), "error", or
        "chunk": windows of ``chunk_overlap`` overlapping tokens, embedded with the prompt, their unit vectors
        averaged by token count (jv5fast/overflow.py). ``truncate`` is its older alias (True = "truncate",
        False = "error"). ``return_chunks=True`` (chunk only) returns ``(embeddings, chunks)``: one
        ``overflow.Chunks`` per text (a str: one), its windows' vectors and token / character spans."""
        single = isinstance(texts, str)
        items = self._check_texts(texts)
        check_precision(precision)
        policy = resolve_overflow(overflow, truncate)
        chunk_overlap = check_chunk_options(policy, chunk_overlap, return_chunks, normalize)
        task = self.task if task is None else self._check_task(task)
        k = self._check_truncate_dim(truncate_dim)
        prefix = self._prefix(prompt_name, prompt)
        n = len(items)
        chunks = [] if return_chunks else None
        if n == 0:
            width, dt = output_layout(k, precision)
            res = np.zeros((0, width), dtype=dt)
        elif policy == "chunk":
            res, chunks, _ = self._embed_chunked(items, prefix, task, k, precision, chunk_overlap, return_chunks,
                                                 show_progress_bar)
        else:
            ids = self._encode([prefix + t for t in items], policy == "truncate")
            res = self._embed_ids(ids, task, k, normalize, precision, show_progress_bar)
        if single:
            res = res[0]
            chunks = chunks[0] if chunks else chunks
        res = torch.from_numpy(np.ascontiguousarray(res)) if convert_to_tensor else res
        return (res, chunks) if return_chunks else res

    def _embed_chunked(self, items, prefix, task, k, precision, overlap, keep, show_progress_bar):
        """``embed`` with overflow='chunk' (arguments checked): texts that fit take ``_embed_ids`` exactly as
        with truncation; the others are streamed in windows (jv5fast/overflow.py). Returns ``(rows, chunks or
        None, tokens the model saw)``."""
        ids, truncated = self._tokenize([prefix + t for t in items])
        splitter = self._chunk_splitter() if keep or any(truncated) else None
        bar = None
        if show_progress_bar and any(truncated):  # a window count is known only as each text is tokenized whole
            from tqdm.auto import tqdm
            bar = tqdm(unit="window", desc="embed windows")
        try:
            res, chunks, tokens = embed_chunked(
                splitter, prefix, items, ids, truncated, overlap=overlap, k=k, precision=precision, keep=keep,
                embed_fit=lambda seqs: self._embed_ids(seqs, task, k, True, precision, show_progress_bar),
                embed_ids=lambda seqs: self._embed_ids(seqs, task, self.dim, True, "float32", False),
                group_tokens=group_budget(self._batch_budget(), self.max_length), on_group=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        if any(truncated):
            log.info("%d of %d texts were longer than max_length=%d tokens and embedded in windows (first: index %d)",
                     sum(truncated), len(items), self.max_length, truncated.index(True))
        return res, chunks, tokens

    def _chunk_splitter(self) -> Splitter:
        """The ``overflow.Splitter`` of this engine's tokenizer (built once; two threads racing build two equal
        ones, and either serves)."""
        if self._splitter is None:
            self._splitter = Splitter(self.tokenizer.untruncated(), self.max_length)
        return self._splitter

    def _windows(self, prefix, items, ids, truncated, overlap, label="texts"):
        """``{i: overflow.TextWindows}`` of the over-long texts of a chunked call (``ids``/``truncated``:
        ``_tokenize`` of ``prefix + items[i]``): every text's window is checked against ``overlap`` first, then
        each is tokenized whole. For ``jv5fast.scheduler.Batcher``, which schedules the windows itself."""
        over = [i for i, t in enumerate(truncated) if t]
        if not over:
            return {}
        sp = self._chunk_splitter()
        plans = plan_prompts(sp, prefix, ids, over, overlap, label)
        return {i: sp.windows(i, prefix, items[i], plans[i], overlap, first=ids[i]) for i in over}

    def _batch_budget(self) -> int:
        """Tokens per packed forward: max_batch_tokens, capped at CPU_BATCH_TOKENS on the CPU."""
        return min(self.max_batch_tokens, CPU_BATCH_TOKENS) if self.device.type == "cpu" else self.max_batch_tokens

    def _embed_ids(self, ids, task, k, normalize, precision, show_progress_bar):
        """``embed`` from token ids (``_encode``'s, non-empty; arguments checked): (N, width) numpy. Also for
        callers that need the ids themselves (embed-corpus counts tokens without tokenizing twice)."""
        n = len(ids)
        lengths = [len(s) for s in ids]
        batches = plan_batches(lengths, self._batch_budget(), balance=self.device.type == "cpu")
        if show_progress_bar is None:
            show = len(batches) > _PROGRESS_MIN_BATCHES and n > 64
        else:
            show = bool(show_progress_bar)
        out = torch.empty(n, k, dtype=torch.float32)
        bar = None
        if show:
            from tqdm.auto import tqdm
            bar = tqdm(total=n, unit="text", desc="embed")
        try:
            with self._lock, self._on_device():
                self._activate(task)
                for idx in batches:
                    self._run(idx, ids, out, k, normalize)
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()

        bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(f"non-finite embedding for texts{bad[:10]} (dtype {self.dtype}); "
                                     f"try dtype='float32'")
        return out.numpy() if precision == "float32" else quantize(out.numpy(), precision)

    # sentence-transformers' surface (SentenceTransformer.encode's keywords, its similarity): jv5fast.st_compat
    encode, encode_query, encode_document = st_compat.encode, st_compat.encode_query, st_compat.encode_document
    similarity, similarity_pairwise = st_compat.similarity, st_compat.similarity_pairwise
    similarity_fn_name = "cosine"

    def tokenize(self, texts, *, prompt_name=None, prompt=None):
        """Token ids exactly as ``embed`` would feed them to the model (prefix and truncation applied)."""
        single = isinstance(texts, str)
        items = self._check_texts(texts)
        prefix = self._prefix(prompt_name, prompt)
        ids, _ = self.tokenizer.encode([prefix + t for t in items])
        return ids[0] if single else ids

    def _tokenize(self, prefixed, label="texts"):
        """(token ids, was-truncated flags) of prompt-prefixed texts, refusing a text with no tokens."""
        ids, truncated = self.tokenizer.encode(prefixed)
        for i, seq in enumerate(ids):
            if len(seq) == 0:
                raise ValueError(f"{label}[{i}] produced no tokens (empty text with an empty prompt); "
                                 f"give it a prompt or some text")
        return ids, truncated

    def _encode(self, prefixed, truncate=True, label="texts", fix="pass truncate=True to cut it", plural="texts",
                flags=False):
        """Token ids of prompt-prefixed texts, refusing a text with no tokens and, with ``truncate=False``,
        one over ``max_length`` (errors name ``label[i]``; ``fix`` says how to allow truncation). Shared by
        ``embed`` and ``jv5fast.scheduler.Batcher``; ``flags=True`` returns ``(ids, was-truncated flags)``."""
        ids, truncated = self._tokenize(prefixed, label)
        if any(truncated):
            idx = [i for i, t in enumerate(truncated) if t]
            if not truncate:
                i = idx[0]
                raise ValueError(f"{label}[{i}] has {self.tokenizer.count_untruncated(prefixed[i])} tokens "
                                 f"(prompt included), more than max_length={self.max_length}; {fix}"
                                 + (f" ({len(idx)} {plural} are too long)" if len(idx) > 1 else ""))
            log.info("%d of %d texts were truncated to max_length=%d tokens (first: index %d)",
                     len(idx), len(ids), self.max_length, idx[0])
        return (ids, truncated) if flags else ids

    def warmup(self, max_tokens=None):
        """Do now what the first calls would otherwise pay for: compile the kernels (one eager batch of
        ragged lengths) and, with CUDA graphs, capture every short-batch bucket up to ``max_tokens``
        (default: all 77 buckets). Returns the number of captured graphs."""
        if self.backend != "torch":
            return 0
        with self._lock, self._on_device():
            self._activate(self.task)
            lens = [min(self.max_length, n) for n in (300, 17, 1)]
            batch = PackedBatch.from_ids([[0] * n for n in lens], self.device)
            self.model.forward(batch, last_only=True)
            if self._graphs is None:
                return 0
            return self._graphs.capture_all(max_tokens)

    def _on_device(self):
        """Make the engine's GPU current: Triton launches on the current device, not the tensors'."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @property
    def cuda_graphs(self) -> bool:
        """Whether short batches currently replay CUDA graphs (False once switched off after a failure)."""
        return self._graphs is not None and self._graphs.disabled is None

    # ---- internals -----------------------------------------------------------------------------
    def _run(self, idx, ids, out, k, normalize):
        """Embed the texts ``idx`` of ``ids`` into rows ``idx`` of ``out`` (pooled, truncated, normalized)."""
        def put(lo, hi, rows):
            one_each = torch.arange(rows.shape[0] + 1, device=rows.device, dtype=torch.int32)
            emb = ops.pool_last(rows, one_each, truncate_dim=k, normalize=normalize)
            out[torch.as_tensor(idx[lo:hi])] = emb.float().cpu()
        self._forward([ids[i] for i in idx], put, name=lambda j: f"text {idx[j]}")

    def _forward(self, seqs, consume, lo=0, name=lambda j: "one text", between=None):
        """Forward ``seqs`` (token id lists) as one packed batch and hand the last-token rows (B, E) to
        ``consume(lo, hi, rows)`` for ``seqs[lo:hi]`` (rows are valid only during the call: a CUDA graph
        reuses its output). On CUDA OOM the batch is split in halves, down to a single text. The caller
        holds the engine lock with the task active (``embed``; ``jv5fast.scheduler.Batcher``). ``between``
        goes to ``Backbone.forward`` (eager torch batches only)."""
        try:
            rows = self._graphs.run(seqs) if self._graphs is not None else None   # (B, E) or None
            if rows is None:
                kw = {"between": between} if between is not None and self.backend == "torch" else {}
                rows = self.model.forward(PackedBatch.from_ids(seqs, self.device), last_only=True, **kw)  # (B, E)
            consume(lo, lo + len(seqs), rows)
        except torch.OutOfMemoryError:
            if len(seqs) == 1:
                raise torch.OutOfMemoryError(f"out of memory embedding {name(lo)} alone ({len(seqs[0])} tokens) "
                                             f"on {self.device}") from None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(seqs) // 2
            self._forward(seqs[:half], consume, lo, name, between)
            self._forward(seqs[half:], consume, lo + half, name, between)

    @staticmethod
    def _check_texts(texts):
        if isinstance(texts, str):
            return [texts]
        if texts is None or isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        items = list(texts)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r:.40}), expected str")
        return items

    def _check_truncate_dim(self, truncate_dim) -> int:
        return check_truncate_dim(truncate_dim, self.dim, self._export_dim)

    def _prefix(self, prompt_name, prompt) -> str:
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            return prompt
        name = self.default_prompt_name if prompt_name is None else prompt_name
        if name is None:
            return ""
        if not isinstance(name, str):  # a list is unhashable: say what is wrong, not TypeError from the dict
            raise ValueError(f"prompt_name must be one name (a str), got {type(name).__name__} "
                             f"{reprlib.repr(name)}; valid: {list(self.prompts)}")
        if name not in self.prompts:
            raise ValueError(f"unknown prompt_name {name!r}; valid: {list(self.prompts)}")
        return self.prompts[name]

