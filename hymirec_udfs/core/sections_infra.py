"""Configuration sections of where the pipeline runs: paths, Spark, table storage, MLflow.

Plain dataclasses, one field per setting with its documentation;
:mod:`hymirec_udfs.core.config` assembles them (with :mod:`.sections_stages`) into
:class:`~hymirec_udfs.core.config.Config` and loads the YAML into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

@dataclass
class PathsConfig:
    """Where state lives. Every location is a path or a URI (``s3://``, ``s3a://``,
    ``gs://``, ``abfss://``, ``hdfs://``, ``dbfs:/``, ``/Volumes/...``); see
    :mod:`hymirec_udfs.core.uri`.

    Attributes:
        work_dir: root of the durable state: tables, reports and MLflow artefacts (a path
            or a URI).
        tables_dir: table root; empty means ``<work_dir>/tables`` (a path or a URI).
        reports_dir: report root; empty means ``<work_dir>/reports`` (a path or a URI;
            reports are written locally first, then copied there).
        checkpoints_dir: training checkpoints; empty means ``<local_dir>/checkpoints``. A
            file-system path (ranks write it with ``torch.save``).
        local_dir: file-system scratch for what needs plain file I/O: checkpoints, the
            memory-mapped item stores and item index, Spark's scratch, stage-1 staging and,
            when ``tracking.tracking_uri`` is empty, MLflow's sqlite file. Empty means
            ``work_dir`` when that is a path, else ``<system temp>/hymirec-<hash of
            work_dir>``. On a multi-node cluster set it to a mount every node sees
            (``/dbfs/...``, ``/Volumes/...``, NFS): the driver and executors exchange
            checkpoints and the item index through it.
    """

    work_dir: str = "./hymirec-work"
    tables_dir: str = ""
    reports_dir: str = ""
    checkpoints_dir: str = ""
    local_dir: str = ""


@dataclass
class SparkConfig:
    """Spark session settings (used only when no session is active).

    Attributes:
        master: master URL for the embedded session.
        app_name: application name.
        conf: extra ``spark.*`` settings.
    """

    master: str = "local[*]"
    app_name: str = "hymirec"
    conf: dict[str, str] = field(default_factory=dict)


@dataclass
class StorageConfig:
    """Table storage.

    Attributes:
        engine: ``auto`` (Spark Delta when the JVM has it, else delta-rs), ``spark`` or
            ``delta-rs``.
        catalog: Unity Catalog / metastore catalog; with ``schema`` set, tables are
            ``catalog.schema.name`` (Spark engine only) instead of paths.
        schema: metastore schema (database).
        options: delta-rs storage options (``AWS_S3_LOCKING_PROVIDER: dynamodb``, ...),
            on top of the environment (``AWS_*``, ``AZURE_*``, ``GOOGLE_*``), which delta-rs
            reads itself. On S3 delta-rs needs a locking provider for concurrent writers,
            or ``AWS_S3_ALLOW_UNSAFE_RENAME: "true"`` when this pipeline is the tables' only
            writer.
    """

    engine: str = "auto"
    catalog: str = ""
    schema: str = ""
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    """MLflow tracking.

    Attributes:
        enabled: log runs to MLflow.
        tracking_uri: empty means a sqlite file under ``<local_dir>/mlflow`` with artefacts
            under ``<work_dir>/mlflow/artifacts``. With a remote ``work_dir`` that sqlite
            file is node-local: set an MLflow server or ``databricks`` here to share runs.
        experiment: experiment name or workspace path.
        progress_every_s: seconds between progress lines of a running stage (Spark tasks
            done, ETA, items/s or users/s; training step, loss, samples/s) and between
            pushes of training metrics to MLflow (0: no progress lines, metrics sent when
            training ends).
    """

    enabled: bool = True
    tracking_uri: str = ""
    experiment: str = "hymirec"
    progress_every_s: float = 30.0
