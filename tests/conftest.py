"""Shared fixtures: one local Spark session for the whole test run, configs in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory):
    """The one SparkSession of the test run (local[2], few shuffle partitions)."""
    from hymirec_udfs.spark import get_spark

    session = get_spark(
        master="local[2]",
        app_name="hymirec-tests",
        conf={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2",
              "spark.driver.memory": "3g"},
        local_dir=str(tmp_path_factory.mktemp("spark-local")),
    )
    yield session
    session.stop()


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., "object"]:
    """Build a config whose work dir is a fresh tmp dir (tracking off unless asked)."""
    from hymirec_udfs.config import load_config

    def _make(*overrides: str, profiles: Sequence[str] = ("local",), tracking: bool = False):
        sets = [f"paths.work_dir={tmp_path / 'work'}", f"tracking.enabled={'true' if tracking else 'false'}"]
        return load_config(list(profiles), sets + list(overrides))

    return _make


@pytest.fixture
def store(spark, make_cfg):
    """A delta-rs table store over a fresh work dir."""
    from hymirec_udfs.tables import get_table_store

    return get_table_store(spark, make_cfg())
