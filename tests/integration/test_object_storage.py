"""The table-layer suite again with the tables on S3 (a moto server on 127.0.0.1), on each
Delta engine, in child pytests (one JVM holds one SparkContext, and s3a needs hadoop-aws
on the classpath from the session's start).

The child runs ``tests/unit/core/test_tables.py`` with ``HYMIREC_TEST_STORAGE=s3``: the
`store` fixture's ``paths.work_dir`` is ``s3://hymirec-test/<test>/work``, so every write
stages through ``s3a://``, every delta-rs commit goes to ``s3://`` and every read lists the
object store, never the driver's disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services import child_pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("engine", ["delta-rs", "spark"])
def test_table_layer_suite_on_s3(engine: str) -> None:
    proc = child_pytest(REPO / "tests" / "unit" / "core" / "test_tables.py",
                        {"HYMIREC_TEST_ENGINE": engine, "HYMIREC_TEST_STORAGE": "s3"})
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
