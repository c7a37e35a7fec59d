"""Balanced spherical k-means (METHOD.md, "balanced cosine k-means") and plain k-means.

One concern: the capacity-constrained Lloyd iteration (k-means++ seeding on a sample,
scoring in chunks, a regret-ordered capacity fill that keeps every cluster at most
``ceil(n / k)`` points, re-seeding of empty clusters) and the unconstrained variant used
by the Euclidean ablation. Pure torch; CPU or GPU through ``device``.

The k-means is hand-written on purpose: no maintained library does capacity-constrained
spherical k-means at catalog scale. faiss' ``Kmeans(spherical=True)`` has no balance
constraint (and subsamples to 256 points per centroid by default), and
``k-means-constrained`` solves each assignment as a min-cost flow over an n x k graph,
which stops being usable at a few thousand points (see ``benchmarks/codebook.py``).
Cost at 10M items x 2048 dims, k=256: one pass is 10M x 256 dot products per iteration in
65536-row chunks (memory O(chunk x k)); the fit runs on a basepool sample, not the catalog.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hymirec_udfs.codebook.blocks import (
    DEFAULT_CANDIDATES,
    DEFAULT_CHUNK_SIZE,
    ArrayLike,
    CodebookInputError,
    DeviceLike,
    as_tensor,
    inverse_norms,
    load_rows,
    resolve_device,
    row_chunks,
    row_sq_norms,
    top_candidates,
)

# The k-means++ seeding runs on a sample of this many points per centroid: seeding is k
# sequential passes, so on all n points it would cost as much as a whole Lloyd iteration
# done as matrix-vector products, for no measurable gain in the fitted codebook.
INIT_SAMPLE_PER_CENTROID = 16

# Regret levels of the capacity fill's sort key; with 2**15 levels the key of k clusters
# fits in int32 while k < 2**16.
_REGRET_LEVELS = 2**15 - 1
_INT32_KEY_MAX_K = 2**16

# Largest k-means++ sample whose Gram matrix is precomputed (4096^2 float32 = 67 MB).
_GRAM_MAX_SAMPLE = 4096

# Candidates per point when leftovers are re-scored against the clusters with room. 8 was
# faster than 16 and 32 at the same objective: a wider list saves re-scoring phases but
# its top-k costs more than the phases it saves.
_FALLBACK_CANDIDATES = 8


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
    xs = load_rows(x, sample, device, inv_norms)
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


def lloyd(
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
    init_centroids: torch.Tensor | None = None,
) -> KMeansResult:
    """Lloyd iterations with an optional capacity-constrained assignment step.

    ``init_centroids`` (``(k, D)``) warm-starts the fit from given centroids (a daily
    refit from the pinned codebook) instead of k-means++ seeding.

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
    inv_norms = inverse_norms(sq_norms) if spherical and not weight_by_norm else None
    generator = torch.Generator().manual_seed(seed)
    if init_centroids is not None:
        if tuple(init_centroids.shape) != (k, d):
            raise CodebookInputError(f"init_centroids has shape {tuple(init_centroids.shape)}; expected ({k}, {d})")
        centroids = init_centroids.to(device=device, dtype=torch.float32).clone()
    else:
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
        for start, stop in row_chunks(n, chunk_size):
            top_candidates(
                load_rows(x, slice(start, stop), device, inv_norms),
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
                for start, stop in row_chunks(points.numel(), chunk_size):
                    top_candidates(
                        load_rows(x, points[start:stop], device, inv_norms),
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
        for start, stop in row_chunks(n, chunk_size):
            sums.index_add_(0, assignment[start:stop], load_rows(x, slice(start, stop), device, inv_norms))
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


def check_k(k: int, n: int, layer: int | None = None) -> None:
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
    xt = as_tensor(x, "x")
    dev = resolve_device(device, xt)
    check_k(k, xt.shape[0])
    sq = row_sq_norms(xt, "x", dev, chunk_size, allow_zero=False)
    return lloyd(
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
    xt = as_tensor(x, "x")
    dev = resolve_device(device, xt)
    check_k(k, xt.shape[0])
    sq = row_sq_norms(xt, "x", dev, chunk_size, allow_zero=True)
    return lloyd(
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
