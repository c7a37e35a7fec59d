"""Table names, column names and schemas: declared once, checked on every write.

Schemas are declared as Arrow schemas because both storage engines speak Arrow: delta-rs
writes them directly and Spark's type is derived with ``spark_schema(name)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql.types import StructType


# Table names ------------------------------------------------------------------------------
ITEMS = "items"
INTERACTIONS = "interactions"
QUARANTINE = "quarantine"
ITEM_EMBEDDINGS = "item_embeddings"
CODEBOOKS = "codebooks"
ITEM_CODES = "item_codes"
CODEBOOK_HEALTH = "codebook_health"
SEQUENCES = "sequences"
EVAL_PER_USER = "eval_per_user"
EVAL_METRICS = "eval_metrics"
USER_INTERESTS = "user_interests"
RECOMMENDATIONS = "recommendations"
JOB_RUNS = "job_runs"

# Column names shared across tables ---------------------------------------------------------
ITEM_ID = "item_id"
USER_ID = "user_id"
TIMESTAMP = "timestamp"
TEXT = "text"
EMBEDDING = "embedding"
MODEL_ID = "model_id"
CONTENT_HASH = "content_hash"
# Position of an interaction in its source (file line order; see ingest.sources); breaks
# ties in time everywhere, so no id order leaks into the sequences.
SOURCE_ORDER = "source_order"
# serving tables: each run replaces the rows of its as-of date
AS_OF_DATE = "as_of_date"
# sequences: one row per user
ITEM_IDS = "item_ids"
TIMESTAMPS = "timestamps"
SOURCE_ORDERS = "source_orders"
TRAIN_END = "train_end"
VALID_END = "valid_end"
_TS = pa.timestamp("us", tz="UTC")
TABLE_SCHEMAS: dict[str, pa.Schema] = {
    ITEMS: pa.schema(
        [
            pa.field(ITEM_ID, pa.string(), nullable=False),
            pa.field("title", pa.string()),
            pa.field("description", pa.string()),
            pa.field("tags", pa.string()),
            pa.field(TEXT, pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("ingested_at", _TS, nullable=False),
            # incremental ingestion: the run date that first brought the item (null: a
            # snapshot), and the run date that removed it (null: live). Recommendations
            # as of D only hold items with valid_from <= D and no removed_on <= D.
            pa.field("valid_from", pa.date32()),
            pa.field("removed_on", pa.date32()),
        ]
    ),
    INTERACTIONS: pa.schema(
        [
            pa.field(USER_ID, pa.string(), nullable=False),
            pa.field(ITEM_ID, pa.string(), nullable=False),
            pa.field(TIMESTAMP, pa.int64(), nullable=False),
            pa.field("rating", pa.float64()),
            pa.field("source", pa.string(), nullable=False),
            pa.field(SOURCE_ORDER, pa.int64(), nullable=False),
        ]
    ),
    QUARANTINE: pa.schema(
        [
            pa.field("stage", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("record_key", pa.string()),
            pa.field("raw_record", pa.string()),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("quarantined_at", _TS, nullable=False),
        ]
    ),
    ITEM_EMBEDDINGS: pa.schema(
        [
            pa.field(ITEM_ID, pa.string(), nullable=False),
            pa.field(EMBEDDING, pa.list_(pa.float32()), nullable=False),
            pa.field("dim", pa.int32(), nullable=False),
            pa.field(MODEL_ID, pa.string(), nullable=False),
            pa.field(CONTENT_HASH, pa.string(), nullable=False),
            pa.field("embedded_at", _TS, nullable=False),
        ]
    ),
    CODEBOOKS: pa.schema(
        [
            pa.field("version", pa.string(), nullable=False),
            pa.field("layer", pa.int32(), nullable=False),
            pa.field("code", pa.int32(), nullable=False),
            pa.field("centroid", pa.list_(pa.float32()), nullable=False),
            pa.field("metric", pa.string(), nullable=False),
            pa.field("cluster_size_fit", pa.int64(), nullable=False),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("fit_stats", pa.string()),
            pa.field("created_at", _TS, nullable=False),
        ]
    ),
    ITEM_CODES: pa.schema(
        [
            pa.field(ITEM_ID, pa.string(), nullable=False),
            pa.field("codes", pa.list_(pa.int16()), nullable=False),
            pa.field("coefs", pa.list_(pa.float32()), nullable=False),
            pa.field("codebook_version", pa.string(), nullable=False),
            pa.field("recon_cosine", pa.float32(), nullable=False),
            # the embedding's content hash: a changed text is re-encoded, nothing else
            pa.field(CONTENT_HASH, pa.string(), nullable=False),
        ]
    ),
    CODEBOOK_HEALTH: pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field(AS_OF_DATE, pa.date32()),
            pa.field("codebook_version", pa.string(), nullable=False),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("new_items", pa.int64(), nullable=False),
            pa.field("new_recon_cosine", pa.float64()),
            pa.field("reference_recon_cosine", pa.float64(), nullable=False),
            pa.field("cosine_floor", pa.float64(), nullable=False),
            pa.field("share_below_floor", pa.float64()),
            pa.field("occupancy_skew", pa.float64()),
            pa.field("collision_rate", pa.float64()),
            pa.field("drift_score", pa.float64()),
            pa.field("drift_threshold", pa.float64(), nullable=False),
            pa.field("refit", pa.bool_(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("new_version", pa.string()),
            pa.field("created_at", _TS, nullable=False),
        ]
    ),
    SEQUENCES: pa.schema(
        [
            pa.field(USER_ID, pa.string(), nullable=False),
            # the whole time-ordered history (ties by source order) and its split boundaries;
            # training samples are cut from it by the loader (hymirec_udfs.sequences.samples)
            pa.field(ITEM_IDS, pa.list_(pa.string()), nullable=False),
            pa.field(TIMESTAMPS, pa.list_(pa.int64()), nullable=False),
            pa.field(SOURCE_ORDERS, pa.list_(pa.int64()), nullable=False),
            pa.field(TRAIN_END, pa.int32(), nullable=False),
            pa.field(VALID_END, pa.int32(), nullable=False),
            # the user's rank shard (hymirec_udfs.core.shards.user_shards)
            pa.field("shard", pa.int32(), nullable=False),
        ]
    ),
    EVAL_PER_USER: pa.schema(
        [
            pa.field("model", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field(USER_ID, pa.string(), nullable=False),
            pa.field("target_id", pa.string(), nullable=False),
            pa.field("rank", pa.int64(), nullable=False),
            pa.field("target_in_catalog", pa.bool_(), nullable=False),
            pa.field("hit", pa.map_(pa.int32(), pa.bool_()), nullable=False),
            pa.field("ndcg", pa.map_(pa.int32(), pa.float64()), nullable=False),
            pa.field("interest_diversity", pa.float64()),
        ]
    ),
    EVAL_METRICS: pa.schema(
        [
            pa.field("model", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("k", pa.int32(), nullable=False),
            pa.field("recall", pa.float64(), nullable=False),
            pa.field("ndcg", pa.float64(), nullable=False),
            pa.field("mrr", pa.float64(), nullable=False),
            pa.field("users", pa.int64(), nullable=False),
            pa.field("users_target_absent", pa.int64(), nullable=False),
            pa.field("evaluated_at", _TS, nullable=False),
        ]
    ),
    USER_INTERESTS: pa.schema(
        [
            pa.field(USER_ID, pa.string(), nullable=False),
            pa.field("interest", pa.int32(), nullable=False),
            pa.field("vector", pa.list_(pa.float32()), nullable=False),  # L2-normalised
            pa.field("model_name", pa.string(), nullable=False),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("codebook_version", pa.string(), nullable=False),
            pa.field(AS_OF_DATE, pa.date32(), nullable=False),
        ]
    ),
    RECOMMENDATIONS: pa.schema(
        [
            pa.field(USER_ID, pa.string(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),  # 1 = best
            pa.field(ITEM_ID, pa.string(), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("interest", pa.int32(), nullable=False),  # the interest that retrieved it
            pa.field("model_version", pa.string(), nullable=False),
            pa.field(AS_OF_DATE, pa.date32(), nullable=False),
        ]
    ),
    JOB_RUNS: pa.schema(
        [
            pa.field("stage", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("pipeline_run_id", pa.string()),
            pa.field("mlflow_run_id", pa.string()),
            pa.field("profile", pa.string()),
            pa.field("config_hash", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("input_versions", pa.map_(pa.string(), pa.int64())),
            pa.field("output_versions", pa.map_(pa.string(), pa.int64())),
            pa.field("row_counts", pa.map_(pa.string(), pa.int64())),
            pa.field("summary", pa.string()),
            pa.field("error", pa.string()),
            pa.field("started_at", _TS, nullable=False),
            pa.field("wall_s", pa.float64(), nullable=False),
        ]
    ),
}


# Keys used by merge-by-key upserts.
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    ITEMS: (ITEM_ID,),
    ITEM_EMBEDDINGS: (ITEM_ID, MODEL_ID),
    # every codebook version's codes are kept: a model reads the version it was trained on
    ITEM_CODES: (ITEM_ID, "codebook_version"),
    EVAL_PER_USER: ("model", "run_id", "split", USER_ID),
    EVAL_METRICS: ("model", "run_id", "split", "k"),
}


def arrow_schema(name: str) -> pa.Schema:
    """The declared Arrow schema of table ``name`` (KeyError names unknown tables)."""
    try:
        return TABLE_SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown table '{name}'; declared tables: {sorted(TABLE_SCHEMAS)}") from None


def spark_schema(name: str) -> "StructType":
    """The declared schema of table ``name`` as a Spark StructType."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema(name))
