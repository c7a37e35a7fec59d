"""Exact full-catalog scoring: target ranks and top-K lists against the whole catalog.

One concern: the chunked exact ranking with its float64 refinement (the parts share the
score buffer, the exclusion masks and the error bounds, so they stay together).

Pure numpy/torch: the Spark stage that feeds user interests and the catalog into these
functions lives elsewhere. Everything here follows ``docs/METHOD.md`` ("Evaluation
protocol"):

* A user's score for catalog item ``i`` is ``max_j cos(r_j, e_i)`` over the user's
  interest vectors ``r_1..r_s`` (``merge="max"``), or, as an option, the target is a hit
  at K when it is in *any* interest's own top-K (``merge="union"``).
* Ranking is over the whole catalog, exact, with the user's history items excluded.
* With one target per user, Recall@K is the hit rate and NDCG@K is
  ``1 / log2(rank + 1)`` when ``rank <= K``.

Rank conventions (shared by every function here):

* ``rank >= 1`` is the 1-based position of the target among the eligible items.
* ``rank == 0`` means the target is not in the catalog (``target_idx == -1``): nothing
  can retrieve it, so it is a miss at every K, and it is counted separately
  (``users_target_absent``) so that catalog coverage problems stay visible instead of
  silently lowering recall.

Exactness: the ranking pass uses float32 matmuls over chunks for speed. Float32
rounding can flip the order of two items whose cosines differ by less than the rounding
error, which would make ranks depend on chunk sizes and BLAS kernels. Every comparison
that float32 cannot decide (scores within a rigorous error bound of the target score) is
therefore re-done in float64 on the raw inputs, so ranks are those of the float64 cosine
and do not change with ``chunk_items`` / ``chunk_users``.
"""

from __future__ import annotations

import contextlib
import math
from typing import (
    TYPE_CHECKING,
    Callable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

from hymirec_udfs.core.choices import MergeMode

if TYPE_CHECKING:  # torch stays a lazy import: the package must import fast (STYLE 9).
    import torch


ArrayLike = Union[np.ndarray, "torch.Tensor"]
MERGE_MAX = MergeMode.MAX.value
MERGE_UNION = MergeMode.UNION.value
MERGE_MODES: Tuple[str, ...] = MergeMode.values()


#: Value of ``target_idx`` for a target that is not in the catalog.
TARGET_ABSENT = -1

# Per-row counts are summed in float32, exact only below 2**24 (see _count_where).
_MAX_CHUNK_ITEMS = 1 << 24

# Norms below this are treated as zero vectors (score 0 against everything) rather than
# blown up into noise by the division.
_NORM_EPS = 1e-12

# float64 cosines of float32 inputs are exact products summed with ~D * 2**-53 relative
# error; differences below this are summation-order noise, so they count as ties
# (pessimistically, against the target).
_TIE_EPS64 = 1e-12

# When more than this fraction of a chunk's scores is too close to call in float32 (a
# degenerate model, e.g. constant interests), one float64 matmul of the affected rows is
# cheaper than gathering the pairs one by one.
_DENSE_REFINE_FRACTION = 1.0 / 64.0

# Pairs re-scored in float64 per batch in the sparse path (memory: pairs * s * D * 8 B).
_REFINE_BATCH_PAIRS = 8192

# Rows per float64 matmul in the dense path, chosen so rows * s * chunk_items * 8 B
# stays near this many bytes.
_DENSE_REFINE_BYTES = 1 << 27


def rank_targets(
    interests: ArrayLike,
    item_emb: ArrayLike,
    target_idx: ArrayLike,
    exclude: Optional[Sequence[np.ndarray]] = None,
    *,
    merge: str = MERGE_MAX,
    chunk_items: int = 65536,
    chunk_users: int = 1024,
) -> np.ndarray:
    """Exact full-catalog rank of each user's target item.

    The score of item ``i`` for user ``u`` is ``max_j cos(r_uj, e_i)``. The rank is
    ``1 + #{i != target, i not excluded : score(i) >= score(target)}``.

    * Ties are pessimistic (counted against the target): otherwise a degenerate model
      that gives every item the same score would rank every target first and score a
      perfect recall.
    * Excluded items (the user's history) never count against the target.
    * Exclusion never removes the target: if the target is also in the user's history
      (a repeat consumption), it is still ranked, since dropping it would silently turn
      a valid test case into a miss.
    * A target absent from the catalog (``target_idx == -1``) gets rank 0 ("miss").

    Memory is bounded by ``chunk_users * s * chunk_items`` float32 scores (one buffer,
    reused for every block): the catalog is never scored against all users at once, and
    never copied; its norms are computed once (one float per item) and applied to the
    scores, so a unit-norm catalog is used exactly as passed.

    ``merge="union"`` returns ``min_j rank_j`` of :func:`rank_targets_per_interest`: the
    target is in the union of the per-interest top-K lists exactly when its best
    per-interest rank is ``<= K``, so Recall@K computed from these ranks is the union
    hit rate, and NDCG uses that best rank.

    Args:
        interests: user interest vectors, shape ``(U, s, D)`` (``(U, D)`` is read as
            ``s == 1``). Normalised here; zero vectors score 0 against every item.
        item_emb: catalog embeddings, shape ``(N, D)``; cosines use their norms (zero
            rows score 0 against every interest).
        target_idx: catalog index of each user's target, shape ``(U,)``; ``-1`` when
            the target is not in the catalog.
        exclude: per user, catalog indices to drop from the ranking (history items);
            ``None`` excludes nothing. Duplicates are allowed.
        merge: ``"max"`` (score = max over interests) or ``"union"``.
        chunk_items: catalog rows scored per matmul.
        chunk_users: users scored per matmul.

    Returns:
        int64 ranks, shape ``(U,)``; 0 where the target is absent.

    Raises:
        ValueError: on shape mismatches, out-of-range indices, non-finite values or an
            unknown ``merge``.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
    if merge == MERGE_UNION:
        per_interest = rank_targets_per_interest(
            interests,
            item_emb,
            target_idx,
            exclude,
            chunk_items=chunk_items,
            chunk_users=chunk_users,
        )
        return per_interest.min(axis=1)
    inputs = _prepare_inputs(interests, item_emb, target_idx, exclude)
    return _rank_rows(*inputs, chunk_items=chunk_items, chunk_users=chunk_users)


def rank_targets_per_interest(
    interests: ArrayLike,
    item_emb: ArrayLike,
    target_idx: ArrayLike,
    exclude: Optional[Sequence[np.ndarray]] = None,
    *,
    chunk_items: int = 65536,
    chunk_users: int = 1024,
) -> np.ndarray:
    """Rank of each user's target under each interest separately.

    ``rank_j = 1 + #{i != target, i not excluded : cos(r_j, e_i) >= cos(r_j, e_t)}``
    (``t`` the target) with the same tie, exclusion and absent-target rules as
    :func:`rank_targets`. The target is in the union of the per-interest top-K lists
    iff ``min_j rank_j <= K``; :func:`metrics_from_ranks` accepts this 2-D output
    directly and applies that min.

    Args:
        interests: shape ``(U, s, D)`` (``(U, D)`` is read as ``s == 1``).
        item_emb: shape ``(N, D)``.
        target_idx: shape ``(U,)``, ``-1`` for a target not in the catalog.
        exclude: per user, catalog indices excluded from the ranking, or ``None``.
        chunk_items: catalog rows scored per matmul.
        chunk_users: (user, interest) rows scored per matmul.

    Returns:
        int64 ranks, shape ``(U, s)``; a row of zeros where the target is absent.

    Raises:
        ValueError: as :func:`rank_targets`.
    """
    vecs, items, targets, excl = _prepare_inputs(
        interests, item_emb, target_idx, exclude
    )
    n_users, n_interests, dim = vecs.shape
    # Each (user, interest) pair becomes its own one-interest "user"; the exclusion
    # arrays are shared by reference, not copied.
    flat_vecs = vecs.reshape(n_users * n_interests, 1, dim)
    flat_targets = np.repeat(targets, n_interests)
    flat_excl = None if excl is None else [e for e in excl for _ in range(n_interests)]
    ranks = _rank_rows(
        flat_vecs,
        items,
        flat_targets,
        flat_excl,
        chunk_items=chunk_items,
        chunk_users=chunk_users,
    )
    return ranks.reshape(n_users, n_interests)


def topk_items(
    interests: ArrayLike,
    item_emb: ArrayLike,
    k: int,
    exclude: Optional[Sequence[np.ndarray]] = None,
    *,
    merge: str = MERGE_MAX,
    chunk_items: int = 65536,
    chunk_users: int = 1024,
    device: str = "cpu",
) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-K catalog items per user, excluding each user's history.

    With ``merge="max"`` items are ordered by ``max_j cos(r_j, e_i)``. With
    ``merge="union"`` each interest gets its own top-K list (the union is their set),
    so the outputs gain an interest axis. Items with equal scores at the K boundary may
    be either side of it (``torch.topk`` order); rows are sorted by descending score.
    When fewer than K items are eligible the tail is padded with index ``-1`` and score
    ``-inf``.

    Args:
        interests: shape ``(U, s, D)`` (``(U, D)`` is read as ``s == 1``).
        item_emb: shape ``(N, D)``.
        k: list length, ``>= 1``.
        exclude: per user, catalog indices never recommended, or ``None``.
        merge: ``"max"`` or ``"union"``.
        chunk_items: catalog rows scored per matmul.
        chunk_users: users scored per matmul.
        device: torch device of the scoring (``cpu``, ``cuda``, ``cuda:1``). On a GPU the
            catalog is copied there once (N x D float32: 8 GB at 1M x 2048), each user
            chunk's top-K comes back to the host; matmuls run in IEEE float32 (TF32 off),
            so the lists equal the CPU's up to float32 rounding of near-ties.

    Returns:
        ``(indices, scores)``: int64 and float32 arrays of shape ``(U, k)`` for
        ``"max"``, ``(U, s, k)`` for ``"union"``.

    Raises:
        ValueError: on bad shapes, indices, ``k`` or ``merge``.
    """
    import torch

    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_chunks(chunk_items, chunk_users)
    # topk has no targets; "absent" placeholders pass validation even for N == 0.
    dummy_targets = np.full(_num_rows(interests), TARGET_ABSENT, dtype=np.int64)
    vecs, items, _, excl = _prepare_inputs(interests, item_emb, dummy_targets, exclude)
    n_users, n_interests, dim = vecs.shape
    if merge == MERGE_UNION:
        vecs = vecs.reshape(n_users * n_interests, 1, dim)
        if excl is not None:
            excl = [e for e in excl for _ in range(n_interests)]
    n_rows, n_items = vecs.shape[0], items.shape[0]
    k_eff = min(k, n_items)
    out_idx = np.full((n_rows, k), -1, dtype=np.int64)
    out_score = np.full((n_rows, k), -np.inf, dtype=np.float32)

    dev = torch.device(device)
    with torch.inference_mode(), _ieee_fp32_matmul():
        scorer = _CatalogScorer(items.to(dev), vecs.shape[1], min(chunk_users, n_rows), chunk_items)
        for row_lo in range(0, n_rows, chunk_users):
            row_hi = min(row_lo + chunk_users, n_rows)
            n_chunk = row_hi - row_lo
            queries = scorer.queries(vecs[row_lo:row_hi].to(dev))
            excl_rows, excl_cols = _chunk_exclusions(excl, row_lo, row_hi)
            best_score = torch.full((n_chunk, 0), -math.inf, device=dev)
            best_idx = torch.zeros((n_chunk, 0), dtype=torch.int64, device=dev)
            for item_lo in range(0, n_items, chunk_items):
                item_hi = min(item_lo + chunk_items, n_items)
                scores = scorer.scores(queries, n_chunk, item_lo, item_hi)
                _mask_exclusions(scores, excl_rows, excl_cols, item_lo, item_hi)
                best_score, best_idx = _merge_topk(
                    scores, item_lo, best_score, best_idx, k_eff, scorer.mask(scores)
                )
            best_idx = torch.where(
                torch.isneginf(best_score), torch.full_like(best_idx, -1), best_idx
            )
            out_idx[row_lo:row_hi, : best_idx.shape[1]] = best_idx.cpu().numpy()
            out_score[row_lo:row_hi, : best_score.shape[1]] = best_score.cpu().numpy()

    if merge == MERGE_UNION:
        return (
            out_idx.reshape(n_users, n_interests, k),
            out_score.reshape(n_users, n_interests, k),
        )
    return out_idx, out_score


def _num_rows(interests: ArrayLike) -> int:
    shape = tuple(interests.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"interests must be (U, s, D) or (U, D), got shape {shape}")
    return int(shape[0])


def _check_chunks(chunk_items: int, chunk_users: int) -> None:
    if not 1 <= chunk_items <= _MAX_CHUNK_ITEMS or chunk_users < 1:
        raise ValueError(
            f"need 1 <= chunk_items <= {_MAX_CHUNK_ITEMS} and chunk_users >= 1, got "
            f"chunk_items={chunk_items}, chunk_users={chunk_users}"
        )


def reduce_ranks(ranks: ArrayLike) -> np.ndarray:
    arr = np.asarray(ranks.cpu() if hasattr(ranks, "cpu") else ranks)
    if arr.ndim == 2:
        # Rows of an absent target are all 0, so the min keeps them at 0.
        arr = arr.min(axis=1) if arr.shape[1] else np.zeros(arr.shape[0], np.int64)
    if arr.ndim != 1:
        raise ValueError(f"ranks must be (U,) or (U, s), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError("ranks must be whole numbers")
    arr = arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(
            "ranks must be >= 0 (0 marks a target absent from the catalog)"
        )
    return arr


def _prepare_inputs(
    interests: ArrayLike,
    item_emb: ArrayLike,
    target_idx: ArrayLike,
    exclude: Optional[Sequence[np.ndarray]],
) -> Tuple["torch.Tensor", "torch.Tensor", np.ndarray, Optional[List[np.ndarray]]]:
    """Validate and convert inputs, without copying the catalog when avoidable."""
    import torch

    vecs = _as_float_tensor(interests, "interests")
    if vecs.ndim == 2:
        vecs = vecs.unsqueeze(1)
    if vecs.ndim != 3:
        raise ValueError(
            f"interests must be (U, s, D) or (U, D), got {tuple(vecs.shape)}"
        )
    items = _as_float_tensor(item_emb, "item_emb")
    if items.ndim != 2:
        raise ValueError(f"item_emb must be (N, D), got {tuple(items.shape)}")
    n_users, n_interests, dim = vecs.shape
    n_items = items.shape[0]
    if items.shape[1] != dim:
        raise ValueError(
            f"interest dim {dim} does not match item_emb dim {items.shape[1]}"
        )
    if n_interests < 1:
        raise ValueError("interests must have at least one interest per user")
    if not bool(torch.isfinite(vecs).all()):
        raise ValueError("interests contain NaN or inf")

    targets = np.asarray(
        target_idx.cpu() if hasattr(target_idx, "cpu") else target_idx
    ).reshape(-1)
    if targets.shape[0] != n_users:
        raise ValueError(
            f"target_idx has {targets.shape[0]} entries for {n_users} users"
        )
    if targets.size and not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"target_idx must be integers, got {targets.dtype}")
    targets = targets.astype(np.int64)
    bad = (targets < TARGET_ABSENT) | (targets >= n_items)
    if np.any(bad):
        raise ValueError(
            f"target_idx out of range [-1, {n_items}): {targets[bad][:5].tolist()}"
        )

    excl: Optional[List[np.ndarray]] = None
    if exclude is not None:
        if len(exclude) != n_users:
            raise ValueError(f"exclude has {len(exclude)} entries for {n_users} users")
        excl = []
        for user, items_out in enumerate(exclude):
            arr = np.asarray(items_out if items_out is not None else [], dtype=np.int64)
            arr = arr.reshape(-1)
            if arr.size and (arr.min() < 0 or arr.max() >= n_items):
                raise ValueError(
                    f"exclude[{user}] has catalog indices outside [0, {n_items})"
                )
            excl.append(arr)
    return vecs, items, targets, excl


def _as_float_tensor(values: ArrayLike, name: str) -> "torch.Tensor":
    """float32 CPU tensor view of ``values``; copies only when the dtype forces it."""
    import torch

    if isinstance(values, torch.Tensor):
        tensor = values.detach().to(device="cpu")
    else:
        arr = np.asarray(values)
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got {arr.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
    if tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    return tensor


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Force IEEE float32 CPU and CUDA matmuls for the duration, then restore the settings.

    ``torch.set_float32_matmul_precision("medium")`` (or the newer
    ``torch.backends.*.fp32_precision = "bf16"``) makes oneDNN run float32 matmuls in
    bfloat16, with errors around 1e-1 on cosines: the exactness band of
    :func:`_rank_rows` and the top-K order would silently break. The knob is process
    global, so it is restored even on error.
    """
    import torch

    # CUDA's counterpart of the oneDNN knob is TF32 (GPU scoring); newer torch names it
    # fp32_precision and warns on the old allow_tf32 attribute.
    cuda = torch.backends.cuda.matmul
    attr, ieee = ("fp32_precision", "ieee") if hasattr(cuda, "fp32_precision") else ("allow_tf32", False)
    saved_cuda = getattr(cuda, attr)
    setattr(cuda, attr, ieee)
    try:
        with _ieee_cpu_matmul():
            yield
    finally:
        setattr(cuda, attr, saved_cuda)


@contextlib.contextmanager
def _ieee_cpu_matmul() -> Iterator[None]:
    import torch

    knob = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if knob is not None and hasattr(knob, "fp32_precision"):
        saved = knob.fp32_precision
        knob.fp32_precision = "ieee"
        try:
            yield
        finally:
            knob.fp32_precision = saved
        return
    saved_legacy = torch.get_float32_matmul_precision()  # torch without the new API
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved_legacy)


def _normalise32(block: "torch.Tensor") -> "torch.Tensor":
    import torch

    norms = torch.linalg.vector_norm(block, dim=-1, keepdim=True)
    return block / norms.clamp_min(_NORM_EPS)


def _normalise64(block: "torch.Tensor") -> "torch.Tensor":
    import torch

    block = block.to(torch.float64)
    norms = torch.linalg.vector_norm(block, dim=-1, keepdim=True)
    return block / norms.clamp_min(_NORM_EPS)


# Catalog rows whose norm is within this of 1 count as unit-norm: such catalogs (the
# pipeline's embeddings are L2-normalised) are scored without any rescaling pass.
_UNIT_NORM_TOLERANCE = 1e-6


def _item_inverse_norms(items: "torch.Tensor", chunk_items: int) -> Optional["torch.Tensor"]:
    """``1 / max(||e_i||, eps)`` per catalog row, or None when every row is unit-norm.

    One streamed pass (chunk by chunk: a whole-catalog temporary would double the memory
    of a 1M-item catalog). It also rejects NaN/inf rows, naming the first of them.
    """
    import torch

    norms = torch.empty(items.shape[0], dtype=torch.float32, device=items.device)
    for lo in range(0, items.shape[0], chunk_items):
        hi = min(lo + chunk_items, items.shape[0])
        norms[lo:hi] = torch.linalg.vector_norm(items[lo:hi], dim=1)
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise ValueError(
            f"item_emb has {rows.numel()} row(s) with NaN or inf (first rows: {rows[:5].tolist()})"
        )
    if norms.numel() == 0 or float((norms - 1.0).abs().max()) <= _UNIT_NORM_TOLERANCE:
        return None
    return 1.0 / norms.clamp_min(_NORM_EPS)


class _CatalogScorer:
    """float32 ``max_j cos(r_j, e_i)`` blocks of a user chunk against catalog chunks.

    Every block is written into one preallocated buffer: a fresh ``s * users x items``
    tensor per block (hundreds of MB at the default chunks) costs page faults that
    measured 1.0 s on top of 2.1 s of matmul for 10k query rows x 100k items x D=384.
    Queries are laid out interest-major, so the max over interests is an in-place
    elementwise maximum of contiguous row blocks. Catalog norms are computed once: a
    unit-norm catalog is used as it is, any other is scaled per item after the max (a
    positive per-item factor commutes with the max over interests), never copied.
    """

    def __init__(self, items: "torch.Tensor", n_interests: int, chunk_users: int, chunk_items: int) -> None:
        import torch

        self.items = items
        self.n_interests = n_interests
        self.inv_norms = _item_inverse_norms(items, chunk_items)
        width = max(1, min(chunk_items, items.shape[0]))
        rows = max(1, chunk_users)
        # Flat storage, so every (rows x width) view of it is contiguous, also for a
        # narrower last chunk.
        dev = items.device
        self._scores = torch.empty(n_interests * rows * width, dtype=torch.float32, device=dev)
        self._aux = torch.empty(rows * width, dtype=torch.float32, device=dev)
        self._mask = torch.empty(rows * width, dtype=torch.bool, device=dev)

    def queries(self, vecs: "torch.Tensor") -> "torch.Tensor":
        """Normalised ``(n, s, D)`` interests as ``(s * n, D)``, interest-major."""
        n, s, dim = vecs.shape
        return _normalise32(vecs).transpose(0, 1).reshape(s * n, dim)

    def scores(self, queries: "torch.Tensor", n_rows: int, item_lo: int, item_hi: int) -> "torch.Tensor":
        """``(n_rows, item_hi - item_lo)`` scores; a view of the shared buffer."""
        import torch

        width = item_hi - item_lo
        out = self._scores[: queries.shape[0] * width].view(queries.shape[0], width)
        torch.matmul(queries, self.items[item_lo:item_hi].T, out=out)
        merged = out[:n_rows]
        for j in range(1, self.n_interests):
            torch.maximum(merged, out[j * n_rows : (j + 1) * n_rows], out=merged)
        if self.inv_norms is not None:
            merged.mul_(self.inv_norms[item_lo:item_hi])
        return merged

    def aux(self, like: "torch.Tensor") -> "torch.Tensor":
        """A float32 scratch block shaped like ``like`` (a scores block)."""
        return self._aux[: like.numel()].view(like.shape)

    def mask(self, like: "torch.Tensor") -> "torch.Tensor":
        """A bool scratch block shaped like ``like`` (a scores block)."""
        return self._mask[: like.numel()].view(like.shape)


def _merge_topk(
    scores: "torch.Tensor",
    item_lo: int,
    best_score: "torch.Tensor",
    best_idx: "torch.Tensor",
    k: int,
    mask: "torch.Tensor",
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Fold one chunk's scores into each row's running top-``k`` (sorted descending).

    Once a row has ``k`` candidates only entries above its current k-th best can enter,
    so a chunk costs one comparison pass plus a gather of the few entries that pass,
    instead of a top-k over the whole chunk: torch's CPU top-k partially sorts every row
    and measured ~4x the cost of the comparison (45 vs 10.5 ms for 1024 x 16384, k=200).
    """
    import torch

    n_rows, width = scores.shape
    if best_score.shape[1] < k:
        # Fewer than k candidates so far: a plain top-k of everything seen.
        chunk_score, chunk_pos = torch.topk(scores, min(k, width), dim=1, sorted=False)
        cand_score = torch.cat([best_score, chunk_score], dim=1)
        cand_idx = torch.cat([best_idx, chunk_pos + item_lo], dim=1)
    else:
        torch.gt(scores, best_score[:, -1:], out=mask)
        rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major: rows ascending
        if rows.numel() == 0:
            return best_score, best_idx
        counts = torch.bincount(rows, minlength=n_rows)
        rank = torch.arange(rows.numel(), device=scores.device) - (torch.cumsum(counts, 0) - counts)[rows]
        extra = int(counts.max())
        pad_score = torch.full((n_rows, extra), -math.inf, device=scores.device)
        pad_idx = torch.full((n_rows, extra), -1, dtype=torch.int64, device=scores.device)
        pad_score[rows, rank] = scores[rows, cols]
        pad_idx[rows, rank] = cols + item_lo
        cand_score = torch.cat([best_score, pad_score], dim=1)
        cand_idx = torch.cat([best_idx, pad_idx], dim=1)
    best_score, pos = torch.topk(cand_score, min(k, cand_score.shape[1]), dim=1, sorted=True)
    return best_score, torch.gather(cand_idx, 1, pos)


def _count_where(
    compare: "Callable[..., torch.Tensor]",
    scores: "torch.Tensor",
    threshold: "torch.Tensor",
    buffer: "torch.Tensor",
) -> "torch.Tensor":
    """Per-row count of ``compare(scores, threshold)``, as int64.

    Summing a bool tensor converts element by element and is ~8x slower than writing
    the comparison into a float buffer and summing that; the float sums are exact
    because chunk widths stay below 2**24.
    """
    import torch

    compare(scores, threshold, out=buffer)
    return buffer.sum(dim=1).round_().to(torch.int64)


def _chunk_exclusions(
    excl: Optional[List[np.ndarray]], row_lo: int, row_hi: int
) -> Tuple[np.ndarray, np.ndarray]:
    """(row-in-chunk, catalog column) pairs of a user chunk, sorted by column."""
    if excl is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    parts = excl[row_lo:row_hi]
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    rows = np.repeat(np.arange(len(parts), dtype=np.int64), lengths)
    cols = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    order = np.argsort(cols, kind="stable")
    return rows[order], cols[order]


def _mask_exclusions(
    scores: "torch.Tensor",
    excl_rows: np.ndarray,
    excl_cols: np.ndarray,
    item_lo: int,
    item_hi: int,
) -> None:
    """Set excluded (user, item) scores of the chunk to -inf in place."""
    import torch

    lo, hi = np.searchsorted(excl_cols, [item_lo, item_hi])
    if hi > lo:
        rows = torch.from_numpy(excl_rows[lo:hi]).to(scores.device)
        cols = torch.from_numpy(excl_cols[lo:hi] - item_lo).to(scores.device)
        scores[rows, cols] = -math.inf


def _scores64(
    vecs: "torch.Tensor",
    items: "torch.Tensor",
    rows: np.ndarray,
    cols: np.ndarray,
) -> "torch.Tensor":
    """float64 ``max_j cos`` of (row, item) pairs, by gather: the reference score.

    Products of float32 values are exact in float64, and targets and competitors go
    through this one function, so identical vectors score identically up to summation
    order, which ``_TIE_EPS64`` absorbs: exact ties stay ties.
    """
    import torch

    out = torch.empty(rows.shape[0], dtype=torch.float64)
    for lo in range(0, rows.shape[0], _REFINE_BATCH_PAIRS):
        hi = min(lo + _REFINE_BATCH_PAIRS, rows.shape[0])
        q = _normalise64(vecs[torch.from_numpy(rows[lo:hi])])  # (p, s, D)
        e = _normalise64(items[torch.from_numpy(cols[lo:hi])])  # (p, D)
        out[lo:hi] = (q * e.unsqueeze(1)).sum(dim=-1).amax(dim=1)
    return out


def _rank_rows(
    vecs: "torch.Tensor",
    items: "torch.Tensor",
    targets: np.ndarray,
    excl: Optional[List[np.ndarray]],
    *,
    chunk_items: int,
    chunk_users: int,
) -> np.ndarray:
    """Ranks under the max merge for rows ``(R, s, D)``; see :func:`rank_targets`."""
    import torch

    _check_chunks(chunk_items, chunk_users)
    n_rows, _, dim = vecs.shape
    n_items = items.shape[0]
    ranks = np.zeros(n_rows, dtype=np.int64)
    present = np.flatnonzero(targets != TARGET_ABSENT)
    if present.size == 0:
        return ranks
    # Rigorous bound on |float32 matmul cosine - float64 cosine| for unit vectors
    # (gamma_D for the dot product, doubled, plus normalisation rounding): anything
    # farther than this from the target score is decided in float32 alone.
    band = 2.0 * dim * 2.0**-24 + 1e-6

    with torch.inference_mode(), _ieee_fp32_matmul():
        scorer = _CatalogScorer(items, vecs.shape[1], min(chunk_users, present.size), chunk_items)
        for lo in range(0, present.size, chunk_users):
            rows = present[lo : lo + chunk_users]
            n_chunk = rows.size
            rows_t = torch.from_numpy(rows)
            chunk_vecs = vecs[rows_t]
            queries = scorer.queries(chunk_vecs)
            chunk_targets = targets[rows]
            # Target scores first, by gather, in the reference precision.
            local = np.arange(n_chunk, dtype=np.int64)
            target64 = _scores64(chunk_vecs, items, local, chunk_targets)
            lower = (target64 - band).to(torch.float32).unsqueeze(1)
            upper = (target64 + band).to(torch.float32).unsqueeze(1)
            chunk_excl = None if excl is None else [excl[r] for r in rows]
            excl_rows, excl_cols = _chunk_exclusions(chunk_excl, 0, n_chunk)
            target_order = np.argsort(chunk_targets, kind="stable")
            sorted_targets = chunk_targets[target_order]
            counts = torch.zeros(n_chunk, dtype=torch.int64)

            for item_lo in range(0, n_items, chunk_items):
                item_hi = min(item_lo + chunk_items, n_items)
                scores = scorer.scores(queries, n_chunk, item_lo, item_hi)
                _mask_exclusions(scores, excl_rows, excl_cols, item_lo, item_hi)
                # The target never competes with itself (and this also un-does its
                # exclusion, which only matters for the other items).
                t_lo, t_hi = np.searchsorted(sorted_targets, [item_lo, item_hi])
                if t_hi > t_lo:
                    own = target_order[t_lo:t_hi]
                    scores[
                        torch.from_numpy(own),
                        torch.from_numpy(sorted_targets[t_lo:t_hi] - item_lo),
                    ] = -math.inf
                buffer = scorer.aux(scores)
                above = _count_where(torch.gt, scores, upper, buffer)
                at_least = _count_where(torch.ge, scores, lower, buffer)
                counts += above
                # Rows with a score inside [lower, upper] need float64; typically few.
                unsure_rows = torch.nonzero(at_least > above).flatten()
                if unsure_rows.numel() == 0:
                    continue
                sub = scores[unsure_rows]
                unsure = (sub >= lower[unsure_rows]) & (sub <= upper[unsure_rows])
                n_unsure = int((at_least - above).sum())
                if n_unsure > _DENSE_REFINE_FRACTION * scores.numel():
                    counts[unsure_rows] += _refine_dense(
                        chunk_vecs[unsure_rows],
                        items,
                        unsure,
                        target64[unsure_rows],
                        item_lo,
                        item_hi,
                    )
                else:
                    pair_sub, pair_cols = torch.nonzero(unsure, as_tuple=True)
                    pair_rows = unsure_rows[pair_sub]
                    exact = _scores64(
                        chunk_vecs,
                        items,
                        pair_rows.numpy(),
                        pair_cols.numpy() + item_lo,
                    )
                    wins = exact >= target64[pair_rows] - _TIE_EPS64
                    counts += torch.bincount(pair_rows[wins], minlength=n_chunk)
            ranks[rows] = 1 + counts.numpy()
    return ranks


def _refine_dense(
    row_vecs: "torch.Tensor",
    items: "torch.Tensor",
    unsure: "torch.Tensor",
    row_target64: "torch.Tensor",
    item_lo: int,
    item_hi: int,
) -> "torch.Tensor":
    """Count undecided pairs of a chunk with float64 matmuls over the affected rows.

    Only entries flagged ``unsure`` are counted (the others were decided in float32);
    excluded and own-target entries were -inf in float32, so they are never ``unsure``.

    Args:
        row_vecs: raw interests of the affected rows, ``(r, s, D)``.
        items: the whole catalog (raw).
        unsure: ``(r, chunk width)`` mask of pairs to decide.
        row_target64: float64 target scores of the rows, ``(r,)``.
        item_lo: first catalog row of the chunk.
        item_hi: one past the last catalog row of the chunk.

    Returns:
        int64 counts ``(r,)`` of unsure items scoring ``>=`` the target.
    """
    import torch

    n_rows, n_interests, dim = row_vecs.shape
    n_cols = item_hi - item_lo
    extra = torch.zeros(n_rows, dtype=torch.int64)
    block = _normalise64(items[item_lo:item_hi])
    step = max(1, _DENSE_REFINE_BYTES // (8 * n_interests * max(n_cols, 1)))
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        q = _normalise64(row_vecs[lo:hi]).reshape(-1, dim)
        exact = (q @ block.T).view(hi - lo, n_interests, n_cols).amax(dim=1)
        threshold = (row_target64[lo:hi] - _TIE_EPS64).unsqueeze(1)
        extra[lo:hi] = (unsure[lo:hi] & (exact >= threshold)).sum(dim=1)
    return extra
