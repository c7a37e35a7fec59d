"""The cosine-similarity residual codebook (METHOD.md, "The cosine-similarity residual codebook").

An item embedding ``e`` (unit norm, dimension D) is stored as L small integer codes and L
coefficients. Layer ``l`` picks the centroid ``c`` with the highest cosine to the current
residual ``r`` and keeps the projection coefficient ``a = (r . c) / ||c||^2``; the next
residual is the part of ``r`` orthogonal to ``c`` (``r - a c``), not ``r - c``. The decoded
embedding is ``sum_l a_l c_l``, L2-normalised. The Euclidean ablation subtracts the centroid
and stores codes only.

Everything here is pure torch/numpy and runs the same on CPU and GPU (``device``). The
Spark stages (fit on a basepool sample on the driver, encode distributed with the codebook
broadcast, Delta reads and writes) live elsewhere and call this API:

- :func:`balanced_spherical_kmeans`, :func:`plain_kmeans` -> :class:`KMeansResult`
- :func:`fit_residual_codebook` -> (:class:`ResidualCodebook`, :class:`FitReport`)
- :func:`encode`, :func:`decode`, :func:`decode_torch`, :func:`residual_trace`
- :func:`codebook_stats`
- :func:`codebook_to_rows` / :func:`codebook_from_rows`, :func:`save_npz` / :func:`load_npz`

The k-means is hand-written on purpose: no maintained library does capacity-constrained
spherical k-means at catalog scale. faiss' ``Kmeans(spherical=True)`` has no balance
constraint (and subsamples to 256 points per centroid by default), and
``k-means-constrained`` solves each assignment as a min-cost flow over an n x k graph,
which stops being usable at a few thousand points (see ``benchmarks/codebook.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

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
# The k-means++ seeding runs on a sample of this many points per centroid: seeding is k
# sequential passes, so on all n points it would cost as much as a whole Lloyd iteration
# done as matrix-vector products, for no measurable gain in the fitted codebook.
INIT_SAMPLE_PER_CENTROID = 16
# Rows whose squared norm is within this of 1 count as already unit-norm; those inputs
# skip the per-chunk normalisation.
_UNIT_NORM_TOLERANCE = 1e-5
# How many offending row indices an input error quotes.
_ROWS_QUOTED = 5
_NPZ_FORMAT_VERSION = 1
# Regret levels of the capacity fill's sort key; with 2**15 levels the key of k clusters
# fits in int32 while k < 2**16.
_REGRET_LEVELS = 2**15 - 1
_INT32_KEY_MAX_K = 2**16
# Rows scored per block on CPU: an 8192 x k float32 score block stays in L2/L3 between
# the matmul and the top-m, which measured ~20 % faster than 65536-row blocks.
_CPU_SCORE_BLOCK = 8192
# Largest k-means++ sample whose Gram matrix is precomputed (4096^2 float32 = 67 MB).
_GRAM_MAX_SAMPLE = 4096
# Candidates per point when leftovers are re-scored against the clusters with room. 8 was
# faster than 16 and 32 at the same objective: a wider list saves re-scoring phases but
# its top-k costs more than the phases it saves.
_FALLBACK_CANDIDATES = 8

DeviceLike = Union[str, torch.device, None]
ArrayLike = Union[np.ndarray, torch.Tensor]


class Metric(StrEnum):
    """How codes are chosen and residuals formed.

    ``COSINE`` is the paper's codebook (argmax cosine, projection residual, codes plus
    coefficients); ``EUCLIDEAN`` is the ablation (nearest centroid, ``r - c``, codes only).
    """

    COSINE = "cosine"
    EUCLIDEAN = "euclidean"


class CodebookInputError(ValueError):
    """Input the codebook cannot work with; the message names the rows, sizes or dims."""


# --------------------------------------------------------------------------------------
# Results and the codebook itself
# --------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    """Outcome of one k-means fit.

    Attributes:
        centroids: ``(k, D)`` float32 on the compute device; unit rows for spherical fits.
        assignment: ``(n,)`` int64 cluster of each point from the last assignment step
            (capacity-constrained when the fit was balanced); ``centroids`` are the
            (normalised) means of exactly these groups.
        cluster_sizes: ``(k,)`` int64 members per cluster under ``assignment``.
        iterations: assignment steps run (fewer than asked when assignments stopped
            changing).
        objective_history: per assignment step, mean cosine to the assigned centroid
            (spherical) or mean squared distance to it (Euclidean).
        capacity: the per-cluster cap enforced while fitting, None when unbalanced.
        reseeded: empty clusters re-seeded over the whole fit.
    """

    centroids: torch.Tensor
    assignment: torch.Tensor
    cluster_sizes: torch.Tensor
    iterations: int
    objective_history: list[float]
    capacity: int | None
    reseeded: int = 0

    @property
    def max_cluster_over_mean(self) -> float:
        """Largest cluster divided by the mean cluster size ``n / k`` (1.0 is perfect)."""
        n = int(self.cluster_sizes.sum())
        k = int(self.cluster_sizes.numel())
        return float(self.cluster_sizes.max()) * k / n


@dataclass
class ResidualCodebook:
    """A fitted residual codebook.

    Attributes:
        centroids: one ``(k_l, D)`` float32 tensor per layer (unit rows for cosine).
        metric: :class:`Metric` (a plain ``"cosine"`` / ``"euclidean"`` is accepted).
        dim: embedding dimension D.
    """

    centroids: list[torch.Tensor]
    metric: Metric
    dim: int

    def __post_init__(self) -> None:
        self.metric = _parse_metric(self.metric)
        if not self.centroids:
            raise CodebookInputError("a codebook needs at least one layer of centroids")
        for layer, c in enumerate(self.centroids):
            if c.ndim != 2 or c.shape[1] != self.dim or c.shape[0] < 1:
                raise CodebookInputError(
                    f"layer {layer} centroids have shape {tuple(c.shape)}; expected (k, {self.dim})"
                )

    @property
    def ks(self) -> list[int]:
        """Centroids per layer."""
        return [int(c.shape[0]) for c in self.centroids]

    @property
    def num_layers(self) -> int:
        """L, the number of codes per item."""
        return len(self.centroids)

    def to(self, device: DeviceLike) -> ResidualCodebook:
        """The same codebook with float32 centroids on ``device``."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return ResidualCodebook(
            [c.to(device=dev, dtype=torch.float32) for c in self.centroids], self.metric, self.dim
        )

    def stacked_centroids(self, device: DeviceLike = None) -> torch.Tensor:
        """All layers as one ``(L, max_k, D)`` tensor for :func:`decode_torch`.

        Layers with fewer than ``max_k`` centroids are zero-padded; valid codes never
        reach the padding.
        """
        dev = torch.device(device) if device is not None else self.centroids[0].device
        out = torch.zeros(self.num_layers, max(self.ks), self.dim, dtype=torch.float32, device=dev)
        for layer, c in enumerate(self.centroids):
            out[layer, : c.shape[0]] = c.to(device=dev, dtype=torch.float32)
        return out


@dataclass
class LayerFitReport:
    """What happened while fitting one layer.

    Attributes:
        layer: 0-based layer index (the column of the codes array).
        k: centroids in the layer.
        capacity: per-cluster cap while fitting (None when unbalanced).
        cluster_sizes: ``(k,)`` int64 sizes under the fit's (capacity-constrained)
            assignment; encoding afterwards is unconstrained, see :func:`codebook_stats`.
        iterations: assignment steps run.
        objective_history: k-means objective per step: for cosine layers the
            norm-weighted mean cosine ``sum r.c / sum ||r||`` of the residuals to their
            centroids (the plain mean cosine on layer 1), for Euclidean the mean squared
            distance.
        reseeded: empty clusters re-seeded.
        seconds: wall time of the layer's k-means.
        residual_norm_mean: mean norm of the basepool residuals left after this layer.
    """

    layer: int
    k: int
    capacity: int | None
    cluster_sizes: np.ndarray
    iterations: int
    objective_history: list[float]
    reseeded: int
    seconds: float
    residual_norm_mean: float

    @property
    def max_cluster_over_mean(self) -> float:
        """Largest fit-time cluster over the mean size (1.0 is perfect balance)."""
        return float(self.cluster_sizes.max()) * self.k / float(self.cluster_sizes.sum())


@dataclass
class FitReport:
    """Summary of :func:`fit_residual_codebook`, for MLflow and the ``codebooks`` table.

    Attributes:
        metric: metric of the codebook.
        n_input: rows handed in.
        n_fit: basepool rows actually fitted on.
        seed: RNG seed used for the basepool sample and every layer's init.
        balanced: whether the capacity-constrained assignment was used.
        layers: one :class:`LayerFitReport` per layer.
        recon_cosine_mean: mean reconstruction cosine on the basepool (fp16 coefficients).
        seconds: total wall time.
    """

    metric: Metric
    n_input: int
    n_fit: int
    seed: int
    balanced: bool
    layers: list[LayerFitReport] = field(default_factory=list)
    recon_cosine_mean: float = float("nan")
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (cluster sizes summarised, not listed)."""
        return {
            "metric": str(self.metric),
            "n_input": self.n_input,
            "n_fit": self.n_fit,
            "seed": self.seed,
            "balanced": self.balanced,
            "recon_cosine_mean": self.recon_cosine_mean,
            "seconds": self.seconds,
            "layers": [
                {
                    "layer": lr.layer,
                    "k": lr.k,
                    "capacity": lr.capacity,
                    "cluster_size_min": int(lr.cluster_sizes.min()),
                    "cluster_size_max": int(lr.cluster_sizes.max()),
                    "max_cluster_over_mean": lr.max_cluster_over_mean,
                    "iterations": lr.iterations,
                    "objective_history": list(lr.objective_history),
                    "reseeded": lr.reseeded,
                    "seconds": lr.seconds,
                    "residual_norm_mean": lr.residual_norm_mean,
                }
                for lr in self.layers
            ],
        }


@dataclass
class ResidualTrace:
    """Every intermediate of an encode, for tests and diagnostics (holds ``(L+1, n, D)``).

    Attributes:
        codes: ``(n, L)`` int64.
        coefs: ``(n, L)`` float32 coefficients as used for the residuals.
        residuals: ``(L + 1, n, D)`` float32; ``residuals[0]`` is the L2-normalised input,
            ``residuals[l + 1]`` what is left after layer ``l``.
        centroids_used: ``(L, n, D)`` float32, the centroid chosen at each layer.
    """

    codes: np.ndarray
    coefs: np.ndarray
    residuals: np.ndarray
    centroids_used: np.ndarray


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _parse_metric(metric: Metric | str) -> Metric:
    try:
        return Metric(metric)
    except ValueError:
        raise CodebookInputError(
            f"unknown metric {metric!r}; expected one of {[m.value for m in Metric]}"
        ) from None


def _resolve_device(device: DeviceLike, x: torch.Tensor) -> torch.device:
    """None keeps the input's device; ``"auto"`` takes a GPU when there is one."""
    if device is None:
        return x.device
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_tensor(emb: ArrayLike, name: str) -> torch.Tensor:
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
    return int(rows.numel()), [int(i) for i in rows[:_ROWS_QUOTED].tolist()]


def _row_sq_norms(
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
    for start, stop in _chunks(n, chunk_size):
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


def _chunks(n: int, chunk_size: int) -> Iterable[tuple[int, int]]:
    if chunk_size < 1:
        raise CodebookInputError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _inverse_norms(sq_norms: torch.Tensor) -> torch.Tensor | None:
    """Per-row 1/||x|| (0 for zero rows), or None when rows are already unit-norm."""
    if float((sq_norms - 1.0).abs().max()) <= _UNIT_NORM_TOLERANCE:
        return None
    return torch.where(sq_norms > 0, sq_norms.rsqrt(), torch.zeros_like(sq_norms))


def _load_rows(
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


# --------------------------------------------------------------------------------------
# k-means machinery shared by the spherical and Euclidean fits
# --------------------------------------------------------------------------------------


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


def _top_candidates(
    rows: torch.Tensor,
    centroids: torch.Tensor,
    half_sq: torch.Tensor | None,
    m: int,
    out_score: torch.Tensor,
    out_idx: torch.Tensor,
) -> None:
    """Write each row's ``m`` best scores and centroid ids into the ``out_*`` tensors.

    On CPU the rows are scored in blocks of ``_CPU_SCORE_BLOCK`` so the block's score
    matrix stays in cache between the matmul and the top-m; on a GPU the whole chunk is
    one block.
    """
    block = rows.shape[0] if rows.device.type != "cpu" else _CPU_SCORE_BLOCK
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


def _seed_centroids(
    x: torch.Tensor,
    k: int,
    *,
    spherical: bool,
    inv_norms: torch.Tensor | None,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    """Greedy k-means++ on a seeded sample of ``INIT_SAMPLE_PER_CENTROID * k`` points.

    Distances are ``1 - cos`` for the spherical fit (proportional to the squared chord
    between unit vectors) and squared Euclidean otherwise. Random draws come from a CPU
    generator, so the seeding is the same on every device up to float rounding. Each
    step tries ``2 + log k`` candidates and keeps the one that lowers the potential most
    (as scikit-learn does), which gives visibly better starts than plain k-means++.
    """
    n = x.shape[0]
    m = min(n, max(k, INIT_SAMPLE_PER_CENTROID * k))
    sample = torch.randperm(n, generator=generator)[:m].sort().values
    xs = _load_rows(x, sample, device, inv_norms)
    if spherical:
        # Seeding is by direction even when the fit weights rows by their norm.
        xs = F.normalize(xs, dim=1)
    xs_sq = (xs * xs).sum(dim=1)

    # A small sample's Gram matrix (<= 4096^2 floats = 67 MB) turns the k sequential
    # steps into row look-ups: one matmul instead of k small ones, each of which costs a
    # thread hand-off (painful on a loaded machine) for little work.
    gram = xs @ xs.T if m <= _GRAM_MAX_SAMPLE else None

    def dist_to(idx: torch.Tensor) -> torch.Tensor:
        dots = gram[idx] if gram is not None else xs[idx] @ xs.T
        if spherical:
            return (1.0 - dots).clamp_min_(0.0)
        return (xs_sq[idx, None] + xs_sq[None, :] - 2.0 * dots).clamp_min_(0.0)

    trials = 2 + int(math.log(k))
    # Zero rows (exactly reconstructed residuals in later layers) have no direction: they
    # must never become a centre, so they get zero sampling weight throughout.
    usable = (xs_sq > 0) if spherical else torch.ones_like(xs_sq, dtype=torch.bool)
    if not bool(usable.any()):
        return F.normalize(torch.randn(k, x.shape[1], generator=generator), dim=1).to(device)
    usable_rows = torch.nonzero(usable).flatten().cpu()
    first = int(usable_rows[int(torch.randint(usable_rows.numel(), (1,), generator=generator))])
    chosen = [first]
    closest = dist_to(torch.tensor(chosen, device=device))[0] * usable
    for _ in range(1, k):
        weights = closest.double().cpu()
        total = float(weights.sum())
        if total <= 0.0:
            # Every usable point coincides with a chosen centre (duplicates); any one is
            # as good as another, and the capacity fill separates the copies later.
            pick = torch.randint(usable_rows.numel(), (trials,), generator=generator)
            cand = usable_rows[pick]
        else:
            cdf = torch.cumsum(weights, 0)
            draws = torch.rand(trials, generator=generator, dtype=torch.float64) * total
            cand = torch.searchsorted(cdf, draws).clamp_(max=m - 1)
        cand_dev = cand.to(device)
        potentials = torch.minimum(closest[None, :], dist_to(cand_dev))
        best = int(potentials.sum(dim=1).argmin())
        chosen.append(int(cand[best]))
        closest = potentials[best]
    centroids = xs[torch.tensor(chosen, device=device)].clone()
    if spherical:
        centroids = F.normalize(centroids, dim=1)
    return centroids


def _propose_rounds(
    points: torch.Tensor,
    cand_idx: torch.Tensor,
    cand_score: torch.Tensor,
    room: torch.Tensor,
    assignment: torch.Tensor,
    assigned_score: torch.Tensor,
) -> torch.Tensor:
    """Fill clusters from each point's candidate list; return the points left without room.

    Row ``i`` of ``cand_idx`` / ``cand_score`` belongs to point ``points[i]``.

    Each round, every unplaced point proposes to its best remaining candidate that still
    has room, and each cluster accepts proposals in order of regret (how much worse the
    proposer's next candidate is; the last candidate counts as infinite regret) up to its
    room. Rejected points move down their list. This is the margin-ordered greedy fill,
    done in a handful of vectorised rounds instead of a Python loop over points. ``room``,
    ``assignment`` and ``assigned_score`` are updated in place.
    """
    device = points.device
    m = cand_idx.shape[1]
    k = room.numel()
    positions = torch.arange(m, device=device)
    pointer = torch.zeros(points.numel(), dtype=torch.long, device=device)
    live = torch.arange(points.numel(), device=device)
    leftovers: list[torch.Tensor] = []
    while live.numel() > 0:
        if live.numel() == cand_idx.shape[0]:
            # Every row is live (the first round): use the lists as they are rather than
            # gathered copies, the largest temporaries of the fill.
            cidx, csc, live_pointer = cand_idx, cand_score, pointer
        else:
            cidx = torch.index_select(cand_idx, 0, live)
            csc = torch.index_select(cand_score, 0, live)
            live_pointer = torch.index_select(pointer, 0, live)
        ok = (torch.take(room, cidx) > 0) & (positions[None, :] >= live_pointer[:, None])
        has = ok.any(dim=1)
        if not bool(has.all()):
            leftovers.append(live[~has])
            live, cidx, csc, ok = live[has], cidx[has], csc[has], ok[has]
            if live.numel() == 0:
                break
        # gather/index_select/take rather than advanced indexing throughout: the same
        # gathers, measured 1.5-3x faster on CPU.
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
        cluster = cidx.gather(1, first).squeeze(1)
        score = csc.gather(1, first).squeeze(1)
        following = (first + 1).clamp_(max=m - 1)
        first = first.squeeze(1)
        regret = torch.where(first + 1 < m, score - csc.gather(1, following).squeeze(1), torch.inf)

        # One stable sort on an integer key groups the proposals by cluster and puts the
        # highest regret first within each cluster. Regret (>= 0: candidate lists are
        # sorted) is squashed monotonically by r / (1 + r) into 15 bits, plenty to order
        # proposals; torch sorts int32 keys several times faster than floats or int64
        # on CPU, and this sort is most of the fill's cost.
        squashed = torch.where(torch.isinf(regret), 1.0, regret / (1.0 + regret))
        level = (squashed * _REGRET_LEVELS).to(torch.int32).clamp_(0, _REGRET_LEVELS)
        key_dtype = torch.int32 if k < _INT32_KEY_MAX_K else torch.int64
        key = cluster.to(key_dtype) * (_REGRET_LEVELS + 1) + (_REGRET_LEVELS - level).to(key_dtype)
        order = torch.sort(key, stable=True).indices
        grouped = torch.index_select(cluster, 0, order)
        counts = torch.bincount(grouped, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=device) - torch.take(starts, grouped)
        accepted = rank < torch.take(room, grouped)

        winners = order[accepted]
        placed = points[live[winners]]
        assignment[placed] = grouped[accepted]
        assigned_score[placed] = score[winners]
        room -= torch.bincount(grouped[accepted], minlength=k)

        losers = order[~accepted]
        pointer[live[losers]] = first[losers] + 1
        live = live[losers]
    if not leftovers:
        return points[:0]
    return points[torch.cat(leftovers)]


def _capacity_assign(
    cand_idx: torch.Tensor,
    cand_score: torch.Tensor,
    capacity: int,
    k: int,
    rescore: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every point so that no cluster exceeds ``capacity``.

    Points whose top candidates all filled up are re-scored against the clusters that
    still have room (only those points, in chunks) and go through the same fill again;
    since ``k * capacity >= n`` and every round places at least one point, this ends.
    """
    device = cand_idx.device
    n = cand_idx.shape[0]
    room = torch.full((k,), capacity, dtype=torch.long, device=device)
    assignment = torch.full((n,), -1, dtype=torch.long, device=device)
    assigned_score = torch.empty(n, dtype=torch.float32, device=device)
    # Candidate rows are aligned with ``pending``: all points first, then only the
    # leftovers with their fresh lists.
    pending = torch.arange(n, device=device)
    while pending.numel() > 0:
        pending = _propose_rounds(pending, cand_idx, cand_score, room, assignment, assigned_score)
        if pending.numel() == 0:
            break
        cand_idx, cand_score = rescore(pending, room > 0)
    return assignment, assigned_score


def _reseed_empty(
    assignment: torch.Tensor,
    assigned_score: torch.Tensor,
    k: int,
) -> int:
    """Give each empty cluster the worst-fitting point of a cluster that can spare one.

    The moved point becomes the cluster's only member, hence its centroid after the
    update step. Moving into an empty cluster never breaks a capacity. Returns how many
    clusters were re-seeded; ``assignment`` is changed in place.
    """
    sizes = torch.bincount(assignment, minlength=k)
    empty = torch.nonzero(sizes == 0).flatten().tolist()
    if not empty:
        return 0
    sizes_list = sizes.tolist()
    # At most one member per cluster cannot be moved (its last one), so the len(empty) + k
    # worst-fitting points always contain enough movable ones; no full sort of n needed.
    pool = min(assignment.numel(), len(empty) + k)
    worst_first = torch.topk(assigned_score, pool, largest=False).indices.tolist()
    owners = assignment[worst_first].tolist()
    cursor = 0
    for cluster in empty:
        while sizes_list[owners[cursor]] < 2:
            cursor += 1
        point, owner = worst_first[cursor], owners[cursor]
        cursor += 1
        sizes_list[owner] -= 1
        sizes_list[cluster] += 1
        assignment[point] = cluster
        assigned_score[point] = -torch.inf
    return len(empty)


def _lloyd(
    x: torch.Tensor,
    sq_norms: torch.Tensor,
    k: int,
    *,
    spherical: bool,
    iters: int,
    seed: int,
    balance: bool,
    capacity_slack: float,
    chunk_size: int,
    device: torch.device,
    n_candidates: int,
    weight_by_norm: bool = False,
) -> KMeansResult:
    """Lloyd iterations with an optional capacity-constrained assignment step.

    Hand-written because no maintained library does this at catalog scale: faiss' k-means
    has no balance constraint, and k-means-constrained solves every assignment as a
    min-cost flow over n x k edges, unusable beyond a few thousand points.

    ``x`` stays where it is (host memory for catalogs larger than the device); each pass
    streams ``chunk_size`` rows to ``device``. Per iteration: one pass scores every chunk
    against the centroids and keeps the top ``n_candidates`` (never the full n x k), the
    capacity fill runs on those lists, and a second pass sums the members of each cluster.
    With ``weight_by_norm`` a spherical fit assigns by cosine but sums the rows as they
    are, so each row pulls its centroid in proportion to its norm (used for residuals).
    """
    n, d = x.shape
    capacity: int | None = None
    if balance:
        if capacity_slack < 1.0:
            raise CodebookInputError(f"capacity_slack must be >= 1.0, got {capacity_slack}")
        capacity = math.ceil(capacity_slack * n / k)
    # Rows are normalised on the fly for a plain spherical fit; a norm-weighted fit uses
    # them as they are: the cosine ranking per row is scale-free, and the centroid (the
    # normalised sum) then weights each row by its norm.
    inv_norms = _inverse_norms(sq_norms) if spherical and not weight_by_norm else None
    generator = torch.Generator().manual_seed(seed)
    centroids = _seed_centroids(
        x, k, spherical=spherical, inv_norms=inv_norms, device=device, generator=generator
    )
    m = min(n_candidates, k) if balance else 1
    if spherical:
        point_sq = torch.where(sq_norms > 0, torch.ones_like(sq_norms), sq_norms)
    else:
        point_sq = sq_norms

    def half_sq_of(c: torch.Tensor) -> torch.Tensor | None:
        return None if spherical else 0.5 * (c * c).sum(dim=1)

    history: list[float] = []
    assignment: torch.Tensor | None = None
    reseeded = 0
    iterations = 0
    for _ in range(max(1, iters)):
        half_sq = half_sq_of(centroids)
        cand_idx = torch.empty((n, m), dtype=torch.long, device=device)
        cand_score = torch.empty((n, m), dtype=torch.float32, device=device)
        for start, stop in _chunks(n, chunk_size):
            _top_candidates(
                _load_rows(x, slice(start, stop), device, inv_norms),
                centroids,
                half_sq,
                m,
                cand_score[start:stop],
                cand_idx[start:stop],
            )

        if balance:
            assert capacity is not None

            def rescore(points: torch.Tensor, open_clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                # Only the clusters with room are scored: by the time points fall back
                # most clusters are full, so this matmul is a fraction of a full one.
                open_ids = torch.nonzero(open_clusters).flatten()
                open_centroids = centroids[open_ids]
                open_half_sq = None if half_sq is None else half_sq[open_ids]
                width = min(max(m, _FALLBACK_CANDIDATES), open_ids.numel())
                out_idx = torch.empty((points.numel(), width), dtype=torch.long, device=device)
                out_score = torch.empty((points.numel(), width), dtype=torch.float32, device=device)
                for start, stop in _chunks(points.numel(), chunk_size):
                    _top_candidates(
                        _load_rows(x, points[start:stop], device, inv_norms),
                        open_centroids,
                        open_half_sq,
                        width,
                        out_score[start:stop],
                        out_idx[start:stop],
                    )
                return open_ids[out_idx], out_score

            new_assignment, assigned_score = _capacity_assign(cand_idx, cand_score, capacity, k, rescore)
        else:
            new_assignment = cand_idx[:, 0].clone()
            assigned_score = cand_score[:, 0].clone()
        del cand_idx, cand_score
        iterations += 1

        # Zero rows (possible in later residual layers) carry no direction; they are
        # excluded from the spherical objective rather than counted as cosine 0.
        if spherical:
            valid = point_sq > 0
            if not bool(valid.any()):
                history.append(0.0)
            elif weight_by_norm:
                # Norm-weighted mean cosine: sum r.c / sum ||r|| (the plain mean cosine
                # when the rows are unit-norm).
                history.append(float(assigned_score.sum() / sq_norms.sqrt().sum()))
            else:
                history.append(float(assigned_score[valid].mean()))
        else:
            history.append(float((point_sq - 2.0 * assigned_score).mean()))

        if assignment is not None and torch.equal(new_assignment, assignment):
            break  # the centroids are already the means of this assignment
        reseeded += _reseed_empty(new_assignment, assigned_score, k)
        assignment = new_assignment

        sums = torch.zeros((k, d), dtype=torch.float32, device=device)
        for start, stop in _chunks(n, chunk_size):
            sums.index_add_(0, assignment[start:stop], _load_rows(x, slice(start, stop), device, inv_norms))
        counts = torch.bincount(assignment, minlength=k)
        if spherical:
            norms = sums.norm(dim=1, keepdim=True)
            # A cluster of zero residuals has no mean direction; keeping the previous
            # centroid is as good as any and keeps it unit-norm.
            centroids = torch.where(norms > 1e-12, sums / norms.clamp_min(1e-12), centroids)
        else:
            centroids = torch.where(
                counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(sums.dtype), centroids
            )

    assert assignment is not None
    sizes = torch.bincount(assignment, minlength=k)
    if capacity is not None and int(sizes.max()) > capacity:
        raise RuntimeError(
            f"capacity violated after fitting: largest cluster {int(sizes.max())} > cap {capacity}"
        )
    return KMeansResult(
        centroids=centroids,
        assignment=assignment,
        cluster_sizes=sizes,
        iterations=iterations,
        objective_history=history,
        capacity=capacity,
        reseeded=reseeded,
    )


def _check_k(k: int, n: int, layer: int | None = None) -> None:
    where = "" if layer is None else f"layer {layer} "
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise CodebookInputError(f"{where}k must be a positive integer, got {k!r}")
    if k > n:
        raise CodebookInputError(
            f"{where}asks for k={k} centroids but the basepool has only n={n} rows"
        )


def balanced_spherical_kmeans(
    x: ArrayLike,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    balance: bool = True,
    capacity_slack: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: DeviceLike = None,
    n_candidates: int = DEFAULT_CANDIDATES,
) -> KMeansResult:
    """Spherical k-means whose assignment step caps every cluster at ``ceil(slack n / k)``.

    Rows are L2-normalised (inputs already unit-norm skip that), assigned by cosine, and
    centroids are the normalised means of their members. With ``balance`` each
    assignment step is a capacity fill: every point's top ``n_candidates`` centroids are
    kept, clusters take proposals in order of regret (best minus next-best score) up to
    their capacity, rejected points try their next candidate, and points whose
    candidates all filled are re-scored against the clusters with room. With
    ``capacity_slack = 1`` the cap is ``ceil(n / k)``, which forces every cluster to be
    non-empty unless ``n - (k - 1) * cap <= 0``; any cluster left empty is re-seeded with
    the worst-fitting point of a larger cluster. The cap is checked after fitting.

    Seeding is greedy k-means++ on cosine distance over a seeded sample of
    ``16 k`` points; iterations stop early when the assignment no longer changes.

    Memory and streaming (float32, k = 256, m = ``n_candidates`` = 2, chunk c = 65536):
    the data never has to fit on the device. For n = 10M, D = 2048 the rows are 82 GB
    (41 GB in bf16), so they stay in host memory and each iteration streams them to the
    GPU twice (scoring, then centroid sums) in 65536 x 2048 x 4 B = 537 MB chunks. Per
    chunk the device holds the chunk and its 65536 x 256 x 4 B = 67 MB score block. The
    per-point state is the candidate lists, n x m x (8 + 4) B = 240 MB, plus the capacity
    fill's temporaries at its peak (first round: masks, keys, sort order, assignment),
    about 200 B per point more: roughly 2.2 GB in all for 10M points, independent of D.
    The centroid sums are k x D x 4 B = 2 MB. No n x k x D tensor is ever formed, and
    n x k scores exist only one chunk at a time. At that scale the ~160 GB of PCIe
    transfer per iteration dominates the ~10 TFLOP of matmul; a basepool that fits on
    the device (1M x 2048 fp32 = 8 GB) should be passed as a device tensor, in which
    case nothing is transferred.

    Args:
        x: ``(n, D)`` rows (numpy or torch, any float dtype, any device). Not copied.
        k: number of clusters.
        iters: maximum assignment/update iterations.
        seed: seed for the init sample and k-means++ draws; same seed, same result
            (bit-identical on CPU; GPU float atomics in the sums may differ in the last bit).
        balance: enforce the capacity during fitting; False gives plain spherical k-means.
        capacity_slack: cap factor (>= 1); 1.0 means clusters hold at most ``ceil(n/k)``.
        chunk_size: rows streamed to ``device`` at a time; bounds the ``chunk x D``
            transfer and, on a GPU, the ``chunk x k`` scores (a CPU scores 8192-row
            blocks of it, which keeps each score block in cache).
        device: compute device; None uses ``x``'s device, ``"auto"`` a GPU when present.
        n_candidates: candidate centroids kept per point for the capacity fill.

    Returns:
        A :class:`KMeansResult` with unit-norm centroids.

    Raises:
        CodebookInputError: empty input, NaN/Inf or all-zero rows, or ``k > n``.
    """
    xt = _as_tensor(x, "x")
    dev = _resolve_device(device, xt)
    _check_k(k, xt.shape[0])
    sq = _row_sq_norms(xt, "x", dev, chunk_size, allow_zero=False)
    return _lloyd(
        xt,
        sq,
        int(k),
        spherical=True,
        iters=iters,
        seed=seed,
        balance=balance,
        capacity_slack=capacity_slack,
        chunk_size=chunk_size,
        device=dev,
        n_candidates=n_candidates,
    )


def plain_kmeans(
    x: ArrayLike,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    balance: bool = False,
    capacity_slack: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: DeviceLike = None,
    n_candidates: int = DEFAULT_CANDIDATES,
) -> KMeansResult:
    """Euclidean k-means (the ablation's quantiser), same streaming machinery.

    Assignment minimises squared Euclidean distance, centroids are plain means, seeding is
    greedy k-means++ on squared distance. Zero rows are valid points here.

    Args:
        x: ``(n, D)`` rows (numpy or torch).
        k: number of clusters.
        iters: maximum iterations.
        seed: init seed.
        balance: capacity-constrained assignment (off by default: plain k-means).
        capacity_slack: cap factor when ``balance``.
        chunk_size: rows streamed to ``device`` at a time.
        device: compute device (None: ``x``'s).
        n_candidates: candidates per point for the capacity fill.

    Returns:
        A :class:`KMeansResult`; ``objective_history`` is the mean squared distance.

    Raises:
        CodebookInputError: empty input, NaN/Inf rows, or ``k > n``.
    """
    xt = _as_tensor(x, "x")
    dev = _resolve_device(device, xt)
    _check_k(k, xt.shape[0])
    sq = _row_sq_norms(xt, "x", dev, chunk_size, allow_zero=True)
    return _lloyd(
        xt,
        sq,
        int(k),
        spherical=False,
        iters=iters,
        seed=seed,
        balance=balance,
        capacity_slack=capacity_slack,
        chunk_size=chunk_size,
        device=dev,
        n_candidates=n_candidates,
    )


# --------------------------------------------------------------------------------------
# Residual codebook: one layer of encoding, fit, encode, decode
# --------------------------------------------------------------------------------------


def _encode_layer(
    residual: torch.Tensor,
    centroids: torch.Tensor,
    metric: Metric,
    *,
    round_coefs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code, coefficient and next residual of one layer for a block of residuals.

    Cosine: ``b = argmax cos(r, c)``, ``a = (r . c) / ||c||^2``, ``r' = r - a c``. With
    ``round_coefs`` ``a`` is rounded through float16 *before* forming ``r'``, so the
    stored fp16 coefficient reproduces the reconstruction exactly (``e - sum a c`` is the
    last residual); the price is that ``r'`` is orthogonal to ``c`` only up to the fp16
    rounding of ``a``. Euclidean: nearest centroid, ``r' = r - c``, ``a = 1``.
    """
    codes, coefs, step = _encode_step(residual, centroids, metric, round_coefs=round_coefs)
    return codes, coefs, residual - step


def _encode_step(
    residual: torch.Tensor,
    centroids: torch.Tensor,
    metric: Metric,
    *,
    round_coefs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, coefficients and the reconstruction step ``a c`` of one layer (see above).

    Temporaries are kept to the score block and one ``rows x D`` gather: the cosine is
    ``dots / ||c||`` scaled in place, the coefficient ``(r . c) / ||c||^2`` is read back
    from it as ``cos_score / ||c||``, and gathers use ``index_select`` (measured faster
    than advanced indexing on CPU).
    """
    c_sq = (centroids * centroids).sum(dim=1)
    dots = residual @ centroids.T
    if metric is Metric.COSINE:
        inv_norm = c_sq.clamp_min(1e-30).rsqrt()
        dots.mul_(inv_norm)
        best, codes = dots.max(dim=1)
        coefs = best * torch.index_select(inv_norm, 0, codes)
        if round_coefs:
            coefs = coefs.to(torch.float16).to(torch.float32)
        return codes, coefs, torch.index_select(centroids, 0, codes).mul_(coefs[:, None])
    codes = dots.sub_(0.5 * c_sq).argmax(dim=1)
    coefs = torch.ones(residual.shape[0], dtype=torch.float32, device=residual.device)
    return codes, coefs, torch.index_select(centroids, 0, codes)


def _normalised_rows(x: torch.Tensor, rows: slice, device: torch.device) -> torch.Tensor:
    return F.normalize(x[rows].to(device=device, dtype=torch.float32), dim=1)


def fit_residual_codebook(
    emb: ArrayLike,
    ks: Sequence[int],
    *,
    metric: Metric | str = "cosine",
    iters: int = 20,
    seed: int = 0,
    balance: bool = True,
    basepool_size: int | None = None,
    device: DeviceLike = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    capacity_slack: float = 1.0,
) -> tuple[ResidualCodebook, FitReport]:
    """Fit a residual codebook layer by layer on a basepool of item embeddings.

    Inputs are L2-normalised first (embeddings from the embed stage already are, so this
    only removes rounding drift). Cosine (METHOD): layer-1 residuals are the embeddings;
    each layer fits balanced spherical k-means on its residuals, encodes them by argmax
    cosine with fp16-rounded projection coefficients, and passes on the orthogonal
    remainder ``r - a c``.

    How residuals enter the fit (a choice METHOD leaves open): assignment is by cosine,
    i.e. by *direction*, exactly as encoding is; but each centroid is the normalised *sum*
    of its raw residuals, so a residual pulls its centroid in proportion to its norm. An
    item's error drops by ``||r||^2 cos^2(r, c)``, so the items still badly reconstructed
    (large residuals) are the ones whose directions matter most, and they decide the
    low tail of reconstruction cosine. Against normalising the residuals first (every
    direction weighted equally) this measured better on the benchmark's synthetic
    catalog (N=20k, D=384, k=64, L=3): mean reconstruction cosine +0.007 to +0.009 on
    three seeds, p5 +0.03 to +0.04 on the two where it was recorded. Layer 1 is
    unaffected (unit rows).

    Euclidean (ablation): plain, unbalanced k-means on the raw residuals and ``r - c``;
    ``balance`` does not apply.

    The basepool's residual matrix (``basepool x D`` float32) lives on the compute device;
    ``basepool_size`` bounds it (1M x 2048 is 8 GB).

    Args:
        emb: ``(n, D)`` item embeddings (numpy or torch).
        ks: centroids per layer; ``len(ks)`` is L.
        metric: ``"cosine"`` or ``"euclidean"``.
        iters: k-means iterations per layer.
        seed: seed for the basepool sample; layer ``l`` seeds its k-means with ``seed + l``.
        balance: capacity-constrained assignment while fitting (cosine only).
        basepool_size: rows sampled (seeded, without replacement) to fit on; None or a
            size >= n uses every row.
        device: compute device (None: the input's, ``"auto"``: a GPU when present).
        chunk_size: rows per streamed block.
        capacity_slack: cap factor for the balanced fit.

    Returns:
        The codebook (centroids on CPU) and a :class:`FitReport`.

    Raises:
        CodebookInputError: empty input, NaN/Inf or zero rows, bad ``ks`` or a ``k``
            larger than the basepool (naming k, the layer and n), or an unknown metric.
    """
    started = time.perf_counter()
    metric = _parse_metric(metric)
    x = _as_tensor(emb, "emb")
    dev = _resolve_device(device, x)
    n_input, d = x.shape
    ks = list(ks)
    if not ks:
        raise CodebookInputError("ks is empty; a codebook needs at least one layer")
    _row_sq_norms(x, "emb", dev, chunk_size, allow_zero=False)

    generator = torch.Generator().manual_seed(seed)
    if basepool_size is not None and basepool_size < n_input:
        if basepool_size < 1:
            raise CodebookInputError(f"basepool_size must be >= 1, got {basepool_size}")
        pool = torch.randperm(n_input, generator=generator)[:basepool_size].sort().values
        x = x[pool.to(x.device)]
    n_fit = x.shape[0]
    for layer, k in enumerate(ks):
        _check_k(k, n_fit, layer)

    residual = torch.empty((n_fit, d), dtype=torch.float32, device=dev)
    for start, stop in _chunks(n_fit, chunk_size):
        residual[start:stop] = _normalised_rows(x, slice(start, stop), dev)

    spherical = metric is Metric.COSINE
    layer_reports: list[LayerFitReport] = []
    centroids: list[torch.Tensor] = []
    for layer, k in enumerate(ks):
        t0 = time.perf_counter()
        sq = (residual * residual).sum(dim=1)
        result = _lloyd(
            residual,
            sq,
            int(k),
            spherical=spherical,
            iters=iters,
            seed=seed + layer,
            balance=balance and spherical,
            capacity_slack=capacity_slack,
            chunk_size=chunk_size,
            device=dev,
            n_candidates=DEFAULT_CANDIDATES,
            weight_by_norm=spherical,
        )
        seconds = time.perf_counter() - t0
        for start, stop in _chunks(n_fit, chunk_size):
            _, _, residual[start:stop] = _encode_layer(
                residual[start:stop], result.centroids, metric, round_coefs=True
            )
        centroids.append(result.centroids.to("cpu"))
        layer_reports.append(
            LayerFitReport(
                layer=layer,
                k=int(k),
                capacity=result.capacity,
                cluster_sizes=result.cluster_sizes.cpu().numpy(),
                iterations=result.iterations,
                objective_history=result.objective_history,
                reseeded=result.reseeded,
                seconds=seconds,
                residual_norm_mean=float(residual.norm(dim=1).mean()),
            )
        )

    # Reconstruction = e - final residual (exact with the fp16-rounded coefficients), so
    # the basepool's cosine needs no second pass over the codebook.
    recon_cos = torch.empty(n_fit, dtype=torch.float32, device=dev)
    for start, stop in _chunks(n_fit, chunk_size):
        e = _normalised_rows(x, slice(start, stop), dev)
        recon_cos[start:stop] = F.cosine_similarity(e, e - residual[start:stop], dim=1)

    codebook = ResidualCodebook(centroids=centroids, metric=metric, dim=int(d))
    report = FitReport(
        metric=metric,
        n_input=int(n_input),
        n_fit=int(n_fit),
        seed=seed,
        balanced=balance and spherical,
        layers=layer_reports,
        recon_cosine_mean=float(recon_cos.mean()),
        seconds=time.perf_counter() - started,
    )
    return codebook, report


def _codes_dtype(ks: Sequence[int]) -> np.dtype:
    # The item_codes table stores list<int16>; int32 only when a layer outgrows it.
    return np.dtype(np.int16) if max(ks) <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def _prepare_encode(
    codebook: ResidualCodebook, emb: ArrayLike, device: DeviceLike, chunk_size: int
) -> tuple[torch.Tensor, torch.device, ResidualCodebook]:
    x = _as_tensor(emb, "emb")
    if x.shape[1] != codebook.dim:
        raise CodebookInputError(
            f"emb has dimension {x.shape[1]} but the codebook has dimension {codebook.dim}"
        )
    dev = _resolve_device(device, x)
    _row_sq_norms(x, "emb", dev, chunk_size, allow_zero=False)
    return x, dev, codebook.to(dev)


def encode(
    codebook: ResidualCodebook,
    emb: ArrayLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    round_coefs: bool = True,
    device: DeviceLike = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode embeddings to codes and coefficients (nearest centroid, no capacity).

    Args:
        codebook: a fitted codebook.
        emb: ``(n, D)`` embeddings; rows are L2-normalised first.
        chunk_size: rows per block (memory is ``chunk x (D + max k)`` floats).
        round_coefs: round each coefficient through float16 before forming the next
            residual, so the stored coefficients reproduce the reconstruction exactly.
            False keeps full float32 precision (exact orthogonality; for tests/analysis).
        device: compute device (None: the input's).

    Returns:
        ``codes`` ``(n, L)`` int16 (int32 when some k exceeds 32768), ``coefs`` ``(n, L)``
        float32 (fp16-representable when ``round_coefs``; all 1.0 for the Euclidean
        codebook, which stores codes only), and ``recon_cosine`` ``(n,)`` float32, the
        cosine between each normalised input and its decoded reconstruction.

    Raises:
        CodebookInputError: empty input, NaN/Inf or zero rows, or a dimension mismatch.
    """
    x, dev, cb = _prepare_encode(codebook, emb, device, chunk_size)
    n = x.shape[0]
    num_layers = cb.num_layers
    codes = np.empty((n, num_layers), dtype=_codes_dtype(cb.ks))
    coefs = np.empty((n, num_layers), dtype=np.float32)
    recon_cosine = np.empty(n, dtype=np.float32)
    # On CPU, blocks of _CPU_SCORE_BLOCK rows keep each layer's temporaries in cache
    # (measured ~2x faster than 65536-row blocks); a GPU takes the whole chunk.
    block = chunk_size if dev.type != "cpu" else min(chunk_size, _CPU_SCORE_BLOCK)
    for start, stop in _chunks(n, block):
        e = _normalised_rows(x, slice(start, stop), dev)
        r = e
        recon = torch.zeros_like(e)
        for layer, centroids in enumerate(cb.centroids):
            b, a, step = _encode_step(r, centroids, cb.metric, round_coefs=round_coefs)
            r = r - step
            # Summed explicitly (not e - r) so the cosine is that of what decode returns.
            recon += step
            codes[start:stop, layer] = b.cpu().numpy()
            coefs[start:stop, layer] = a.cpu().numpy()
        recon_cosine[start:stop] = F.cosine_similarity(e, recon, dim=1, eps=1e-12).cpu().numpy()
    return codes, coefs, recon_cosine


def residual_trace(
    codebook: ResidualCodebook,
    emb: ArrayLike,
    *,
    round_coefs: bool = True,
) -> ResidualTrace:
    """Encode while keeping every residual; for tests and small diagnostics only.

    Holds ``(2L + 1) x n x D`` floats, so use it on samples, not catalogs.

    Args:
        codebook: a fitted codebook.
        emb: ``(n, D)`` embeddings; rows are L2-normalised first.
        round_coefs: as in :func:`encode`.

    Returns:
        A :class:`ResidualTrace`.
    """
    x, dev, cb = _prepare_encode(codebook, emb, None, DEFAULT_CHUNK_SIZE)
    r = _normalised_rows(x, slice(0, x.shape[0]), dev)
    residuals, used, codes, coefs = [r], [], [], []
    for centroids in cb.centroids:
        b, a, r = _encode_layer(r, centroids, cb.metric, round_coefs=round_coefs)
        residuals.append(r)
        used.append(centroids[b])
        codes.append(b)
        coefs.append(a)
    return ResidualTrace(
        codes=torch.stack(codes, dim=1).cpu().numpy(),
        coefs=torch.stack(coefs, dim=1).cpu().numpy(),
        residuals=torch.stack(residuals).cpu().numpy(),
        centroids_used=torch.stack(used).cpu().numpy(),
    )


def decode_torch(
    centroids_stacked: torch.Tensor,
    codes: torch.Tensor,
    coefs: torch.Tensor,
) -> torch.Tensor:
    """Reconstruct L2-normalised embeddings with tensor ops only (differentiable).

    Usable inside a model on any leading shape, e.g. ``(batch, seq, L)`` codes.

    Args:
        centroids_stacked: ``(L, max_k, D)`` from :meth:`ResidualCodebook.stacked_centroids`.
        codes: ``(..., L)`` integer codes.
        coefs: ``(..., L)`` coefficients (1.0 for a Euclidean codebook).

    Returns:
        ``(..., D)`` reconstructions ``sum_l a_l c_l`` normalised to unit length (an
        all-zero reconstruction stays zero).
    """
    num_layers = centroids_stacked.shape[0]
    layer_index = torch.arange(num_layers, device=centroids_stacked.device)
    chosen = centroids_stacked[layer_index, codes.long()]  # (..., L, D)
    summed = (chosen * coefs.to(chosen.dtype).unsqueeze(-1)).sum(dim=-2)
    return F.normalize(summed, dim=-1, eps=1e-12)


def decode(
    codebook: ResidualCodebook,
    codes: np.ndarray,
    coefs: np.ndarray,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Reconstruct L2-normalised float32 embeddings from stored codes and coefficients.

    Args:
        codebook: the codebook the codes were made with.
        codes: ``(n, L)`` integer codes.
        coefs: ``(n, L)`` coefficients.
        chunk_size: rows per block.

    Returns:
        ``(n, D)`` float32 unit rows.

    Raises:
        CodebookInputError: shapes that do not match the codebook or out-of-range codes.
    """
    codes = np.asarray(codes)
    coefs = np.asarray(coefs)
    num_layers = codebook.num_layers
    if codes.ndim != 2 or codes.shape[1] != num_layers:
        raise CodebookInputError(
            f"codes have shape {codes.shape}; the codebook has {num_layers} layers"
        )
    if coefs.shape != codes.shape:
        raise CodebookInputError(f"coefs have shape {coefs.shape} but codes have {codes.shape}")
    if codes.shape[0] == 0:
        raise CodebookInputError("codes are empty (0 rows)")
    for layer, k in enumerate(codebook.ks):
        column = codes[:, layer]
        if int(column.min()) < 0 or int(column.max()) >= k:
            bad = np.flatnonzero((column < 0) | (column >= k))
            raise CodebookInputError(
                f"layer {layer} has {bad.size} code(s) outside [0, {k}) "
                f"(first row indices: {bad[:_ROWS_QUOTED].tolist()})"
            )
    stacked = codebook.stacked_centroids(device="cpu")
    out = np.empty((codes.shape[0], codebook.dim), dtype=np.float32)
    for start, stop in _chunks(codes.shape[0], chunk_size):
        c = torch.from_numpy(codes[start:stop].astype(np.int64))
        a = torch.from_numpy(coefs[start:stop].astype(np.float32))
        out[start:stop] = decode_torch(stacked, c, a).numpy()
    return out


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


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
    stats: dict[str, float] = {"n_items": float(n)}
    for layer, k in enumerate(ks):
        column = codes[:, layer].astype(np.int64)
        if column.min() < 0 or column.max() >= k:
            raise CodebookInputError(f"layer {layer} has codes outside [0, {k})")
        sizes = np.bincount(column, minlength=k).astype(np.float64)
        p = sizes[sizes > 0] / n
        stats[f"layer{layer}_cluster_size_min"] = float(sizes.min())
        stats[f"layer{layer}_cluster_size_mean"] = float(n / k)
        stats[f"layer{layer}_cluster_size_max"] = float(sizes.max())
        stats[f"layer{layer}_imbalance"] = float(k * np.sum(sizes**2) / n**2)
        stats[f"layer{layer}_used_fraction"] = float(np.count_nonzero(sizes) / k)
        stats[f"layer{layer}_perplexity"] = float(np.exp(-np.sum(p * np.log(p))))
    stats["collision_rate"] = _collision_rate(codes, ks)

    bytes_per_item = sum(_code_bytes(k) for k in ks) + (2 * len(ks) if with_coefs else 0)
    stats["bytes_per_item"] = float(bytes_per_item)
    if dim is None and emb is not None:
        dim = int(emb.shape[1])
    if dim is not None:
        stats["compression_vs_fp32"] = 4.0 * dim / bytes_per_item
        stats["compression_vs_bf16"] = 2.0 * dim / bytes_per_item
    if recon_cosine is not None:
        rc = np.asarray(recon_cosine, dtype=np.float64)
        stats["recon_cosine_mean"] = float(rc.mean())
        stats["recon_cosine_p5"] = float(np.percentile(rc, 5))
        stats["recon_cosine_min"] = float(rc.min())
    return stats


# --------------------------------------------------------------------------------------
# Persistence: table rows and the MLflow artifact
# --------------------------------------------------------------------------------------


def codebook_to_rows(
    codebook: ResidualCodebook,
    version: str,
    fit_report: FitReport | None,
) -> list[dict[str, Any]]:
    """One row per centroid for the ``codebooks`` table.

    Args:
        codebook: the codebook.
        version: codebook version written to every row.
        fit_report: supplies ``cluster_size_at_fit``; None writes -1 (e.g. a codebook
            rebuilt from an artifact).

    Returns:
        Dicts with ``version``, ``layer`` (0-based, the codes column), ``code``,
        ``centroid`` (list of float), ``metric``, ``cluster_size_at_fit``.
    """
    rows: list[dict[str, Any]] = []
    for layer, centroids in enumerate(codebook.centroids):
        sizes = fit_report.layers[layer].cluster_sizes if fit_report is not None else None
        values = centroids.detach().to("cpu", torch.float32).numpy()
        for code in range(values.shape[0]):
            rows.append(
                {
                    "version": version,
                    "layer": layer,
                    "code": code,
                    "centroid": values[code].tolist(),
                    "metric": str(codebook.metric),
                    "cluster_size_at_fit": int(sizes[code]) if sizes is not None else -1,
                }
            )
    return rows


def codebook_from_rows(rows: Iterable[Mapping[str, Any]]) -> ResidualCodebook:
    """Rebuild a codebook from :func:`codebook_to_rows` output (dicts or Spark Rows).

    Args:
        rows: rows of exactly one codebook version, in any order.

    Returns:
        The codebook, centroids as float32 on CPU.

    Raises:
        CodebookInputError: no rows, several versions or metrics, missing or duplicate
            codes, or centroids of different dimensions.
    """
    rows = list(rows)
    if not rows:
        raise CodebookInputError("no codebook rows")
    versions = {str(row["version"]) for row in rows}
    if len(versions) != 1:
        raise CodebookInputError(f"rows mix codebook versions {sorted(versions)}")
    metrics = {str(row["metric"]) for row in rows}
    if len(metrics) != 1:
        raise CodebookInputError(f"rows mix metrics {sorted(metrics)}")
    by_layer: dict[int, dict[int, list[float]]] = {}
    for row in rows:
        layer, code = int(row["layer"]), int(row["code"])
        codes = by_layer.setdefault(layer, {})
        if code in codes:
            raise CodebookInputError(f"duplicate row for layer {layer} code {code}")
        codes[code] = list(row["centroid"])
    if sorted(by_layer) != list(range(len(by_layer))):
        raise CodebookInputError(f"layers {sorted(by_layer)} are not 0..{len(by_layer) - 1}")
    centroids: list[torch.Tensor] = []
    for layer in range(len(by_layer)):
        codes = by_layer[layer]
        if sorted(codes) != list(range(len(codes))):
            missing = sorted(set(range(max(codes) + 1)) - set(codes))
            raise CodebookInputError(f"layer {layer} is missing codes {missing[:_ROWS_QUOTED]}")
        centroids.append(torch.tensor([codes[c] for c in range(len(codes))], dtype=torch.float32))
    dims = {int(c.shape[1]) for c in centroids}
    if len(dims) != 1:
        raise CodebookInputError(f"centroids have different dimensions across layers: {sorted(dims)}")
    return ResidualCodebook(centroids=centroids, metric=_parse_metric(metrics.pop()), dim=dims.pop())


def save_npz(codebook: ResidualCodebook, path: str | Path) -> None:
    """Write the codebook as a compressed ``.npz`` (the MLflow artifact).

    Args:
        codebook: the codebook.
        path: destination file.
    """
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(_NPZ_FORMAT_VERSION),
        "metric": np.array(str(codebook.metric)),
        "dim": np.array(codebook.dim),
        "num_layers": np.array(codebook.num_layers),
    }
    for layer, c in enumerate(codebook.centroids):
        arrays[f"centroids_{layer}"] = c.detach().to("cpu", torch.float32).numpy()
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_npz(path: str | Path) -> ResidualCodebook:
    """Read a codebook written by :func:`save_npz`.

    Args:
        path: the ``.npz`` file.

    Returns:
        The codebook, centroids as float32 on CPU.

    Raises:
        CodebookInputError: a file of another format version.
    """
    with np.load(path, allow_pickle=False) as data:
        version = int(data["format_version"])
        if version != _NPZ_FORMAT_VERSION:
            raise CodebookInputError(
                f"{path}: codebook format version {version}, this code reads {_NPZ_FORMAT_VERSION}"
            )
        num_layers = int(data["num_layers"])
        centroids = [torch.from_numpy(data[f"centroids_{layer}"].copy()) for layer in range(num_layers)]
        return ResidualCodebook(centroids=centroids, metric=_parse_metric(str(data["metric"])), dim=int(data["dim"]))
