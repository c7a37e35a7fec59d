"""Daily runs: MovieLens-100K replayed as dated increments with --run-date (issue: daily
incremental runs and the dynamic codebook).

One schedule on 120 users (bootstrap + 3 days; the most popular item removed on day 2,
out-of-domain items on day 3), then a re-run of the last day and a backfill of day 1.
"""

from __future__ import annotations

import os

import pytest

from hymirec_udfs.core import rundate, schemas
from hymirec_udfs.core.tables import get_table_store

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.integration]


def _recs(store, day):
    from pyspark.sql import functions as F

    rows = store.read(schemas.RECOMMENDATIONS).where(F.col(schemas.AS_OF_DATE) == F.lit(day).cast("date")).select(
        schemas.USER_ID, "rank", schemas.ITEM_ID, "model_version").collect()
    return sorted(tuple(r) for r in rows)


def test_simulated_schedule_rerun_and_backfill(spark, make_cfg) -> None:
    from pyspark.sql import functions as F

    from hymirec_udfs.schedule import run_day, simulate

    cfg = make_cfg(profiles=("ci-tiny", "daily"), tracking=True)
    lines: list[str] = []
    reports = simulate(spark, cfg, days=3, users=120, drift_day=3, remove_day=2, echo=lines.append)
    print("\n".join(lines))
    boot, day1, day2, drift = reports
    store = get_table_store(spark, cfg)

    # bootstrap: everything is new; a codebook is fitted; the first model trains in full
    assert boot.refit == "yes" and boot.training == "full" and boot.embedded == boot.new_items > 0
    # ordinary days: only the new items are embedded and encoded with the pinned codebook,
    # no refit (ML-100K slices do not trip the drift score), the champion is fine-tuned
    for day in (day1, day2):
        assert day.new_items > 0 and day.embedded == day.new_items and day.encoded == day.new_items
        assert day.refit == "no" and day.drift is not None and day.drift < cfg.codebook.drift_threshold
        assert day.training == "warm_start" and day.r10 is not None
    # the constructed drift (hardware products among films) trips a refit and a full retrain
    assert drift.refit == "yes" and drift.drift >= cfg.codebook.drift_threshold and drift.training == "full"
    health = store.read(schemas.CODEBOOK_HEALTH).orderBy("created_at").collect()
    assert [h.refit for h in health] == [True, False, False, True]
    assert health[-1].reason.startswith("drift") and health[-1].new_version

    # outputs per date; the removed item is never recommended from its removal date on
    dates = [r.date for r in reports]
    served = {str(r[0]) for r in store.read(schemas.RECOMMENDATIONS).select(schemas.AS_OF_DATE).distinct().collect()}
    assert served == set(dates)
    removed = store.read(schemas.ITEMS).where(F.col("removed_on").isNotNull()).collect()
    assert len(removed) == 1 and str(removed[0].removed_on) == dates[2]
    for day in dates[2:]:
        assert removed[0].item_id not in {r[2] for r in _recs(store, day)}
    assert removed[0].item_id in {r[2] for r in _recs(store, dates[1])}  # it was popular before
    # sequences hold nothing after the last run date
    last_ts = store.read(schemas.SEQUENCES).select(F.max(F.array_max(schemas.TIMESTAMPS))).first()[0]
    assert last_ts < rundate.cutoff_epoch(rundate.dt.date.fromisoformat(dates[-1]))

    # a re-run of the last day changes nothing: no new rows, no duplicate keys, equal outputs
    versions = {t: store.version(t) for t in (schemas.ITEMS, schemas.INTERACTIONS, schemas.ITEM_CODES)}
    recs_last = _recs(store, dates[-1])
    again = run_day(spark, cfg, rundate.dt.date.fromisoformat(dates[-1]), echo=lines.append)
    assert again.new_items == 0 and again.embedded == 0 and again.encoded == 0
    assert {t: store.version(t) for t in versions} == versions
    inter = store.read(schemas.INTERACTIONS)
    assert inter.count() == inter.dropDuplicates([schemas.USER_ID, schemas.ITEM_ID, "timestamp",
                                                   schemas.SOURCE_ORDER]).count()
    assert _recs(store, dates[-1]) == recs_last

    # a backfill of day 1 reproduces its recommendations with the model recorded for it
    recs_day1 = _recs(store, dates[1])
    back_lines: list[str] = []
    run_day(spark, cfg, rundate.dt.date.fromisoformat(dates[1]), echo=back_lines.append)
    assert any("train" in line and "backfill" in line for line in back_lines), back_lines
    assert _recs(store, dates[1]) == recs_day1
    # ... from the interactions version day 1's own run read (later days' rows are not in it)
    runs = (store.read(schemas.JOB_RUNS).where((F.col("stage") == "build_sequences") & (F.col("status") == "success")
                                               & (F.get_json_object("summary", "$.run_date") == dates[1]))
            .orderBy("started_at").collect())
    assert len(runs) == 2 and runs[1].input_versions["interactions"] == runs[0].input_versions["interactions"]
    assert store.version(schemas.INTERACTIONS) > runs[0].input_versions["interactions"]
    assert os.environ.get(rundate.ENV) is None
