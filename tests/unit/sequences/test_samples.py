"""Sequence building on a hand-made log: exact samples, splits, skips, bad input."""

from __future__ import annotations

import random

import pytest

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import SequencesConfig
from hymirec_udfs.core.shards import user_shards
from hymirec_udfs.sequences.samples import (
    SequenceError,
    build_sequences,
    cut_samples,
    eval_samples,
    split_history,
    user_row,
    user_samples,
)
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


# The per-cut rows build_sequences wrote before sequences became one row per user, kept
# verbatim as the reference the loader's cutting must reproduce.
def _per_cut_reference(user_id: str, items: list[str], timestamps: list[int], cfg: SequencesConfig) -> list[dict]:
    """All samples of one user (empty when the user is too short).

    Args:
        user_id: the user.
        items: item ids ordered by (timestamp, source order).
        timestamps: matching timestamps.
        cfg: sequence settings.

    Returns:
        Rows with the ``sequences`` columns.
    """
    train, valid, test = split_history(items, timestamps, cfg)
    if len(train) < cfg.min_train_len:
        return []
    n, max_long, w = cfg.recent_window, cfg.max_long, cfg.window_targets

    def windows(prefix: list[str]) -> tuple[list[str], list[str]]:
        recent = prefix[-n:]
        long = prefix[: max(0, len(prefix) - n)][-max_long:] if max_long > 0 else []
        return long, recent

    rows = []
    cuts = list(range(1, len(train), cfg.stride))
    if cfg.max_samples_per_user and len(cuts) > cfg.max_samples_per_user:
        cuts = cuts[-cfg.max_samples_per_user :]  # keep the most recent cut points
    for cut in cuts:
        long, recent = windows(train[:cut])
        rows.append({"user_id": user_id, "split": "train", "cut": cut, "long_ids": long, "recent_ids": recent,
                     "target_ids": train[cut : cut + w], "exclude_ids": []})
    if valid:
        long, recent = windows(train)
        rows.append({"user_id": user_id, "split": "valid", "cut": len(train), "long_ids": long,
                     "recent_ids": recent, "target_ids": valid[:1], "exclude_ids": sorted(set(train))})
    if test:
        prefix = train + valid  # everything before the test target
        long, recent = windows(prefix)
        rows.append({"user_id": user_id, "split": "test", "cut": len(prefix), "long_ids": long,
                     "recent_ids": recent, "target_ids": test[:1], "exclude_ids": sorted(set(prefix))})
    return rows


@pytest.mark.parametrize("cfg", [
    SequencesConfig(recent_window=2, max_long=2, window_targets=2, stride=1, min_train_len=2),
    SequencesConfig(recent_window=3, max_long=0, window_targets=1, stride=2, min_train_len=2, max_samples_per_user=2),
    SequencesConfig(recent_window=5, max_long=7, window_targets=4, stride=3, min_train_len=1, max_samples_per_user=5),
    SequencesConfig(split="time_cutoff", valid_cutoff=40, test_cutoff=70, recent_window=4, max_long=3,
                    window_targets=2, min_train_len=1),
])
def test_user_rows_cut_into_exactly_the_former_per_cut_samples(cfg: SequencesConfig) -> None:
    rng = random.Random(5)
    for u in range(60):
        length = rng.randint(0, 40)
        items = [f"i{rng.randint(0, 30)}" for _ in range(length)]  # repeats allowed
        times = sorted(rng.randint(0, 100) for _ in range(length))
        row = user_row(f"u{u}", items, times, list(range(length)), cfg)
        expected = _per_cut_reference(f"u{u}", items, times, cfg)
        assert (cut_samples(row, cfg) if row else []) == expected


def test_a_user_row_is_linear_in_the_history() -> None:
    cfg = SequencesConfig(recent_window=20, max_long=1000, window_targets=4)
    items = [f"i{k}" for k in range(1000)]
    row = user_row("u", items, list(range(1000)), list(range(1000)), cfg)
    assert len(row["item_ids"]) == 1000 and (row["train_end"], row["valid_end"]) == (998, 999)
    cut_ids = sum(len(r["long_ids"]) + len(r["recent_ids"]) for r in _per_cut_reference("u", items, list(range(1000)), cfg))
    assert cut_ids > 400 * len(row["item_ids"])  # what per-cut rows stored: quadratic


@pytest.mark.spark
def test_spark_build_breaks_time_ties_by_source_order_not_by_id(spark) -> None:
    # (user, item, timestamp, source order): z and a share t=5; z came first in the source
    events = [("u1", "z", 5, 10), ("u1", "a", 5, 11), ("u1", "m", 1, 12), ("u1", "q", 9, 13), ("u1", "r", 10, 14),
              ("u2", "x", 1, 1), ("u3", "b", 7, 30), ("u3", "c", 7, 20), ("u3", "d", 8, 40)]
    log = spark.createDataFrame(events, "user_id string, item_id string, timestamp long, source_order long")
    cfg = SequencesConfig(recent_window=10, window_targets=1, min_train_len=1)
    rows = {r.user_id: r for r in build_sequences(log, cfg).collect()}
    assert set(rows) == {"u1", "u3"}  # u2 is too short
    # u1: m(1), z(5) a(5) [source order, although 'a' < 'z'], q(9), r(10)
    assert rows["u1"].item_ids == ["m", "z", "a", "q", "r"]
    assert rows["u1"].source_orders == [12, 10, 11, 13, 14] and rows["u1"].timestamps == [1, 5, 5, 9, 10]
    assert (rows["u1"].train_end, rows["u1"].valid_end) == (3, 4)
    # u3: c(7, order 20) before b(7, order 30): the id order would say b first
    assert rows["u3"].item_ids == ["c", "b", "d"]
    # the rank shard is stored per row, equal to the loader's hash of the user id
    assert rows["u1"].shard == int(user_shards(["u1"])[0])
    # evaluation cuts its samples from the same rows
    test = {r.user_id: r for r in eval_samples(build_sequences(log, cfg), cfg, ["test"]).collect()}
    assert test["u1"].recent_ids == ["m", "z", "a", "q"] and test["u1"].target_ids == ["r"]
    assert test["u1"].exclude_ids == ["a", "m", "q", "z"]


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
                              "users_skipped_short": 1, "history_items": 6, "interactions_after_run_date": 0,
                              "committed.sequences": 1}
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
