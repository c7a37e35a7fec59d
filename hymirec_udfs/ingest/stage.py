"""Ingestion: raw catalog and interaction files -> ``items``, ``interactions``, ``quarantine``.

Raw lines are read as text by Spark so every rejected row can be quarantined with its
raw record and a reason; nothing is dropped silently. Supported sources:

* ``ml-100k`` — RecBole atomic files (``ml-100k.item`` / ``ml-100k.inter``, tab separated,
  ``name:type`` headers); by default the copy shipped in the ``recbole`` wheel.
* ``ml-100k-grouplens`` — GroupLens ``u.item`` (pipe separated, latin-1) and ``u.data``.
* ``ml-1m`` — ``movies.dat`` / ``ratings.dat`` (``::`` separated, latin-1).
* ``csv`` / ``parquet`` — generic files mapped by the ``ingest.*_col`` settings
  (PixelRec/HLLM style: interactions ``item_id,user_id,timestamp``; items
  ``item_id,title,description,tag``).
* ``synthetic`` — :mod:`hymirec_udfs.ingest.synthetic` for scale work.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import TYPE_CHECKING

from hymirec_udfs.core import schemas
from hymirec_udfs.core.choices import IngestMode
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput
from hymirec_udfs.ingest.raw import IngestError
from hymirec_udfs.ingest.sources import raw_files, read_raw
from hymirec_udfs.ingest.validate import quarantine_rows, validate_interactions, validate_items

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession


def raw_fingerprint(cfg: Config) -> str:
    """Fingerprint of the raw inputs (paths, sizes, mtimes) for the pipeline's skip check;
    in incremental mode, of the run date's increment files."""
    if cfg.ingest.mode == IngestMode.INCREMENTAL:
        from hymirec_udfs.core import rundate
        from hymirec_udfs.ingest.sources import increment_files

        day = rundate.run_date()
        files = list(increment_files(cfg.ingest, day)) if day else []
    else:
        files = raw_files(cfg.ingest)
    parts = [f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Ingest the configured source into ``items``, ``interactions`` and ``quarantine``.

    Raises:
        IngestError: a raw file is missing, a column mapping is wrong, or the quarantined
            share exceeds ``ingest.max_quarantine_fraction`` (the quarantine rows are still
            written so they can be inspected; items and interactions are left unchanged).
    """
    from pyspark.sql import functions as F

    if cfg.ingest.mode == IngestMode.INCREMENTAL:
        from hymirec_udfs.ingest.incremental import run_incremental

        return run_incremental(spark, cfg, ctx)
    raw = read_raw(spark, cfg)
    numeric = raw.source in ("ml-100k", "ml-100k-grouplens", "ml-1m")
    raw_items = raw.items.cache()
    raw_inter = raw.interactions.cache()
    items, bad_items = validate_items(raw_items, cfg.ingest.text_template, numeric)
    items = items.cache()
    inter, bad_inter = validate_interactions(raw_inter, items, numeric)
    inter = inter.cache()

    now = dt.datetime.now(dt.timezone.utc)
    quarantine = quarantine_rows(bad_items, bad_inter, raw.source, ctx.run_id, now).cache()

    n_raw_items, n_raw_inter = raw_items.count(), raw_inter.count()
    n_items, n_inter = items.count(), inter.count()
    n_bad = quarantine.count()
    n_bad_items = quarantine.where(F.col("source").endswith(":items")).count()
    reasons = {r["reason"]: r["count"] for r in quarantine.groupBy("reason").count().collect()}
    n_raw = n_raw_items + n_raw_inter
    if n_raw == 0:
        raise IngestError(f"source '{raw.source}' produced no rows")
    share = n_bad / n_raw
    if n_bad:
        ctx.store.append(schemas.QUARANTINE, quarantine)
    if share > cfg.ingest.max_quarantine_fraction:
        raise IngestError(
            f"{n_bad:,} of {n_raw:,} raw rows ({share:.1%}) were quarantined, above"
            f" ingest.max_quarantine_fraction={cfg.ingest.max_quarantine_fraction:.1%}; reasons: {reasons};"
            f" inspect table 'quarantine' where run_id = '{ctx.run_id}'"
        )
    if n_items == 0 or n_inter == 0:
        raise IngestError(f"no valid {'items' if n_items == 0 else 'interactions'} after validation; reasons: {reasons}")

    ctx.store.overwrite(
        schemas.ITEMS,
        items.select(
            schemas.ITEM_ID, "title", "description", "tags", "text",
            F.lit(raw.source).alias("source"), F.lit(now).cast("timestamp").alias("ingested_at"),
            F.lit(None).cast("date").alias("valid_from"), F.lit(None).cast("date").alias("removed_on"),
        ),
    )
    ctx.store.overwrite(
        schemas.INTERACTIONS,
        inter.select(schemas.USER_ID, schemas.ITEM_ID, "timestamp", "rating", F.lit(raw.source).alias("source"),
                     schemas.SOURCE_ORDER),
    )
    n_users = inter.select(schemas.USER_ID).distinct().count()
    for df in (raw_items, raw_inter, items, inter, quarantine):
        df.unpersist()
    return StageOutput(
        rows={"items": n_items, "interactions": n_inter, "users": n_users, "quarantined": n_bad,
              "raw_items": n_raw_items, "raw_interactions": n_raw_inter},
        summary={"source": raw.source, "quarantine_share": share, "quarantine_reasons": reasons,
                 "duplicate_identical_items": n_raw_items - n_items - n_bad_items},
        outputs=(schemas.ITEMS, schemas.INTERACTIONS) + ((schemas.QUARANTINE,) if n_bad else ()),
    )
