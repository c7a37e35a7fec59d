"""Sequence building on a hand-made log: exact samples, splits, skips, bad input."""

from __future__ import annotations

import pytest

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import SequencesConfig
from hymirec_udfs.core.shards import user_shards
from hymirec_udfs.sequences.samples import SequenceError, build_sequences, user_samples
from hymirec_udfs.core.stage_api import StageFailed
from hymirec_udfs.pipeline import run_stage
from hymirec_udfs.core.tables import get_table_store

CFG = SequencesConfig(recent_window=2, max_long=2, window_targets=2, stride=1, min_train_len=2)


def test_leave_one_out_samples_exact() -> None:
    items = ["a", "b", "c", "d", "e", "f", "g"]
    rows = user_samples("u", items, list(range(7)), CFG)
    got = [(r["split"], r["cut"], r["long_ids"], r["recent_ids"], r["target_ids"], r["exclude_ids"]) for r in rows]
    # train = a..e, valid target f, test target g; cuts 1..4 over the training part.
    assert got == [
        ("train", 1, [], ["a"], ["b", "c"], []),
        ("train", 2, [], ["a", "b"], ["c", "d"], []),
        ("train", 3, ["a"], ["b", "c"], ["d", "e"], []),
        ("train", 4, ["a", "b"], ["c", "d"], ["e"], []),          # targets never reach f/g
        ("valid", 5, ["b", "c"], ["d", "e"], ["f"], ["a", "b", "c", "d", "e"]),
        ("test", 6, ["c", "d"], ["e", "f"], ["g"], ["a", "b", "c", "d", "e", "f"]),
    ]


def test_stride_cap_and_short_users() -> None:
    cfg = SequencesConfig(recent_window=3, max_long=0, window_targets=1, stride=2, min_train_len=2,
                          max_samples_per_user=2)
    rows = user_samples("u", list("abcdefgh"), list(range(8)), cfg)
    train = [(r["cut"], r["recent_ids"], r["long_ids"]) for r in rows if r["split"] == "train"]
    assert train == [(3, ["a", "b", "c"], []), (5, ["c", "d", "e"], [])]  # cuts 1,3,5 capped to last two
    assert user_samples("short", ["a", "b", "c"], [1, 2, 3], cfg) == []  # 1 training item < 2


def test_time_cutoff_split() -> None:
    cfg = SequencesConfig(split="time_cutoff", valid_cutoff=100, test_cutoff=200, recent_window=5,
                          window_targets=1, min_train_len=1)
    rows = user_samples("u", ["a", "b", "c", "d", "e"], [10, 20, 150, 160, 250], cfg)
    by_split = {r["split"]: r for r in rows}
    assert by_split["valid"]["target_ids"] == ["c"] and by_split["valid"]["recent_ids"] == ["a", "b"]
    assert by_split["test"]["target_ids"] == ["e"]
    assert by_split["test"]["exclude_ids"] == ["a", "b", "c", "d"]


@pytest.mark.spark
def test_spark_build_breaks_time_ties_by_source_order_not_by_id(spark) -> None:
    # (user, item, timestamp, source order): z and a share t=5; z came first in the source
    events = [("u1", "z", 5, 10), ("u1", "a", 5, 11), ("u1", "m", 1, 12), ("u1", "q", 9, 13), ("u1", "r", 10, 14),
              ("u2", "x", 1, 1), ("u3", "b", 7, 30), ("u3", "c", 7, 20), ("u3", "d", 8, 40)]
    log = spark.createDataFrame(events, "user_id string, item_id string, timestamp long, source_order long")
    cfg = SequencesConfig(recent_window=10, window_targets=1, min_train_len=1)
    rows = {r.user_id: r for r in build_sequences(log, cfg).where("split = 'test'").collect()}
    assert set(rows) == {"u1", "u3"}  # u2 is too short
    # u1: m(1), z(5) a(5) [source order, although 'a' < 'z'], q(9), r(10)
    assert rows["u1"].recent_ids == ["m", "z", "a", "q"] and rows["u1"].target_ids == ["r"]
    # u3: c(7, order 20) before b(7, order 30): the id order would say b first
    assert rows["u3"].recent_ids == ["c", "b"]
    # the rank shard is stored per row, equal to the loader's hash of the user id
    assert rows["u1"].shard == int(user_shards(["u1"])[0])


@pytest.mark.spark
def test_stage_counts_and_bad_input(spark, make_cfg) -> None:
    import datetime as dt

    cfg = make_cfg("sequences.min_train_len=2", "sequences.recent_window=3")
    store = get_table_store(spark, cfg)
    with pytest.raises(StageFailed, match="needs table 'interactions'"):
        run_stage(spark, cfg, "build-sequences")
    log = [("u1", i, t, None, "t", t) for t, i in enumerate("abcdef")] + [("u2", "a", 1, None, "t", 9)]
    store.overwrite(schemas.INTERACTIONS, spark.createDataFrame(log, schemas.spark_schema(schemas.INTERACTIONS)))
    job = run_stage(spark, cfg, "build-sequences")
    assert job.row_counts == {"train_samples": 3, "valid_samples": 1, "test_samples": 1, "users": 1,
                              "users_skipped_short": 1}
    assert len(store.files(schemas.SEQUENCES)) >= 1

    now = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    emb = [("a", [1.0], 1, "m", "h", now)]
    store.overwrite(schemas.ITEM_EMBEDDINGS, spark.createDataFrame(emb, schemas.spark_schema(schemas.ITEM_EMBEDDINGS)))
    with pytest.raises(StageFailed, match=r"5 interacted items have no row in 'item_embeddings' \(e\.g\."):
        run_stage(spark, cfg, "build-sequences")

    store.overwrite(schemas.INTERACTIONS, spark.createDataFrame([], schemas.spark_schema(schemas.INTERACTIONS)))
    with pytest.raises(StageFailed, match="'interactions' is empty"):
        run_stage(spark, cfg, "build-sequences")
    assert SequenceError.__mro__[1] is ValueError
