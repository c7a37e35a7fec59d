"""Stages ``fit_codebook`` and ``encode_items`` around :mod:`hymirec_udfs.codebook`.

``fit_codebook`` samples a basepool of the current model's item embeddings, fits the
residual codebook on the driver (or its GPU), and writes the centroids to ``codebooks``
(one row per layer and code, under a new version) and to MLflow as an artifact.
``encode_items`` broadcasts the latest codebook and assigns every item in an Arrow UDF,
then replaces ``item_codes`` in one commit, with a report on the full catalog.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from hymirec_udfs import schemas
from hymirec_udfs.config import Config
from hymirec_udfs.stages import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

    from hymirec_udfs.codebook import ResidualCodebook


class CodebookStageError(ValueError):
    """The codebook cannot be fitted or applied (empty input, no codebook yet)."""


def current_embeddings(ctx: StageContext, cfg: Config) -> "DataFrame":
    """Rows of ``item_embeddings`` produced by the configured content encoder."""
    from pyspark.sql import functions as F

    from hymirec_udfs.embed_items import current_model_id

    model_id = current_model_id(cfg.embed, ctx.store, cfg.stage1)
    df = ctx.read(schemas.ITEM_EMBEDDINGS).where(F.col("model_id") == model_id)
    if df.limit(1).count() == 0:
        raise CodebookStageError(
            f"table 'item_embeddings' has no rows for model {model_id}: run the embed stage first"
        )
    return df


def to_matrix(df: "DataFrame", column: str = "embedding") -> tuple[list[str], np.ndarray]:
    """Collect (item ids, float32 matrix) through Arrow (no per-row Python objects)."""
    table = df.select("item_id", column).toArrow()
    ids = table.column("item_id").to_pylist()
    values = table.column(column).combine_chunks()
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dims = np.diff(values.offsets.to_numpy())
    if len(dims) and (dims.min() != dims.max()):
        raise CodebookStageError(f"'{column}' rows have different lengths ({dims.min()}..{dims.max()})")
    return ids, flat.reshape(len(ids), int(dims[0]) if len(dims) else 0)


def latest_codebook(ctx: StageContext) -> tuple[str, "ResidualCodebook", str]:
    """(version, codebook, embedding model id) of the newest codebook in ``codebooks``."""
    from pyspark.sql import functions as F

    from hymirec_udfs.codebook import codebook_from_rows

    books = ctx.read(schemas.CODEBOOKS)
    latest = books.orderBy(F.col("created_at").desc(), F.col("version").desc()).select("version", "model_id").first()
    if latest is None:
        raise CodebookStageError("table 'codebooks' is empty: run fit-codebook first")
    rows = [r.asDict() for r in books.where(F.col("version") == latest.version).collect()]
    return latest.version, codebook_from_rows(rows), latest.model_id


def _device(name: str) -> Optional[str]:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_fit(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Fit the residual codebook on a basepool sample and write ``codebooks``."""
    from pyspark.sql import functions as F

    from hymirec_udfs.codebook import codebook_stats, codebook_to_rows, encode, fit_residual_codebook, save_npz

    cc = cfg.codebook
    emb = current_embeddings(ctx, cfg)
    model_id = emb.select("model_id").first().model_id
    n = emb.count()
    if n > cc.basepool_size:
        # Sample a little more than needed, then cut: Spark's sampling is Bernoulli.
        emb = emb.sample(fraction=min(1.0, 1.1 * cc.basepool_size / n), seed=cc.seed).orderBy("item_id").limit(cc.basepool_size)
    ids, matrix = to_matrix(emb.orderBy("item_id"))
    codebook, report = fit_residual_codebook(
        matrix, cc.ks, metric=cc.metric, iters=cc.iters, seed=cc.seed, balance=cc.balance, device=_device(cc.device)
    )
    codes, _coefs, recon = encode(codebook, matrix)
    fit_stats = codebook_stats(codes, codebook.ks, recon_cosine=recon, dim=codebook.dim,
                               with_coefs=str(codebook.metric) == "cosine")
    version = f"cb-{ctx.run_id}"
    now = dt.datetime.now(dt.timezone.utc)
    report_json = json.dumps(report.to_dict(), default=float)
    rows = [
        {"version": version, "layer": r["layer"], "code": r["code"], "centroid": [float(x) for x in r["centroid"]],
         "metric": str(codebook.metric), "cluster_size_fit": int(r["cluster_size_at_fit"]), "model_id": model_id,
         "fit_stats": report_json, "created_at": now}
        for r in codebook_to_rows(codebook, version, report)
    ]
    ctx.store.append(schemas.CODEBOOKS, spark.createDataFrame(rows, schemas.spark_schema(schemas.CODEBOOKS)))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "codebook.npz"
        save_npz(codebook, path)
        ctx.logger.artifact(str(path), "codebook")
        ctx.logger.dict(report.to_dict(), "codebook/fit_report.json")
    ctx.logger.tags({"codebook.version": version})
    summary = {"version": version, "metric": str(codebook.metric), "ks": list(codebook.ks),
               "fit_seconds": report.seconds, "basepool_recon_cosine_mean": report.recon_cosine_mean}
    for layer in report.layers:
        summary[f"fit_layer{layer.layer}_max_cluster_over_mean"] = layer.max_cluster_over_mean
        summary[f"fit_layer{layer.layer}_cluster_size_min"] = int(layer.cluster_sizes.min())
        summary[f"fit_layer{layer.layer}_cluster_size_max"] = int(layer.cluster_sizes.max())
    summary.update({f"basepool_{k}": v for k, v in fit_stats.items()})
    return StageOutput(rows={"basepool": len(ids), "centroids": len(rows), "catalog": n}, summary=summary)


def _embedding_matrix(batch: "pa.RecordBatch", dim: int) -> np.ndarray:
    """The batch's ``embedding`` column as a float32 ``(rows, dim)`` view of its Arrow buffer.

    Rows of another length are an error naming their item ids, never a reshape that would
    silently shift every later row.
    """
    import pyarrow.compute as pc

    column = batch.column(batch.schema.get_field_index("embedding"))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dim)
    if wrong.size:
        ids = batch.column(batch.schema.get_field_index("item_id")).take(wrong[:5]).to_pylist()
        raise CodebookStageError(
            f"{wrong.size} item embedding(s) do not have the codebook's dimension {dim}"
            f" (item ids {ids}, lengths {sorted(set(lengths[wrong].tolist()))[:5]})"
        )
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(batch.num_rows, dim)


def _encode_batch(batch: "pa.RecordBatch", book: "ResidualCodebook", version: str,
                  schema: "pa.Schema") -> "pa.RecordBatch":
    """Codes, coefficients and reconstruction cosine of one Arrow batch of embeddings.

    Columns are built from flat numpy buffers plus offsets (no per-row Python objects),
    and an input error names the offending item ids rather than batch-relative rows.
    """
    from hymirec_udfs.codebook import CodebookInputError, encode

    matrix = _embedding_matrix(batch, book.dim)
    item_ids = batch.column(batch.schema.get_field_index("item_id"))
    try:
        codes, coefs, recon = encode(book, matrix, round_coefs=True)
    except CodebookInputError as err:
        sq = np.einsum("ij,ij->i", matrix.astype(np.float64), matrix.astype(np.float64))
        bad = np.flatnonzero(~np.isfinite(sq) | (sq <= 0))
        if not bad.size:
            raise
        raise CodebookStageError(
            f"cannot encode {bad.size} item embedding(s): item ids {item_ids.take(bad[:5]).to_pylist()}: {err}"
        ) from err
    return codes_batch(item_ids, codes, coefs, recon, version, schema)


def codes_batch(item_ids: "pa.Array", codes: np.ndarray, coefs: np.ndarray, recon: np.ndarray, version: str,
                schema: Optional["pa.Schema"] = None) -> "pa.RecordBatch":
    """``item_codes`` rows as one Arrow batch, built from flat buffers plus offsets."""
    import pyarrow as pa

    n, layers = codes.shape
    offsets = pa.array(np.arange(0, (n + 1) * layers, layers, dtype=np.int32))
    return pa.RecordBatch.from_arrays(
        [
            item_ids,
            pa.ListArray.from_arrays(offsets, pa.array(codes.astype(np.int16, copy=False).ravel())),
            pa.ListArray.from_arrays(offsets, pa.array(coefs.astype(np.float32, copy=False).ravel())),
            pa.array(np.full(n, version, dtype=object), pa.string()),
            pa.array(recon.astype(np.float32, copy=False)),
        ],
        schema=schema or schemas.arrow_schema(schemas.ITEM_CODES),
    )


def encode_frame(df: "DataFrame", codebook: "ResidualCodebook", version: str) -> "DataFrame":
    """Distributed encoding: the codebook is broadcast once, an Arrow UDF assigns each batch.

    ``mapInArrow`` hands each worker Arrow record batches, so the embeddings go from the
    JVM to a ``(rows, D)`` float32 matrix without one Python object per row (the pandas
    path builds an object array of per-row arrays and stacks them: 1.2x slower end to
    end at 200k and at 1M x 384, ``benchmarks/codebook.py``), and item ids stay at hand
    for errors.
    """
    from hymirec_udfs.codebook import save_npz

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "codebook.npz"
        save_npz(codebook, path)
        blob = path.read_bytes()
    broadcast = df.sparkSession.sparkContext.broadcast(blob)
    out_schema = schemas.arrow_schema(schemas.ITEM_CODES)

    def assign(batches: Iterator["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        import io

        import torch

        from hymirec_udfs.codebook import load_npz

        # One thread per task: Spark already runs one task per core.
        torch.set_num_threads(1)
        book = load_npz(io.BytesIO(broadcast.value))
        for batch in batches:
            if batch.num_rows:
                yield _encode_batch(batch, book, version, out_schema)

    return df.select("item_id", "embedding").mapInArrow(assign, schemas.spark_schema(schemas.ITEM_CODES))


def encode_catalog(emb: "DataFrame", codebook: "ResidualCodebook", version: str) -> "DataFrame":
    """``item_codes`` rows for the current embeddings ``emb``: the stage's encode path.

    (A variant whose Python tasks read the delta-rs snapshot's Parquet row groups with
    pyarrow, skipping the JVM's per-element conversion of ``array<float>`` to Arrow,
    measured no faster end to end on 200k x 384: 2.8 s against 2.6 s, since three
    row-group tasks on two cores leave one idle, so the stage reads through Spark.)
    """
    spark = emb.sparkSession
    parallelism = max(2, spark.sparkContext.defaultParallelism)
    if emb.rdd.getNumPartitions() < parallelism:
        # Too few input splits to use every core (a small or single-file table). A larger
        # table is encoded where it is read: a shuffle of the embeddings measured +15 %
        # on 200k x 384 (3.5 s against 3.0 s) for no gain.
        emb = emb.repartition(parallelism)
    return encode_frame(emb, codebook, version)


def run_encode(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Assign every current item embedding to codes and replace ``item_codes``."""
    from hymirec_udfs.codebook import codebook_stats

    version, codebook, book_model = latest_codebook(ctx)
    emb = current_embeddings(ctx, cfg)
    model_id = emb.select("model_id").first().model_id
    if model_id != book_model:
        raise CodebookStageError(
            f"the latest codebook {version} was fitted on embeddings of model {book_model}, but the"
            f" current embeddings come from {model_id}: run fit-codebook again"
        )
    dims = [r.dim for r in emb.select("dim").distinct().collect()]
    if dims != [codebook.dim]:
        raise CodebookStageError(f"embedding dimension {dims} does not match codebook {version} (D={codebook.dim})")
    if max(codebook.ks) > 32767:
        raise CodebookStageError("codes are stored as int16: k must be <= 32767")
    codes_df = encode_catalog(emb, codebook, version)
    ctx.store.overwrite(schemas.ITEM_CODES, codes_df)

    table = ctx.store.read(schemas.ITEM_CODES).select("codes", "recon_cosine").toArrow()
    codes = np.asarray(table.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(
        table.num_rows, codebook.num_layers)
    recon = table.column("recon_cosine").to_numpy()
    stats = codebook_stats(codes, codebook.ks, recon_cosine=recon, dim=codebook.dim,
                           with_coefs=str(codebook.metric) == "cosine")
    return StageOutput(rows={"items": int(table.num_rows)},
                       summary={"version": version, "metric": str(codebook.metric), **stats})


def decode_item_codes(codes_df: "DataFrame", codebook: "ResidualCodebook") -> tuple[list[str], np.ndarray]:
    """Reconstructed, normalised embeddings of ``item_codes`` rows (the public decode API)."""
    from hymirec_udfs.codebook import decode

    table = codes_df.select("item_id", "codes", "coefs").toArrow()
    n, layers = table.num_rows, codebook.num_layers
    codes = table.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, layers)
    coefs = table.column("coefs").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, layers)
    return table.column("item_id").to_pylist(), decode(codebook, codes, coefs)
