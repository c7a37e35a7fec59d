"""Codebook health statistics: occupancy per layer, skew, collisions, reconstruction.

:func:`codebook_stats` summarises codes (and optionally reconstruction cosines) of any set
of items; the fit report, the encode stage and the report all use it. Cost at 10M items:
one bincount per layer plus one sort of the packed code tuples (O(n log n), 8 B per item).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from hymirec_udfs.codebook.blocks import ArrayLike, CodebookInputError


def _code_bytes(k: int) -> int:
    """Bytes of the smallest unsigned integer that holds codes 0..k-1."""
    if k <= 1 << 8:
        return 1
    if k <= 1 << 16:
        return 2
    return 4


def _collision_rate(codes: np.ndarray, ks: Sequence[int]) -> float:
    """Fraction of items whose full code tuple is shared with at least one other item."""
    n = codes.shape[0]
    if math.prod(int(k) for k in ks) < 2**63:
        # Mixed-radix key: one int64 per item makes np.unique a 1-D sort.
        keys = np.zeros(n, dtype=np.int64)
        for layer, k in enumerate(ks):
            keys = keys * int(k) + codes[:, layer].astype(np.int64)
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] > 1).mean())


def codebook_stats(
    codes: np.ndarray,
    ks: Sequence[int],
    emb: ArrayLike | None = None,
    recon_cosine: np.ndarray | None = None,
    dim: int | None = None,
    *,
    with_coefs: bool = True,
) -> dict[str, float]:
    """How balanced, how used, how distinct and how compact a set of codes is.

    Keys (flat, so they can go straight to ``mlflow.log_metrics``), per layer ``l``
    (0-based): ``layer{l}_cluster_size_min/mean/max``, ``layer{l}_imbalance``
    (``k * sum n_i^2 / n^2``: 1.0 when perfectly even, k when one code takes all),
    ``layer{l}_used_fraction``, ``layer{l}_perplexity`` (``exp`` of the code entropy, at
    most k). Then ``n_items``, ``collision_rate`` (fraction of items sharing their full
    code tuple with another item), ``bytes_per_item`` (each code in the smallest unsigned
    int that holds its layer's k, plus an fp16 coefficient per layer when
    ``with_coefs``); with a dimension, ``compression_vs_fp32`` and ``compression_vs_bf16``;
    with ``recon_cosine``, ``recon_cosine_mean/p5/min``.

    Args:
        codes: ``(n, L)`` integer codes.
        ks: centroids per layer.
        emb: the embeddings the codes stand for; only its dimension is used (when
            ``dim`` is not given).
        recon_cosine: ``(n,)`` reconstruction cosines from :func:`encode`.
        dim: embedding dimension D for the compression ratios.
        with_coefs: count an fp16 coefficient per layer (False for the Euclidean
            codebook, which stores codes only).

    Returns:
        The statistics as a flat ``{name: float}`` dict.

    Raises:
        CodebookInputError: codes that are empty, mis-shaped or out of range.
    """
    codes = np.asarray(codes)
    ks = [int(k) for k in ks]
    if codes.ndim != 2 or codes.shape[1] != len(ks):
        raise CodebookInputError(f"codes have shape {codes.shape}; expected (n, {len(ks)})")
    n = codes.shape[0]
    if n == 0:
        raise CodebookInputError("codes are empty (0 rows)")
    sizes = []
    for layer, k in enumerate(ks):
        column = codes[:, layer].astype(np.int64)
        if column.min() < 0 or column.max() >= k:
            raise CodebookInputError(f"layer {layer} has codes outside [0, {k})")
        sizes.append(np.bincount(column, minlength=k))
    if dim is None and emb is not None:
        dim = int(emb.shape[1])
    recon = None
    if recon_cosine is not None:
        rc = np.asarray(recon_cosine, dtype=np.float64)
        recon = (float(rc.mean()), float(np.percentile(rc, 5)), float(rc.min()))
    return stats_from_counts(n, ks, sizes, _collision_rate(codes, ks), dim=dim, with_coefs=with_coefs, recon=recon)


def stats_from_counts(
    n: int,
    ks: Sequence[int],
    sizes: Sequence[np.ndarray],
    collision_rate: float,
    *,
    dim: int | None = None,
    with_coefs: bool = True,
    recon: tuple[float, float, float] | None = None,
) -> dict[str, float]:
    """:func:`codebook_stats` from aggregates: per layer the k cluster sizes, the collision
    rate and (mean, p5, min) reconstruction cosine. This is what a distributed caller
    (:func:`hymirec_udfs.codebook.spark.catalog_code_stats`) computes without the codes."""
    stats: dict[str, float] = {"n_items": float(n)}
    for layer, k in enumerate(ks):
        layer_sizes = np.asarray(sizes[layer], dtype=np.float64)
        p = layer_sizes[layer_sizes > 0] / n
        stats[f"layer{layer}_cluster_size_min"] = float(layer_sizes.min())
        stats[f"layer{layer}_cluster_size_mean"] = float(n / k)
        stats[f"layer{layer}_cluster_size_max"] = float(layer_sizes.max())
        stats[f"layer{layer}_imbalance"] = float(k * np.sum(layer_sizes**2) / n**2)
        stats[f"layer{layer}_used_fraction"] = float(np.count_nonzero(layer_sizes) / k)
        stats[f"layer{layer}_perplexity"] = float(np.exp(-np.sum(p * np.log(p))))
    stats["collision_rate"] = float(collision_rate)
    bytes_per_item = sum(_code_bytes(k) for k in ks) + (2 * len(ks) if with_coefs else 0)
    stats["bytes_per_item"] = float(bytes_per_item)
    if dim is not None:
        stats["compression_vs_fp32"] = 4.0 * dim / bytes_per_item
        stats["compression_vs_bf16"] = 2.0 * dim / bytes_per_item
    if recon is not None:
        stats["recon_cosine_mean"], stats["recon_cosine_p5"], stats["recon_cosine_min"] = recon
    return stats
