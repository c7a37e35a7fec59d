"""``job_runs`` lineage: one row per stage run, and the questions asked of it.

:func:`record_job_run` appends the row (stage, run id, config hash, status, input and output
table versions, row counts, wall time); :func:`last_success` and :func:`up_to_date` answer
"which run produced this" and "can the pipeline skip this stage".
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageSpec
from hymirec_udfs.core.tables import TableStore

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession


@dataclass
class JobRun:
    """One row of ``job_runs`` (plus whether the pipeline skipped the stage)."""

    stage: str
    run_id: str
    status: str
    config_hash: str
    input_versions: dict[str, int]
    output_versions: dict[str, int]
    row_counts: dict[str, int]
    summary: dict[str, Any]
    wall_s: float
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    skipped: bool = False


def record_job_run(store: TableStore, spark: "SparkSession", cfg: Config, job: JobRun, started: dt.datetime,
            pipeline_run_id: Optional[str]) -> None:
    row = {
        "stage": job.stage,
        "run_id": job.run_id,
        "pipeline_run_id": pipeline_run_id,
        "mlflow_run_id": job.mlflow_run_id,
        "profile": cfg.profile,
        "config_hash": job.config_hash,
        "status": job.status,
        "input_versions": job.input_versions,
        "output_versions": job.output_versions,
        "row_counts": job.row_counts,
        "summary": json.dumps(job.summary, default=str, sort_keys=True),
        "error": job.error,
        "started_at": started,
        "wall_s": job.wall_s,
    }
    store.append(schemas.JOB_RUNS, spark.createDataFrame([row], schemas.spark_schema(schemas.JOB_RUNS)))


def last_success(store: TableStore, stage: str, run_date: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The latest successful ``job_runs`` row of ``stage`` (of run date ``run_date`` when
    given), or None when there is none."""
    if not store.exists(schemas.JOB_RUNS):
        return None
    from pyspark.sql import functions as F

    where = (F.col("stage") == stage) & (F.col("status") == "success")
    if run_date:
        where = where & (F.get_json_object("summary", "$.run_date") == run_date)
    rows = store.read(schemas.JOB_RUNS).where(where).orderBy(F.col("started_at").desc()).limit(1).collect()
    return rows[0].asDict(recursive=True) if rows else None


def summary_values(store: TableStore, stage: str, key: str) -> set[str]:
    """The distinct non-empty values of ``summary.<key>`` over ``stage``'s successful runs
    (an aggregate over ``job_runs``: one row per stage run)."""
    if not store.exists(schemas.JOB_RUNS):
        return set()
    from pyspark.sql import functions as F

    value = F.get_json_object("summary", f"$.{key}")
    rows = (store.read(schemas.JOB_RUNS).where((F.col("stage") == stage) & (F.col("status") == "success"))
            .select(value.alias("v")).where(F.col("v").isNotNull() & (F.col("v") != "")).distinct().collect())
    return {r["v"] for r in rows}


def up_to_date(store: TableStore, cfg: Config, spec: StageSpec) -> Optional[str]:
    """Why ``spec`` can be skipped, or None when it must run.

    A stage is up to date when its last successful run had the same config hash, read
    the same versions of its input tables that are current now, and its output tables
    are still at the versions it wrote, in the declared shape (a table an older release
    wrote with other columns is rebuilt, not skipped).
    """
    last = last_success(store, spec.name)
    if last is None:
        return None
    if last["config_hash"] != spec.config_hash(cfg):
        return None
    for table, version in (last["input_versions"] or {}).items():
        if store.version(table) != version:
            return None
    for table in spec.inputs:
        if table not in (last["input_versions"] or {}):
            return None
    for table, version in (last["output_versions"] or {}).items():
        if store.version(table) != version:
            return None
        if store.columns(table) != schemas.arrow_schema(table).names:
            return None  # written by a release with another shape: rebuild it
    return f"unchanged since run {last['run_id']} ({last['started_at']:%Y-%m-%d %H:%M:%S})"


def latest_run_date(store: TableStore) -> Optional[str]:
    """The latest run date (YYYY-MM-DD) any successful stage recorded (None when none did)."""
    if not store.exists(schemas.JOB_RUNS):
        return None
    from pyspark.sql import functions as F

    row = (store.read(schemas.JOB_RUNS).where(F.col("status") == "success")
           .select(F.max(F.get_json_object("summary", "$.run_date")).alias("d")).first())
    return row["d"] if row else None


def recorded_serving(store: TableStore, day: str) -> Optional[dict[str, Any]]:
    """The summary of the last successful ``recommend`` run for run date ``day`` (its
    ``model_run_id``, ``model_version``, ``model_name``), or None: what a backfill serves."""
    row = last_success(store, "recommend", day)
    return json.loads(row["summary"] or "{}") if row else None


def backfill_reason(store: TableStore) -> Optional[str]:
    """Why this run is a backfill (its run date is before the latest one recorded), or None."""
    from hymirec_udfs.core import rundate

    day = rundate.run_date()
    latest = latest_run_date(store) if day else None
    if day and latest and day.isoformat() < latest:
        return (f"backfill of {day} (runs up to {latest} exist): the codebook and model recorded for"
                f" {day} are reused")
    return None


def recorded_input_version(store: TableStore, stage: str, day: str, table: str) -> Optional[int]:
    """The version of ``table`` the last successful ``stage`` run for run date ``day`` read."""
    row = last_success(store, stage, day)
    versions = (row["input_versions"] or {}) if row else {}
    return int(versions[table]) if table in versions else None
