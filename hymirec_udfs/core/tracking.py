"""MLflow tracking: one run per stage run, nested under a pipeline run.

MLflow's sqlite store lives under ``<local_dir>/mlflow`` by default, artefacts under
``<work_dir>/mlflow/artifacts`` (object storage when the work dir is a URI); on
Databricks the tracking URI is ``databricks``. With ``tracking.enabled: false`` every call
here is a no-op, so stages never branch on tracking.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from hymirec_udfs.core.config import Config
from hymirec_udfs.core.uri import is_remote


class RunLogger:
    """Thin handle over an active MLflow run (or nothing, when tracking is off)."""

    def __init__(self, run_id: Optional[str]) -> None:
        self.run_id = run_id

    @property
    def active(self) -> bool:
        """Whether calls reach MLflow."""
        return self.run_id is not None

    def params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values stringified, truncated to MLflow's limit)."""
        if not self.active:
            return
        import mlflow

        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        """Log numeric metrics; non-numeric values are skipped.

        Logged to this logger's run by id (``MlflowClient.log_batch``), not through the
        fluent API's active run, which is per thread: the training metrics follower calls
        this from its own thread while training runs.
        """
        if not self.active:
            return
        import time

        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [
            Metric(metric_name(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if clean:
            MlflowClient().log_batch(self.run_id, metrics=clean)

    def tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        if not self.active:
            return
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        """Log a file or directory as an artifact."""
        if not self.active:
            return
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(path, artifact_path)
        else:
            mlflow.log_artifact(path, artifact_path)

    def dict(self, data: Mapping[str, Any], name: str) -> None:
        """Log a mapping as a JSON artifact."""
        if not self.active:
            return
        import mlflow

        mlflow.log_dict(json.loads(json.dumps(data, default=str)), name)


def metric_name(name: str) -> str:
    """MLflow-safe metric name (``recall@10`` -> ``recall_at_10``)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name.replace("@", "_at_"))


_SAID_LOCAL_SQLITE: set[str] = set()


def configure_mlflow(cfg: Config) -> None:
    """Point MLflow at the configured store and experiment (creating both if needed)."""
    import mlflow

    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        if is_remote(cfg.work_uri) and cfg.work_uri not in _SAID_LOCAL_SQLITE:
            _SAID_LOCAL_SQLITE.add(cfg.work_uri)
            logging.getLogger(__name__).warning(
                "paths.work_dir is %s but tracking.tracking_uri is empty: MLflow's run metadata goes to the "
                "node-local %s (artefacts to %s). Set tracking.tracking_uri to an MLflow server or 'databricks' "
                "to share runs between machines.", cfg.work_uri, uri, cfg.artifact_root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            # The default store: artefacts under the work dir (object storage too: MLflow
            # writes s3://, gs://, abfss:// itself); runs' metadata in the local sqlite file.
            artifact_location = cfg.artifact_root
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(cfg.tracking.experiment)


@contextlib.contextmanager
def mlflow_run(
    cfg: Config, run_name: str, *, nested: bool = False, tags: Optional[Mapping[str, str]] = None
) -> Iterator[RunLogger]:
    """Start an MLflow run (nested under the active one when ``nested``).

    The run ends FINISHED on success and FAILED when the block raises.
    """
    if not cfg.tracking.enabled:
        yield RunLogger(None)
        return
    import mlflow

    configure_mlflow(cfg)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with mlflow.start_run(run_name=run_name, nested=nested, tags=dict(tags or {})) as run:
        yield RunLogger(run.info.run_id)
