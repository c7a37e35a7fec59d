"""Top-K retrieval for users with several interests: exact (chunked full-catalog scoring)
and approximate (a faiss IVF index), with the interest that retrieved each item and an
optional per-interest quota.

Both take unit interests ``(U, s, D)`` and unit item vectors ``(N, D)`` and rank items by
``max_j cos(r_j, e_i)``, the evaluation's score. Exact retrieval is
:func:`hymirec_udfs.evaluation.scoring.topk_items` (the evaluation code, CPU or GPU). The
approximate path uses faiss (``IndexIVFFlat`` with inner product, trained on the catalog
or a sample of it): faiss is the well-kept ANN library here; what is written by hand is
only the merge of the s per-interest lists.

Costs at 10M items x 2048-d: exact retrieval reads the whole item matrix per user chunk
(U x N x D x s multiply-adds; 2.4k users/s on one H200 at 1M x 2048, measured by
``benchmarks/gpu.py``) and holds it as float32 (82 GB: a GPU or a large executor);
the IVF index holds the same float32 vectors plus ``nlist`` centroids and scans about
``nprobe / nlist`` of them per query.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from hymirec_udfs.evaluation.scoring import topk_items


def attribute_interests(interests: np.ndarray, items: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """For each retrieved item, the interest with the highest cosine to it (-1 for padding).

    Args:
        interests: ``(U, s, D)`` unit interests.
        items: ``(N, D)`` unit item vectors (any array indexable by rows, e.g. a memmap).
        idx: ``(U, K)`` item rows, ``-1`` for padding.
    """
    safe = np.where(idx < 0, 0, idx)
    picked = np.asarray(items[safe.reshape(-1)], dtype=np.float32).reshape(*idx.shape, -1)  # (U, K, D)
    sims = np.einsum("ukd,usd->uks", picked, interests.astype(np.float32))
    out = sims.argmax(axis=2).astype(np.int32)
    return np.where(idx < 0, -1, out)


def round_robin(per_interest_idx: np.ndarray, per_interest_score: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge each user's s ranked lists by taking the next unseen item of each interest in
    turn, so every interest contributes about ``k / s`` items (diversity quota).

    Args:
        per_interest_idx: ``(U, s, K')`` item rows per interest, best first, -1 padding.
        per_interest_score: matching scores.
        k: list length.

    Returns:
        ``(idx, score, interest)`` of shape ``(U, k)``; rank order is the round-robin order.
    """
    n_users, s, width = per_interest_idx.shape
    out_idx = np.full((n_users, k), -1, np.int64)
    out_score = np.full((n_users, k), -np.inf, np.float32)
    out_interest = np.full((n_users, k), -1, np.int32)
    for u in range(n_users):
        seen: set[int] = set()
        pos = [0] * s
        filled = 0
        while filled < k and any(p < width for p in pos):
            for j in range(s):
                while pos[j] < width:
                    item = int(per_interest_idx[u, j, pos[j]])
                    score = float(per_interest_score[u, j, pos[j]])
                    pos[j] += 1
                    if item >= 0 and item not in seen:
                        seen.add(item)
                        out_idx[u, filled], out_score[u, filled], out_interest[u, filled] = item, score, j
                        filled += 1
                        break
                if filled == k:
                    break
    return out_idx, out_score, out_interest


def exact_topk(
    interests: np.ndarray,
    items: Any,
    k: int,
    exclude: Optional[Sequence[np.ndarray]] = None,
    *,
    per_interest_quota: bool = False,
    chunk_items: int = 65536,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-``k`` item rows, scores and retrieving interest per user.

    Without a quota, items are ranked by the max over interests (as evaluation ranks
    them); with one, each interest's own exact list is merged by :func:`round_robin`.
    """
    if per_interest_quota and interests.shape[1] > 1:
        idx, score = topk_items(interests, items, k, exclude, merge="union", chunk_items=chunk_items, device=device)
        return round_robin(idx, score, k)
    idx, score = topk_items(interests, items, k, exclude, merge="max", chunk_items=chunk_items, device=device)
    return idx, score, attribute_interests(interests, items, idx)


def default_nprobe(nlist: int) -> int:
    """Lists searched per query by default: ``max(16, nlist // 64)``.

    Measured (``benchmarks/recommend.py``, 1M clustered 384-d items, nlist 4,000, top-100
    of 2 interests with 50 excluded): recall@100 against exact 0.953 at nprobe 15, 0.988
    at 31, **0.997 at 62** (this rule), 1.000 from 250 on; at 62 ANN serves 2-3x the
    users/s of exact scoring on 2 cores (``benchmarks/results/recommend.json``, with the
    whole sweep). nlist/64 keeps a margin above the 0.95 goal for catalogs less clustered
    than the benchmark's.
    """
    return max(16, nlist // 64)


class AnnIndex:
    """A faiss inner-product IVF index over unit item vectors (cosine = inner product).

    Args:
        items: ``(N, D)`` unit item vectors (float32 or float16; added in chunks).
        nlist: inverted lists (0: ``4 * sqrt(N)``, at least 1, at most N / 39 so that
            every list has training points).
        nprobe: lists searched per query (0: :func:`default_nprobe`).
        seed: the k-means seed of the IVF training.
        train_sample: vectors the quantizer is trained on (a seeded sample beyond that).
    """

    def __init__(self, items: Any, *, nlist: int = 0, nprobe: int = 0, seed: int = 0,
                 train_sample: int = 262_144) -> None:
        faiss = _faiss()
        n, dim = items.shape
        self.n_items, self.dim = int(n), int(dim)
        if not nlist:
            nlist = int(4 * math.sqrt(max(n, 1)))
        self.nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
        self.nprobe = nprobe or default_nprobe(self.nlist)
        quantizer = faiss.IndexFlatIP(self.dim)
        self.index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, train_sample, replace=False)) if n > train_sample else np.arange(n)
        self.index.train(np.ascontiguousarray(np.asarray(items[rows], dtype=np.float32)))
        for lo in range(0, n, 65536):
            self.index.add(np.ascontiguousarray(np.asarray(items[lo : lo + 65536], dtype=np.float32)))
        self.index.nprobe = min(self.nprobe, self.nlist)

    def save(self, path: str) -> None:
        """Write the index (``faiss.write_index``): the artefact an online ANN service loads."""
        _faiss().write_index(self.index, path)

    @classmethod
    def load(cls, path: str, nprobe: int = 0) -> "AnnIndex":
        """Read an index written by :meth:`save`."""
        obj = cls.__new__(cls)
        obj.index = _faiss().read_index(path)
        obj.n_items, obj.dim, obj.nlist = obj.index.ntotal, obj.index.d, obj.index.nlist
        obj.nprobe = nprobe or default_nprobe(obj.nlist)
        obj.index.nprobe = min(obj.nprobe, obj.nlist)
        return obj

    def topk(
        self,
        interests: np.ndarray,
        k: int,
        exclude: Optional[Sequence[np.ndarray]] = None,
        *,
        per_interest_quota: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate top-``k`` rows, scores and retrieving interest per user.

        Each interest searches ``k + len(history)`` candidates (so exclusion cannot empty
        the list); the lists are merged by max score per item, or round-robin with a quota.
        """
        n_users, s, dim = interests.shape
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        width = min(self.n_items, k + extra)
        scores, rows = self.index.search(np.ascontiguousarray(interests.reshape(-1, dim), dtype=np.float32), width)
        rows, scores = rows.reshape(n_users, s, width), scores.reshape(n_users, s, width).astype(np.float32)
        if exclude is not None:
            for u, e in enumerate(exclude):
                if len(e):
                    scores[u][np.isin(rows[u], e)] = -np.inf
                    rows[u][np.isin(rows[u], e)] = -1
        if per_interest_quota and s > 1:
            order = np.argsort(-scores, axis=2, kind="stable")
            return round_robin(np.take_along_axis(rows, order, 2), np.take_along_axis(scores, order, 2), k)
        out_idx = np.full((n_users, k), -1, np.int64)
        out_score = np.full((n_users, k), -np.inf, np.float32)
        out_interest = np.full((n_users, k), -1, np.int32)
        for u in range(n_users):
            flat_rows, flat_scores = rows[u].reshape(-1), scores[u].reshape(-1)
            interest = np.repeat(np.arange(s, dtype=np.int32), width)
            keep = flat_rows >= 0
            flat_rows, flat_scores, interest = flat_rows[keep], flat_scores[keep], interest[keep]
            order = np.lexsort((interest, -flat_scores))  # best first; ties: lower interest
            flat_rows, flat_scores, interest = flat_rows[order], flat_scores[order], interest[order]
            _, first = np.unique(flat_rows, return_index=True)  # each item's best interest
            first = np.sort(first)[:k]
            out_idx[u, : len(first)] = flat_rows[first]
            out_score[u, : len(first)] = flat_scores[first]
            out_interest[u, : len(first)] = interest[first]
        return out_idx, out_score, out_interest


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency of the ann extra
        raise ImportError("recommend.retrieval=ann needs faiss: pip install 'hymirec[ann]' (faiss-cpu)") from exc
    return faiss
