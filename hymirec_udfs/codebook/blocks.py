"""Chunked tensor building blocks shared by the k-means and the residual codebook.

Input checks (finite, non-empty, 2-D; bad rows named by index), device resolution, row
norms and block-wise scoring with the top candidates per row, so that neither the fit
nor the encode ever materialises an n x k score matrix for the whole input.
"""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np
import torch

from hymirec_udfs.core.choices import Metric

DEFAULT_CHUNK_SIZE = 65536

# Candidates kept per point for the capacity fill. Points whose candidates all fill up
# go through the exact fallback (re-scored against the clusters with room), so this only
# trades top-m cost against fallback size, never correctness. At N=200k, D=384, k=256
# (slack 1.0) 2, 3 and 4 reach the same objective within 0.001 (layer 1: 0.7489, 0.7480,
# 0.7482) and the same 3-layer reconstruction cosine (0.8716 vs 0.8715 with 4); 2 is the
# fastest because the top 2 are two row maxima instead of torch's top-k (3-layer fit
# 16.7-16.8 s against 17.7-18.5 s with 4), although ~25 % of the points take the fallback
# (~20 % with 4). 1 loses 0.005: without a second score there is no regret to order by.
DEFAULT_CANDIDATES = 2

# Rows whose squared norm is within this of 1 count as already unit-norm; those inputs
# skip the per-chunk normalisation.
_UNIT_NORM_TOLERANCE = 1e-5

# How many offending row indices an input error quotes.
ROWS_QUOTED = 5

# Rows scored per block on CPU: an 8192 x k float32 score block stays in L2/L3 between
# the matmul and the top-m, which measured ~20 % faster than 65536-row blocks.
CPU_SCORE_BLOCK = 8192
DeviceLike = Union[str, torch.device, None]
ArrayLike = Union[np.ndarray, torch.Tensor]




class CodebookInputError(ValueError):
    """Input the codebook cannot work with; the message names the rows, sizes or dims."""


def parse_metric(metric: Metric | str) -> Metric:
    try:
        return Metric(metric)
    except ValueError:
        raise CodebookInputError(
            f"unknown metric {metric!r}; expected one of {[m.value for m in Metric]}"
        ) from None


def resolve_device(device: DeviceLike, x: torch.Tensor) -> torch.device:
    """None keeps the input's device; ``"auto"`` takes a GPU when there is one."""
    if device is None:
        return x.device
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_tensor(emb: ArrayLike, name: str) -> torch.Tensor:
    """A 2-D floating tensor view of ``emb`` (no copy for contiguous float numpy)."""
    if isinstance(emb, np.ndarray):
        if emb.dtype.kind not in "fiu":
            raise CodebookInputError(f"{name} must be numeric, got dtype {emb.dtype}")
        arr = np.ascontiguousarray(emb)
        if not arr.flags.writeable:
            # torch.from_numpy warns on read-only buffers (e.g. Arrow-backed); a copy is
            # cheaper than teaching every caller about it.
            arr = arr.copy()
        t = torch.from_numpy(arr)
    elif isinstance(emb, torch.Tensor):
        t = emb.detach()
    else:
        raise CodebookInputError(
            f"{name} must be a numpy array or torch tensor, got {type(emb).__name__}"
        )
    if t.ndim != 2:
        raise CodebookInputError(f"{name} must be 2-D (rows x dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise CodebookInputError(f"{name} is empty (0 rows)")
    if t.shape[1] == 0:
        raise CodebookInputError(f"{name} has dimension 0")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _quote_rows(mask: torch.Tensor) -> tuple[int, list[int]]:
    rows = torch.nonzero(mask).flatten()
    return int(rows.numel()), [int(i) for i in rows[:ROWS_QUOTED].tolist()]


def row_sq_norms(
    x: torch.Tensor,
    name: str,
    device: torch.device,
    chunk_size: int,
    *,
    allow_zero: bool,
) -> torch.Tensor:
    """Squared row norms on ``device``; rejects NaN/Inf rows and (unless allowed) zero rows.

    One streamed pass: the checks never materialise an n x D boolean.
    """
    n = x.shape[0]
    sq = torch.empty(n, dtype=torch.float32, device=device)
    for start, stop in row_chunks(n, chunk_size):
        c = x[start:stop].to(device=device, dtype=torch.float32)
        # NaN and Inf propagate into the squared norm, so checking n sums is enough.
        sq[start:stop] = (c * c).sum(dim=1)
    bad = ~torch.isfinite(sq)
    if bool(bad.any()):
        count, first = _quote_rows(bad)
        raise CodebookInputError(
            f"{name} has {count} row(s) containing NaN or Inf (first row indices: {first}); "
            "values beyond 1e19 overflow the float32 norm and count as Inf too"
        )
    if not allow_zero:
        zero = sq <= 0
        if bool(zero.any()):
            count, first = _quote_rows(zero)
            raise CodebookInputError(
                f"{name} has {count} all-zero row(s) (first row indices: {first}); a zero "
                "vector has no direction to encode"
            )
    return sq


def row_chunks(n: int, chunk_size: int) -> Iterable[tuple[int, int]]:
    if chunk_size < 1:
        raise CodebookInputError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def inverse_norms(sq_norms: torch.Tensor) -> torch.Tensor | None:
    """Per-row 1/||x|| (0 for zero rows), or None when rows are already unit-norm."""
    if float((sq_norms - 1.0).abs().max()) <= _UNIT_NORM_TOLERANCE:
        return None
    return torch.where(sq_norms > 0, sq_norms.rsqrt(), torch.zeros_like(sq_norms))


def load_rows(
    x: torch.Tensor,
    rows: slice | torch.Tensor,
    device: torch.device,
    inv_norms: torch.Tensor | None,
) -> torch.Tensor:
    """Rows of ``x`` as float32 on ``device``, normalised when ``inv_norms`` is given."""
    if isinstance(rows, torch.Tensor):
        # index_select, not x[rows]: the advanced-indexing gather measured 1.5-3x slower
        # on CPU for these row gathers (the capacity fill's fallback makes many).
        c = torch.index_select(x, 0, rows.to(x.device)).to(device=device, dtype=torch.float32, non_blocking=True)
        scale = None if inv_norms is None else inv_norms[rows]
    else:
        c = x[rows].to(device=device, dtype=torch.float32, non_blocking=True)
        scale = None if inv_norms is None else inv_norms[rows]
    if scale is not None:
        c = c * scale[:, None]
    return c


def _scores(
    chunk: torch.Tensor,
    centroids: torch.Tensor,
    half_sq: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Higher is closer: cosine for unit centroids, ``x.c - ||c||^2/2`` for Euclidean.

    The Euclidean form drops ``||x||^2``, which does not change any point's ranking.
    """
    s = torch.matmul(chunk, centroids.T, out=out)
    if half_sq is not None:
        s.sub_(half_sq)
    return s


def top_candidates(
    rows: torch.Tensor,
    centroids: torch.Tensor,
    half_sq: torch.Tensor | None,
    m: int,
    out_score: torch.Tensor,
    out_idx: torch.Tensor,
) -> None:
    """Write each row's ``m`` best scores and centroid ids into the ``out_*`` tensors.

    On CPU the rows are scored in blocks of ``CPU_SCORE_BLOCK`` so the block's score
    matrix stays in cache between the matmul and the top-m; on a GPU the whole chunk is
    one block.
    """
    block = rows.shape[0] if rows.device.type != "cpu" else CPU_SCORE_BLOCK
    # One score buffer reused across blocks: a fresh multi-MB allocation per block costs
    # page faults that showed up in profiles.
    buffer = torch.empty((min(block, rows.shape[0]), centroids.shape[0]), dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], block):
        stop = min(start + block, rows.shape[0])
        s = _scores(rows[start:stop], centroids, half_sq, out=buffer[: stop - start])
        if m <= 2:
            # Row maxima, the first knocked out of the (scratch) block before the second:
            # cheaper than topk's per-row partial sort (1.7 vs 2.0 ms for the top 2 of
            # 8192 x 256, 2.9 ms for the top 4; 0.8 ms for the top 1).
            for j in range(m):
                v, i = s.max(dim=1, keepdim=True)
                out_score[start:stop, j : j + 1], out_idx[start:stop, j : j + 1] = v, i
                if j + 1 < m:
                    s.scatter_(1, i, -torch.inf)
        else:
            out_score[start:stop], out_idx[start:stop] = s.topk(m, dim=1)
