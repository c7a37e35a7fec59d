"""Benchmark the residual codebook against faiss and k-means-constrained, measured in one run.

Run from the repository root::

    python benchmarks/codebook.py            # N=200,000 x D=384, k=256, L=3, 20 iterations
    python benchmarks/codebook.py --quick    # N=20,000, k=64: under 3 minutes on 2 cores

What it measures, on seeded clustered synthetic unit vectors (uneven topic sizes):

- fit time of the whole L-layer cosine residual codebook (``fit_time_ratio_vs_faiss``)
  against the same codebook with every layer fitted by
  ``faiss.Kmeans(d, k, niter=iters, spherical=True, seed=...)`` (same k, iterations and
  projection residual, residuals updated the same way on both sides);
- fit time of one layer of our balanced spherical k-means against faiss on the same
  points (``..._one_layer``; faiss' default subsamples to 256 points per centroid, that
  time is reported too), as wall clock with the default threads and as one-thread CPU
  time (robust to other load on a shared machine), and how balanced each result is;
- reconstruction cosine of our cosine residual codebook against a faiss-fitted cosine
  codebook (same projection residual, same encoder, same bytes per item) and against the
  Euclidean residual codebook at the same bytes per item (codes only, so more layers);
- ``k_means_constrained.KMeansConstrained`` (min-cost-flow balanced k-means) on growing
  subsamples under a time cap, to show where it stops being usable.

- encode throughput of the ``encode_items`` path through local Spark (Delta in, Arrow
  UDF, Delta out) against a single-process loop over the same table
  (``encode_ratio_vs_plain``, see :func:`bench_encode`); ``--only-encode`` reruns just
  this part and updates an earlier result file.

Results go to ``benchmarks/results/codebook.json`` (flat keys plus ``machine``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# OpenMP threads that spin while waiting burn the time slices of a shared machine: with
# other tenants' load, every parallel region then waits for a descheduled spinner, which
# measured a 5x slowdown of our fit (many small parallel ops) against 2x for faiss (few
# large ones). Sleeping waiters make both fair; it must be set before torch and faiss
# load their OpenMP runtime, and an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script from a checkout: make the package importable without installing.
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from hymirec_udfs.codebook.blocks import DEFAULT_CHUNK_SIZE, Metric
from hymirec_udfs.codebook.residual import ResidualCodebook, _encode_layer, encode, fit_residual_codebook
from hymirec_udfs.codebook.kmeans import balanced_spherical_kmeans
from hymirec_udfs.codebook.stats import codebook_stats

RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "codebook.json"


@dataclass
class BenchConfig:
    """Sizes of one benchmark run.

    Attributes:
        n: catalog rows.
        d: embedding dimension.
        k: centroids per layer.
        layers: codebook layers L.
        iters: k-means iterations (ours and faiss alike).
        seed: data and fit seed.
        constrained_sizes: subsample sizes tried with k-means-constrained, in order.
        constrained_time_cap_s: wall-clock cap per k-means-constrained fit.
        quick: whether this is the ``--quick`` configuration.
        encode_items: catalog size of the Spark encode comparison (Spark's fixed cost
            per job, ~1 s here, weighs less on a realistic catalog).
    """

    n: int
    d: int
    k: int
    layers: int
    iters: int
    seed: int
    constrained_sizes: tuple[int, ...]
    constrained_time_cap_s: float
    quick: bool
    encode_items: int = 0


FULL = BenchConfig(
    n=200_000, d=384, k=256, layers=3, iters=20, seed=0,
    constrained_sizes=(1_000, 2_000, 5_000, 10_000, 20_000, 50_000), constrained_time_cap_s=120.0, quick=False,
    encode_items=1_000_000,
)
QUICK = BenchConfig(
    n=20_000, d=384, k=64, layers=3, iters=20, seed=0,
    constrained_sizes=(500, 1_000, 2_000, 5_000), constrained_time_cap_s=20.0, quick=True,
)


def make_catalog(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered unit vectors: topics of very uneven (Pareto) size, subtopics, noise.

    The uneven topic sizes are what makes unconstrained k-means pile clusters up; the
    subtopic level gives the second and third codebook layers structure to find.
    """
    rng = np.random.default_rng(seed)
    topics, subtopics = 512, 8

    def unit(rows: int) -> np.ndarray:
        v = rng.standard_normal((rows, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    weights = rng.pareto(1.2, topics) + 0.05
    topic = rng.choice(topics, size=n, p=weights / weights.sum())
    sub = topic * subtopics + rng.integers(0, subtopics, size=n)
    x = unit(topics)[topic] + 0.6 * unit(topics * subtopics)[sub]
    x += (0.5 / math.sqrt(d)) * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _faiss_kmeans(x: np.ndarray, k: int, iters: int, seed: int, *, subsample: bool) -> tuple[np.ndarray, float]:
    import faiss

    # faiss trains on at most max_points_per_centroid * k points; lift that cap to fit
    # on the same points as ours, or keep faiss' default (256) when asked.
    kwargs = {} if subsample else {"max_points_per_centroid": int(math.ceil(x.shape[0] / k)) + 1}
    km = faiss.Kmeans(x.shape[1], k, niter=iters, spherical=True, seed=seed, **kwargs)
    start = time.perf_counter()
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy(), time.perf_counter() - start


def _single_thread_cpu_seconds(fit: Any) -> float:
    """CPU seconds of ``fit()`` with torch and faiss pinned to one thread.

    On a shared machine wall-clock ratios swing with other tenants' load (OpenMP threads
    wait for each other when cores are oversubscribed); one-thread CPU time is the
    contention-robust figure for "how much work does each fit do".
    """
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        start = time.process_time()
        fit()
        return time.process_time() - start
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


def _assign_by_cosine(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    book = ResidualCodebook([torch.from_numpy(centroids)], "cosine", centroids.shape[1])
    return encode(book, x)[0][:, 0].astype(np.int64)


def bench_kmeans(x: np.ndarray, cfg: BenchConfig) -> dict[str, Any]:
    """One layer: our balanced spherical k-means vs faiss spherical k-means."""
    n, k = x.shape[0], cfg.k
    start = time.perf_counter()
    ours = balanced_spherical_kmeans(x, k, iters=cfg.iters, seed=cfg.seed)
    ours_s = time.perf_counter() - start
    faiss_centroids, faiss_s = _faiss_kmeans(x, k, cfg.iters, cfg.seed, subsample=False)
    _, faiss_default_s = _faiss_kmeans(x, k, cfg.iters, cfg.seed, subsample=True)

    ours_cpu = _single_thread_cpu_seconds(lambda: balanced_spherical_kmeans(x, k, iters=cfg.iters, seed=cfg.seed))
    faiss_cpu = _single_thread_cpu_seconds(lambda: _faiss_kmeans(x, k, cfg.iters, cfg.seed, subsample=False))

    faiss_assign = _assign_by_cosine(x, faiss_centroids)
    faiss_sizes = np.bincount(faiss_assign, minlength=k)
    faiss_objective = float(np.mean(np.einsum("nd,nd->n", x, faiss_centroids[faiss_assign])))
    ours_free = np.bincount(_assign_by_cosine(x, ours.centroids.numpy()), minlength=k)
    return {
        "fit_seconds_ours_one_layer": ours_s,
        "fit_seconds_faiss_one_layer": faiss_s,
        "fit_time_ratio_vs_faiss_one_layer": ours_s / faiss_s,
        "fit_seconds_faiss_default_subsample": faiss_default_s,
        "fit_time_ratio_vs_faiss_default_subsample": ours_s / faiss_default_s,
        "fit_cpu_seconds_1thread_ours": ours_cpu,
        "fit_cpu_seconds_1thread_faiss": faiss_cpu,
        "fit_cpu_time_ratio_vs_faiss_1thread": ours_cpu / faiss_cpu,
        "fit_iterations_ours": ours.iterations,
        "fit_max_cluster_over_mean": ours.max_cluster_over_mean,
        "fit_capacity": ours.capacity,
        "fit_objective_ours": ours.objective_history[-1],
        "faiss_max_cluster_over_mean": float(faiss_sizes.max()) * k / n,
        "faiss_min_cluster": int(faiss_sizes.min()),
        "faiss_objective": faiss_objective,
        # Encoding is nearest-centroid without capacity, so the codes of the catalog are
        # less even than the fit; this is the balance the item_codes table will show.
        "encode_max_cluster_over_mean_ours": float(ours_free.max()) * k / n,
    }


def _faiss_cosine_codebook(x: np.ndarray, cfg: BenchConfig) -> tuple[ResidualCodebook, float]:
    """The same cosine residual codebook, each layer fitted by faiss spherical k-means.

    Timed like :func:`fit_residual_codebook`: per layer the residuals are normalised for
    faiss, faiss fits, and the layer is applied once to the current residuals with the
    same projection step ours uses (codes by cosine, fp16-rounded coefficient, ``r - a
    c``), so both sides do the same work besides the k-means itself.
    """
    layers: list[torch.Tensor] = []
    residual = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone()
    seconds = 0.0
    for layer in range(cfg.layers):
        start = time.perf_counter()
        unit = torch.nn.functional.normalize(residual, dim=1).numpy()
        seconds += time.perf_counter() - start
        centroids, s = _faiss_kmeans(unit, cfg.k, cfg.iters, cfg.seed + layer, subsample=False)
        seconds += s
        start = time.perf_counter()
        c = torch.from_numpy(centroids)
        for lo in range(0, residual.shape[0], DEFAULT_CHUNK_SIZE):
            hi = min(lo + DEFAULT_CHUNK_SIZE, residual.shape[0])
            _, _, residual[lo:hi] = _encode_layer(residual[lo:hi], c, Metric.COSINE, round_coefs=True)
        seconds += time.perf_counter() - start
        layers.append(c)
    return ResidualCodebook(layers, "cosine", x.shape[1]), seconds


def bench_reconstruction(x: np.ndarray, cfg: BenchConfig) -> dict[str, Any]:
    """Reconstruction cosine at equal bytes per item: ours, faiss-fitted cosine, Euclidean."""
    ks = [cfg.k] * cfg.layers
    start = time.perf_counter()
    ours, report = fit_residual_codebook(x, ks, iters=cfg.iters, seed=cfg.seed)
    ours_fit_s = time.perf_counter() - start
    codes, _, recon_ours = encode(ours, x)
    ours_stats = codebook_stats(codes, ks, recon_cosine=recon_ours, dim=cfg.d)

    faiss_book, faiss_fit_s = _faiss_cosine_codebook(x, cfg)
    faiss_codes, _, recon_faiss = encode(faiss_book, x)
    faiss_stats = codebook_stats(faiss_codes, ks, recon_cosine=recon_faiss, dim=cfg.d)

    # Codes only: spend the coefficient bytes on more layers, e.g. 3 x (1 + 2) B = 9 codes.
    bytes_per_item = ours_stats["bytes_per_item"]
    euclid_layers = int(bytes_per_item // codebook_stats(codes[:, :1], ks[:1], with_coefs=False)["bytes_per_item"])
    euclid, _ = fit_residual_codebook(x, [cfg.k] * euclid_layers, metric="euclidean", iters=cfg.iters, seed=cfg.seed)
    euclid_codes, _, recon_euclid = encode(euclid, x)
    euclid_stats = codebook_stats(euclid_codes, euclid.ks, recon_cosine=recon_euclid, dim=cfg.d, with_coefs=False)
    same_layers = ResidualCodebook(euclid.centroids[: cfg.layers], "euclidean", cfg.d)
    recon_euclid_same_layers = encode(same_layers, x)[2]

    return {
        "recon_cosine_ours": ours_stats["recon_cosine_mean"],
        "recon_cosine_ours_p5": ours_stats["recon_cosine_p5"],
        "recon_cosine_faiss_rq": faiss_stats["recon_cosine_mean"],
        "recon_cosine_faiss_rq_p5": faiss_stats["recon_cosine_p5"],
        "recon_cosine_euclidean": euclid_stats["recon_cosine_mean"],
        "recon_cosine_euclidean_p5": euclid_stats["recon_cosine_p5"],
        "recon_cosine_euclidean_same_layers": float(recon_euclid_same_layers.mean()),
        "bytes_per_item": bytes_per_item,
        "bytes_per_item_euclidean": euclid_stats["bytes_per_item"],
        "euclidean_layers": euclid_layers,
        "compression_vs_fp32": ours_stats["compression_vs_fp32"],
        "collision_rate_ours": ours_stats["collision_rate"],
        "collision_rate_faiss_rq": faiss_stats["collision_rate"],
        "codes_layer0_imbalance_ours": ours_stats["layer0_imbalance"],
        "codes_layer0_imbalance_faiss_rq": faiss_stats["layer0_imbalance"],
        "fit_layer_max_cluster_over_mean_ours": [lr.max_cluster_over_mean for lr in report.layers],
        # The fit-time comparison: all L layers, faiss per layer, same k,
        # iterations and projection residual (the one-layer figures are above).
        "fit_seconds_ours": ours_fit_s,
        "fit_seconds_faiss": faiss_fit_s,
        "fit_time_ratio_vs_faiss": ours_fit_s / faiss_fit_s,
        "fit_layer_seconds_ours": [lr.seconds for lr in report.layers],
    }


_CONSTRAINED_CHILD = """
import sys, time, math, numpy as np
from k_means_constrained import KMeansConstrained
x = np.load(sys.argv[1]); k = int(sys.argv[2]); iters = int(sys.argv[3]); seed = int(sys.argv[4])
model = KMeansConstrained(n_clusters=k, size_max=math.ceil(x.shape[0] / k), n_init=1,
                          max_iter=iters, random_state=seed)
wall, cpu = time.perf_counter(), time.process_time()
model.fit(x)
print(time.perf_counter() - wall, time.process_time() - cpu)
"""


def bench_kmeans_constrained(x: np.ndarray, cfg: BenchConfig) -> dict[str, Any]:
    """k-means-constrained on growing subsamples, each in a child process under a time cap.

    A child process is the only way to stop a min-cost-flow solve that runs past the cap.
    Our fit on the same subsample is timed alongside.
    """
    try:
        import k_means_constrained  # noqa: F401
    except ImportError as exc:
        return {"available": False, "note": f"k-means-constrained not installed ({exc}); nothing measured"}
    tried: list[dict[str, Any]] = []
    largest_ok: int | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in cfg.constrained_sizes:
            if n > x.shape[0]:
                break
            sample = x[np.random.default_rng(cfg.seed).choice(x.shape[0], n, replace=False)]
            path = os.path.join(tmp, f"x{n}.npy")
            np.save(path, sample)
            start = time.perf_counter()
            try:
                out = subprocess.run(
                    [sys.executable, "-c", _CONSTRAINED_CHILD, path, str(cfg.k), str(cfg.iters), str(cfg.seed)],
                    capture_output=True, text=True, timeout=cfg.constrained_time_cap_s, check=True,
                )
                wall_s, cpu_s = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
                seconds: float | None = wall_s
                cpu: float | None = cpu_s
                status = "ok"
            except subprocess.TimeoutExpired:
                seconds, cpu, status = None, None, f"over {cfg.constrained_time_cap_s:.0f} s cap"
            except subprocess.CalledProcessError as exc:
                seconds, cpu = None, None
                status = f"failed: {exc.stderr.strip().splitlines()[-1] if exc.stderr else exc}"
            wall = time.perf_counter() - start
            t0 = time.perf_counter()
            balanced_spherical_kmeans(sample, cfg.k, iters=cfg.iters, seed=cfg.seed)
            ours_s = time.perf_counter() - t0
            ours_cpu = _single_thread_cpu_seconds(
                lambda: balanced_spherical_kmeans(sample, cfg.k, iters=cfg.iters, seed=cfg.seed)
            )
            tried.append({"n": n, "seconds": seconds, "cpu_seconds": cpu, "ours_seconds": ours_s,
                          "ours_cpu_seconds_1thread": ours_cpu, "status": status, "child_wall_s": wall})
            if status != "ok":
                break
            largest_ok = n
    result: dict[str, Any] = {
        "available": True,
        "k": cfg.k,
        "time_cap_s": cfg.constrained_time_cap_s,
        "tried": tried,
        "largest_n_within_cap": largest_ok,
    }
    ok = [t for t in tried if t["status"] == "ok" and t["cpu_seconds"]]
    if len(ok) >= 2:
        # Power law through the CPU times of the last two sizes that finished (CPU time,
        # because wall time on a shared machine is too noisy to fit); an estimate.
        (n1, s1), (n2, s2) = (ok[-2]["n"], ok[-2]["cpu_seconds"]), (ok[-1]["n"], ok[-1]["cpu_seconds"])
        exponent = math.log(s2 / s1) / math.log(n2 / n1)
        result["cpu_scaling_exponent"] = exponent
        result["estimated_cpu_seconds_at_full_n"] = s2 * (x.shape[0] / n2) ** exponent
    return result


def _embeddings_table(x: np.ndarray, model_id: str) -> Any:
    """``x`` as an ``item_embeddings`` Arrow table (built from flat buffers, no row objects)."""
    import datetime as dt

    import pyarrow as pa

    from hymirec_udfs.core import schemas

    n, d = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    columns = {
        "item_id": pa.array([f"item{j:07d}" for j in range(n)]),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x, np.float32).ravel())),
        "dim": pa.array(np.full(n, d, np.int32)),
        "model_id": pa.array([model_id] * n),
        "content_hash": pa.array([f"h{j}" for j in range(n)]),
        "embedded_at": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(columns).cast(schemas.arrow_schema(schemas.ITEM_EMBEDDINGS))


def _encode_frame_pandas(df: Any, book: ResidualCodebook, version: str) -> Any:
    """The previous pandas-UDF encode (np.stack over per-row arrays), kept here as a reference."""
    import io

    import pandas as pd

    from hymirec_udfs.core import schemas
    from hymirec_udfs.codebook.serialize import load_npz, save_npz

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "codebook.npz"
        save_npz(book, path)
        blob = df.sparkSession.sparkContext.broadcast(path.read_bytes())

    def assign(batches: Any) -> Any:
        torch.set_num_threads(1)
        cb = load_npz(io.BytesIO(blob.value))
        for batch in batches:
            matrix = np.stack(batch["embedding"].to_numpy()).astype(np.float32)
            codes, coefs, recon = encode(cb, matrix, round_coefs=True)
            yield pd.DataFrame({"item_id": batch["item_id"].to_numpy(), "codes": list(codes.astype(np.int16)),
                                "coefs": list(coefs.astype(np.float32)), "codebook_version": version,
                                "recon_cosine": recon.astype(np.float32), "content_hash": ""})

    return df.select("item_id", "embedding").mapInPandas(assign, schemas.spark_schema(schemas.ITEM_CODES))


def _encode_catalog(x: np.ndarray, n_items: int, cfg: BenchConfig) -> np.ndarray:
    """The fit's catalog, or a fresh one of ``n_items`` rows from the same generator."""
    n_items = n_items or cfg.encode_items
    return x if n_items in (0, x.shape[0]) else make_catalog(n_items, cfg.d, cfg.seed + 1)


def bench_encode(x: np.ndarray, book: ResidualCodebook, repeats: int = 2) -> dict[str, Any]:
    """encode_items through local Spark against a single-process loop over the same items.

    Both sides start from the same ``item_embeddings`` Delta table and end with an
    ``item_codes`` Delta table. Spark runs the stage's own path,
    :func:`~hymirec_udfs.codebook.spark.encode_catalog` (a distributed read of the
    table's files, an Arrow UDF with the codebook broadcast, one delta-rs commit through
    the table store); the plain side reads the table with delta-rs into one float32
    matrix, runs :func:`encode` (chunked torch matmuls, all cores) and writes the codes
    with ``write_deltalake``. The headline ratio is end to end (Spark items/s over plain
    items/s); also timed: the plain loop's in-memory encode alone, and the earlier
    pandas-UDF version of the Spark path. Each is warmed up once, then the best of
    ``repeats`` runs is kept.
    """
    from deltalake import DeltaTable, write_deltalake

    from hymirec_udfs.core import schemas
    from hymirec_udfs.codebook.spark import codes_batch, encode_catalog
    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.core.tables import get_table_store

    n = x.shape[0]
    version = "cb-bench"
    results: dict[str, Any] = {"encode_items": n}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(["local"], [f"paths.work_dir={tmp}", "tracking.enabled=false"])
        spark = get_spark(cfg)
        store = get_table_store(spark, cfg)
        write_deltalake(store.location(schemas.ITEM_EMBEDDINGS), _embeddings_table(x, "bench-model"), mode="overwrite")
        parallelism = max(2, spark.sparkContext.defaultParallelism)

        def spark_run(pandas_udf: bool = False) -> float:
            # What run_encode does between reading the table and committing item_codes
            # (encode_catalog), or the same with the earlier pandas UDF.
            start = time.perf_counter()
            emb = store.read(schemas.ITEM_EMBEDDINGS)
            if pandas_udf:
                emb = emb.repartition(parallelism) if emb.rdd.getNumPartitions() < parallelism else emb
                codes = _encode_frame_pandas(emb, book, version)
            else:
                codes = encode_catalog(emb, book, version)
            store.overwrite(schemas.ITEM_CODES, codes)
            return time.perf_counter() - start

        plain_path = str(Path(tmp) / "item_codes_plain")

        def plain_run() -> tuple[float, float]:
            start = time.perf_counter()
            table = DeltaTable(store.location(schemas.ITEM_EMBEDDINGS)).to_pyarrow_table(columns=["item_id", "embedding"])
            values = table.column("embedding").combine_chunks()
            matrix = values.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
            t0 = time.perf_counter()
            codes, coefs, recon = encode(book, matrix, round_coefs=True)
            compute = time.perf_counter() - t0
            out = codes_batch(table.column("item_id").combine_chunks(), codes, coefs, recon, version)
            write_deltalake(plain_path, out, mode="overwrite")
            return time.perf_counter() - start, compute

        spark_run()  # warm-up: Python workers start, JIT, page cache
        plain_run()
        spark_s, plain_s, compute_s, pandas_s = [], [], [], []
        for _ in range(repeats):
            spark_s.append(spark_run())
            total, compute = plain_run()
            plain_s.append(total)
            compute_s.append(compute)
        for _ in range(repeats):
            pandas_s.append(spark_run(pandas_udf=True))

        # Same codes both ways (the Spark table is what the stage wrote last: pandas path).
        spark_codes = store.read(schemas.ITEM_CODES).orderBy("item_id").select("codes").toArrow()
        plain_codes = DeltaTable(plain_path).to_pyarrow_table(columns=["item_id", "codes"]).sort_by("item_id")
        results["encode_codes_identical"] = spark_codes.column("codes").to_pylist() == plain_codes.column("codes").to_pylist()
        spark.stop()

    best = {"spark": min(spark_s), "plain": min(plain_s), "compute": min(compute_s), "pandas": min(pandas_s)}
    results.update({
        "encode_seconds_spark": best["spark"],
        "encode_seconds_plain": best["plain"],
        "encode_seconds_plain_compute_only": best["compute"],
        "encode_seconds_spark_pandas_udf": best["pandas"],
        "encode_items_per_s_spark": n / best["spark"],
        "encode_items_per_s_plain": n / best["plain"],
        "encode_ratio_vs_plain": best["plain"] / best["spark"],
        "encode_ratio_vs_plain_compute_only": best["compute"] / best["spark"],
        "encode_arrow_udf_speedup_vs_pandas_udf": best["pandas"] / best["spark"],
        "encode_runs_seconds": {"spark": spark_s, "plain": plain_s, "plain_compute_only": compute_s,
                                "spark_pandas_udf": pandas_s},
    })
    return results


def machine_info() -> dict[str, Any]:
    """Cores, GPU (null on CPU machines) and the load when the run started."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average_1m_at_start": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _row(name: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4f}"
    return f"  {name:<46} {value}"


def print_table(results: dict[str, Any], cfg: BenchConfig) -> None:
    """A readable summary of the flat results."""
    print(f"\ncodebook benchmark  N={cfg.n} D={cfg.d} k={cfg.k} L={cfg.layers} iters={cfg.iters}"
          f"{'  (quick)' if cfg.quick else ''}")
    print(f"residual codebook fit, {cfg.layers} layers (faiss spherical k-means per layer)")
    for key in ("fit_seconds_ours", "fit_seconds_faiss", "fit_time_ratio_vs_faiss", "fit_layer_seconds_ours"):
        print(_row(key, results[key]))
    print("one layer of k-means")
    for key in ("fit_seconds_ours_one_layer", "fit_seconds_faiss_one_layer", "fit_time_ratio_vs_faiss_one_layer",
                "fit_seconds_faiss_default_subsample", "fit_time_ratio_vs_faiss_default_subsample",
                "fit_cpu_seconds_1thread_ours", "fit_cpu_seconds_1thread_faiss",
                "fit_cpu_time_ratio_vs_faiss_1thread",
                "fit_iterations_ours", "fit_max_cluster_over_mean", "faiss_max_cluster_over_mean",
                "encode_max_cluster_over_mean_ours", "fit_objective_ours", "faiss_objective"):
        print(_row(key, results[key]))
    print(f"reconstruction cosine at {results['bytes_per_item']:.0f} bytes/item "
          f"({results['compression_vs_fp32']:.0f}x vs fp32)")
    for key in ("recon_cosine_ours", "recon_cosine_faiss_rq", "recon_cosine_euclidean",
                "recon_cosine_euclidean_same_layers", "euclidean_layers", "collision_rate_ours"):
        print(_row(key, results[key]))
    kc = results["kmeans_constrained"]
    print("k-means-constrained (min-cost flow), k =", kc.get("k"))
    if not kc.get("available"):
        print("  " + kc["note"])
    else:
        for t in kc["tried"]:
            secs = "-" if t["seconds"] is None else f"{t['seconds']:.2f} s"
            cpu = "-" if t["cpu_seconds"] is None else f"{t['cpu_seconds']:.2f} s"
            print(f"  n={t['n']:<8} {secs:<10} (cpu {cpu:<9}) ours {t['ours_seconds']:.2f} s"
                  f" (1-thread cpu {t['ours_cpu_seconds_1thread']:.2f} s)  {t['status']}")
        if "estimated_cpu_seconds_at_full_n" in kc:
            print(_row(f"estimated CPU s at N={cfg.n} (n^{kc['cpu_scaling_exponent']:.2f})",
                       kc["estimated_cpu_seconds_at_full_n"]))
    print_encode(results)


def print_encode(results: dict[str, Any]) -> None:
    """The Spark encode comparison's lines."""
    if results.get("encode_ratio_vs_plain") is None:
        print(_row("encode_ratio_vs_plain", None))
        return
    print(f"encode {results['encode_items']:,} items, item_embeddings -> item_codes (Delta to Delta)")
    for key in ("encode_seconds_spark", "encode_seconds_plain", "encode_seconds_plain_compute_only",
                "encode_seconds_spark_pandas_udf", "encode_ratio_vs_plain", "encode_ratio_vs_plain_compute_only",
                "encode_arrow_udf_speedup_vs_pandas_udf", "encode_codes_identical"):
        print(_row(key, results[key]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under 3 minutes on 2 cores)")
    parser.add_argument("--skip-encode", action="store_true", help="skip the Spark encode comparison")
    parser.add_argument("--only-encode", action="store_true", help="run only the Spark encode comparison")
    parser.add_argument("--encode-items", type=int, default=0,
                        help="catalog size of the encode comparison (default: 1M, --quick: N of the fit)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL

    machine = machine_info()
    x = make_catalog(cfg.n, cfg.d, cfg.seed)
    if args.only_encode:
        # Refresh the encode figures of an earlier full run, keeping its other keys.
        results = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {}
        book, _ = fit_residual_codebook(x, [cfg.k] * cfg.layers, iters=cfg.iters, seed=cfg.seed)
        results.update(bench_encode(_encode_catalog(x, args.encode_items, cfg), book))
        results.setdefault("machine", {})["encode_load_average_1m_at_start"] = machine["load_average_1m_at_start"]
        print_encode(results)
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_PATH.write_text(json.dumps(results, indent=2))
        return results
    results: dict[str, Any] = {"n": cfg.n, "d": cfg.d, "k": cfg.k, "layers": cfg.layers,
                               "iters": cfg.iters, "quick": cfg.quick}
    results.update(bench_kmeans(x, cfg))
    results.update(bench_reconstruction(x, cfg))
    if not args.skip_encode:
        book, _ = fit_residual_codebook(x, [cfg.k] * cfg.layers, iters=cfg.iters, seed=cfg.seed)
        results.update(bench_encode(_encode_catalog(x, args.encode_items, cfg), book))
    else:
        results["encode_ratio_vs_plain"] = None
    results["kmeans_constrained"] = bench_kmeans_constrained(x, cfg)
    results["machine"] = machine

    print_table(results, cfg)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS_PATH.relative_to(REPO_ROOT)}")
    return results


if __name__ == "__main__":
    main()
