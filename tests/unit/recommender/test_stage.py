"""The train stage's guards: empty sequences, items without codes, rank errors surfaced."""

from __future__ import annotations

import datetime as dt

import pytest

from hymirec_udfs.core import schemas
from hymirec_udfs.core.stage_api import StageContext, StageFailed
from hymirec_udfs.pipeline import run_stage
from hymirec_udfs.core.tables import get_table_store
from hymirec_udfs.core.tracking import RunLogger

pytestmark = pytest.mark.spark
NOW = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _tables(spark, cfg, with_codes: bool) -> None:
    from hymirec_udfs.artifacts import current_model_id

    store = get_table_store(spark, cfg)
    mid = current_model_id(cfg.embed)
    emb = [(f"i{j}", [1.0 if k == j % 4 else 0.0 for k in range(4)], 4, mid, "h", NOW) for j in range(6)]
    store.overwrite(schemas.ITEM_EMBEDDINGS, spark.createDataFrame(emb, schemas.spark_schema(schemas.ITEM_EMBEDDINGS)))
    book = [("cb", 0, c, [1.0 if k == c else 0.0 for k in range(4)], "cosine", 1, mid, "{}", NOW) for c in range(4)]
    store.overwrite(schemas.CODEBOOKS, spark.createDataFrame(book, schemas.spark_schema(schemas.CODEBOOKS)))
    if with_codes:
        codes = [(f"i{j}", [j % 4], [1.0], "cb", 1.0, "h") for j in range(4)]  # i4, i5 have no code
        store.overwrite(schemas.ITEM_CODES, spark.createDataFrame(codes, schemas.spark_schema(schemas.ITEM_CODES)))
    seqs = spark.createDataFrame([], schemas.spark_schema(schemas.SEQUENCES))
    store.overwrite(schemas.SEQUENCES, seqs)


def test_empty_sequences_fail_clearly(spark, make_cfg, tiny_llama_dir) -> None:
    cfg = make_cfg(f"embed.model={tiny_llama_dir}")
    _tables(spark, cfg, with_codes=True)
    with pytest.raises(StageFailed, match="'sequences' has no training samples"):
        run_stage(spark, cfg, "train")


def test_items_without_codes_are_named(spark, make_cfg, tiny_llama_dir) -> None:
    from hymirec_udfs.recommender.data import TrainStageError
    from hymirec_udfs.artifacts import build_item_store

    cfg = make_cfg(f"embed.model={tiny_llama_dir}")
    _tables(spark, cfg, with_codes=True)
    store = get_table_store(spark, cfg)
    ctx = StageContext(spark, cfg, store, "t", RunLogger(None), "train")
    expected = r"2 items have an embedding but no code of codebook cb \(e\.g\. \['i4', 'i5'\]\): run encode"
    with pytest.raises(TrainStageError, match=expected):
        build_item_store(ctx, cfg)
