"""The stage API: :class:`StageSpec`, :class:`StageContext`, :class:`StageOutput`.

Each stage is a function ``run(spark, cfg, ctx) -> StageOutput`` in its subpackage's
``stage`` module, named in the registry (:mod:`hymirec_udfs.pipeline`) by string.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from hymirec_udfs.core.config import Config
from hymirec_udfs.core.tables import TableStore
from hymirec_udfs.core.tracking import RunLogger

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage and the original error."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"stage '{stage}' failed: {type(error).__name__}: {error}")
        self.stage = stage
        self.error = error


@dataclass
class StageOutput:
    """What a stage reports back to the runner.

    Attributes:
        rows: row counts worth reporting (table or quantity name -> count).
        summary: anything else for the job summary and MLflow (numbers become metrics).
        outputs: tables written (the runner records their versions).
    """

    rows: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()


@dataclass
class StageContext:
    """Per-run handles given to a stage: table store, MLflow logger, pinned inputs."""

    spark: "SparkSession"
    cfg: Config
    store: TableStore
    run_id: str
    logger: RunLogger
    stage: str
    input_versions: dict[str, int] = field(default_factory=dict)
    #: the stage's :class:`~hymirec_udfs.core.progress.SparkProgress` (set by the runner);
    #: a stage calls ``ctx.progress.expect(n, "items")`` to get units/s in its progress lines
    progress: Any = None

    def expect(self, total: int, unit: str) -> None:
        """Declare what the stage's big Spark job processes (progress lines show units/s)."""
        if self.progress is not None:
            self.progress.expect(total, unit)

    def read(self, name: str) -> "DataFrame":
        """Read an input table pinned to the version current when first read."""
        self.store.require(name, self.stage)
        if name not in self.input_versions:
            self.input_versions[name] = int(self.store.version(name))
        return self.store.read(name, version=self.input_versions[name])


@dataclass(frozen=True)
class StageSpec:
    """A pipeline stage.

    Attributes:
        name: stage name (also the ``job_runs.stage`` value and the job file name).
        target: ``module:function`` implementing ``run(spark, cfg, ctx)``.
        inputs: tables read.
        outputs: tables written.
        config_sections: config sections whose values change the stage's result.
        cli: the ``hymirec`` sub-command.
        fingerprint: optional ``module:function(cfg) -> str`` for inputs that are not
            tables (raw files, the result of an earlier stage recorded in ``job_runs``).
        enabled: optional dotted boolean config key (``stage1.enabled``); while it is
            false the pipeline skips the stage. Running the stage by name ignores it.
        gpu: the stage wants GPU executors (the DAG and the bundle put it on a GPU
            cluster; tests check both against this flag).
        preflight: optional ``module:function(cfg) -> None`` raising a clear error when
            something the stage needs under ``cfg`` is missing from this Python (an
            optional package: the default embedding model's, faiss for ANN). Run before
            any Spark work; the bundle test runs it in a venv holding only what each
            Databricks task installs.
    """

    name: str
    target: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config_sections: tuple[str, ...]
    cli: str
    fingerprint: str = ""
    enabled: str = ""
    gpu: bool = False
    preflight: str = ""

    def check_requirements(self, cfg: Config) -> None:
        """Run :attr:`preflight` (nothing when the stage declares none)."""
        if self.preflight:
            _resolve(self.preflight)(cfg)

    def function(self) -> Callable[..., StageOutput]:
        """Import the stage function (lazily, so the CLI starts fast)."""
        return _resolve(self.target)

    def config_hash(self, cfg: Config) -> str:
        """Hash of the relevant config sections plus the fingerprint of raw inputs."""
        extra = _resolve(self.fingerprint)(cfg) if self.fingerprint else ""
        return cfg.section_hash(*self.config_sections) + (f"-{extra}" if extra else "")

    def disabled_reason(self, cfg: Config) -> Optional[str]:
        """Why the pipeline skips this stage (its ``enabled`` key is false), or None."""
        if not self.enabled:
            return None
        section, key = self.enabled.split(".")
        return None if getattr(getattr(cfg, section), key) else f"{self.enabled} is false"


def _resolve(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)
