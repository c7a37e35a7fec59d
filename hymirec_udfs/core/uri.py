"""Locations as URIs: one place that knows how each engine spells a location.

A location in the configuration is either a local path (``./work``, ``/Volumes/c/s/v``,
``/dbfs/x``, ``file:///x``) or a URI with a scheme (``s3://``, ``s3a://``, ``gs://``,
``abfss://``, ``hdfs://``, ``dbfs:/``). Local paths are made absolute; URIs are never run
through :class:`pathlib.Path` (``Path("s3a://b/x").resolve()`` is a path under the current
directory) and never globbed on the driver's disk.

Each engine names object storage its own way, so every hand-over goes through one of:

* :func:`for_spark` - Hadoop file systems: ``s3://`` becomes ``s3a://`` (the scheme
  ``hadoop-aws`` registers; Databricks accepts it too).
* :func:`for_arrow` - pyarrow / delta-rs / MLflow: ``s3a://`` becomes ``s3://``, ``dbfs:/x``
  the FUSE path ``/dbfs/x``.
* :func:`arrow_fs` - a ``pyarrow.fs`` file system and path for listing, reading footers
  and deleting, for local disk and object storage alike.

Credentials and endpoints come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ...), which delta-rs, pyarrow and boto3 (MLflow) read themselves;
:func:`s3a_conf` maps the endpoint into Hadoop's ``fs.s3a.*`` settings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

#: Schemes whose locations are object storage or a distributed file system (not the
#: driver's disk). ``file`` is local.
REMOTE_SCHEMES = ("s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "wasb", "wasbs", "hdfs", "viewfs", "dbfs")


def scheme(location: str) -> str:
    """The URI scheme in lower case, ``""`` for a plain path (``/x``, ``./x``, ``C:\\x``)."""
    match = _SCHEME.match(str(location))
    if not match or len(match.group(1)) == 1:  # a Windows drive letter is not a scheme
        return ""
    return match.group(1).lower()


def is_remote(location: str) -> bool:
    """Whether ``location`` is not on this machine's file system (object storage, HDFS, DBFS
    by URI). ``/Volumes/...`` and ``/dbfs/...`` are FUSE mounts: local paths."""
    return scheme(location) in REMOTE_SCHEMES  # "mlflow:", "package:" specs are not locations


def normalize(location: str, setting: str = "location") -> str:
    """A location in canonical form: local paths absolute (``~`` expanded, ``file://``
    dropped); URIs kept as written, without a trailing slash.

    Raises:
        ValueError: an empty location or a scheme nothing here can read, naming ``setting``.
    """
    location = str(location).strip()
    if not location:
        raise ValueError(f"{setting} is empty")
    kind = scheme(location)
    if kind == "file":
        location = re.sub(r"^file:(//)?", "", location)
        kind = ""
    if not kind:
        return str(Path(location).expanduser().resolve())
    if kind not in REMOTE_SCHEMES:
        raise ValueError(f"{setting}={location!r}: unknown scheme '{kind}://' (use a path or one of "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    stripped = location.rstrip("/")
    return stripped if not stripped.endswith(":") else stripped + "/"  # keep "dbfs:/"


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for paths and URIs alike."""
    out = str(location).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def local_path(location: str, setting: str) -> Path:
    """The local :class:`Path` of ``location``.

    Raises:
        ValueError: ``location`` is remote; the message names ``setting`` and says what a
            file-system location is needed for.
    """
    if is_remote(location):
        raise ValueError(
            f"{setting}={location!r} must be a file-system path visible to the driver and every executor "
            "(local disk, or a shared mount such as /dbfs/..., /Volumes/... or NFS): what lives there is "
            "written with plain file I/O (torch.save, memory-mapped arrays, model directories)")
    return Path(normalize(location, setting))


def for_spark(location: str) -> str:
    """How Spark (Hadoop) spells ``location``: ``s3://`` and ``s3n://`` become ``s3a://``;
    a DBFS FUSE path ``/dbfs/x`` becomes ``dbfs:/x`` (Databricks' Spark reads a bare
    ``/dbfs/x`` as ``dbfs:/dbfs/x``, where nothing is); ``/Volumes/...`` stays as it is."""
    kind = scheme(location)
    if kind in ("s3", "s3n"):
        return "s3a" + location[len(kind):]
    if kind == "file" or not kind:
        path = normalize(location)
        if path == "/dbfs" or path.startswith("/dbfs/"):
            return "dbfs:/" + path[len("/dbfs/"):]
        return path
    return location


def for_arrow(location: str) -> str:
    """How pyarrow, delta-rs and MLflow spell ``location``: ``s3a://`` becomes ``s3://``,
    ``dbfs:/x`` the FUSE path ``/dbfs/x``, ``file:`` URIs plain paths."""
    kind = scheme(location)
    if kind in ("s3a", "s3n"):
        return "s3" + location[len(kind):]
    if kind == "dbfs":
        return "/dbfs/" + re.sub(r"^dbfs:/*", "", location)
    if kind == "file" or not kind:
        return normalize(location)
    return location


def arrow_fs(location: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for ``location`` (local, s3, gs, hdfs, abfs natively;
    other schemes through fsspec when its implementation is installed).

    Raises:
        ValueError: no file system implementation for the scheme, naming the location.
    """
    import pyarrow.fs as pafs

    uri = for_arrow(location)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa_errors() + (ValueError,)) as arrow_error:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as fsspec_error:
            raise ValueError(f"no file system for {location!r}: pyarrow says {arrow_error}; fsspec says "
                             f"{fsspec_error}") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def pa_errors() -> tuple[type, ...]:
    """Exceptions pyarrow raises for an unsupported URI."""
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowNotImplementedError)


def open_input(location: str) -> Any:
    """A readable file for ``location``: the plain path when local (pyarrow maps it), else
    a ``pyarrow`` random-access file on the object store (Parquet footers and row groups are
    read with range requests, not by downloading the file)."""
    if not is_remote(location):
        return for_arrow(location)
    fs, path = arrow_fs(location)
    return fs.open_input_file(path)


def exists(location: str) -> bool:
    """Whether a file or directory exists at ``location``."""
    import pyarrow.fs as pafs

    fs, path = arrow_fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(location: str, suffix: str = "") -> list[str]:
    """Files directly under the directory ``location`` whose names end in ``suffix``, as
    locations in ``location``'s own spelling (sorted). An absent directory lists nothing."""
    import pyarrow.fs as pafs

    fs, path = arrow_fs(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(location, name) for name in names]


def remove_tree(location: str) -> None:
    """Delete the directory ``location`` and everything under it (absent is fine)."""
    import pyarrow.fs as pafs

    fs, path = arrow_fs(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def publish_dir(local_dir: Path, location: str) -> str:
    """Copy the local directory ``local_dir`` to ``location`` (a no-op when they are the
    same place); returns ``location``. Used for reports under a remote ``paths.reports_dir``."""
    import pyarrow.fs as pafs

    if not is_remote(location) and Path(normalize(location)) == Path(local_dir).resolve():
        return location
    fs, path = arrow_fs(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return location


def s3a_conf(environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Hadoop ``fs.s3a.*`` settings for an S3-compatible endpoint named the standard way
    (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, as boto3, pyarrow and delta-rs read
    it). Empty when no endpoint is set (AWS itself: s3a finds the region and credentials)."""
    env = os.environ if environ is None else environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    conf = {
        "spark.hadoop.fs.s3a.endpoint": endpoint,
        # Self-hosted S3 servers (MinIO, moto, Ceph) serve buckets as paths, not subdomains.
        "spark.hadoop.fs.s3a.path.style.access": "true",
    }
    if endpoint.startswith("http://"):
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = "false"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        conf["spark.hadoop.fs.s3a.endpoint.region"] = region
    return conf
