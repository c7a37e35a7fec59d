"""One table interface, two Delta engines.

Every stage reads and writes through :class:`TableStore`; it never knows which engine is
underneath:

* :class:`SparkDeltaStore` — Spark's own Delta (``delta-spark``) when the JVM has the
  Delta classes (Databricks, clusters that ship the jars).
* :class:`DeltaRsStore` — delta-rs (``deltalake``) otherwise. The tables are real Delta
  tables (``_delta_log``), readable by Spark Delta and Databricks. Reads stay distributed:
  Spark reads the Parquet files of the snapshot's add actions. Writes go through a
  staging directory: Spark writes Parquet in parallel, then the files are streamed batch
  by batch into one delta-rs commit, so the driver never holds the table in memory.

Both engines give the same guarantees: a write either commits a new version or leaves
the previous one untouched (Delta's atomic commit), and a DataFrame whose columns or
types differ from the declared schema is refused before anything is written.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import pyarrow as pa

from hymirec_udfs.core import schemas, uri
from hymirec_udfs.core.config import Config

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession


class SchemaMismatchError(ValueError):
    """A DataFrame does not match the declared schema of the table it is written to."""


class StagedWriteError(RuntimeError):
    """A staged write cannot be committed whole (files not visible, rows missing)."""


class TableNotFoundError(LookupError):
    """The table has not been written yet."""


@dataclass(frozen=True)
class TableInfo:
    """One row of ``hymirec tables``."""

    name: str
    version: Optional[int]
    rows: Optional[int]
    location: str


def conform(df: "DataFrame", name: str) -> "DataFrame":
    """Check ``df`` against the declared schema of ``name`` and order its columns.

    Column names and data types must match exactly (nullability is enforced by the
    table itself on write).

    Raises:
        SchemaMismatchError: naming missing columns, unexpected columns and columns whose
            type differs.
    """
    expected = schemas.spark_schema(name)
    got = {f.name: f.dataType for f in df.schema.fields}
    want = {f.name: f.dataType for f in expected.fields}
    missing = [c for c in want if c not in got]
    extra = [c for c in got if c not in want]
    wrong = [
        f"{c} (expected {want[c].simpleString()}, got {got[c].simpleString()})"
        for c in want
        if c in got and got[c] != want[c]
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra}")
        if wrong:
            parts.append(f"wrong types: {', '.join(wrong)}")
        raise SchemaMismatchError(f"schema mismatch writing table '{name}': " + "; ".join(parts))
    return df.select(*[f.name for f in expected.fields])


class TableStore(ABC):
    """Read / overwrite / append / merge-by-key / version / history for named tables."""

    def __init__(self, spark: "SparkSession", cfg: Config) -> None:
        self.spark = spark
        self.cfg = cfg

    engine: str = ""

    @abstractmethod
    def location(self, name: str) -> str:
        """Where table ``name`` lives (a path or ``catalog.schema.name``)."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether table ``name`` has at least one committed version."""

    @abstractmethod
    def version(self, name: str) -> Optional[int]:
        """Current version of ``name`` (None when it does not exist)."""

    @abstractmethod
    def columns(self, name: str) -> list[str]:
        """Column names of the table's current version (its stored shape)."""

    @abstractmethod
    def history(self, name: str) -> list[dict[str, Any]]:
        """Commit history of ``name``, newest first (version, timestamp, operation)."""

    @abstractmethod
    def read(self, name: str, version: Optional[int] = None) -> "DataFrame":
        """Distributed read of ``name`` (optionally as of ``version``)."""

    @abstractmethod
    def _write(self, name: str, df: "DataFrame", mode: str) -> int:
        """Engine-specific overwrite/append of a conformed DataFrame."""

    @abstractmethod
    def _merge(self, name: str, df: "DataFrame", keys: Sequence[str]) -> int:
        """Engine-specific upsert of a conformed DataFrame."""

    @abstractmethod
    def delete(self, name: str, predicate: str) -> int:
        """Delete rows matching a SQL ``predicate``; returns the new version."""

    def overwrite(self, name: str, df: "DataFrame") -> int:
        """Replace the contents of ``name`` atomically; returns the new version."""
        return self._write(name, conform(df, name), "overwrite")

    def append(self, name: str, df: "DataFrame") -> int:
        """Append rows to ``name`` (creating it); returns the new version."""
        return self._write(name, conform(df, name), "append")

    def merge(self, name: str, df: "DataFrame", keys: Optional[Sequence[str]] = None) -> int:
        """Upsert ``df`` into ``name`` by ``keys`` (default: the declared merge keys).

        Matching rows are updated, new rows inserted, other rows kept. A missing table is
        created from ``df``.
        """
        keys = tuple(keys or schemas.MERGE_KEYS[name])
        df = conform(df, name)
        if not self.exists(name):
            return self._write(name, df, "overwrite")
        return self._merge(name, df, keys)

    def replace_where(self, name: str, df: "DataFrame", predicate: str) -> int:
        """Replace the rows matching ``predicate`` with ``df`` in one commit (every row of
        ``df`` must match it); other rows stay. Creates a missing table. This is how a
        dated output is re-run idempotently (``as_of_date = '2026-01-02'``).
        """
        df = conform(df, name)
        if not self.exists(name):
            return self._write(name, df, "overwrite")
        return self._replace_where(name, df, predicate)

    @abstractmethod
    def _replace_where(self, name: str, df: "DataFrame", predicate: str) -> int:
        """Engine-specific replaceWhere of a conformed DataFrame."""

    @abstractmethod
    def files(self, name: str, version: Optional[int] = None) -> list[str]:
        """Data files (URIs) of the snapshot; trainers shard these between ranks."""

    def rank_files(self, name: str, version: int) -> list[str]:
        """Parquet files holding ``name`` at ``version`` that processes outside Spark
        (training ranks) can open with plain file I/O: the table's own files here; a
        staged copy for catalog tables (see :class:`SparkDeltaStore`)."""
        return self.files(name, version)

    def read_or_empty(self, name: str) -> "DataFrame":
        """``read(name)``, or an empty DataFrame with the declared schema."""
        if self.exists(name):
            return self.read(name)
        return self.spark.createDataFrame([], schemas.spark_schema(name))

    def count(self, name: str) -> Optional[int]:
        """Row count of the current version (None when the table does not exist)."""
        return self.read(name).count() if self.exists(name) else None

    def require(self, name: str, stage: str) -> None:
        """Fail clearly when a stage's input table is missing."""
        if not self.exists(name):
            raise TableNotFoundError(
                f"stage '{stage}' needs table '{name}' at {self.location(name)}, which does not exist yet;"
                " run the stage that writes it first (see `hymirec pipeline run`)"
            )

    def list_tables(self) -> list[TableInfo]:
        """Every declared table with its version and row count."""
        return [
            TableInfo(name, self.version(name), self.count(name), self.location(name))
            for name in schemas.TABLE_SCHEMAS
        ]


# delta-rs writes on the driver: it buffers a whole Parquet row group (its default is far
# larger) before flushing, so a write's driver memory grew with the table (958 MB for 1M
# rows x 64 floats, 244 MB of data). With 65,536-row groups (and 64 MiB files on writes;
# a merge follows the table's delta.targetFileSize) it stays near 0.5 GB to 2M rows.
ROW_GROUP_ROWS = 65_536
TARGET_FILE_BYTES = 64 * 1024 * 1024


def _writer_properties() -> Any:
    from deltalake import WriterProperties

    # Passing WriterProperties replaces delta-rs's defaults wholesale: without compression
    # named, files would be written uncompressed (its default writer uses Snappy).
    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression="SNAPPY")


class DeltaRsStore(TableStore):
    """Delta tables written by delta-rs, read by Spark from the snapshot's Parquet files."""

    engine = "delta-rs"

    def __init__(self, spark: "SparkSession", cfg: Config) -> None:
        super().__init__(spark, cfg)
        self.root = cfg.tables_uri
        if not uri.is_remote(self.root):
            Path(self.root).mkdir(parents=True, exist_ok=True)
        # delta-rs reads AWS_* / AZURE_* / GOOGLE_* from the environment; these add to it.
        self.options = dict(cfg.storage.options) or None
        # Staged Parquet must carry INT64 timestamps (delta-rs cannot commit INT96).
        spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")

    def location(self, name: str) -> str:
        schemas.arrow_schema(name)  # unknown names fail here
        return uri.join(self.root, name)

    def _uri(self, name: str) -> str:
        """The table's location as delta-rs spells it (``s3://``, not ``s3a://``)."""
        return uri.for_arrow(self.location(name))

    def _table(self, name: str, version: Optional[int] = None):
        from deltalake import DeltaTable

        if not self.exists(name):
            raise TableNotFoundError(f"table '{name}' does not exist at {self.location(name)}")
        table = DeltaTable(self._uri(name), storage_options=self.options)
        if version is not None:
            table.load_as_version(version)
        return table

    def exists(self, name: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self._uri(name), storage_options=self.options)

    def version(self, name: str) -> Optional[int]:
        return self._table(name).version() if self.exists(name) else None

    def columns(self, name: str) -> list[str]:
        return [field.name for field in self._table(name).schema().fields]

    def history(self, name: str) -> list[dict[str, Any]]:
        return list(self._table(name).history())

    def read(self, name: str, version: Optional[int] = None) -> "DataFrame":
        files = self.files(name, version)
        schema = schemas.spark_schema(name)
        if not files:
            return self.spark.createDataFrame([], schema)
        return self.spark.read.schema(schema).parquet(*files)

    def files(self, name: str, version: Optional[int] = None) -> list[str]:
        table = self._table(name, version)
        if "deletionVectors" in (table.protocol().reader_features or []):
            # Reading the Parquet files directly (Spark here, trainers and the encode
            # stage through files()) would resurrect deleted rows.
            raise RuntimeError(
                f"table '{name}' uses deletion vectors; read it with storage.engine=spark (delta-spark)"
            )
        # Spark's spelling (s3a://): Spark reads them, and so do ranks through core.uri.
        return sorted(uri.for_spark(f) for f in table.file_uris())

    def _batches(self, staging: str, target: pa.Schema) -> pa.RecordBatchReader:
        """The staged rows as Arrow batches, checked before anything is committed.

        Raises (inside the commit, so nothing is committed):
            StagedWriteError: Spark's commit marker is missing (it wrote somewhere the driver
                cannot see, e.g. ``fs.defaultFS`` is not the driver's disk), or fewer rows
                were read back than the staged files' footers hold.
        """
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        if not uri.exists(uri.join(staging, "_SUCCESS")):
            hadoop = self.spark.sparkContext._jsc.hadoopConfiguration()
            raise StagedWriteError(
                f"staged write left no _SUCCESS marker at {staging}: Spark wrote it where the driver cannot "
                f"see it (fs.defaultFS={hadoop.get('fs.defaultFS')}); nothing was committed. Give "
                "paths.tables_dir a scheme (s3a://, abfss://, hdfs://) or use storage.engine=spark."
            )
        import pyarrow.fs as pafs

        fs, base = uri.arrow_fs(staging)  # one file system for the listing, footers and reads
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base))
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        staged_rows = sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)
        self.last_staged_rows = staged_rows

        def gen() -> Iterator[pa.RecordBatch]:
            seen = 0
            if files:
                for batch in ds.dataset(files, format="parquet", filesystem=fs).to_batches(batch_size=65536):
                    seen += batch.num_rows
                    # cast() enforces the declared types and non-null columns.
                    yield batch.select(target.names).cast(target)
            if seen != staged_rows:
                raise StagedWriteError(
                    f"read {seen} of the {staged_rows} rows staged at {staging}; nothing was committed")

        return pa.RecordBatchReader.from_batches(target, gen())

    def _stage(self, name: str, df: "DataFrame") -> str:
        """Spark writes ``df`` as Parquet under ``<tables>/_staging/`` (beside the tables, on
        the same storage, so every executor can write it and the driver can read it)."""
        staging = uri.join(self.root, "_staging", f"{name}-{uuid.uuid4().hex}")
        df.write.mode("overwrite").option("compression", "snappy").parquet(uri.for_spark(staging))
        return staging

    @staticmethod
    def _unstage(staging: str) -> None:
        try:
            uri.remove_tree(staging)
        except OSError as exc:  # a leftover staging directory is garbage, never data
            logging.getLogger(__name__).warning("could not remove staging %s: %s", staging, exc)

    def _write(self, name: str, df: "DataFrame", mode: str) -> int:
        from deltalake import write_deltalake

        staging = self._stage(name, df)
        try:
            write_deltalake(
                self._uri(name), self._batches(staging, schemas.arrow_schema(name)), mode=mode,
                storage_options=self.options, target_file_size=TARGET_FILE_BYTES,
                writer_properties=_writer_properties(),
                # An overwrite writes the declared schema (enforced by conform() before it gets
                # here): a table written by an older release with another shape is replaced in
                # one commit, its earlier versions still readable by time travel.
                **({"schema_mode": "overwrite"} if mode == "overwrite" else {}),
            )
        finally:
            self._unstage(staging)
        return self.version(name)

    def _merge(self, name: str, df: "DataFrame", keys: Sequence[str]) -> int:
        staging = self._stage(name, df)
        try:
            predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)
            (
                self._table(name)
                .merge(
                    self._batches(staging, schemas.arrow_schema(name)),
                    predicate=predicate,
                    source_alias="s",
                    target_alias="t",
                    writer_properties=_writer_properties(),
                )
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
        finally:
            self._unstage(staging)
        return self.version(name)

    def _replace_where(self, name: str, df: "DataFrame", predicate: str) -> int:
        from deltalake import write_deltalake

        staging = self._stage(name, df)
        try:
            # delta-rs checks that every new row matches the predicate, as Spark's replaceWhere.
            write_deltalake(self._uri(name), self._batches(staging, schemas.arrow_schema(name)),
                            mode="overwrite", predicate=predicate, storage_options=self.options,
                            target_file_size=TARGET_FILE_BYTES, writer_properties=_writer_properties())
        finally:
            self._unstage(staging)
        return self.version(name)

    def delete(self, name: str, predicate: str) -> int:
        table = self._table(name)
        table.delete(predicate, writer_properties=_writer_properties())
        return table.version()


class SparkDeltaStore(TableStore):
    """Spark-native Delta (delta-spark): paths locally, ``catalog.schema.name`` on Databricks."""

    engine = "spark"

    def __init__(self, spark: "SparkSession", cfg: Config) -> None:
        super().__init__(spark, cfg)
        self.use_catalog = bool(cfg.storage.catalog and cfg.storage.schema)
        self.root = cfg.tables_uri

    def location(self, name: str) -> str:
        schemas.arrow_schema(name)
        if self.use_catalog:
            return f"{self.cfg.storage.catalog}.{self.cfg.storage.schema}.{name}"
        return uri.for_spark(uri.join(self.root, name))

    def _delta(self, name: str):
        from delta.tables import DeltaTable

        if self.use_catalog:
            return DeltaTable.forName(self.spark, self.location(name))
        return DeltaTable.forPath(self.spark, self.location(name))

    def exists(self, name: str) -> bool:
        from delta.tables import DeltaTable

        if self.use_catalog:
            return bool(self.spark.catalog.tableExists(self.location(name)))
        return bool(DeltaTable.isDeltaTable(self.spark, self.location(name)))

    def version(self, name: str) -> Optional[int]:
        if not self.exists(name):
            return None
        return int(self._delta(name).history(1).collect()[0]["version"])

    def columns(self, name: str) -> list[str]:
        return list(self._delta(name).toDF().columns)

    def history(self, name: str) -> list[dict[str, Any]]:
        rows = self._delta(name).history().select("version", "timestamp", "operation").collect()
        return [r.asDict() for r in rows]

    def read(self, name: str, version: Optional[int] = None) -> "DataFrame":
        if not self.exists(name):
            raise TableNotFoundError(f"table '{name}' does not exist at {self.location(name)}")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        if self.use_catalog:
            return reader.table(self.location(name))
        return reader.load(self.location(name))

    def files(self, name: str, version: Optional[int] = None) -> list[str]:
        df = self.read(name, version)
        found = sorted(df.inputFiles())
        features = self._delta(name).detail().select("tableFeatures").first()
        if found and "deletionVectors" in (features["tableFeatures"] or []):
            # A file with a deletion vector still holds the deleted rows: readers of the
            # raw Parquet (trainers, encode) would resurrect them. Files written only by
            # overwrite/append (every table the pipeline hands to ranks) have none.
            raw = self.spark.read.schema(schemas.spark_schema(name)).parquet(*found).count()
            if raw != df.count():
                raise RuntimeError(
                    f"table '{name}' has rows deleted through deletion vectors; its Parquet files cannot be read "
                    f"directly. Run `REORG TABLE delta.`{self.location(name)}` APPLY (PURGE)` (or rewrite it) first")
        return found

    def rank_files(self, name: str, version: int) -> list[str]:
        """For a catalog table (``catalog.schema.name``, Unity Catalog's managed tables) a
        copy of ``version`` written by Spark as Parquet under
        ``<local_dir>/staged/<name>-v<version>`` (once per version; reused until the table
        changes): ranks cannot open a managed table's cloud files (UC vends credentials
        to Spark, not to processes), and ``local_dir`` is a Volume every node mounts.
        Path tables hand their own files over, as the base class does.

        Cost at 10M users: one Spark write of the table (~the table's size), once per
        ``sequences`` version.
        """
        if not self.use_catalog:
            return self.files(name, version)
        target = self.cfg.work_dir / "staged" / f"{name}-v{version}"
        if not (target / "_SUCCESS").exists():
            self.read(name, version).write.mode("overwrite").parquet(uri.for_spark(str(target)))
        found = sorted(str(p) for p in target.glob("*.parquet"))
        if not found:
            raise RuntimeError(f"staging table '{self.location(name)}' v{version} to {target} wrote no Parquet file")
        return found

    def _write(self, name: str, df: "DataFrame", mode: str) -> int:
        writer = df.write.format("delta").mode(mode)
        if not self.exists(name):
            self._create(name)
        elif mode == "overwrite" and self.columns(name) != schemas.arrow_schema(name).names:
            # A table an older release wrote with another shape: replace its schema (the
            # declared one, enforced by conform()); otherwise keep the table's own schema,
            # whose NOT NULL columns Delta enforces on every write.
            writer = writer.option("overwriteSchema", "true")
        if self.use_catalog:
            writer.saveAsTable(self.location(name))
        else:
            writer.save(self.location(name))
        return self.version(name)

    def _create(self, name: str) -> None:
        """Create the table empty with the declared schema, NOT NULL columns included: a
        DataFrame's own schema is all-nullable, so a table created by the first write
        would accept nulls in required columns."""
        from delta.tables import DeltaTable

        if self.use_catalog:
            # SQL, not DeltaTableBuilder.tableName: open-source Delta's builder parses a
            # two-part identifier only and refuses catalog.schema.name.
            columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}{'' if f.nullable else ' NOT NULL'}"
                                for f in schemas.spark_schema(name).fields)
            self.spark.sql(f"CREATE TABLE IF NOT EXISTS {self.location(name)} ({columns}) USING DELTA")
            return
        DeltaTable.createIfNotExists(self.spark).location(self.location(name)) \
            .addColumns(schemas.spark_schema(name)).execute()

    def _merge(self, name: str, df: "DataFrame", keys: Sequence[str]) -> int:
        condition = " AND ".join(f"t.{k} = s.{k}" for k in keys)
        (
            self._delta(name)
            .alias("t")
            .merge(df.alias("s"), condition)
            .whenMatchedUpdateAll()
            .whenNotMatchedInsertAll()
            .execute()
        )
        return self.version(name)

    def _replace_where(self, name: str, df: "DataFrame", predicate: str) -> int:
        writer = df.write.format("delta").mode("overwrite").option("replaceWhere", predicate)
        if self.use_catalog:
            writer.saveAsTable(self.location(name))
        else:
            writer.save(self.location(name))
        return self.version(name)

    def delete(self, name: str, predicate: str) -> int:
        self._delta(name).delete(predicate)
        return self.version(name)


_AUTO_SAID: dict[Any, str] = {}


def get_table_store(spark: "SparkSession", cfg: Config) -> TableStore:
    """Pick the engine from ``storage.engine`` (``auto``: Spark Delta when available)."""
    from hymirec_udfs.core.spark import delta_jars_available

    engine = cfg.storage.engine
    if engine == "auto":
        engine = "spark" if delta_jars_available(spark) else "delta-rs"
        if _AUTO_SAID.get(cfg.tables_uri) != engine:
            _AUTO_SAID[cfg.tables_uri] = engine
            why = "this Spark JVM has Delta's classes" if engine == "spark" else "no Delta classes in this Spark JVM"
            logging.getLogger(__name__).info("storage.engine=auto: using %s (%s)", engine, why)
    if engine == "spark":
        if not delta_jars_available(spark):
            raise RuntimeError(
                "storage.engine=spark but this Spark JVM has no Delta classes (io.delta.tables.DeltaTable);"
                " add the delta-spark jars to the cluster or use storage.engine=delta-rs"
            )
        return SparkDeltaStore(spark, cfg)
    if cfg.storage.catalog:
        raise RuntimeError("storage.catalog/schema need storage.engine=spark (delta-rs writes paths)")
    return DeltaRsStore(spark, cfg)
