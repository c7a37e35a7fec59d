"""The item store: what training and scoring know about the catalog.

Row 0 is padding; rows 1..N hold each item's embedding, codes and coefficients, with the
codebook's centroids beside them.

On disk (the format every stage and rank reads; :class:`ItemStoreWriter` writes it, a
block at a time, :meth:`ItemStore.load` memory-maps it) a store is a directory::

    meta.json         format, version, n_items, dim, layers, dtype, codebook metric and
                      the provenance (embedding model id, codebook version) -- written
                      last: a directory without it is an unfinished write and is refused
    embeddings.npy    (N+1, D) float16 (default) or float32, row 0 zeros
    codes.npy         (N+1, L) int32
    coefs.npy         (N+1, L) float32
    centroids.npy     (L, K, D) float32
    item_ids.arrow    Arrow IPC file, one string column, catalog order (index i+1)

``.npy`` is numpy's own format, so the arrays open with ``np.load(mmap_mode=...)``. The
embeddings are mapped copy-on-write: the ranks of one node share the file's pages in
the OS page cache instead of each holding an ``(N+1) x D`` float32 copy. Cost at 10M items
x 2048-d: 41 GB of float16 on disk, mapped, paged in as touched (a rank that reads
every item once pages in all of it, shared by the node's ranks); codes and coefficients
240 MB; item ids as Python strings ~0.7 GB per process (the one part still in memory).
A legacy single ``.npz`` (earlier releases' checkpoints) still loads, into memory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from hymirec_udfs.core.choices import Metric


@dataclass
class ItemStore:
    """Catalog arrays the stage-2 models read (METHOD.md notation).

    Catalog index ``i + 1`` is ``item_ids[i]``; index 0 is padding.

    Attributes:
        item_ids: N item ids (strings).
        embeddings: (N+1, D) float16 or float32 (kept as given, memory-mapped when
            loaded from disk), row 0 zeros, other rows L2-normalised ``e_j``.
        codes: (N+1, L) integer codebook codes ``b_j^l``.
        coefs: (N+1, L) float32 projection coefficients ``a_j^l`` (row 0 zeros).
        centroids: (L, K, D) float32 codebook centroids; layers with fewer than K
            centroids are padded with zero rows.
        codebook_metric: ``cosine`` (reconstruction ``sum_l a_l c_l``) or ``euclidean``
            (``sum_l c_l``); both are L2-normalised afterwards.
    """

    item_ids: list[str]
    embeddings: np.ndarray
    codes: np.ndarray
    coefs: np.ndarray
    centroids: np.ndarray
    codebook_metric: str = "cosine"

    def __post_init__(self) -> None:
        self.item_ids = [str(x) for x in self.item_ids]
        # No copy of what is already float16/float32 (a memory map stays one).
        if not isinstance(self.embeddings, np.ndarray) or self.embeddings.dtype not in STORE_DTYPES.values():
            self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if not (isinstance(self.codes, np.ndarray) and np.issubdtype(self.codes.dtype, np.integer)):
            self.codes = np.asarray(self.codes, dtype=np.int64)
        self.coefs = np.asarray(self.coefs, dtype=np.float32)
        self.centroids = np.asarray(self.centroids, dtype=np.float32)
        n = len(self.item_ids)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n + 1:
            raise ValueError(f"embeddings must be (N+1, D) = ({n + 1}, D), got {self.embeddings.shape}")
        if self.codes.ndim != 2 or self.codes.shape[0] != n + 1:
            raise ValueError(f"codes must be (N+1, L) = ({n + 1}, L), got {self.codes.shape}")
        if self.coefs.shape != self.codes.shape:
            raise ValueError(f"coefs shape {self.coefs.shape} != codes shape {self.codes.shape}")
        if self.centroids.ndim != 3 or self.centroids.shape[0] != self.codes.shape[1]:
            raise ValueError(
                f"centroids must be (L, K, D) with L = {self.codes.shape[1]}, got {self.centroids.shape}"
            )
        if self.centroids.shape[2] != self.embeddings.shape[1]:
            raise ValueError(
                f"centroid dim {self.centroids.shape[2]} != embedding dim {self.embeddings.shape[1]}"
            )
        if self.codebook_metric not in Metric.values():
            raise ValueError(f"codebook_metric must be one of {Metric.values()}, got {self.codebook_metric!r}")
        if n and (self.codes[1:].min() < 0 or self.codes[1:].max() >= self.centroids.shape[1]):
            raise ValueError(f"codes must lie in [0, {self.centroids.shape[1]}), got "
                             f"[{self.codes[1:].min()}, {self.codes[1:].max()}]")
        if len(set(self.item_ids)) != n:
            raise ValueError("item_ids contain duplicates")
        self._index: Any = None
        self._arrow_ids: Any = None
        self.meta: dict[str, Any] = {}
        self.path: Optional[str] = None  # the directory it was loaded from, if any

    @property
    def n_items(self) -> int:
        """Catalog size N (padding excluded)."""
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.embeddings.shape[1])

    def lookup(self, ids: Any) -> np.ndarray:
        """Catalog indices (1..N) of item ids, -1 for ids not in the catalog.

        Args:
            ids: item ids: a sequence, a numpy array, or a pyarrow string array (looked up
                in Arrow without materialising Python strings, which matters for the
                millions of history entries of a training table).

        Returns:
            int64 array of the same length.
        """
        import pyarrow as pa

        if isinstance(ids, (pa.Array, pa.ChunkedArray)):
            import pyarrow.compute as pc

            if self._arrow_ids is None:
                self._arrow_ids = pa.array(self.item_ids, type=pa.string())
            if not pa.types.is_string(ids.type):
                ids = ids.cast(pa.string())
            found = pc.index_in(ids, value_set=self._arrow_ids)
            return np.asarray(found.fill_null(-1), dtype=np.int64) + (np.asarray(found.is_valid()).astype(np.int64))
        import pandas as pd

        if self._index is None:
            self._index = pd.Index(self.item_ids)
        ids_arr = np.asarray(ids, dtype=object)
        if ids_arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        pos = self._index.get_indexer(ids_arr.astype(str)).astype(np.int64)
        return np.where(pos >= 0, pos + 1, -1)

    def index_of(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Catalog indices (1..N) of item ids.

        Args:
            ids: item ids.

        Returns:
            int64 array of the same length.

        Raises:
            KeyError: some ids are not in the catalog (no embedding or code); the first
                few are named.
        """
        ids_arr = np.asarray(ids, dtype=object)
        idx = self.lookup(ids_arr)
        missing = idx < 0
        if missing.any():
            unknown = list(dict.fromkeys(ids_arr[missing].tolist()))
            raise KeyError(
                f"{len(unknown)} item id(s) have no embedding/code in the item store, "
                f"e.g. {unknown[:5]}"
            )
        return idx

    def save(self, path: str, *, dtype: str = "float16", meta: Optional[dict[str, Any]] = None) -> None:
        """Write the store in the directory format (module docstring), block by block.

        Args:
            path: the directory (replaced when it exists).
            dtype: ``float16`` or ``float32`` embeddings on disk.
            meta: extra provenance for ``meta.json`` (merged over this store's ``meta``).
        """
        layers = self.codes.shape[1]
        with ItemStoreWriter(path, self.n_items, self.dim, self.centroids, self.codebook_metric, layers=layers,
                             dtype=dtype, meta={**self.meta, **(meta or {})}) as writer:
            for lo in range(0, self.n_items, WRITE_BLOCK_ROWS):
                hi = min(lo + WRITE_BLOCK_ROWS, self.n_items)
                writer.append(self.item_ids[lo:hi], self.embeddings[1 + lo : 1 + hi], self.codes[1 + lo : 1 + hi],
                              self.coefs[1 + lo : 1 + hi])

    @classmethod
    def load(cls, path: str) -> "ItemStore":
        """Open a store: a directory is memory-mapped; a legacy ``.npz`` is read into memory.

        Raises:
            ValueError: a directory without ``meta.json`` (an unfinished write) or of
                another format/version.
        """
        if os.path.isdir(path):
            return _open_directory(Path(path))
        with np.load(path, allow_pickle=False) as data:
            return cls(
                item_ids=data["item_ids"].tolist(),
                embeddings=data["embeddings"],
                codes=data["codes"],
                coefs=data["coefs"],
                centroids=data["centroids"],
                codebook_metric=str(data["codebook_metric"]),
            )


STORE_FORMAT = "hymirec-item-store"
STORE_VERSION = 1
STORE_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
# Rows per block when copying a store (64 MB of float32 at D=2048).
WRITE_BLOCK_ROWS = 8192


def _open_directory(root: Path) -> ItemStore:
    import pyarrow as pa

    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"item store {root} has no meta.json: an unfinished write; rebuild it")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
        raise ValueError(f"item store {root} is {meta.get('format')!r} v{meta.get('version')}, "
                         f"expected {STORE_FORMAT!r} v{STORE_VERSION}")
    with pa.memory_map(str(root / "item_ids.arrow")) as source:
        ids = pa.ipc.open_file(source).read_all().column(0).to_pylist()
    store = ItemStore(
        item_ids=ids,
        # Copy-on-write: writable for torch.from_numpy, never written back, pages shared.
        embeddings=np.load(root / "embeddings.npy", mmap_mode="c"),
        codes=np.load(root / "codes.npy", mmap_mode="c"),
        coefs=np.load(root / "coefs.npy"),
        centroids=np.load(root / "centroids.npy"),
        codebook_metric=meta["codebook_metric"],
    )
    store.meta = {k: v for k, v in meta.items() if k not in _LAYOUT_KEYS}
    store.path = str(root)
    return store


_LAYOUT_KEYS = ("format", "version", "n_items", "dim", "layers", "dtype", "codebook_metric")


class ItemStoreWriter:
    """Writes an item store directory in appended blocks, without the catalog in memory.

    Rows go to memory-mapped ``.npy`` files at a cursor; ids to an Arrow IPC stream. The
    directory is built under ``<path>.partial`` and renamed into place by :meth:`close`
    after ``meta.json``, so a failed or short write (fewer rows than declared) leaves no
    store behind and never replaces a previous one. Memory: one block.

    Args:
        path: the store directory to create (replaced when it exists).
        n_items: rows to expect (N, padding excluded).
        dim: embedding width D.
        centroids: (L, K, D) codebook centroids.
        codebook_metric: ``cosine`` or ``euclidean``.
        layers: code layers L (defaults to the centroids').
        dtype: ``float16`` or ``float32`` embeddings.
        meta: provenance for ``meta.json`` (embedding model id, codebook version, ...).
    """

    def __init__(self, path: str, n_items: int, dim: int, centroids: np.ndarray, codebook_metric: str, *,
                 layers: Optional[int] = None, dtype: str = "float16", meta: Optional[dict[str, Any]] = None) -> None:
        import pyarrow as pa
        from numpy.lib.format import open_memmap

        if dtype not in STORE_DTYPES:
            raise ValueError(f"item store dtype must be one of {tuple(STORE_DTYPES)}, got {dtype!r}")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.n_items, self.dim = int(n_items), int(dim)
        centroids = np.asarray(centroids, dtype=np.float32)
        self.layers = int(layers if layers is not None else centroids.shape[0])
        self.meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "n_items": self.n_items, "dim": self.dim,
                     "layers": self.layers, "dtype": dtype, "codebook_metric": str(codebook_metric), **(meta or {})}
        np.save(self.partial / "centroids.npy", centroids)
        rows = self.n_items + 1
        self.embeddings = open_memmap(self.partial / "embeddings.npy", mode="w+", dtype=STORE_DTYPES[dtype],
                                      shape=(rows, self.dim))
        self.codes = open_memmap(self.partial / "codes.npy", mode="w+", dtype=np.int32, shape=(rows, self.layers))
        self.coefs = open_memmap(self.partial / "coefs.npy", mode="w+", dtype=np.float32, shape=(rows, self.layers))
        self.embeddings[0] = 0
        self.codes[0] = 0
        self.coefs[0] = 0
        self._ids_sink = pa.OSFile(str(self.partial / "item_ids.arrow"), "wb")
        self._ids = pa.ipc.new_file(self._ids_sink, pa.schema([("item_id", pa.string())]))
        self.cursor = 0

    def append(self, ids: Sequence[str], embeddings: np.ndarray, codes: np.ndarray, coefs: np.ndarray) -> None:
        """Write the next ``len(ids)`` catalog rows.

        Raises:
            ValueError: more rows than declared, or a block of the wrong shape.
        """
        import pyarrow as pa

        n = len(ids)
        if self.cursor + n > self.n_items:
            raise ValueError(f"item store {self.path}: more rows than the {self.n_items} declared")
        embeddings = np.asarray(embeddings)
        if embeddings.shape != (n, self.dim):
            raise ValueError(f"item store {self.path}: embedding block {embeddings.shape}, expected ({n}, {self.dim})")
        lo = 1 + self.cursor
        self.embeddings[lo : lo + n] = embeddings
        self.codes[lo : lo + n] = np.asarray(codes).reshape(n, self.layers)
        self.coefs[lo : lo + n] = np.asarray(coefs).reshape(n, self.layers)
        self._ids.write_batch(pa.record_batch([pa.array([str(x) for x in ids], type=pa.string())],
                                              names=["item_id"]))
        self.cursor += n

    def close(self) -> None:
        """Finish: check the row count, flush, write ``meta.json``, move into place.

        Raises:
            ValueError: fewer rows written than declared (nothing is moved into place).
        """
        self._ids.close()
        self._ids_sink.close()
        if self.cursor != self.n_items:
            self.abort()
            raise ValueError(f"item store {self.path}: {self.cursor} rows written, {self.n_items} declared")
        for arr in (self.embeddings, self.codes, self.coefs):
            arr.flush()
        del self.embeddings, self.codes, self.coefs
        (self.partial / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Drop the partial directory."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "ItemStoreWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self._ids.close()
                self._ids_sink.close()
            finally:
                self.abort()


def link_or_copy_store(source: str, target: str) -> None:
    """Place a store directory at ``target``: hard links where the file system allows
    (no second copy of a 41 GB embedding file), else a copy; ``target`` is replaced."""
    src, dst = Path(source), Path(target)
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for item in src.iterdir():
        try:
            os.link(item, partial / item.name)
        except OSError:
            shutil.copy2(item, partial / item.name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(partial, dst)
