"""Progress lines and live training metrics: the follower sends records to a real MLflow run
while they are written; Spark progress names tasks, ETA and units/s."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from hymirec_udfs.core.progress import MetricsFollower, SparkProgress


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _wait(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_follower_sends_records_while_they_are_written_into_a_real_mlflow_run(make_cfg, tmp_path, caplog) -> None:
    import mlflow
    from mlflow import MlflowClient

    from hymirec_udfs.core.tracking import RunLogger, configure_mlflow

    cfg = make_cfg(tracking=True)
    configure_mlflow(cfg)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    logger = RunLogger(run_id)  # logged by id: the follower's thread has no active run
    path = tmp_path / "metrics.jsonl"
    sent: list[int] = []

    def send(values: dict, step: int) -> None:
        logger.metrics({f"x.{k}": v for k, v in values.items()}, step=step)
        sent.append(step)

    caplog.set_level(logging.INFO, logger="hymirec_udfs.progress")
    with MetricsFollower(str(path), 0.05, send, label="hymirec") as follower:
        _append(path, {"kind": "train", "step": 1, "epoch": 0, "loss": 4.0, "samples_per_s": 100.0})
        _append(path, {"kind": "train", "step": 2, "epoch": 0, "loss": 3.5, "samples_per_s": 120.0})
        # live: in MLflow before training (the writer) is done
        assert _wait(lambda: len(MlflowClient().get_metric_history(run_id, "x.loss")) == 2)
        with open(path, "a") as fh:  # half a line being written is not read
            fh.write('{"kind": "valid", "step": 2, "ndcg@10"')
        time.sleep(0.3)
        assert sent == [1, 2]
        with open(path, "a") as fh:
            fh.write(': 0.25}\n')
        assert _wait(lambda: sent == [1, 2, 2])
        # a resume truncates the file to its checkpoint step: the follower starts over
        path.write_text(json.dumps({"kind": "train", "step": 1, "epoch": 0, "loss": 4.0}) + "\n")
        _append(path, {"kind": "train", "step": 2, "epoch": 0, "loss": 3.4, "samples_per_s": 90.0})
    assert sent[-2:] == [1, 2] and follower.sent == len(sent)
    history = sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, "x.loss"))
    assert history == [(1, 4.0), (1, 4.0), (2, 3.4), (2, 3.5)]  # the resumed attempt's curve is there too
    assert [m.value for m in MlflowClient().get_metric_history(run_id, "x.ndcg_at_10")] == [0.25]
    lines = [r.getMessage() for r in caplog.records if r.name == "hymirec_udfs.progress"]
    assert any(line.startswith("hymirec: step 2, epoch 0, loss 3.5000, 120.0 samples/s") for line in lines), lines
    assert any(line.startswith("hymirec: valid at step 2: ndcg@10 0.25") for line in lines), lines


def test_follower_sends_what_the_file_holds_on_stop_even_when_polling_is_off(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    sent = []
    with MetricsFollower(str(path), 0, lambda v, s: sent.append((s, v["loss"]))):
        _append(path, {"kind": "train", "step": 1, "loss": 2.0})
    assert sent == [(1, 2.0)]


@pytest.mark.spark
def test_spark_progress_reports_tasks_eta_and_units_per_second(spark) -> None:
    progress = SparkProgress(spark, "embed_items", 0.2)
    progress.expect(4000, "items")

    def slow(rows):
        time.sleep(0.6)
        return rows

    with progress:
        spark.sparkContext.parallelize(range(8), 8).mapPartitions(slow).count()
    lines = progress.lines
    assert lines, "no progress line during a 2-second job"
    task_lines = [line for line in lines if "Spark stage" in line]
    assert task_lines and all(line.startswith("embed_items: Spark stage ") for line in task_lines), lines
    assert any("/8 tasks" in line and "ETA" in line and "items/s of 4,000" in line for line in task_lines), lines
