"""Locations as URIs: nothing remote is turned into a local path, each engine gets its spelling."""

from __future__ import annotations

from pathlib import Path

import pytest

from hymirec_udfs.core import uri
from hymirec_udfs.core.config import load_config

REMOTE = ["s3://bkt/x", "s3a://bkt/x", "gs://bkt/x", "abfss://c@acct.dfs.core.windows.net/x", "hdfs:///x",
          "hdfs://nn:8020/x", "dbfs:/x"]


@pytest.mark.parametrize("location", REMOTE)
def test_remote_locations_are_kept_as_written(location: str) -> None:
    assert uri.is_remote(location)
    assert uri.normalize(location + "/") == location
    assert uri.join(location, "tables", "items") == f"{location}/tables/items"


@pytest.mark.parametrize("location", ["./w", "/Volumes/c/s/v", "/dbfs/x", "file:///tmp/x", "~/w"])
def test_local_locations_are_absolute_paths(location: str) -> None:
    assert not uri.is_remote(location)
    out = uri.normalize(location)
    assert Path(out).is_absolute() and "file:" not in out and "~" not in out


def test_each_engine_gets_its_spelling() -> None:
    assert uri.for_spark("s3://b/t") == "s3a://b/t"
    assert uri.for_spark("s3a://b/t") == "s3a://b/t"
    assert uri.for_arrow("s3a://b/t") == "s3://b/t"
    assert uri.for_arrow("dbfs:/mnt/t") == "/dbfs/mnt/t"
    assert uri.for_spark("gs://b/t") == uri.for_arrow("gs://b/t") == "gs://b/t"
    # Databricks: Spark read a bare /dbfs/x as dbfs:/dbfs/x (stage 1's staging went there);
    # Volumes paths are read as they are
    assert uri.for_spark("/dbfs/tmp/hymirec/stage1") == "dbfs:/tmp/hymirec/stage1"
    assert uri.for_arrow(uri.for_spark("/dbfs/tmp/x")) == "/dbfs/tmp/x"
    assert uri.for_spark("/Volumes/main/hymirec/hymirec/work") == "/Volumes/main/hymirec/hymirec/work"


def test_unknown_scheme_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"paths.work_dir='ftp://h/x': unknown scheme 'ftp://'"):
        uri.normalize("ftp://h/x", "paths.work_dir")


def test_remote_work_dir_is_not_mangled_and_local_state_goes_to_local_dir(tmp_path: Path) -> None:
    """The issue's bug: Path('s3a://bucket/x').resolve() became a path under the cwd."""
    cfg = load_config([], ["paths.work_dir=s3a://bucket/x", f"paths.local_dir={tmp_path}"])
    assert cfg.work_uri == "s3a://bucket/x"
    assert cfg.tables_uri == "s3a://bucket/x/tables"
    assert cfg.reports_uri == "s3a://bucket/x/reports"
    assert cfg.work_dir == tmp_path and cfg.checkpoints_dir == tmp_path / "checkpoints"
    assert cfg.reports_dir == tmp_path / "reports"  # written here, then published to reports_uri
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert cfg.artifact_root == "s3://bucket/x/mlflow/artifacts"  # MLflow's (boto3's) spelling


def test_remote_work_dir_without_local_dir_uses_a_stable_temp_dir() -> None:
    a = load_config([], ["paths.work_dir=s3://bucket/x"])
    b = load_config([], ["paths.work_dir=s3://bucket/x"])
    c = load_config([], ["paths.work_dir=s3://bucket/y"])
    assert a.work_dir == b.work_dir != c.work_dir
    assert "s3" not in str(a.work_dir) and a.work_dir.is_absolute()


def test_checkpoints_on_object_storage_are_refused_naming_the_setting() -> None:
    cfg = load_config([], ["paths.checkpoints_dir=s3://bucket/ckpt"])
    with pytest.raises(ValueError, match=r"paths.checkpoints_dir='s3://bucket/ckpt' must be a file-system path"):
        _ = cfg.checkpoints_dir


def test_list_publish_and_remove_on_the_local_file_system(tmp_path: Path) -> None:
    src = tmp_path / "report"
    src.mkdir()
    (src / "a.html").write_text("x")
    (src / "b.png").write_bytes(b"y")
    dest = str(tmp_path / "published" / "run1")
    assert uri.publish_dir(src, dest) == dest
    assert [Path(p).name for p in uri.list_files(dest)] == ["a.html", "b.png"]
    assert [Path(p).name for p in uri.list_files(dest, ".png")] == ["b.png"]
    assert uri.list_files(str(tmp_path / "absent")) == []
    uri.remove_tree(dest)
    assert not uri.exists(dest)
    uri.remove_tree(dest)  # absent is fine


def test_s3a_settings_follow_the_standard_endpoint_variable() -> None:
    conf = uri.s3a_conf({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"})
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-1"
    assert uri.s3a_conf({}) == {}
