"""Texts longer than the context: the overflow policy of ``Engine.embed`` (``truncate`` | ``error`` | ``chunk``).

``chunk`` cuts a text's own tokens (no prompt, no special tokens) into consecutive windows of at most
``window = max_length - len(specials) - len(prompt)`` tokens, ``overlap`` tokens shared by neighbours; each window
is embedded as its own sequence ``head specials + prompt + window + tail specials`` (window 0 is exactly what
truncation feeds today), and the text's vector is the mean of the windows' full-width unit vectors weighted by
their token counts, renormalized, then Matryoshka-truncated, renormalized and quantized like any vector (vLLM's
chunked processing, vllm-project/vllm#22280, also averages chunk embeddings by token count). Trade-off: memory
stays bounded — windows are generated lazily and embedded in groups of a few batches, their vectors summed as
they come — at the price of tokenizing an over-long text twice (truncated, then whole). Pure logic: the engine
hands in ``embed_ids`` (token id lists -> full-width unit vectors), so everything here is testable without one.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .postprocess import output_layout, quantize
from .tokenizer import clean_text

OVERFLOW = ("truncate", "error", "chunk")
GROUP_BATCHES = 4  # windows are embedded in groups of this many batches' tokens (see group_budget)


def group_budget(max_batch_tokens: int, max_length: int) -> int:
    """Tokens per group of windows: a few packed batches (so windows of several texts share them), at least a
    few windows; a group's ids and vectors are all that exists of a long text's windows at a time."""
    return GROUP_BATCHES * max(max_batch_tokens, max_length)


def resolve_overflow(overflow=None, truncate=None) -> str:
    """The policy from ``overflow`` and its older alias ``truncate`` (True = 'truncate', False = 'error');
    None = not given. Both given must agree; neither means 'truncate'."""
    if overflow is not None and (not isinstance(overflow, str) or overflow not in OVERFLOW):
        raise ValueError(f"overflow {overflow!r} is not valid; choose one of {list(OVERFLOW)}")
    if truncate is not None and not isinstance(truncate, (bool, np.bool_)):
        raise TypeError(f"truncate must be a bool or None, got {type(truncate).__name__}")
    alias = None if truncate is None else ("truncate" if truncate else "error")
    if overflow is None:
        return alias or "truncate"
    if alias is not None and alias != overflow:
        raise ValueError(f"truncate={bool(truncate)} conflicts with overflow={overflow!r} (truncate=True means "
                         f"overflow='truncate', truncate=False means overflow='error'); pass overflow alone")
    return overflow


def check_chunk_options(policy: str, chunk_overlap, return_chunks, normalize=True) -> int:
    """Check the options that only ``overflow='chunk'`` takes; returns ``chunk_overlap`` as an int."""
    if isinstance(chunk_overlap, (bool, np.bool_)) or not isinstance(chunk_overlap, (int, np.integer)):
        raise TypeError(f"chunk_overlap must be an int, got {type(chunk_overlap).__name__}")
    if chunk_overlap < 0:
        raise ValueError(f"chunk_overlap must be >= 0, got {chunk_overlap}")
    if not isinstance(return_chunks, (bool, np.bool_)):
        raise TypeError(f"return_chunks must be a bool, got {type(return_chunks).__name__}")
    if policy != "chunk" and (chunk_overlap or return_chunks):
        raise ValueError(f"chunk_overlap and return_chunks apply to overflow='chunk' only; overflow is {policy!r}")
    if policy == "chunk" and not normalize:
        raise ValueError("overflow='chunk' averages the windows' unit vectors, so normalize=False has no raw "
                         "vector to return for a long text; pass normalize=True (or overflow='truncate')")
    return int(chunk_overlap)


# ---- window planning --------------------------------------------------------------------------------------
def check_window(window, overlap, label="the text") -> None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"no room for {label}'s tokens: its window would be {window} tokens (max_length minus "
                         f"the prompt and special tokens); shorten the prompt or raise max_length")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)):
        raise TypeError(f"chunk_overlap must be an int, got {type(overlap).__name__}")
    if not 0 <= overlap < window:
        raise ValueError(f"chunk_overlap={overlap} must be in 0..{window - 1}: {label}'s windows hold {window} "
                         f"tokens (max_length minus the prompt and special tokens)")


def plan_windows(n_tokens: int, window: int, overlap: int = 0) -> Iterator[Tuple[int, int]]:
    """Spans ``(start, end)`` of consecutive windows over ``n_tokens`` tokens, lazily: each holds 1..``window``
    tokens, neighbours share exactly ``overlap``, the first starts at 0 and the last ends at ``n_tokens``.
    ``n_tokens == 0`` gives one empty span (the prompt alone)."""
    check_window(window, overlap)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    start, step = 0, window - overlap
    while True:
        end = min(start + window, n_tokens)
        yield start, end
        if end >= n_tokens:
            return
        start += step


def count_windows(n_tokens: int, window: int, overlap: int = 0) -> int:
    """``len(list(plan_windows(...)))`` without planning them."""
    check_window(window, overlap)
    return 1 if n_tokens <= window else 1 + -(-(n_tokens - window) // (window - overlap))


# ---- tokens: specials, prompt, text ----------------------------------------------------------------------
def special_template(hf_tokenizer) -> Tuple[List[int], List[int]]:
    """The special ids the post-processor puts before and after a text (nano: [], [EOS]; small: [], [])."""
    with_sp = hf_tokenizer.encode("a", add_special_tokens=True)
    plain = hf_tokenizer.encode("a", add_special_tokens=False).ids
    ids, mask = with_sp.ids, with_sp.special_tokens_mask
    first = next((i for i, m in enumerate(mask) if not m), len(ids))
    head, tail = ids[:first], ids[first + len(plain):]
    if head + plain + tail != ids:
        raise RuntimeError(f"the tokenizer's post-processor does not wrap a text in fixed special tokens "
                           f"({ids} for {plain}); overflow='chunk' cannot build windows for it")
    return list(head), list(tail)


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


@dataclass(frozen=True, eq=False)
class Chunks:
    """One text's windows, for callers that pool or retrieve them themselves (``return_chunks=True``).

    A dataclass per text rather than one padded (N, windows, D') array: texts have 1 to thousands of windows,
    and each text's windows stay one contiguous array."""
    vectors: np.ndarray             # (n, D') the windows' vectors, truncated, normalized, quantized as the text's
    spans: List[Tuple[int, int]]    # (start, end) of each window in the text's own token ids (no prompt/specials)
    offsets: List[Tuple[int, int]]  # (start, end) of each window in the text's characters (text[start:end])
    num_tokens: int                 # the text's own token count


@dataclass(frozen=True, eq=False)
class TextWindows:
    """One text cut into windows; window ``(s, e)`` is the sequence ``prefix + content[s:e] + tail``."""
    index: int                          # the text's position in the call (for messages)
    prefix: np.ndarray                  # head specials + the prompt's tokens, shared by every window
    content: np.ndarray                 # (n,) the text's own token ids
    tail: np.ndarray                    # trailing specials (nano's EOS)
    window: int                         # content tokens per window
    overlap: int                        # content tokens shared by neighbouring windows
    char_offsets: Optional[np.ndarray] = None  # (n, 2) each content token's characters in the text, when kept

    def spans(self) -> Iterator[Tuple[int, int]]:
        return plan_windows(len(self.content), self.window, self.overlap)

    def ids(self, span) -> List[int]:
        s, e = span
        return np.concatenate([self.prefix, self.content[s:e], self.tail]).tolist()

    @property
    def num_windows(self) -> int:
        return count_windows(len(self.content), self.window, self.overlap)

    @property
    def tokens(self) -> int:
        """Tokens the model sees over all windows (prompt and specials once per window)."""
        nw = self.num_windows
        return nw * (len(self.prefix) + len(self.tail)) + len(self.content) + (nw - 1) * self.overlap

    def char_span(self, span) -> Tuple[int, int]:
        s, e = span
        if self.char_offsets is None or e <= s:
            return (0, 0)
        return int(self.char_offsets[s, 0]), int(self.char_offsets[e - 1, 1])


class Splitter:
    """Prompt / text / special-token split of prompt-prefixed texts, from an untruncated HF tokenizer that
    tokenizes exactly as the engine's (``Tokenizer.untruncated()``).

    The prompt's share of a text's tokens is their common prefix with the prompt tokenized alone: BPE may glue
    the prompt's trailing space to the text's first word ("Query: " + "how" -> [Query, :, " how"]), and such a
    token belongs to the text. So the split depends on the text by a token at most; it is read off the
    truncated ids the engine already has."""

    def __init__(self, hf_tokenizer, max_length: int):
        self._tok, self.max_length = hf_tokenizer, max_length
        head, tail = special_template(hf_tokenizer)
        self.head, self.tail = np.asarray(head, dtype=np.int64), np.asarray(tail, dtype=np.int64)
        self._prompts = {}

    def prompt_ids(self, prefix: str) -> np.ndarray:
        ids = self._prompts.get(prefix)
        if ids is None:
            if len(self._prompts) >= 64:  # custom prompts: a small cache, never unbounded
                self._prompts.clear()
            ids = np.asarray(self._tok.encode(clean_text(prefix), add_special_tokens=False).ids, dtype=np.int64)
            self._prompts[prefix] = ids
        return ids

    def plain(self, ids) -> list:
        """Ids without the head and tail specials (``ids`` as the engine's tokenizer returns them)."""
        return list(ids)[len(self.head):len(ids) - len(self.tail)]

    def prompt_len(self, prefix: str, ids) -> int:
        """How many of ``ids`` (a text's tokens with specials, possibly truncated) are the prompt's."""
        return common_prefix(self.plain(ids), self.prompt_ids(prefix))

    def window(self, p: int) -> int:
        return self.max_length - len(self.head) - len(self.tail) - p

    def windows(self, index: int, prefix: str, text: str, p: int, overlap: int, first=None,
                keep_offsets=False) -> TextWindows:
        """Tokenize ``prefix + text`` whole (O(its length)) and cut it; ``first``: the truncated ids, checked
        against window 0."""
        # encode_batch, not encode: only the batch call releases the GIL (a 1M-token text takes seconds, and the
        # server's event loop must go on meanwhile)
        enc = self._tok.encode_batch([clean_text(prefix + text)], add_special_tokens=False)[0]
        ids = np.asarray(enc.ids, dtype=np.int64)
        w = self.window(p)
        if first is not None and not np.array_equal(ids[:p + w], self.plain(first)):
            raise RuntimeError(f"texts[{index}]: the untruncated tokenization disagrees with the truncated one")
        offsets = None
        if keep_offsets:
            offsets = np.asarray(enc.offsets[p:], dtype=np.int64).reshape(-1, 2) - len(prefix)
            offsets = np.clip(offsets, 0, len(text))
        del enc
        return TextWindows(index, np.concatenate([self.head, ids[:p]]), ids[p:].astype(np.int32), self.tail,
                           w, overlap, offsets)


# ---- the weighted mean, streamed ------------------------------------------------------------------------
class WeightedMean:
    """Running ``sum_i w_i v_i / sum_i w_i`` in float64; ``result()`` is it renormalized to unit length."""

    def __init__(self, dim: int):
        self.sum = np.zeros(dim, dtype=np.float64)
        self.weight = 0.0
        self.count = 0

    def add(self, vector, weight) -> None:
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != self.sum.shape:
            raise ValueError(f"vector of shape {v.shape} added to a mean of shape {self.sum.shape}")
        if not weight > 0:
            raise ValueError(f"weights must be > 0, got {weight}")
        self.sum += weight * v
        self.weight += weight
        self.count += 1

    def result(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("the mean of no vectors")
        mean = self.sum / self.weight
        norm = float(np.linalg.norm(mean))
        if not math.isfinite(norm) or norm == 0.0:
            raise FloatingPointError(f"the windows' vectors average to a vector of norm {norm}; cannot normalize")
        return (mean / norm).astype(np.float32)


def finish(vectors, k: int, precision: str) -> np.ndarray:
    """Full-width unit vectors (m, E) -> Matryoshka-truncated to ``k``, renormalized, in ``precision``."""
    x = np.asarray(vectors, dtype=np.float64)[:, :k]
    return quantize((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), precision)


def plan_prompts(splitter, prefix: str, ids, over, overlap: int, label: str = "texts") -> dict:
    """{i: prompt tokens in its windows} for the over-long texts ``over`` (``ids``: their truncated
    tokenization), each text's window checked against ``overlap`` before any is embedded."""
    plans = {}
    for i in over:
        plans[i] = splitter.prompt_len(prefix, ids[i])
        check_window(splitter.window(plans[i]), overlap, f"{label}[{i}]")
    return plans


def stream_windows(texts: Iterable[TextWindows], embed_ids: Callable, group_tokens: int, keep: bool = False,
                   on_group: Optional[Callable[[int], None]] = None):
    """Embed every window of ``texts`` (an iterable, consumed lazily) in groups of at most ``group_tokens``
    tokens (or one window), windows of several texts sharing a group; yield ``(text, unit vector (E,),
    windows' vectors (n, E) or None)`` per text, in order, as soon as its last window is done. Only one
    group's windows exist at a time, and a text's window vectors only with ``keep``."""
    pending = deque()  # [text, WeightedMean or None, kept vectors]: texts whose windows are not all embedded
    group, used = [], 0

    def flush():
        seqs = [s for _, _, s in group]
        try:
            vecs = np.asarray(embed_ids(seqs), dtype=np.float32)
        except FloatingPointError as e:
            idx = sorted({entry[0].index for entry, _, _ in group})
            raise FloatingPointError(f"non-finite embedding in a window of texts{idx}: {e}") from None
        if vecs.ndim != 2 or vecs.shape[0] != len(seqs):
            raise ValueError(f"embed_ids returned shape {vecs.shape} for {len(seqs)} windows")
        for (entry, (s, e), _), v in zip(group, vecs):
            if entry[1] is None:
                entry[1] = WeightedMean(v.shape[0])
            entry[1].add(v, max(e - s, 1))  # weight: the window's own text tokens (overlap included)
            if keep:
                entry[2].append(v)
        if on_group is not None:
            on_group(len(group))
        group.clear()

    def done(entry):
        vectors = np.stack(entry[2]) if keep else None
        return entry[0], entry[1].result(), vectors

    for tw in texts:
        pending.append([tw, None, []])
        for span in tw.spans():
            seq = tw.ids(span)
            if group and used + len(seq) > group_tokens:
                flush()
                used = 0
                while len(pending) > 1:  # every text before the current one has all its windows embedded
                    yield done(pending.popleft())
            group.append((pending[-1], span, seq))
            used += len(seq)
    if group:
        flush()
    while pending:
        yield done(pending.popleft())


def embed_chunked(splitter: Splitter, prefix: str, items, ids, truncated, *, overlap: int, embed_fit: Callable,
                  embed_ids: Callable, k: int, precision: str, group_tokens: int, keep: bool = False,
                  on_group: Optional[Callable[[int], None]] = None):
    """``Engine.embed(..., overflow='chunk')`` from the engine's truncated tokenization ``ids`` / ``truncated``.

    Texts that fit go whole to ``embed_fit(ids) -> rows in precision`` (exactly today's path); each over-long
    one is cut into windows (checked first: every window must fit ``overlap``), tokenized whole only when its
    turn comes, and streamed through ``embed_ids(id lists) -> full-width unit vectors`` (``on_group(windows)``
    after each group). Returns ``(rows (N, width) in precision, list of Chunks (one per text) or None, tokens
    the model saw: every window's, prompt and specials included)``."""
    n = len(items)
    fit = [i for i in range(n) if not truncated[i]]
    over = [i for i in range(n) if truncated[i]]
    plans = plan_prompts(splitter, prefix, ids, over, overlap)  # index -> prompt tokens in its windows
    width, dtype = output_layout(k, precision)
    out = np.empty((n, width), dtype=dtype)
    tokens = sum(len(ids[i]) for i in fit)
    chunks = [None] * n if keep else None
    if fit:
        out[fit] = embed_fit([ids[i] for i in fit])
        if keep:
            for i in fit:  # one window: the whole text
                p = splitter.prompt_len(prefix, ids[i])
                tw = splitter.windows(i, prefix, items[i], p, 0, keep_offsets=True)
                whole = (0, len(tw.content))
                chunks[i] = Chunks(out[i:i + 1].copy(), [whole], [tw.char_span(whole)], len(tw.content))
    if not over:
        return out, chunks, tokens
    sources = (splitter.windows(i, prefix, items[i], plans[i], overlap, first=ids[i], keep_offsets=keep)
               for i in over)
    for tw, vector, vectors in stream_windows(sources, embed_ids, group_tokens, keep=keep, on_group=on_group):
        out[tw.index] = finish(vector[None], k, precision)[0]
        tokens += tw.tokens
        if keep:
            spans = list(tw.spans())
            chunks[tw.index] = Chunks(finish(vectors, k, precision), spans, [tw.char_span(s) for s in spans],
                                      len(tw.content))
    return out, chunks, tokens
