"""Typed, layered configuration.

``conf/base.yaml`` holds every default; a profile (``local``, ``cluster``,
``databricks``, ...) overrides part of it; ``--set a.b=c`` on the command line is applied
last. The merged mapping is converted into the dataclasses below, and any unknown key,
wrong type or missing file fails at load time with the key and the file named.

One concern: the configuration's shape and its loading. The sections (one dataclass each,
every field documented) live in :mod:`.sections_infra` (where it runs) and
:mod:`.sections_stages` (what each stage computes); this module assembles them into
:class:`Config`, merges the YAML layers and validates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from hymirec_udfs.core import uri
from hymirec_udfs.core.choices import CONFIG_CHOICES
from hymirec_udfs.core.sections_infra import (  # noqa: F401 - re-exported: the config's public names
    PathsConfig, SparkConfig, StorageConfig, TrackingConfig,
)
from hymirec_udfs.core.sections_stages import (  # noqa: F401 - re-exported
    IngestConfig, SyntheticConfig, EmbedConfig, CodebookConfig, SequencesConfig, ModelConfig, DmilConfig,
    TrainConfig, EvaluateConfig, RegistryConfig, RecommendConfig, Stage1Config,
)


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names which."""


@dataclass
class Config:
    """The whole resolved configuration."""

    profile: str = "base"
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    sequences: SequencesConfig = field(default_factory=SequencesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dmil: DmilConfig = field(default_factory=DmilConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)

    # Derived locations ---------------------------------------------------------------
    @property
    def work_uri(self) -> str:
        """The durable root (an absolute path or a URI)."""
        return uri.normalize(self.paths.work_dir, "paths.work_dir")

    @property
    def tables_uri(self) -> str:
        """The table root (an absolute path or a URI)."""
        if self.paths.tables_dir:
            return uri.normalize(self.paths.tables_dir, "paths.tables_dir")
        return uri.join(self.work_uri, "tables")

    @property
    def reports_uri(self) -> str:
        """Where reports are published (an absolute path or a URI)."""
        if self.paths.reports_dir:
            return uri.normalize(self.paths.reports_dir, "paths.reports_dir")
        return uri.join(self.work_uri, "reports")

    @property
    def work_dir(self) -> Path:
        """The local (file-system) work directory: ``paths.local_dir``, else ``work_dir``
        when it is a path, else a directory under the system temp named by its hash."""
        if self.paths.local_dir:
            return uri.local_path(self.paths.local_dir, "paths.local_dir")
        work = self.work_uri
        if not uri.is_remote(work):
            return Path(work)
        import tempfile

        return Path(tempfile.gettempdir()) / f"hymirec-{hashlib.sha256(work.encode()).hexdigest()[:12]}"

    @property
    def reports_dir(self) -> Path:
        """Local directory reports are written to (the report root itself when it is a
        path; otherwise ``<local_dir>/reports``, copied to :attr:`reports_uri`)."""
        published = self.reports_uri
        return Path(published) if not uri.is_remote(published) else self.work_dir / "reports"

    @property
    def checkpoints_dir(self) -> Path:
        """Absolute checkpoint root (a file-system path)."""
        if self.paths.checkpoints_dir:
            return uri.local_path(self.paths.checkpoints_dir, "paths.checkpoints_dir")
        return self.work_dir / "checkpoints"

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI (sqlite under the local work dir by default)."""
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{self.work_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        """Where a new MLflow experiment keeps artefacts when the tracking store is the
        default sqlite file: ``<work_dir>/mlflow/artifacts`` as MLflow spells it."""
        root = uri.join(self.work_uri, "mlflow", "artifacts")
        return uri.for_arrow(root) if uri.is_remote(root) else Path(root).as_uri()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested mapping of the resolved configuration."""
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (the whole config when none)."""
        data = self.to_dict()
        picked = {name: data[name] for name in sections} if sections else data
        picked.pop("profile", None)
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_conf_dir() -> Any:
    """The directory holding ``base.yaml`` and the profiles.

    ``HYMIREC_CONF_DIR`` wins; otherwise the ``conf/`` shipped with the package (the
    repository's ``conf/`` in a source checkout, a copy inside the wheel otherwise). The
    packaged copy is read through ``importlib.resources``, so it also works when the wheel
    is shipped zipped with ``spark-submit --py-files``.
    """
    env = os.environ.get("HYMIREC_CONF_DIR")
    if env:
        return Path(env)
    from importlib.resources import files

    try:
        return files("hymirec_udfs.conf")  # conf/ is mapped into the package by setup.py
    except ModuleNotFoundError:
        # A checkout that was never installed (PYTHONPATH=. on a GPU box): its own conf/.
        checkout = Path(__file__).resolve().parents[2] / "conf"
        if checkout.is_dir():
            return checkout
        raise


def load_config(
    profiles: Union[str, Sequence[str], None] = None,
    overrides: Sequence[str] = (),
    conf_dir: Union[str, Path, None] = None,
) -> Config:
    """Load ``base.yaml``, then each profile in order, then ``--set`` overrides.

    Args:
        profiles: profile names (``conf/<name>.yaml``) or YAML file paths, applied in
            order; a comma-separated string is split.
        overrides: ``a.b=c`` strings; values are parsed as YAML scalars/lists.
        conf_dir: directory of the YAML files (default :func:`default_conf_dir`).

    Returns:
        The typed configuration.

    Raises:
        ConfigError: a missing file, an unknown key or a wrongly typed value; the
            message names the key and the file (or ``--set``).
    """
    conf_root = Path(conf_dir) if conf_dir else default_conf_dir()
    if isinstance(profiles, str):
        profiles = [p for p in profiles.split(",") if p.strip()]
    profiles = list(profiles or [])

    base_file = conf_root / "base.yaml"
    layers: list[tuple[str, dict]] = [(str(base_file), _read_yaml(base_file))]
    for name in profiles:
        path = Path(name) if name.endswith((".yaml", ".yml")) else conf_root / f"{name}.yaml"
        layers.append((str(path), _read_yaml(path)))
    if overrides:
        layers.append(("--set", _parse_overrides(overrides)))

    cfg = Config()
    for source, data in layers:
        _apply(cfg, data, source, prefix="")
    cfg.profile = ",".join(profiles) if profiles else "base"
    _validate(cfg)
    return cfg


def _read_yaml(path: Any) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _parse_overrides(overrides: Sequence[str]) -> dict:
    root: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set twice with different shapes")
        node[parts[-1]] = value
    return root


def _apply(obj: Any, data: dict, source: str, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
        hint = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            _apply(current, value, source, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hint, dotted, source))


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    raise ConfigError(f"{source}: '{key}' has an unsupported type {hint}")




def _validate(cfg: Config) -> None:
    for dotted, choice in CONFIG_CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        allowed = choice.values()
        if value not in allowed:
            raise ConfigError(f"'{dotted}' must be one of {allowed}, got {value!r}")
    if not cfg.codebook.ks or any(k < 1 for k in cfg.codebook.ks):
        raise ConfigError(f"'codebook.ks' must be a non-empty list of positive ints, got {cfg.codebook.ks}")
    for dotted in ("sequences.recent_window", "sequences.window_targets", "sequences.stride",
                   "model.interests", "train.batch_size", "train.num_processes"):
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"'{dotted}' must be >= 1")
    for dotted in ("evaluate.max_users", "train.max_steps", "stage1.max_steps", "sequences.max_samples_per_user",
                   "sequences.cuts_per_epoch"):
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"'{dotted}' must be >= 0 (0: no limit)")
    # Also refused where a model is built from a ModelConfig directly (library use); here it
    # fails before any stage has run.
    if cfg.model.item_id_trained_only and cfg.model.item_adapter != "mlp_id":
        raise ConfigError(f"'model.item_id_trained_only' needs 'model.item_adapter=mlp_id', "
                          f"got {cfg.model.item_adapter!r}")


def dump_config(cfg: Config) -> str:
    """The resolved configuration as YAML (what ``hymirec config show`` prints)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
