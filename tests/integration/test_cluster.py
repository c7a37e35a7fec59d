"""The whole pipeline on a Spark standalone cluster (a master and two workers on 127.0.0.1)
with Spark's Delta and ``paths.work_dir=s3://...`` on an S3 server (moto), submitted with
spark-submit as a scheduler does, under the tiny CI profile (``conf/ci-tiny.yaml``).

The other engine/storage combinations run in the table-layer suites
(``test_spark_engine.py``, ``test_object_storage.py``) and in ``test_faults.py`` (delta-rs
on the cluster with local tables, ingest to embed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services import run_pipeline_on_cluster

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


def _inspect(work_uri: str) -> dict:
    """What the application left on S3, read with the package's own URI layer."""
    from deltalake import DeltaTable

    from hymirec_udfs.core import uri

    tables = {}
    for name in ("items", "item_embeddings", "item_codes", "sequences", "eval_metrics", "recommendations", "job_runs"):
        table = DeltaTable(uri.join(work_uri, "tables", name))
        tables[name] = (table.version(), table.to_pyarrow_table().num_rows)
    reports = uri.list_files(uri.join(work_uri, "reports"))  # run dirs are below; list one level deeper
    fs, path = uri.arrow_fs(uri.join(work_uri, "reports"))
    import pyarrow.fs as pafs

    report_files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                    if i.type == pafs.FileType.File]
    fs, path = uri.arrow_fs(uri.join(work_uri, "mlflow", "artifacts"))
    artefacts = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File]
    recs = DeltaTable(uri.join(work_uri, "tables", "recommendations")).to_pyarrow_table()
    keys = list(zip(recs.column("user_id").to_pylist(), recs.column("rank").to_pylist()))
    return {"tables": tables, "reports": reports, "report_files": report_files, "artefacts": artefacts,
            "recommendation_keys_unique": len(keys) == len(set(keys))}


def test_pipeline_on_a_standalone_cluster_with_spark_delta_on_s3(tmp_path: Path) -> None:
    out = run_pipeline_on_cluster(tmp_path / "cluster-run", profile="local,ci-tiny", engine="spark", storage="s3",
                                  sets=("train.num_processes=2",), after=_inspect)
    result, seen = out["result"], out["after"]
    assert out["returncode"] == 0 and result.get("status") == "success", (result, out["log"])
    assert result["spark"]["spark.master"].startswith("spark://127.0.0.1:")
    assert {s for s, status in result["stages"].items() if status == "success"} >= {
        "ingest", "embed_items", "fit_codebook", "encode_items", "build_sequences", "train", "evaluate", "recommend"}
    assert out["work_uri"].startswith("s3://")
    tables = seen["tables"]
    assert tables["items"][1] == 2500 and tables["item_embeddings"][1] == 2500 and tables["item_codes"][1] == 2500
    assert tables["sequences"][1] > 0 and tables["eval_metrics"][1] > 0
    assert tables["recommendations"][1] == 120 * 100  # every user, top-100
    assert seen["recommendation_keys_unique"]
    assert any(f.endswith(".html") for f in seen["report_files"]), seen["report_files"]  # report published to S3
    assert seen["artefacts"], "no MLflow artefact reached s3://.../mlflow/artifacts"
