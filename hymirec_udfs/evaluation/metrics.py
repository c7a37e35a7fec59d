"""Ranking metrics from target ranks: Recall@K, NDCG@K, MRR, per user and aggregated.

Rank conventions are those of :mod:`hymirec_udfs.evaluation.scoring` (``rank >= 1`` is the
1-based position among eligible items, ``0`` means the target is not in the catalog).
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Dict,
    Sequence,
    Tuple,
)

import numpy as np

from hymirec_udfs.evaluation.scoring import ArrayLike, reduce_ranks

if TYPE_CHECKING:  # torch stays a lazy import: the package must import fast (STYLE 9).
    pass


DEFAULT_KS: Tuple[int, ...] = (10, 50, 100, 200)


#: Keys of :func:`metrics_from_ranks` besides the per-K ones.
KEY_MRR = "mrr"
KEY_USERS = "users"
KEY_USERS_TARGET_ABSENT = "users_target_absent"


def metrics_from_ranks(
    ranks: ArrayLike, ks: Sequence[int] = DEFAULT_KS
) -> Dict[str, float]:
    """Aggregate Recall@K, NDCG@K and MRR from target ranks.

    Every user counts in the denominator, including those whose target is absent from
    the catalog (rank 0, a miss): dropping them would reward a catalog that loses items.

    Args:
        ranks: ranks from :func:`rank_targets` ``(U,)``, or per-interest ranks
            ``(U, s)`` from :func:`rank_targets_per_interest`, reduced here by the min
            over interests (the union rule).
        ks: cut-offs.

    Returns:
        ``{"recall@K": ..., "ndcg@K": ... for each K, "mrr": ..., "users": U,
        "users_target_absent": count of rank 0}``. Rates are 0.0 when ``U == 0``.

    Raises:
        ValueError: on negative ranks, a bad shape or a non-positive K.
    """
    flat = reduce_ranks(ranks)
    ks = _check_ks(ks)
    n_users = int(flat.shape[0])
    result: Dict[str, float] = {}
    columns = per_user_metrics(flat, ks)
    for k in ks:
        result[f"recall@{k}"] = _mean(columns[f"hit_{k}"])
        result[f"ndcg@{k}"] = _mean(columns[f"ndcg_{k}"])
    result[KEY_MRR] = _mean(columns["rr"])
    result[KEY_USERS] = n_users
    result[KEY_USERS_TARGET_ABSENT] = int(np.count_nonzero(flat == 0))
    return result


def per_user_metrics(
    ranks: ArrayLike, ks: Sequence[int] = DEFAULT_KS
) -> Dict[str, np.ndarray]:
    """Per-user metric columns, e.g. to join back onto a user table.

    Column names avoid ``@`` so they are valid Spark/pandas column names as is.

    Args:
        ranks: ``(U,)`` ranks, or ``(U, s)`` per-interest ranks (reduced by min).
        ks: cut-offs.

    Returns:
        ``{"hit_K": float64 0/1, "ndcg_K": float64 for each K, "rr": 1/rank or 0}``,
        each of shape ``(U,)``.

    Raises:
        ValueError: as :func:`metrics_from_ranks`.
    """
    flat = reduce_ranks(ranks)
    ks = _check_ks(ks)
    found = flat >= 1
    safe = np.where(found, flat, 1).astype(np.float64)
    gain = np.where(found, 1.0 / np.log2(safe + 1.0), 0.0)
    columns: Dict[str, np.ndarray] = {}
    for k in ks:
        hit = found & (flat <= k)
        columns[f"hit_{k}"] = hit.astype(np.float64)
        columns[f"ndcg_{k}"] = np.where(hit, gain, 0.0)
    columns["rr"] = np.where(found, 1.0 / safe, 0.0)
    return columns


def _check_ks(ks: Sequence[int]) -> Tuple[int, ...]:
    out = tuple(int(k) for k in ks)
    if any(k < 1 for k in out):
        raise ValueError(f"every K must be >= 1, got {out}")
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0
