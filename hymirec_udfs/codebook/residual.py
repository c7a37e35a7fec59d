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

- :mod:`.kmeans`: :func:`balanced_spherical_kmeans`, :func:`plain_kmeans` -> ``KMeansResult``
- here: :func:`fit_residual_codebook` -> (:class:`ResidualCodebook`, :class:`FitReport`),
  :func:`encode`, :func:`decode`, :func:`decode_torch`, :func:`residual_trace`
- :mod:`.stats`: ``codebook_stats``
- :mod:`.serialize`: ``codebook_to_rows`` / ``codebook_from_rows``, ``save_npz`` / ``load_npz``

The k-means is hand-written on purpose: no maintained library does capacity-constrained
spherical k-means at catalog scale. faiss' ``Kmeans(spherical=True)`` has no balance
constraint (and subsamples to 256 points per centroid by default), and
``k-means-constrained`` solves each assignment as a min-cost flow over an n x k graph,
which stops being usable at a few thousand points (see ``benchmarks/codebook.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hymirec_udfs.codebook.blocks import (
    CPU_SCORE_BLOCK,
    DEFAULT_CANDIDATES,
    DEFAULT_CHUNK_SIZE,
    ROWS_QUOTED,
    ArrayLike,
    CodebookInputError,
    DeviceLike,
    Metric,
    as_tensor,
    parse_metric,
    resolve_device,
    row_chunks,
    row_sq_norms,
)
from hymirec_udfs.codebook.kmeans import check_k, lloyd


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
        self.metric = parse_metric(self.metric)
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
    init: ResidualCodebook | None = None,
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
        init: warm start: each layer's k-means starts from this codebook's centroids of
            that layer (same ``ks`` and D) instead of k-means++ (the daily refit).

    Returns:
        The codebook (centroids on CPU) and a :class:`FitReport`.

    Raises:
        CodebookInputError: empty input, NaN/Inf or zero rows, bad ``ks`` or a ``k``
            larger than the basepool (naming k, the layer and n), or an unknown metric.
    """
    started = time.perf_counter()
    metric = parse_metric(metric)
    x = as_tensor(emb, "emb")
    dev = resolve_device(device, x)
    n_input, d = x.shape
    ks = list(ks)
    if not ks:
        raise CodebookInputError("ks is empty; a codebook needs at least one layer")
    row_sq_norms(x, "emb", dev, chunk_size, allow_zero=False)

    generator = torch.Generator().manual_seed(seed)
    if basepool_size is not None and basepool_size < n_input:
        if basepool_size < 1:
            raise CodebookInputError(f"basepool_size must be >= 1, got {basepool_size}")
        pool = torch.randperm(n_input, generator=generator)[:basepool_size].sort().values
        x = x[pool.to(x.device)]
    n_fit = x.shape[0]
    for layer, k in enumerate(ks):
        check_k(k, n_fit, layer)
    if init is not None and (init.ks != ks or init.dim != d):
        raise CodebookInputError(
            f"warm start from a codebook of ks={init.ks}, D={init.dim}; this fit has ks={ks}, D={d}")

    residual = torch.empty((n_fit, d), dtype=torch.float32, device=dev)
    for start, stop in row_chunks(n_fit, chunk_size):
        residual[start:stop] = _normalised_rows(x, slice(start, stop), dev)

    spherical = metric is Metric.COSINE
    layer_reports: list[LayerFitReport] = []
    centroids: list[torch.Tensor] = []
    for layer, k in enumerate(ks):
        t0 = time.perf_counter()
        sq = (residual * residual).sum(dim=1)
        result = lloyd(
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
            init_centroids=None if init is None else init.centroids[layer],
        )
        seconds = time.perf_counter() - t0
        for start, stop in row_chunks(n_fit, chunk_size):
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
    for start, stop in row_chunks(n_fit, chunk_size):
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
    x = as_tensor(emb, "emb")
    if x.shape[1] != codebook.dim:
        raise CodebookInputError(
            f"emb has dimension {x.shape[1]} but the codebook has dimension {codebook.dim}"
        )
    dev = resolve_device(device, x)
    row_sq_norms(x, "emb", dev, chunk_size, allow_zero=False)
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
    # On CPU, blocks of CPU_SCORE_BLOCK rows keep each layer's temporaries in cache
    # (measured ~2x faster than 65536-row blocks); a GPU takes the whole chunk.
    block = chunk_size if dev.type != "cpu" else min(chunk_size, CPU_SCORE_BLOCK)
    for start, stop in row_chunks(n, block):
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
                f"(first row indices: {bad[:ROWS_QUOTED].tolist()})"
            )
    stacked = codebook.stacked_centroids(device="cpu")
    out = np.empty((codes.shape[0], codebook.dim), dtype=np.float32)
    for start, stop in row_chunks(codes.shape[0], chunk_size):
        c = torch.from_numpy(codes[start:stop].astype(np.int64))
        a = torch.from_numpy(coefs[start:stop].astype(np.float32))
        out[start:stop] = decode_torch(stacked, c, a).numpy()
    return out
