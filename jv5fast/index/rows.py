"""What an index holds in memory besides its codes, and the checks on what ``add`` is given.

Growable row buffers (``_Rows`` numpy, ``_TorchRows`` on any torch device: geometric capacity, so n appended
rows cost O(n) copying), external ids (``_Ids``: all int64 or all str, row-aligned, no duplicates, -1
refused) and how ``map_ids`` turns row positions into them, texts, the shared ``metadata`` property, and the
lazy import of an optional extra (faiss, pyarrow). Every user argument is checked here by name, with a
ValueError / TypeError, never an assert.
"""
from __future__ import annotations

import numpy as np

from .format import _RESERVED_ID, _check_metadata, _strings_arrays

def _as_float(x, dim: int, what: str) -> np.ndarray:
    """float (n, dim) numpy/torch -> float32 numpy, refusing NaN/inf and wrong shapes by name."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{what} must be float embeddings, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {tuple(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{what} contain NaN or inf in row(s) {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}")
    return x


class _Rows:
    """A growable (n, width) array with amortized O(1) appends."""

    def __init__(self, width: int, dtype):
        self.buf = np.empty((0, width), dtype=dtype)
        self.n = 0

    def append(self, rows: np.ndarray):
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            new = np.empty((max(need, 2 * self.buf.shape[0], 1024), self.buf.shape[1]), dtype=self.buf.dtype)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n : need] = rows
        self.n = need

    @property
    def data(self) -> np.ndarray:
        return self.buf[: self.n]


class _TorchRows:
    """``_Rows`` for a torch tensor on any device: capacity grows geometrically, so n appended rows cost
    O(n) copying and O(log n) reallocations (``reallocs`` counts them); ``data`` is a view, never a copy."""

    def __init__(self, width: int, dtype, device):
        import torch

        self.buf = torch.empty((0, width), dtype=dtype, device=device)
        self.n = 0
        self.reallocs = 0

    def append(self, rows) -> None:
        import torch

        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            cap = max(need, 2 * self.buf.shape[0], 1024)
            new = torch.empty((cap, self.buf.shape[1]), dtype=self.buf.dtype, device=self.buf.device)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
            self.reallocs += 1
        self.buf[self.n : need] = rows
        self.n = need

    def truncate(self, n: int) -> None:
        self.n = n

    @property
    def data(self):
        return self.buf[: self.n]


def _as_ids(ids, n: int):
    """User ids for n rows -> ("int64", int64 (n,) array) or ("str", list of str); None when n == 0 and the
    kind cannot be told. Anything else is a ValueError naming the offending entry."""
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__len__"):
        raise ValueError(f"ids must be a sequence with one id (int or str) per row, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D (one id per row), got shape {ids.shape}")
        if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
            j = int(np.argmax(ids > np.iinfo(np.int64).max))
            raise ValueError(f"ids[{j}] = {int(ids[j])} does not fit in int64")
        if ids.dtype.kind in "iu":
            ids = ids.astype(np.int64)
        elif ids.dtype.kind in "UO":
            ids = ids.tolist()
        else:
            raise ValueError(f"ids must be integers (int64) or str, got an array of dtype {ids.dtype}")
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries for {n} rows; give exactly one id per row")
    if isinstance(ids, np.ndarray):
        if (ids == -1).any():
            j = int(np.argmax(ids == -1))
            raise ValueError(f"ids[{j}] = -1 {_RESERVED_ID}")
        return "int64", ids
    if n == 0:
        return None
    ids = list(ids)
    first_int = isinstance(ids[0], (int, np.integer)) and not isinstance(ids[0], (bool, np.bool_))
    for j, x in enumerate(ids):
        if isinstance(x, str) and not first_int:
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"ids[{j}] = {x!r} is not valid Unicode (a lone surrogate)") from None
        elif not (first_int and isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))):
            want = "int (like ids[0])" if first_int else "str (like ids[0])" if isinstance(ids[0], str) else "int or str"
            raise ValueError(f"ids[{j}] = {x!r:.80} is a {type(x).__name__}; ids must all be {want}")
        elif not -2**63 <= x < 2**63:
            raise ValueError(f"ids[{j}] = {x} does not fit in int64")
        elif x == -1:
            raise ValueError(f"ids[{j}] = -1 {_RESERVED_ID}")
    return ("int64", np.array(ids, dtype=np.int64)) if first_int else ("str", ids)


class _Ids:
    """External ids row-aligned with an index's codes: an int64 ``_Rows`` or a list of str, plus an
    id -> row dict built on the first add() that needs it (a loaded index that is only searched never builds
    it)."""

    def __init__(self, kind: str, values=None):
        self.kind = kind
        self._ints = _Rows(1, np.int64) if kind == "int64" else None
        self._strs = [] if kind == "str" else None
        self._row = None  # id -> row, lazily
        self._array = None  # cached read-only numpy view / object array
        if values is not None:
            self.extend(values)

    def __len__(self):
        return self._ints.n if self._ints is not None else len(self._strs)

    def check_new(self, kind: str, values) -> None:
        """Refuse ``values`` of another kind, or any id already present (or repeated within ``values``)."""
        if kind != self.kind:
            raise ValueError(f"this index's ids are {self.kind}; got {kind} ids (all ids of an index have one type)")
        if self._row is None:
            existing = self._ints.data[:, 0].tolist() if self._ints is not None else self._strs
            self._row = {x: r for r, x in enumerate(existing)}
        seen = {}
        for j, x in enumerate(values.tolist() if isinstance(values, np.ndarray) else values):
            if x in self._row:
                raise ValueError(f"duplicate id {x!r}: ids[{j}] is already the id of row {self._row[x]}")
            if x in seen:
                raise ValueError(f"duplicate id {x!r}: ids[{seen[x]}] and ids[{j}]")
            seen[x] = j

    def extend(self, values) -> None:
        n0 = len(self)
        if self._ints is not None:
            self._ints.append(np.asarray(values, np.int64)[:, None])
        else:
            self._strs.extend(values)
        if self._row is not None:
            for r, x in enumerate(values.tolist() if isinstance(values, np.ndarray) else values, n0):
                self._row[x] = r
        self._array = None

    def truncate(self, n: int) -> None:
        if self._ints is not None:
            self._ints.n = n
        else:
            del self._strs[n:]
        self._row = self._array = None

    def values_list(self) -> list:
        return self._ints.data[:, 0].tolist() if self._ints is not None else list(self._strs)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            if self._ints is not None:
                a = self._ints.data[:, 0]
            else:
                a = np.empty(len(self._strs), dtype=object)
                a[:] = self._strs
            a = a.view()
            a.flags.writeable = False
            self._array = a
        return self._array


def _check_texts(texts, n: int) -> list:
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__"):
        raise ValueError(f"texts must be a sequence with one str per row, got {type(texts).__name__}")
    texts = list(texts)
    if len(texts) != n:
        raise ValueError(f"texts has {len(texts)} entries for {n} rows; give exactly one text per row")
    for j, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{j}] is a {type(t).__name__}, not a str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"texts[{j}] is not valid Unicode (a lone surrogate)") from None
    return texts


def _map_rows(I, n: int, ids: _Ids | None):
    """faiss-style positions I (any shape, -1 = no result) -> external ids of the same shape: int64 with -1,
    or an object array of str with None; positions themselves (int64) when the index has no ids."""
    if hasattr(I, "detach") and hasattr(I, "cpu"):
        I = I.detach().cpu().numpy()
    I = np.asarray(I)
    if I.dtype.kind not in "iu":
        raise ValueError(f"I must be integer row positions (as search() returns), got dtype {I.dtype}")
    I = I.astype(np.int64)
    if I.size and (I.min() < -1 or I.max() >= n):
        bad = I[(I < -1) | (I >= n)].flat[0]
        raise ValueError(f"row position {int(bad)} is out of range for an index of {n} rows (valid: -1..{n - 1})")
    if ids is None:
        return I
    if ids.kind == "int64":
        return np.where(I >= 0, ids.array[np.maximum(I, 0)] if n else -1, -1).astype(np.int64)
    out = np.empty(I.shape, dtype=object)
    ok = I >= 0
    out[ok] = ids.array[I[ok]]
    out[~ok] = None
    return out


def _ids_arrays(ids: _Ids | None) -> dict:
    if ids is None:
        return {}
    if ids.kind == "int64":
        return {"ids": ids._ints.data}
    return _strings_arrays("id", ids._strs)


class _WithMetadata:
    """The ``metadata`` property both indexes share: checked on every assignment."""

    @property
    def metadata(self) -> dict:
        """Free-form JSON-able settings saved with the index (e.g. the model, task and prompt the rows came from)."""
        return self._metadata

    @metadata.setter
    def metadata(self, value) -> None:
        self._metadata = _check_metadata(value)


def _need(module: str, extra: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise
        raise ModuleNotFoundError(f"{module} is not installed; this needs the {extra} extra: "
                                  f'pip install "jv5fast[{extra}]"', name=e.name) from None
