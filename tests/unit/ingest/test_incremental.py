"""Incremental ingestion: dated increments merged idempotently, catalog upserts, removals,
late and future rows, and the errors that name the file or setting."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from hymirec_udfs.core import rundate, schemas
from hymirec_udfs.core.stage_api import StageFailed
from hymirec_udfs.core.tables import get_table_store
from hymirec_udfs.pipeline import run_stage

pytestmark = pytest.mark.spark


def _ts(day: str, hour: int = 12) -> int:
    return rundate.day_start_epoch(dt.date.fromisoformat(day)) + 3600 * hour


def _increment(root: Path, day: str, items: list[str], interactions: list[str]) -> None:
    folder = root / day
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.csv").write_text("item_id,title,description,tag,removed\n" + "".join(f"{r}\n" for r in items))
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n"
                                             + "".join(f"{r}\n" for r in interactions))


@pytest.fixture
def inc_cfg(make_cfg, tmp_path, monkeypatch):
    root = tmp_path / "increments"

    def _make(*extra: str):
        return make_cfg(f"ingest.data_dir={root}", *extra, profiles=("local", "daily"))

    return root, _make


def _run(spark, cfg, day: str, monkeypatch):
    monkeypatch.setenv(rundate.ENV, day)
    return run_stage(spark, cfg, "ingest")


def test_increments_merge_idempotently_with_upserts_removals_late_and_future_rows(spark, inc_cfg, monkeypatch):
    root, make = inc_cfg
    cfg = make("ingest.max_quarantine_fraction=0.5")
    _increment(root, "2026-01-01", ["a,Heat,cops,Crime,", "b,Up,,Animation,"],
               [f"u1,a,{_ts('2025-12-30')},4", f"u1,b,{_ts('2026-01-01')},5", f"u2,a,{_ts('2026-01-01')},3"])
    first = _run(spark, cfg, "2026-01-01", monkeypatch)
    assert first.row_counts["new_items"] == 2 and first.row_counts["new_interactions"] == 3
    assert first.row_counts["late_interactions"] == 0  # the first increment is the history
    store = get_table_store(spark, cfg)
    assert {r.item_id: str(r.valid_from) for r in store.read(schemas.ITEMS).collect()} == {
        "a": "2026-01-01", "b": "2026-01-01"}

    _increment(root, "2026-01-02",
               ["c,Alien,space,Horror,", "b,Up,balloons,Animation,", "a,,,,1", "zz,,,,1"],
               [f"u2,c,{_ts('2026-01-02')},5", f"u3,b,{_ts('2025-12-31')},2",  # a late row
                f"u3,c,{_ts('2026-01-05')},4",                                    # after the run date
                f"u2,a,{_ts('2026-01-02', 1)},3"])
    second = _run(spark, cfg, "2026-01-02", monkeypatch)
    assert second.row_counts["new_items"] == 1 and second.row_counts["changed_items"] == 1
    assert second.row_counts["removed_items"] == 1 and second.row_counts["new_interactions"] == 3
    assert second.row_counts["late_interactions"] == 1 and second.summary["late_from"] == "2025-12-31"
    assert second.row_counts["quarantined"] == 2
    items = {r.item_id: r for r in store.read(schemas.ITEMS).collect()}
    assert str(items["a"].removed_on) == "2026-01-02" and items["a"].text.startswith("Title: Heat")
    assert str(items["b"].valid_from) == "2026-01-01" and "balloons" in items["b"].text  # updated, first seen kept
    assert str(items["c"].valid_from) == "2026-01-02" and items["c"].removed_on is None
    reasons = {r.reason for r in store.read(schemas.QUARANTINE).collect()}
    assert reasons == {"removal of an item not in the catalog", "timestamp after the run date 2026-01-02 (belongs to a"
                       " later run)"}
    # source orders of the two days never collide, and day 2 sorts after day 1
    orders = store.read(schemas.INTERACTIONS).groupBy(F.col("timestamp") >= _ts("2026-01-02", 0)).agg(
        F.min(schemas.SOURCE_ORDER).alias("lo"), F.max(schemas.SOURCE_ORDER).alias("hi")).collect()
    assert store.read(schemas.INTERACTIONS).select(schemas.SOURCE_ORDER).distinct().count() == 6 and len(orders) == 2

    # re-running the day adds nothing and writes nothing
    versions = {t: store.version(t) for t in (schemas.ITEMS, schemas.INTERACTIONS)}
    again = _run(spark, cfg, "2026-01-02", monkeypatch)
    assert again.row_counts["new_interactions"] == 0 and again.row_counts["new_items"] == 0
    assert {t: store.version(t) for t in versions} == versions
    assert store.read(schemas.INTERACTIONS).count() == 6


def test_incremental_errors_name_the_date_file_and_setting(spark, inc_cfg, monkeypatch):
    root, make = inc_cfg
    cfg = make()
    monkeypatch.delenv(rundate.ENV, raising=False)
    with pytest.raises(StageFailed, match="needs a run date: pass --run-date"):
        run_stage(spark, cfg, "ingest")
    with pytest.raises(StageFailed, match=r"increment for 2026-01-03 not found: .*2026-01-03/items.csv "
                                          r"\(ingest.increment_items\)"):
        _run(spark, cfg, "2026-01-03", monkeypatch)
    monkeypatch.setenv(rundate.ENV, "03/01/2026")
    with pytest.raises(StageFailed, match="not a date"):
        run_stage(spark, cfg, "ingest")
    _increment(root, "2026-01-03", ["a,A,,x,"], [])
    with pytest.raises(StageFailed, match="reads csv or parquet increments; ingest.source is 'ml-100k'"):
        _run(spark, make("ingest.source=ml-100k"), "2026-01-03", monkeypatch)


def test_sequences_are_cut_at_the_end_of_the_run_date(spark, inc_cfg, monkeypatch):
    root, make = inc_cfg
    cfg = make("sequences.min_train_len=1")
    rows = [f"u1,{i},{_ts('2026-01-01', h)},4" for i, h in (("a", 1), ("b", 2), ("c", 3), ("d", 4))]
    _increment(root, "2026-01-02", ["a,A,,x,", "b,B,,x,", "c,C,,x,", "d,D,,x,", "e,E,,x,"],
               rows + [f"u1,e,{_ts('2026-01-02', 5)},4"])
    _run(spark, cfg, "2026-01-02", monkeypatch)
    monkeypatch.setenv(rundate.ENV, "2026-01-01")
    job = run_stage(spark, cfg, "build-sequences")
    assert job.row_counts["interactions_after_run_date"] == 1 and job.summary["as_of"] == "2026-01-01"
    seq = get_table_store(spark, cfg).read(schemas.SEQUENCES).first()
    assert list(seq.item_ids) == ["a", "b", "c", "d"]
