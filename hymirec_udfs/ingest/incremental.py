"""Incremental ingestion (``ingest.mode: incremental``): merge the run date's increment.

For ``--run-date D`` the increment files of D (``ingest.increment_items`` /
``increment_interactions``, ``{date}`` = D, format ``csv`` or ``parquet`` mapped by the
``ingest.*_col`` keys) are validated like a snapshot and merged:

* **interactions** are appended only where the key (user, item, timestamp, source order)
  is not in the table yet, so re-running D adds nothing. The source order is the row's
  position in D's file plus ``D.toordinal() << 43``: unique across days, deterministic for
  a re-run, and later days sort after earlier ones at equal timestamps (a snapshot's
  orders are below every day's). Rows dated before D ("late") are merged and reported;
  rows after the end of D are quarantined (they belong to a later run).
* **items** are upserted: new items get ``valid_from = D``, an item whose text changed is
  updated (the embed stage re-embeds it, nothing else), and an item whose
  ``ingest.removed_col`` is true gets ``removed_on = D`` (never recommended from D on; its
  past interactions stay). Unchanged rows are not rewritten, so a re-run writes nothing.

The first increment creates the tables. Costs at 10M items / 1B interactions: two
anti-joins against the existing keys (shuffles of the increment and of the table's key
columns) and commits of the new rows only.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from hymirec_udfs.core import rundate, schemas
from hymirec_udfs.core.choices import IngestSource
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput
from hymirec_udfs.ingest.raw import IngestError
from hymirec_udfs.ingest.sources import increment_files, read_generic
from hymirec_udfs.ingest.validate import quarantine_rows, validate_interactions, validate_items

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

# Day offset of the source order (see the module docstring): 2**43 rows per day's file.
DAY_SHIFT = 43
KEYS = (schemas.USER_ID, schemas.ITEM_ID, schemas.TIMESTAMP, schemas.SOURCE_ORDER)


def run_incremental(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Merge the run date's increment into ``items`` and ``interactions``.

    Raises:
        IngestError: no run date, a source other than csv/parquet, a missing increment
            file, or too large a quarantined share (quarantine rows are written; the
            tables are left unchanged).
    """
    from pyspark.sql import functions as F

    day = rundate.run_date()
    if day is None:
        raise IngestError("ingest.mode=incremental needs a run date: pass --run-date YYYY-MM-DD (or the run_date"
                          " widget / job parameter)")
    if cfg.ingest.source not in (IngestSource.CSV, IngestSource.PARQUET):
        raise IngestError(f"ingest.mode=incremental reads csv or parquet increments; ingest.source is"
                          f" '{cfg.ingest.source}'")
    items_path, inter_path = increment_files(cfg.ingest, day)
    raw = read_generic(spark, cfg.ingest, items_path, inter_path)
    store = ctx.store
    now = dt.datetime.now(dt.timezone.utc)
    day_lit = F.lit(day.isoformat()).cast("date")

    raw_items = raw.items.cache()
    truthy = F.lower(F.coalesce(F.col("removed"), F.lit(""))).isin("1", "true", "yes", "y")
    removals = raw_items.where(truthy).select(schemas.ITEM_ID).distinct()
    items_ok, bad_items = validate_items(raw_items.where(~truthy).drop("removed"), cfg.ingest.text_template, False)
    existing = store.read_or_empty(schemas.ITEMS).cache()
    unknown_removed = removals.join(existing.select(schemas.ITEM_ID), schemas.ITEM_ID, "left_anti")
    bad_items = bad_items.unionByName(
        unknown_removed.join(raw_items.where(truthy), schemas.ITEM_ID).select(
            F.col(schemas.ITEM_ID).alias("record_key"), "raw_record",
            F.lit("removal of an item not in the catalog").alias("reason")))

    prev = existing.select(schemas.ITEM_ID, F.col("text").alias("_prev_text"), F.col("valid_from").alias("_prev_from"),
                           F.col("removed_on").alias("_prev_removed"))
    joined = items_ok.join(prev, schemas.ITEM_ID, "left")
    is_new = F.col("_prev_text").isNull()
    changed = joined.where(is_new | (F.col("_prev_text") != F.col("text")) | F.col("_prev_removed").isNotNull())
    upserts = changed.select(
        schemas.ITEM_ID, "title", "description", "tags", "text", F.lit(raw.source).alias("source"),
        F.lit(now).cast("timestamp").alias("ingested_at"),
        F.coalesce(F.col("_prev_from"), day_lit).alias("valid_from"), F.lit(None).cast("date").alias("removed_on"),
        is_new.alias("_new"))
    removed_rows = existing.join(removals, schemas.ITEM_ID).where(F.col("removed_on").isNull()).withColumn(
        "removed_on", day_lit).withColumn("_new", F.lit(False))
    item_changes = upserts.unionByName(removed_rows).cache()

    known = existing.select(schemas.ITEM_ID).unionByName(items_ok.select(schemas.ITEM_ID)).distinct()
    inter_raw = raw.interactions.withColumn(
        schemas.SOURCE_ORDER, F.col(schemas.SOURCE_ORDER) + F.lit(day.toordinal() << DAY_SHIFT))
    inter_ok, bad_inter = validate_interactions(inter_raw, known, False)
    cutoff, start = rundate.cutoff_epoch(day), rundate.day_start_epoch(day)
    inter_ok = inter_ok.withColumn(
        "_future", F.col("timestamp") >= F.lit(cutoff)).cache()
    future = inter_ok.where("_future").select(
        F.concat_ws("/", schemas.USER_ID, schemas.ITEM_ID).alias("record_key"),
        F.to_json(F.struct(*KEYS)).alias("raw_record"),
        F.lit(f"timestamp after the run date {day} (belongs to a later run)").alias("reason"))
    bad_inter = bad_inter.unionByName(future)
    inter_ok = inter_ok.where(~F.col("_future")).drop("_future")
    first_increment = not store.exists(schemas.INTERACTIONS)
    if not first_increment:
        have = store.read(schemas.INTERACTIONS).select(*KEYS)
        new_inter = inter_ok.join(have, list(KEYS), "left_anti")
    else:
        new_inter = inter_ok
    new_inter = new_inter.withColumn("source", F.lit(raw.source)).select(
        schemas.USER_ID, schemas.ITEM_ID, "timestamp", "rating", "source", schemas.SOURCE_ORDER).cache()

    quarantine = quarantine_rows(bad_items, bad_inter, raw.source, ctx.run_id, now).cache()
    n_raw_items, n_raw_inter = raw_items.count(), raw.interactions.count()
    n_bad = quarantine.count()
    reasons = {r["reason"]: r["count"] for r in quarantine.groupBy("reason").count().collect()}
    n_raw = n_raw_items + n_raw_inter
    share = n_bad / n_raw if n_raw else 0.0
    outputs: tuple[str, ...] = ()
    if n_bad:
        store.append(schemas.QUARANTINE, quarantine)
        outputs += (schemas.QUARANTINE,)
    if share > cfg.ingest.max_quarantine_fraction:
        raise IngestError(
            f"{n_bad:,} of {n_raw:,} rows of the {day} increment ({share:.1%}) were quarantined, above"
            f" ingest.max_quarantine_fraction={cfg.ingest.max_quarantine_fraction:.1%}; reasons: {reasons};"
            f" inspect table 'quarantine' where run_id = '{ctx.run_id}'")

    counts = item_changes.groupBy().agg(
        F.count("*").alias("all"), F.sum(F.col("_new").cast("int")).alias("new"),
        F.sum(F.col("removed_on").isNotNull().cast("int")).alias("removed")).first()
    n_changes, n_new_items, n_removed = int(counts["all"]), int(counts["new"] or 0), int(counts["removed"] or 0)
    if not store.exists(schemas.ITEMS) and n_changes == 0:
        raise IngestError(f"the first increment ({items_path}) holds no valid item: nothing to build a catalog from")
    if n_changes:
        store.merge(schemas.ITEMS, item_changes.drop("_new"))
        outputs += (schemas.ITEMS,)
    # rows dated before D: "late" (the first increment is the history: none is late)
    late = new_inter.where(F.lit(not first_increment) & (F.col("timestamp") < F.lit(start))).agg(
        F.count("*").alias("n"), F.min("timestamp").alias("first")).first()
    n_inter = new_inter.count()
    if n_inter or not store.exists(schemas.INTERACTIONS):
        store.append(schemas.INTERACTIONS, new_inter)
        outputs += (schemas.INTERACTIONS,)
    first_late = (dt.datetime.fromtimestamp(late["first"], dt.timezone.utc).date().isoformat()
                  if late["n"] else "")
    for df in (raw_items, existing, item_changes, inter_ok, new_inter, quarantine):
        df.unpersist()
    return StageOutput(
        rows={"new_items": n_new_items, "changed_items": n_changes - n_new_items - n_removed,
              "removed_items": n_removed, "new_interactions": n_inter, "late_interactions": int(late["n"]),
              "quarantined": n_bad, "raw_items": n_raw_items, "raw_interactions": n_raw_inter},
        summary={"mode": "incremental", "run_date": day.isoformat(), "source": raw.source,
                 "increment_items": str(items_path), "increment_interactions": str(inter_path),
                 "late_from": first_late, "quarantine_share": share, "quarantine_reasons": reasons},
        outputs=outputs,
    )
