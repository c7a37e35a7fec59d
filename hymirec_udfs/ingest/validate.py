"""Validation of raw rows: good rows typed, bad rows quarantined with their reason.

Nothing is dropped silently: every rejected row keeps its raw record and a reason in
``quarantine``.
"""

from __future__ import annotations

import datetime as dt
import string
from typing import TYPE_CHECKING, Sequence

from hymirec_udfs.core import schemas
from hymirec_udfs.ingest.raw import ITEM_TEXT_FIELDS, IngestError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame


def compose_text(template: Sequence[str]) -> "Column":
    """Spark expression composing the item prompt from ``title``, ``description``, ``tags``.

    Each template segment (``"Genres: {tags}"``) is rendered only when at least one of its
    placeholders is non-empty; rendered segments are joined with ``". "``.

    Raises:
        IngestError: a placeholder other than title/description/tags.
    """
    from pyspark.sql import functions as F

    segments = []
    for segment in template:
        pieces, fields = [], []
        for literal, name, _spec, _conv in string.Formatter().parse(segment):
            if literal:
                pieces.append(F.lit(literal))
            if name is not None:
                if name not in ITEM_TEXT_FIELDS:
                    raise IngestError(
                        f"ingest.text_template segment {segment!r}: unknown placeholder '{name}'"
                        f" (use {', '.join(ITEM_TEXT_FIELDS)})"
                    )
                fields.append(name)
                pieces.append(F.coalesce(F.col(name), F.lit("")))
        present = F.lit(False)
        for name in fields:
            present = present | (F.length(F.coalesce(F.col(name), F.lit(""))) > 0)
        segments.append(F.when(present, F.concat(*pieces)))
    return F.trim(F.concat_ws(". ", *segments))


def validate_items(raw: "DataFrame", template: Sequence[str], numeric_ids: bool) -> tuple["DataFrame", "DataFrame"]:
    """Split raw items into good rows and quarantined rows (``record_key``, ``raw_record``, ``reason``).

    Rules: the id must be present (and numeric for MovieLens sources); the composed text
    must not be empty; an id appearing with different texts is quarantined entirely
    (every copy: there is no way to tell which is right); identical copies collapse to one.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = raw.withColumn("text", compose_text(template))
    reason = (
        F.when(F.col(schemas.ITEM_ID).isNull() | (F.col(schemas.ITEM_ID) == ""), F.lit("null item id"))
        .when(F.lit(numeric_ids) & ~F.col(schemas.ITEM_ID).rlike(r"^\d+$"), F.lit("unparsable item id"))
        .when(F.col("text") == "", F.lit("empty item text"))
    )
    df = df.withColumn("reason", reason)
    by_id = Window.partitionBy(schemas.ITEM_ID)
    df = df.withColumn(
        "reason",
        F.when(
            F.col("reason").isNull() & (F.size(F.collect_set(F.when(F.col("reason").isNull(), F.col("text"))).over(by_id)) > 1),
            F.lit("duplicate item id with conflicting text"),
        ).otherwise(F.col("reason")),
    )
    bad = df.where(F.col("reason").isNotNull()).select(
        F.col(schemas.ITEM_ID).alias("record_key"), "raw_record", "reason"
    )
    good = df.where(F.col("reason").isNull()).dropDuplicates([schemas.ITEM_ID]).drop("reason", "raw_record")
    return good, bad


def parse_timestamp(col: "Column") -> "Column":
    """Epoch seconds (integer or decimal) or ISO-8601 -> epoch seconds; null when unparsable."""
    from pyspark.sql import functions as F

    numeric = col.rlike(r"^-?\d+(\.\d+)?$")
    return F.when(numeric, F.floor(col.cast("double")).cast("long")).otherwise(
        F.unix_seconds(F.try_to_timestamp(col))
    )


def validate_interactions(raw: "DataFrame", items: "DataFrame", numeric_ids: bool) -> tuple["DataFrame", "DataFrame"]:
    """Split raw interactions into good rows and quarantined rows.

    Rules: user and item ids present (numeric for MovieLens), timestamp parsable, rating
    numeric when present, item known to the (validated) catalog.
    """
    from pyspark.sql import functions as F

    ts = parse_timestamp(F.col("timestamp"))
    known = items.select(F.col(schemas.ITEM_ID).alias("_known_item")).withColumn("_is_known", F.lit(True))
    df = raw.withColumn("_ts", ts).join(F.broadcast(known), F.col(schemas.ITEM_ID) == F.col("_known_item"), "left")
    idpat = r"^\d+$" if numeric_ids else r"^.+$"
    reason = (
        F.when(F.col(schemas.USER_ID).isNull() | (F.col(schemas.USER_ID) == ""), F.lit("null user id"))
        .when(F.col(schemas.ITEM_ID).isNull() | (F.col(schemas.ITEM_ID) == ""), F.lit("null item id"))
        .when(~F.col(schemas.USER_ID).rlike(idpat), F.lit("unparsable user id"))
        .when(~F.col(schemas.ITEM_ID).rlike(idpat), F.lit("unparsable item id"))
        .when(F.col("timestamp").isNull() | F.col("_ts").isNull(), F.lit("unparsable timestamp"))
        .when(F.col("rating").isNotNull() & (F.col("rating") != "") & F.col("rating").try_cast("double").isNull(),
              F.lit("unparsable rating"))
        .when(F.col("_is_known").isNull(), F.lit("unknown item (not in the validated catalog)"))
    )
    df = df.withColumn("reason", reason)
    bad = df.where(F.col("reason").isNotNull()).select(
        F.concat_ws("/", F.coalesce(schemas.USER_ID, F.lit("")), F.coalesce(schemas.ITEM_ID, F.lit(""))).alias("record_key"),
        "raw_record", "reason",
    )
    good = df.where(F.col("reason").isNull()).select(
        schemas.USER_ID, schemas.ITEM_ID, F.col("_ts").alias("timestamp"), F.col("rating").try_cast("double").alias("rating"),
        schemas.SOURCE_ORDER,
    )
    return good, bad


def quarantine_rows(bad_items: "DataFrame", bad_inter: "DataFrame", source: str, run_id: str,
                    now: "dt.datetime") -> "DataFrame":
    """``quarantine`` rows of one ingest run (items' and interactions' rejects)."""
    from pyspark.sql import functions as F

    return (
        bad_items.withColumn("source", F.lit(f"{source}:items"))
        .unionByName(bad_inter.withColumn("source", F.lit(f"{source}:interactions")))
        .select(
            F.lit("ingest").alias("stage"), "source", "record_key", "raw_record", "reason",
            F.lit(run_id).alias("run_id"), F.lit(now).cast("timestamp").alias("quarantined_at"),
        )
    )
