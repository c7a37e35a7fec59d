"""Rank shards: the writers' Spark hash equals the loaders' Python hash; ranges tile."""

from __future__ import annotations

import pytest

from hymirec_udfs.core.shards import USER_SHARDS, rank_shard_range, spark_user_shard, user_shards

IDS = ["1", "42", "u-7", "ユーザー", "", "a" * 300]


@pytest.mark.spark
def test_spark_shard_equals_python_shard(spark) -> None:
    df = spark.createDataFrame([(u,) for u in IDS], "user_id string")
    got = [r.shard for r in df.select(spark_user_shard("user_id").alias("shard")).collect()]
    assert got == user_shards(IDS).tolist()
    assert all(0 <= s < USER_SHARDS for s in got)


def test_rank_ranges_tile_the_shards_without_overlap() -> None:
    for world in (1, 2, 3, 7, 64):
        ranges = [rank_shard_range(r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == USER_SHARDS
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_rank_range_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        rank_shard_range(2, 2)
