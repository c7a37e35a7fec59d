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
from typing import TYPE_CHECKING


from hymirec_udfs.artifacts import current_embeddings, latest_codebook, to_matrix
from hymirec_udfs.codebook.spark import CodebookStageError, catalog_code_stats, encode_catalog
from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.devices import auto_device
from hymirec_udfs.core.stage_api import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession



def run_fit(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Fit the residual codebook on a basepool sample and write ``codebooks``."""

    from hymirec_udfs.codebook.residual import encode, fit_residual_codebook
    from hymirec_udfs.codebook.serialize import codebook_to_rows, save_npz
    from hymirec_udfs.codebook.stats import codebook_stats

    cc = cfg.codebook
    emb = current_embeddings(ctx, cfg)
    model_id = emb.select("model_id").first().model_id
    n = emb.count()
    if n > cc.basepool_size:
        # Sample a little more than needed, then cut: Spark's sampling is Bernoulli.
        emb = emb.sample(fraction=min(1.0, 1.1 * cc.basepool_size / n), seed=cc.seed).orderBy(schemas.ITEM_ID).limit(cc.basepool_size)
    ids, matrix = to_matrix(emb.orderBy(schemas.ITEM_ID))
    codebook, report = fit_residual_codebook(
        matrix, cc.ks, metric=cc.metric, iters=cc.iters, seed=cc.seed, balance=cc.balance, device=auto_device(cc.device)
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


def run_encode(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Assign every current item embedding to codes of the latest codebook and replace that
    version's rows of ``item_codes`` (other versions' rows stay)."""

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
    # Only this codebook version's rows are replaced: the codes of earlier versions stay
    # (keyed by item and version), so a model trained on them still reads its own codes.
    ctx.store.replace_where(schemas.ITEM_CODES, codes_df, f"codebook_version = '{version}'")

    from pyspark.sql import functions as F

    mine = ctx.store.read(schemas.ITEM_CODES).where(F.col("codebook_version") == version)
    stats = catalog_code_stats(mine, list(codebook.ks), dim=codebook.dim, with_coefs=str(codebook.metric) == "cosine")
    return StageOutput(rows={"items": int(stats["n_items"])},
                       summary={"version": version, "metric": str(codebook.metric), **stats})
