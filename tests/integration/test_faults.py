"""Faults, for real: a worker of a standalone cluster dies in the middle of the embedding
stage; a driver is SIGKILLed in the middle of a table commit, on each Delta engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.services import free_port, run_pipeline_on_cluster

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


def _rest(port: int, path: str):
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1{path}", timeout=5).read())  # noqa: S310


def test_worker_lost_during_embedding_stage_completes_and_equals_a_clean_run(tmp_path: Path, spark, make_cfg) -> None:
    from deltalake import DeltaTable

    from hymirec_udfs.pipeline import run_stage

    ui = free_port()
    killed: dict = {}

    def kill_a_worker_mid_embedding(cluster, _log) -> None:
        """Watch the driver's REST API; once the embedding job (job group
        ``hymirec:embed_items``, the many-task one) has finished a task but not all,
        SIGKILL worker 0 and the executor it runs."""
        deadline = time.time() + 900
        while time.time() < deadline and not killed:
            try:
                (app,) = _rest(ui, "/applications")
                for job in _rest(ui, f"/applications/{app['id']}/jobs?status=running"):
                    if (job.get("jobGroup") == "hymirec:embed_items" and job["numTasks"] >= 6
                            and 1 <= job["numCompletedTasks"] < job["numTasks"]):
                        cluster.kill_worker(0)
                        killed.update(job=job, app=app["id"])
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)

    out = run_pipeline_on_cluster(
        tmp_path / "faulted", profile="local,ci-tiny", engine="delta-rs", storage="local",
        sets=("embed.partitions=8", "tracking.enabled=false"), extra_args=("--to", "encode_items"),
        conf={"spark.ui.enabled": "true", "spark.ui.port": str(ui)}, during=kill_a_worker_mid_embedding)
    assert killed, f"the embedding job was never seen half done; log {out['log']}"
    assert out["returncode"] == 0 and out["result"].get("status") == "success", out
    # the ingest-to-encode slice on the cluster with delta-rs and local tables
    assert {s for s, status in out["result"]["stages"].items() if status == "success"} == {
        "ingest", "embed_items", "fit_codebook", "encode_items"}, out["result"]
    log = Path(out["log"]).read_text(errors="replace")
    assert "Lost executor" in log or "lost worker" in log.lower() or "Worker removed" in log, log[-3000:]
    print(f"killed worker 0 during job {killed['job']['jobId']} at {killed['job']['numCompletedTasks']}/"
          f"{killed['job']['numTasks']} tasks")
    table = DeltaTable(out["work_uri"] + "/tables/item_embeddings").to_pyarrow_table().sort_by("item_id")

    # The clean run: the same stages, same config, in the test's own local session.
    cfg = make_cfg("embed.partitions=8", profiles=("local", "ci-tiny"))
    run_stage(spark, cfg, "ingest")
    run_stage(spark, cfg, "embed_items")
    clean = DeltaTable(cfg.tables_uri + "/item_embeddings").to_pyarrow_table().sort_by("item_id")
    assert table.num_rows == clean.num_rows == 2500
    assert table.column("item_id").to_pylist() == clean.column("item_id").to_pylist()
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()),
                               np.array(clean.column("embedding").to_pylist()), atol=1e-5)
    for column in ("content_hash", "model_id"):
        assert table.column(column).to_pylist() == clean.column(column).to_pylist()


CHILD = r'''
import os, sys, time
from hymirec_udfs.core.config import load_config
from hymirec_udfs.core.spark import get_spark
from hymirec_udfs.core.tables import get_table_store
from pyspark.sql import functions as F

engine, work, marker, phase = sys.argv[1:5]
cfg = load_config(["local"], [f"paths.work_dir={work}", f"storage.engine={engine}", "tracking.enabled=false"])
spark = get_spark(cfg)
store = get_table_store(spark, cfg)

def items(n, tag):
    return spark.range(n).select(
        F.format_string("i%06d", "id").alias("item_id"), F.lit(tag).alias("title"),
        F.lit(None).cast("string").alias("description"), F.lit("g").alias("tags"), F.lit("text").alias("text"),
        F.lit("test").alias("source"), F.current_timestamp().alias("ingested_at"),
        F.lit(None).cast("date").alias("valid_from"), F.lit(None).cast("date").alias("removed_on"))

if phase == "setup":
    store.overwrite("items", items(50_000, "v0"))
    print("VERSION", store.version("items"), flush=True)
    sys.exit(0)
# phase "merge": announce, then upsert 200k rows (50k updated, 150k new); the parent kills us mid-way.
open(marker, "w").write(str(time.time()))
store.merge("items", items(200_000, "v1").repartition(8))
open(marker + ".done", "w").write("done")
'''


def _child(tmp_path: Path, engine: str, work: Path, phase: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_GATEWAY", "HYMIREC_TEST"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, str(script), engine, str(work), str(tmp_path / "marker"), phase],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("engine", ["delta-rs", "spark"])
def test_driver_killed_during_a_commit_leaves_the_previous_version_and_a_rerun_is_exact(
        tmp_path: Path, engine: str) -> None:
    """SIGKILL the driver (and its JVM) while ``merge`` stages and commits 200k rows: the table
    stays at the previous version, readable; a re-run then commits once, keys unique."""
    from deltalake import DeltaTable

    work = tmp_path / "work"
    setup = _child(tmp_path, engine, work, "setup")
    out, _ = setup.communicate(timeout=600)
    assert setup.returncode == 0, out[-3000:]
    table_path = str(work / "tables" / "items")
    before = DeltaTable(table_path).version()

    files_before = set(Path(table_path).glob("*.parquet"))
    child = _child(tmp_path, engine, work, "merge")
    marker = tmp_path / "marker"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), child.communicate()[0][-3000:]

    def committing() -> bool:
        """The commit phase: delta-rs has Spark's staged files (``_SUCCESS``) and is writing;
        Spark's Delta has written new data files into the table, the log entry not yet."""
        if engine == "delta-rs":
            return any((work / "tables" / "_staging").glob("items-*/_SUCCESS"))
        return bool(set(Path(table_path).glob("*.parquet")) - files_before)

    while not committing() and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    assert child.poll() is None, "the merge ended before its commit phase was seen"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(60)
    assert not (tmp_path / "marker.done").exists(), "the merge finished before the kill; nothing was tested"

    after_kill = DeltaTable(table_path)
    data = after_kill.to_pyarrow_table()
    ids = data.column("item_id").to_pylist()
    assert len(ids) == len(set(ids))  # never a half-applied merge with duplicated keys
    if after_kill.version() == before:
        assert len(ids) == 50_000 and set(data.column("title").to_pylist()) == {"v0"}
    else:  # the commit itself landed before the kill: then all of it did
        assert after_kill.version() == before + 1 and len(ids) == 200_000

    rerun = _child(tmp_path, engine, work, "merge")
    out, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out[-3000:]
    final = DeltaTable(table_path).to_pyarrow_table()
    ids = final.column("item_id").to_pylist()
    assert len(ids) == len(set(ids)) == 200_000
    assert set(final.column("title").to_pylist()) == {"v1"}
