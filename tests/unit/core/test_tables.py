"""The table layer on the delta-rs engine: real Delta tables, atomic, schema-enforced."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from hymirec_udfs.core import schemas, uri
from tests.conftest import TEST_ENGINE, TEST_STORAGE
from hymirec_udfs.core.tables import SchemaMismatchError, TableNotFoundError

pytestmark = pytest.mark.spark

NOW = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _items(spark, rows):
    return spark.createDataFrame(
        [(i, t, None, "g", f"Title: {t}", "test", NOW, None, None) for i, t in rows], schemas.spark_schema(schemas.ITEMS)
    )


def test_overwrite_merge_version_history_and_time_travel(spark, store) -> None:
    assert store.engine == TEST_ENGINE
    assert store.location("items").startswith(("s3://", "s3a://")) == (TEST_STORAGE == "s3")
    assert not store.exists("items") and store.version("items") is None
    first = store.overwrite("items", _items(spark, [("1", "a"), ("2", "b")]))
    assert first in (0, 1)  # Spark's engine commits the declared (NOT NULL) schema first
    assert store.merge("items", _items(spark, [("2", "B"), ("3", "c")])) == first + 1
    now = {r.item_id: r.title for r in store.read("items").collect()}
    assert now == {"1": "a", "2": "B", "3": "c"}
    before = {r.item_id: r.title for r in store.read("items", version=first).collect()}
    assert before == {"1": "a", "2": "b"}
    assert store.append("items", _items(spark, [("4", "d")])) == first + 2
    assert store.count("items") == 4
    ops = [h["operation"] for h in store.history("items")]
    assert ops[0] == "WRITE" and "MERGE" in ops


def _read_text(location: str) -> str:
    fs, path = uri.arrow_fs(location)
    with fs.open_input_stream(path) as handle:
        return handle.read().decode()


def test_delta_log_is_valid(spark, store) -> None:
    from deltalake import DeltaTable

    first = store.overwrite("items", _items(spark, [("1", "a")]))
    store.overwrite("items", _items(spark, [("9", "z")]))
    # Listed and read through core.uri: the same test runs on local disk and on S3.
    commits = uri.list_files(uri.join(store.location("items"), "_delta_log"), ".json")
    assert [c.rsplit("/", 1)[1] for c in commits] == [f"{v:020d}.json" for v in range(first + 2)]
    actions = [json.loads(line) for c in commits[: first + 1] for line in _read_text(c).splitlines()]
    kinds = {next(iter(a)) for a in actions}
    assert {"protocol", "metaData", "add", "commitInfo"} <= kinds
    meta = next(a["metaData"] for a in actions if "metaData" in a)
    fields = json.loads(meta["schemaString"])["fields"]
    assert [f["name"] for f in fields] == schemas.arrow_schema("items").names
    assert {f["name"]: f["nullable"] for f in fields}["item_id"] is False  # NOT NULL on both engines
    table = DeltaTable(uri.for_arrow(store.location("items")), version=first)
    assert table.to_pyarrow_table().column("item_id").to_pylist() == ["1"]
    assert [r.item_id for r in store.read("items").collect()] == ["9"]


def test_schema_mismatch_names_columns_and_leaves_table(spark, store) -> None:
    first = store.overwrite("items", _items(spark, [("1", "a")]))
    from pyspark.sql import functions as F

    bad = _items(spark, [("2", "b")]).drop("title").withColumn("extra", F.col("item_id"))
    with pytest.raises(SchemaMismatchError, match=r"missing columns \['title'\]; unexpected columns \['extra'\]"):
        store.overwrite("items", bad)
    wrong_type = _items(spark, [("2", "b")]).withColumn("title", F.lit(5))
    with pytest.raises(SchemaMismatchError, match=r"title \(expected string, got int\)"):
        store.append("items", wrong_type)
    assert store.version("items") == first
    assert [r.item_id for r in store.read("items").collect()] == ["1"]


def test_failed_write_leaves_previous_version_readable(spark, store) -> None:
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    first = store.overwrite("items", _items(spark, [("1", "a")]))

    @F.udf(StringType())
    def explode_on_3(x: str) -> str:
        if x == "3":
            raise RuntimeError("boom in the middle of the write")
        return x

    failing = _items(spark, [("2", "b"), ("3", "c")]).withColumn("item_id", explode_on_3("item_id"))
    with pytest.raises(Exception, match="boom"):
        store.overwrite("items", failing)
    assert store.version("items") == first
    assert [r.item_id for r in store.read("items").collect()] == ["1"]


def test_null_in_required_column_is_refused(spark, store) -> None:
    store.overwrite("items", _items(spark, [("1", "a")]))
    from pyspark.sql import functions as F

    # A null id produced by a transform (the DataFrame's own schema says nullable).
    nulls = _items(spark, [("2", "b")]).withColumn("item_id", F.when(F.lit(False), F.lit("x")))
    with pytest.raises(Exception, match="(?i)null"):
        store.append("items", nulls)
    assert store.count("items") == 1


def test_missing_table_errors_name_the_table(spark, store) -> None:
    with pytest.raises(TableNotFoundError, match="item_codes"):
        store.read("item_codes")
    with pytest.raises(TableNotFoundError, match="stage 'train' needs table 'sequences'"):
        store.require("sequences", "train")
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        store.location("nope")
    assert store.read_or_empty("item_codes").count() == 0


def test_empty_dataframe_creates_empty_table(spark, store) -> None:
    empty = spark.createDataFrame([], schemas.spark_schema(schemas.QUARANTINE))
    assert store.overwrite("quarantine", empty) == store.version("quarantine")
    assert store.count("quarantine") == 0


@pytest.mark.skipif(TEST_ENGINE != "delta-rs", reason="delta-rs staging (Spark's engine commits its own files)")
def test_staged_write_the_driver_cannot_see_fails_and_commits_nothing(spark, store, monkeypatch) -> None:
    # Where fs.defaultFS is not the driver's disk, Spark writes the staged Parquet elsewhere
    # and the driver's staging directory stays empty. Before the fix that committed a new
    # version with zero rows and reported success (silent data loss).
    from hymirec_udfs.core.tables import DeltaRsStore, StagedWriteError

    store.overwrite("items", _items(spark, [("1", "a"), ("2", "b")]))
    real_stage = DeltaRsStore._stage

    def stage_elsewhere(self, name, df):
        written = real_stage(self, name, df)  # Spark's files land here ...
        invisible = f"{written}-driver-view"
        fs, path = uri.arrow_fs(invisible)
        fs.create_dir(path)  # ... while the driver looks here (local disk or S3 alike)
        return invisible

    monkeypatch.setattr(DeltaRsStore, "_stage", stage_elsewhere)
    with pytest.raises(StagedWriteError, match=r"no _SUCCESS marker.*fs\.defaultFS=.*nothing was committed"):
        store.overwrite("items", _items(spark, [("3", "c")]))
    assert store.version("items") == 0
    assert sorted(r.item_id for r in store.read("items").collect()) == ["1", "2"]



def test_overwrite_replaces_a_table_written_with_an_older_shape(spark, store) -> None:
    # An upgrade changes a table's declared shape (interactions gained source_order,
    # sequences became one row per user): the next overwrite must replace it, not fail
    # with "Cannot cast schema, number of fields does not match".
    import pyarrow as pa
    from deltalake import write_deltalake

    old = pa.table({"item_id": ["9"], "title": ["old shape"]})
    write_deltalake(uri.for_arrow(store.location("items")), old)
    assert store.version("items") == 0
    assert store.overwrite("items", _items(spark, [("1", "a")])) == 1
    assert [(r.item_id, r.title) for r in store.read("items").collect()] == [("1", "a")]
    from deltalake import DeltaTable

    assert DeltaTable(uri.for_arrow(store.location("items")), version=0).to_pyarrow_table().column("title").to_pylist() == ["old shape"]


def _recs(spark, day: str, users: list[str], item: str = "i1"):
    rows = [(u, 1, item, 0.5, 0, "v1", dt.date.fromisoformat(day)) for u in users]
    return spark.createDataFrame(rows, schemas.spark_schema(schemas.RECOMMENDATIONS))


def test_replace_where_replaces_one_date_only_and_is_idempotent(spark, store) -> None:
    pred = "as_of_date = '{}'"
    store.replace_where(schemas.RECOMMENDATIONS, _recs(spark, "2026-01-01", ["a", "b"]), pred.format("2026-01-01"))
    store.replace_where(schemas.RECOMMENDATIONS, _recs(spark, "2026-01-02", ["a"]), pred.format("2026-01-02"))
    version = store.replace_where(schemas.RECOMMENDATIONS, _recs(spark, "2026-01-02", ["c"], "i9"),
                                  pred.format("2026-01-02"))
    rows = sorted((str(r.as_of_date), r.user_id, r.item_id) for r in store.read(schemas.RECOMMENDATIONS).collect())
    assert rows == [("2026-01-01", "a", "i1"), ("2026-01-01", "b", "i1"), ("2026-01-02", "c", "i9")]
    with pytest.raises(Exception):  # a row outside the predicate is refused, nothing committed
        store.replace_where(schemas.RECOMMENDATIONS, _recs(spark, "2026-01-03", ["d"]), pred.format("2026-01-02"))
    assert store.version(schemas.RECOMMENDATIONS) == version


@pytest.mark.skipif(TEST_ENGINE != "spark", reason="needs Spark Delta in the JVM (child run of test_spark_engine)")
def test_a_table_written_by_one_engine_is_read_and_merged_by_the_other(spark, make_cfg) -> None:
    from hymirec_udfs.core.tables import DeltaRsStore, SparkDeltaStore

    cfg = make_cfg()
    spark_store, rs_store = SparkDeltaStore(spark, cfg), DeltaRsStore(spark, cfg)
    assert spark_store.overwrite("items", _items(spark, [("1", "a"), ("2", "b")])) == 1  # after the NOT NULL create
    rs_store.merge("items", _items(spark, [("2", "B"), ("3", "c")]))
    assert sorted((r.item_id, r.title) for r in spark_store.read("items").collect()) == [
        ("1", "a"), ("2", "B"), ("3", "c")]
    spark_store.merge("items", _items(spark, [("4", "d")]))
    assert rs_store.version("items") == spark_store.version("items")
    assert sorted(r.item_id for r in rs_store.read("items").collect()) == ["1", "2", "3", "4"]
    first = rs_store.version("items") - 2
    assert sorted(r.item_id for r in rs_store.read("items", version=first).collect()) == ["1", "2"]  # time travel


@pytest.mark.skipif(TEST_ENGINE != "spark", reason="needs Spark Delta in the JVM (child run of test_spark_engine)")
def test_deletion_vectors_are_read_by_spark_and_refused_for_raw_file_readers(spark, store) -> None:
    store.overwrite("items", _items(spark, [("1", "a"), ("2", "b"), ("3", "c")]))
    spark.sql(f"ALTER TABLE delta.`{store.location('items')}` SET TBLPROPERTIES (delta.enableDeletionVectors = true)")
    assert len(store.files("items")) >= 1  # the feature alone (no deleted rows) is fine
    store.delete("items", "item_id = '2'")
    assert sorted(r.item_id for r in store.read("items").collect()) == ["1", "3"]
    with pytest.raises(RuntimeError, match="deletion vectors.*REORG TABLE"):
        store.files("items")


@pytest.mark.skipif(TEST_ENGINE != "spark", reason="needs Spark Delta in the JVM (child run of test_spark_engine)")
def test_catalog_tables_hand_ranks_a_staged_copy_per_version(spark, make_cfg) -> None:
    """A catalog (Unity Catalog) table's own files are cloud paths ranks cannot open:
    rank_files stages the version as Parquet under local_dir, once per version."""
    import pyarrow.parquet as pq

    from hymirec_udfs.core.tables import SparkDeltaStore

    spark.sql("CREATE SCHEMA IF NOT EXISTS spark_catalog.hymirec_rank_files")
    cfg = make_cfg("storage.catalog=spark_catalog", "storage.schema=hymirec_rank_files")
    store = SparkDeltaStore(spark, cfg)
    try:
        first = store.overwrite("items", _items(spark, [("1", "a"), ("2", "b")]))
        files = store.rank_files("items", first)
        assert files and all(f.startswith(str(cfg.work_dir / "staged" / f"items-v{first}")) for f in files)
        assert sorted(r for f in files for r in pq.read_table(f).column("item_id").to_pylist()) == ["1", "2"]
        assert store.rank_files("items", first) == files  # reused, not rewritten
        second = store.merge("items", _items(spark, [("3", "c")]))
        staged = store.rank_files("items", second)
        assert sorted(r for f in staged for r in pq.read_table(f).column("item_id").to_pylist()) == ["1", "2", "3"]
        # a path table hands over its own files
        path_store = SparkDeltaStore(spark, make_cfg())
        version = path_store.overwrite("items", _items(spark, [("9", "z")]))
        assert path_store.rank_files("items", version) == path_store.files("items", version)
    finally:
        spark.sql("DROP SCHEMA IF EXISTS spark_catalog.hymirec_rank_files CASCADE")


@pytest.mark.skipif(TEST_ENGINE != "delta-rs", reason="delta-rs writes on the driver (Spark's engine on executors)")
def test_delta_rs_writes_bounded_row_groups(spark, store) -> None:
    # delta-rs buffers a whole row group on the driver before flushing it: its default row
    # group made a write's driver memory grow with the table. Writes, merges and
    # replaceWhere must all cut row groups at ROW_GROUP_ROWS.
    import pyarrow.parquet as pq

    from hymirec_udfs.core.tables import ROW_GROUP_ROWS

    n = ROW_GROUP_ROWS * 2 + 10
    rows = spark.range(n).selectExpr("cast(id as string) as id", "'t' as t").collect()
    store.overwrite("items", _items(spark, [(r.id, r.t) for r in rows]))

    def groups() -> list[int]:
        sizes = []
        for f in store.files("items"):
            fs, path = uri.arrow_fs(f)
            meta = pq.ParquetFile(fs.open_input_file(path)).metadata
            sizes += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            # delta-rs's own default codec, kept when its writer properties are given
            assert {meta.row_group(0).column(c).compression for c in range(meta.num_columns)} == {"SNAPPY"}
        return sizes

    written = groups()
    assert sum(written) == n and max(written) <= ROW_GROUP_ROWS and len(written) >= 3
    store.merge("items", _items(spark, [(r.id, "u") for r in rows[: ROW_GROUP_ROWS + 5]]))
    merged = groups()
    assert sum(merged) == n and max(merged) <= ROW_GROUP_ROWS
    store.delete("items", "item_id < '5'")  # a delete rewrites files with the same properties
    assert sum(groups()) == n - len([r for r in rows if r.id < "5"])
