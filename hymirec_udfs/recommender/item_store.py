"""The item store: what training and scoring know about the catalog.

Row 0 is padding; rows 1..N hold each item's embedding, codes and coefficients, with the
codebook's centroids beside them. Cost at 10M items x 2048 dims: 80 GB of float32
embeddings per process -- the scale issue replaces this dense array with codes plus a
streamed embedding store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hymirec_udfs.core.choices import Metric


@dataclass
class ItemStore:
    """Catalog arrays the stage-2 models read (METHOD.md notation).

    Catalog index ``i + 1`` is ``item_ids[i]``; index 0 is padding.

    Attributes:
        item_ids: N item ids (strings).
        embeddings: (N+1, D) float32, row 0 zeros, other rows L2-normalised ``e_j``.
        codes: (N+1, L) int64 codebook codes ``b_j^l``.
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
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
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

    def save(self, path: str) -> None:
        """Write the store as an uncompressed ``.npz`` (no pickled objects).

        Args:
            path: file path (``.npz`` is appended by numpy when missing).
        """
        np.savez(
            path,
            item_ids=np.asarray(self.item_ids, dtype=str),
            embeddings=self.embeddings,
            codes=self.codes,
            coefs=self.coefs,
            centroids=self.centroids,
            codebook_metric=np.asarray(self.codebook_metric),
        )

    @classmethod
    def load(cls, path: str) -> "ItemStore":
        """Read a store written by :meth:`save`.

        Args:
            path: the ``.npz`` file.

        Returns:
            The item store.
        """
        with np.load(path, allow_pickle=False) as data:
            return cls(
                item_ids=data["item_ids"].tolist(),
                embeddings=data["embeddings"],
                codes=data["codes"],
                coefs=data["coefs"],
                centroids=data["centroids"],
                codebook_metric=str(data["codebook_metric"]),
            )
