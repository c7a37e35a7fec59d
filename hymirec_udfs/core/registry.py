"""The MLflow model registry: registered versions and the ``challenger`` / ``champion``
aliases (MLflow's own registry; a ``catalog.schema.name`` on Unity Catalog).

Evaluation registers the trained model (``runs:/<train run>/model``) once per training run,
points ``challenger`` at it and moves ``champion`` when the promotion gate says so;
``recommend`` serves ``models:/<name>@champion``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hymirec_udfs.core.config import Config

CHALLENGER = "challenger"
CHAMPION = "champion"


class RegistryError(RuntimeError):
    """The registry cannot answer (no tracking, no such alias, ...)."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version."""

    name: str
    version: str
    run_id: str


def _client(cfg: Config):
    from mlflow import MlflowClient

    from hymirec_udfs.core.tracking import configure_mlflow

    if not cfg.tracking.enabled:
        raise RegistryError("the model registry needs MLflow: tracking.enabled is false "
                            "(set it true, or registry.enabled=false and recommend.model_run_id)")
    configure_mlflow(cfg)
    return MlflowClient()


def register(cfg: Config, run_id: str, artifact_path: str = "model") -> ModelVersion:
    """The registered version of ``runs:/<run_id>/<artifact_path>``: the existing one when
    this run was registered before (a re-run of evaluate), else a new version."""
    import mlflow

    client = _client(cfg)
    name = cfg.registry.model_name
    for found in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return ModelVersion(name, str(found.version), run_id)
    created = mlflow.register_model(f"runs:/{run_id}/{artifact_path}", name)
    return ModelVersion(name, str(created.version), run_id)


def set_alias(cfg: Config, alias: str, version: ModelVersion) -> None:
    """Point ``alias`` at ``version``."""
    _client(cfg).set_registered_model_alias(version.name, alias, version.version)


def run_tag_values(cfg: Config, tag: str) -> set[str]:
    """The values of run tag ``tag`` over the runs of every registered version of the model
    (versions deleted from the registry no longer count). One ``get_run`` per version:
    hundreds of calls for a model registered daily for a year."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.registry.model_name
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return set()
        raise
    values = set()
    for version in found:
        if version.run_id:
            value = client.get_run(version.run_id).data.tags.get(tag)
            if value:
                values.add(value)
    return values


def by_alias(cfg: Config, alias: str) -> Optional[ModelVersion]:
    """The version ``alias`` points at; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.registry.model_name
    try:
        found = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # Only "no such model / alias" means none: a locked store or a server error must not
        # read as "no champion" (the gate would then promote without comparing).
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return ModelVersion(name, str(found.version), found.run_id)


def require_alias(cfg: Config, alias: str) -> ModelVersion:
    """:func:`by_alias`, failing clearly when there is none."""
    found = by_alias(cfg, alias)
    if found is None:
        raise RegistryError(
            f"registered model '{cfg.registry.model_name}' has no '{alias}' alias (at {cfg.tracking_uri}): run "
            "evaluate, which registers the trained model and promotes the first one, or name a model with "
            "recommend.model_run_id")
    return found
