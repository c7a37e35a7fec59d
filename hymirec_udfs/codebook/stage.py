"""Stages ``fit_codebook`` and ``encode_items`` around :mod:`hymirec_udfs.codebook`.

``fit_codebook`` keeps a *pinned* codebook per embedding model. Every run it measures the
pinned codebook's health on the catalog (:func:`measure_health`: the new items'
reconstruction against the fit-time reference, occupancy skew, collisions, one drift
score; a ``codebook_health`` row per run) and fits a new version only when
``codebook.refit`` says so (:func:`hymirec_udfs.codebook.lifecycle.decide`): the first time
for a model, when the drift score trips, on a schedule, or when forced. A refit of the
same shape is warm-started from the pinned centroids and aligned to its code ids
(:func:`hymirec_udfs.codebook.lifecycle.align`). Centroids go to ``codebooks`` (one row per
layer and code under the new version) and to MLflow.

``encode_items`` encodes, with the latest codebook, only the items whose
(``item_id``, ``content_hash``) has no code of that version yet (all of them after a
refit), in an Arrow UDF on the executors, and merges them into ``item_codes``; other
versions' rows stay while a registered model uses them (:func:`prune_codes`). After an
aligned refit it reports the share of the catalog whose codes did not change.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from hymirec_udfs.artifacts import current_embeddings, latest_codebook, to_matrix
from hymirec_udfs.codebook.spark import CodebookStageError, catalog_code_stats, encode_catalog
from hymirec_udfs.core import rundate, schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.devices import auto_device
from hymirec_udfs.core.stage_api import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

    from hymirec_udfs.codebook.residual import ResidualCodebook


@dataclass
class Pinned:
    """The codebook new items are encoded with: the newest version for the embedding model."""

    version: str
    book: "ResidualCodebook"
    created_at: dt.datetime
    lifecycle: dict[str, Any]


def pinned_codebook(ctx: StageContext, model_id: str) -> Optional[Pinned]:
    """The newest codebook fitted on ``model_id``'s embeddings (None when there is none)."""
    from pyspark.sql import functions as F

    from hymirec_udfs.codebook.serialize import codebook_from_rows

    if not ctx.store.exists(schemas.CODEBOOKS):
        return None
    books = ctx.read(schemas.CODEBOOKS).where(F.col("model_id") == model_id)
    latest = books.orderBy(F.col("created_at").desc(), F.col("version").desc()).select(
        "version", "created_at", "fit_stats").first()
    if latest is None:
        return None
    rows = [r.asDict() for r in books.where(F.col("version") == latest.version).collect()]
    stats = json.loads(latest.fit_stats or "{}")
    lifecycle = stats.get("lifecycle") or {
        # a codebook from before the lifecycle was recorded: its basepool is the reference
        "reference_recon_mean": stats.get("recon_cosine_mean", 1.0), "reference_source": "basepool",
        "reference_recon_p05": stats.get("recon_cosine_mean", 1.0) - 0.05}
    return Pinned(latest.version, codebook_from_rows(rows), latest.created_at, lifecycle)


def measure_health(ctx: StageContext, cfg: Config, emb: "DataFrame", pinned: Pinned) -> dict[str, Any]:
    """Health of the pinned codebook on today's catalog.

    New items are the current embeddings whose (item, content hash) has no code of the
    pinned version; they are encoded on the executors (``encode_catalog``) and only their
    aggregates reach the driver. Occupancy skew (layer-0 largest cluster over the mean)
    and the collision rate are Spark aggregations over the whole catalog's codes.
    Costs at 10M items: one anti-join on item ids, an encode of the new items only, and a
    group-by over the catalog's codes (``sum(ks)`` counts to the driver).
    """
    from pyspark.sql import functions as F

    from hymirec_udfs.codebook import lifecycle

    book, version = pinned.book, pinned.version
    codes = (ctx.read(schemas.ITEM_CODES).where(F.col("codebook_version") == version)
             if ctx.store.exists(schemas.ITEM_CODES) else None)
    if codes is not None and schemas.CONTENT_HASH not in ctx.store.columns(schemas.ITEM_CODES):
        codes = None  # written by an older release: every item counts as new
    known = codes.select(schemas.ITEM_ID, schemas.CONTENT_HASH) if codes is not None else None
    new = emb if known is None else emb.join(known, [schemas.ITEM_ID, schemas.CONTENT_HASH], "left_anti")
    floor = float(pinned.lifecycle["reference_recon_p05"])
    encoded = encode_catalog(new, book, version).cache()
    try:
        agg = encoded.agg(F.count("*").alias("n"), F.avg("recon_cosine").alias("mean"),
                          F.avg((F.col("recon_cosine") < F.lit(floor)).cast("double")).alias("below")).first()
        n_new = int(agg["n"])
        whole = encoded if codes is None else codes.join(encoded.select(schemas.ITEM_ID), schemas.ITEM_ID,
                                                         "left_anti").unionByName(encoded)
        stats = catalog_code_stats(whole, list(book.ks), dim=book.dim, with_coefs=str(book.metric) == "cosine")
    finally:
        encoded.unpersist()
    new_mean = float(agg["mean"]) if n_new else None
    reference = float(pinned.lifecycle["reference_recon_mean"])
    return {
        "new_items": n_new, "new_recon_cosine": new_mean, "reference_recon_cosine": reference,
        "cosine_floor": floor, "share_below_floor": float(agg["below"]) if n_new else None,
        "occupancy_skew": stats["layer0_cluster_size_max"] / max(stats["layer0_cluster_size_mean"], 1e-9),
        "collision_rate": stats["collision_rate"],
        "drift_score": lifecycle.drift_score(new_mean, reference),
    }


def run_fit(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Check the pinned codebook's health; fit (warm-started, aligned) a new version when
    ``codebook.refit`` says so, and write ``codebooks`` and ``codebook_health``."""
    from hymirec_udfs.codebook import lifecycle

    cc = cfg.codebook
    emb = current_embeddings(ctx, cfg)
    model_id = emb.select("model_id").first().model_id
    n = emb.count()
    day = rundate.run_date()
    pinned = pinned_codebook(ctx, model_id)
    same_shape = pinned is not None and pinned.book.ks == list(cc.ks) and str(pinned.book.metric) == cc.metric
    health: dict[str, Any] = {}
    days_since = None
    if pinned is not None and same_shape:
        health = measure_health(ctx, cfg, emb, pinned)
        fitted_on = pinned.lifecycle.get("run_date") or pinned.created_at.date().isoformat()
        days_since = ((day or dt.datetime.now(dt.timezone.utc).date()) - dt.date.fromisoformat(fitted_on)).days
    decision = lifecycle.decide(cc.refit, has_book=pinned is not None, same_shape=same_shape,
                                drift=health.get("drift_score"), threshold=cc.drift_threshold,
                                new_items=int(health.get("new_items", n)), min_new_items=cc.min_new_items,
                                days_since_fit=days_since, every_days=cc.refit_every_days)
    summary: dict[str, Any] = {"refit": decision.refit, "reason": decision.reason,
                               **{f"health_{k}": v for k, v in health.items() if v is not None}}
    rows: dict[str, int] = {"catalog": n, "new_items": int(health.get("new_items", n))}
    new_version = None
    if decision.refit:
        fitted = _fit(spark, cfg, ctx, emb, n, model_id, pinned if (decision.warm and cc.warm_start) else None,
                      decision.reason)
        new_version = fitted["version"]
        rows.update({"basepool": fitted.pop("basepool"), "centroids": fitted.pop("centroids")})
        summary.update(fitted)
    now = dt.datetime.now(dt.timezone.utc)
    health_row = {
        "run_id": ctx.run_id, schemas.AS_OF_DATE: day, "codebook_version": pinned.version if pinned else "",
        "model_id": model_id, "new_items": int(health.get("new_items", n)),
        "new_recon_cosine": health.get("new_recon_cosine"),
        "reference_recon_cosine": float(health.get("reference_recon_cosine", 0.0)),
        "cosine_floor": float(health.get("cosine_floor", 0.0)), "share_below_floor": health.get("share_below_floor"),
        "occupancy_skew": health.get("occupancy_skew"), "collision_rate": health.get("collision_rate"),
        "drift_score": health.get("drift_score"), "drift_threshold": float(cc.drift_threshold),
        "refit": decision.refit, "reason": decision.reason, "new_version": new_version, "created_at": now,
    }
    ctx.store.append(schemas.CODEBOOK_HEALTH,
                     spark.createDataFrame([health_row], schemas.spark_schema(schemas.CODEBOOK_HEALTH)))
    ctx.logger.tags({"codebook.version": new_version or (pinned.version if pinned else ""),
                     "codebook.refit_reason": decision.reason})
    summary["version"] = new_version or (pinned.version if pinned else "")
    return StageOutput(rows=rows, summary=summary,
                       outputs=((schemas.CODEBOOKS,) if decision.refit else ()) + (schemas.CODEBOOK_HEALTH,))


def _fit(spark: "SparkSession", cfg: Config, ctx: StageContext, emb: "DataFrame", n: int, model_id: str,
         warm: Optional[Pinned], reason: str) -> dict[str, Any]:
    """Fit a new codebook version on a basepool sample (warm-started from and aligned to
    ``warm`` when given), append it to ``codebooks``; returns the summary figures."""
    import numpy as np
    from pyspark.sql import functions as F

    from hymirec_udfs.codebook import lifecycle
    from hymirec_udfs.codebook.residual import encode, fit_residual_codebook
    from hymirec_udfs.codebook.serialize import codebook_to_rows, save_npz
    from hymirec_udfs.codebook.stats import codebook_stats

    cc = cfg.codebook
    pool = emb
    if n > cc.basepool_size:
        # Sample a little more than needed, then cut: Spark's sampling is Bernoulli.
        pool = emb.sample(fraction=min(1.0, 1.1 * cc.basepool_size / n), seed=cc.seed).orderBy(
            schemas.ITEM_ID).limit(cc.basepool_size)
    held = None
    if cc.holdout_fraction > 0:
        # A seeded hash split (the same items whatever the partitioning): the held-out items
        # calibrate the drift score's reference, as new items will be judged -- unseen.
        bucket = F.abs(F.xxhash64(schemas.ITEM_ID, F.lit(cc.seed))) % 10000
        cut = int(round(cc.holdout_fraction * 10000))
        held = pool.where(bucket < cut)
        pool = pool.where(bucket >= cut)
    ids, matrix = to_matrix(pool.orderBy(schemas.ITEM_ID))
    codebook, report = fit_residual_codebook(
        matrix, cc.ks, metric=cc.metric, iters=cc.iters, seed=cc.seed, balance=cc.balance,
        device=auto_device(cc.device), init=warm.book if warm is not None else None,
    )
    perms = None
    if warm is not None:
        codebook, perms = lifecycle.align(warm.book, codebook)
        for layer, perm in zip(report.layers, perms):
            layer.cluster_sizes = layer.cluster_sizes[perm]
    codes, _coefs, recon = encode(codebook, matrix)
    fit_stats = codebook_stats(codes, codebook.ks, recon_cosine=recon, dim=codebook.dim,
                               with_coefs=str(codebook.metric) == "cosine")
    reference = np.asarray(recon, dtype=np.float64)
    source = "basepool"
    if held is not None:
        _, held_matrix = to_matrix(held.orderBy(schemas.ITEM_ID))
        if len(held_matrix):
            reference = np.asarray(encode(codebook, held_matrix)[2], dtype=np.float64)
            source = f"holdout ({len(held_matrix)} items)"
    day = rundate.run_date()
    version = f"cb-{ctx.run_id}"
    life = {"reference_recon_mean": float(reference.mean()), "reference_recon_p05": float(np.quantile(reference, 0.05)),
            "reference_source": source, "parent_version": warm.version if warm is not None else None,
            "warm_started": warm is not None, "aligned": perms is not None, "reason": reason,
            "run_date": (day or dt.datetime.now(dt.timezone.utc).date()).isoformat()}
    now = dt.datetime.now(dt.timezone.utc)
    report_json = json.dumps({**report.to_dict(), "lifecycle": life}, default=float)
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
        ctx.logger.dict({**report.to_dict(), "lifecycle": life}, "codebook/fit_report.json")
    summary: dict[str, Any] = {
        "version": version, "metric": str(codebook.metric), "ks": list(codebook.ks), "fit_seconds": report.seconds,
        "basepool_recon_cosine_mean": report.recon_cosine_mean, "warm_started": warm is not None,
        "parent_version": warm.version if warm is not None else "", "reference_source": source,
        "reference_recon_cosine": life["reference_recon_mean"], "basepool": len(ids), "centroids": len(rows)}
    for layer in report.layers:
        summary[f"fit_layer{layer.layer}_max_cluster_over_mean"] = layer.max_cluster_over_mean
        summary[f"fit_layer{layer.layer}_cluster_size_min"] = int(layer.cluster_sizes.min())
        summary[f"fit_layer{layer.layer}_cluster_size_max"] = int(layer.cluster_sizes.max())
    summary.update({f"basepool_{k}": v for k, v in fit_stats.items()})
    return summary


def run_encode(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Encode the items that have no code of the latest codebook yet (new, changed, or all
    after a refit) and merge them into ``item_codes`` (other versions' rows stay)."""
    from pyspark.sql import functions as F

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
    store = ctx.store
    current_shape = store.exists(schemas.ITEM_CODES) and \
        store.columns(schemas.ITEM_CODES) == schemas.arrow_schema(schemas.ITEM_CODES).names
    mine = store.read(schemas.ITEM_CODES).where(F.col("codebook_version") == version) if current_shape else None
    todo = emb if mine is None else emb.join(mine.select(schemas.ITEM_ID, schemas.CONTENT_HASH),
                                             [schemas.ITEM_ID, schemas.CONTENT_HASH], "left_anti")
    todo = todo.cache()
    n_todo = todo.count()
    mode = "none"
    if n_todo:
        codes_df = encode_catalog(todo, codebook, version)
        if not current_shape and store.exists(schemas.ITEM_CODES):
            # written by an older release (no content hash): replaced whole, this version only
            store.overwrite(schemas.ITEM_CODES, codes_df)
            mode = "full (table rebuilt)"
        elif mine is None or mine.limit(1).count() == 0:
            # a new version: only its rows are written; earlier versions' codes stay, so a
            # model trained on them still reads its own codes
            store.replace_where(schemas.ITEM_CODES, codes_df, f"codebook_version = '{version}'")
            mode = "full"
        else:
            store.merge(schemas.ITEM_CODES, codes_df)
            mode = "incremental"
    todo.unpersist()
    mine = store.read(schemas.ITEM_CODES).where(F.col("codebook_version") == version)
    stats = catalog_code_stats(mine, list(codebook.ks), dim=codebook.dim, with_coefs=str(codebook.metric) == "cosine")
    summary: dict[str, Any] = {"version": version, "metric": str(codebook.metric), "encode_mode": mode, **stats}
    parent = _parent_version(ctx, version)
    if parent and mode.startswith("full"):
        old = store.read(schemas.ITEM_CODES).where(F.col("codebook_version") == parent)
        same = mine.alias("n").join(old.alias("o"), schemas.ITEM_ID).agg(
            F.count("*").alias("n"), F.avg((F.col("n.codes") == F.col("o.codes")).cast("double")).alias("all"),
            F.avg((F.col("n.codes")[0] == F.col("o.codes")[0]).cast("double")).alias("first")).first()
        if same["n"]:
            summary.update({"parent_version": parent, "codes_unchanged": float(same["all"]),
                            "codes_unchanged_layer0": float(same["first"]), "codes_compared": int(same["n"])})
    if mode.startswith("full") and cfg.codebook.prune_codes:
        summary.update(prune_codes(ctx, cfg, keep={version, parent} - {None}))
    return StageOutput(rows={"items": int(stats["n_items"]), "encoded": n_todo}, summary=summary,
                       outputs=(schemas.ITEM_CODES,) if n_todo else ())


def codes_in_use(ctx: StageContext, cfg: Config) -> tuple[set[str], str]:
    """The codebook versions some model still reads codes of, and where that came from.

    With the registry on: the ``hymirec.codebook_version`` tag of every registered
    version's training run (serving and backfills only load registered versions, or fall
    back to the model's own item store). Without it: every version a successful ``train``
    run recorded in ``job_runs``.
    """
    from hymirec_udfs.core import lineage, registry

    if cfg.registry.enabled and cfg.tracking.enabled:
        return registry.run_tag_values(cfg, "hymirec.codebook_version"), f"registered model '{cfg.registry.model_name}'"
    return lineage.summary_values(ctx.store, "train", "codebook_version"), "train runs in job_runs"


def prune_codes(ctx: StageContext, cfg: Config, keep: set[str]) -> dict[str, Any]:
    """Delete the ``item_codes`` rows of codebook versions that no model uses (see
    :func:`codes_in_use`) and that are not in ``keep`` (the latest version and the one it
    was aligned to). Each refit adds one catalog of codes; without this they accumulate.

    Cost: one registry call per registered version, then one Delta delete; versions are
    written by separate ``replace_where`` commits, so the delete drops whole files (no
    rewrite) — at 10M items a pruned version is ~10M rows / ~200 MB removed from the
    snapshot (the files stay for time travel until ``VACUUM``). A registry that cannot
    answer skips pruning (reported), never deletes codes a model might read.
    """
    from pyspark.sql import functions as F

    try:
        used, source = codes_in_use(ctx, cfg)
    except Exception as exc:  # noqa: BLE001 - the registry is down: keep everything, say why
        return {"prune_skipped": f"{type(exc).__name__}: {exc}"[:300]}
    versions = {r["codebook_version"] for r in
                ctx.read(schemas.ITEM_CODES).select("codebook_version").distinct().collect()}
    stale = sorted(versions - keep - used)
    out: dict[str, Any] = {"codes_kept_versions": sorted(versions - set(stale)), "codes_kept_because": source,
                           "pruned_versions": stale, "pruned_rows": 0}
    if stale:
        predicate = " OR ".join(f"codebook_version = '{v}'" for v in stale)
        out["pruned_rows"] = int(ctx.read(schemas.ITEM_CODES).where(F.col("codebook_version").isin(stale)).count())
        ctx.store.delete(schemas.ITEM_CODES, predicate)
    return out


def _parent_version(ctx: StageContext, version: str) -> Optional[str]:
    """The codebook ``version`` was warm-started from and aligned to (None for a cold fit)."""
    from pyspark.sql import functions as F

    row = ctx.read(schemas.CODEBOOKS).where(F.col("version") == version).select("fit_stats").first()
    life = json.loads(row["fit_stats"] or "{}").get("lifecycle") or {} if row else {}
    return life.get("parent_version") if life.get("aligned") else None
