"""Stage registry, the stage runner with ``job_runs`` lineage, and the pipeline runner.

Each stage is a function ``run(spark, cfg, ctx) -> StageOutput`` in its own module. The
runner around it gives every stage the same behaviour: an MLflow run (nested under the
pipeline's), input table versions pinned and recorded, a ``job_runs`` row appended on
success and on failure, and — in the pipeline — a skip when nothing it depends on changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from hymirec_udfs import schemas
from hymirec_udfs.config import Config
from hymirec_udfs.tables import TableStore, get_table_store
from hymirec_udfs.tracking import RunLogger, mlflow_run

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
    """

    name: str
    target: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config_sections: tuple[str, ...]
    cli: str
    fingerprint: str = ""
    enabled: str = ""

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


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec(
            "ingest", "hymirec_udfs.ingest:run", (),
            (schemas.ITEMS, schemas.INTERACTIONS, schemas.QUARANTINE),
            ("ingest", "synthetic"), "ingest", fingerprint="hymirec_udfs.ingest:raw_fingerprint",
        ),
        StageSpec(
            "train_content_encoder", "hymirec_udfs.content_encoder_training:run",
            (schemas.ITEMS, schemas.INTERACTIONS), (), ("embed", "stage1"), "train-content-encoder",
            fingerprint="hymirec_udfs.content_encoder_training:split_fingerprint", enabled="stage1.enabled",
        ),
        StageSpec(
            "embed_items", "hymirec_udfs.embed_items:run", (schemas.ITEMS,),
            (schemas.ITEM_EMBEDDINGS,), ("embed",), "embed",
            fingerprint="hymirec_udfs.embed_items:encoder_fingerprint",
        ),
        StageSpec(
            "fit_codebook", "hymirec_udfs.codebook_stages:run_fit", (schemas.ITEM_EMBEDDINGS,),
            (schemas.CODEBOOKS,), ("codebook", "embed"), "fit-codebook",
        ),
        StageSpec(
            "encode_items", "hymirec_udfs.codebook_stages:run_encode", (schemas.ITEM_EMBEDDINGS, schemas.CODEBOOKS),
            (schemas.ITEM_CODES,), ("codebook", "embed"), "encode",
        ),
        StageSpec(
            "build_sequences", "hymirec_udfs.sequences:run", (schemas.INTERACTIONS,),
            (schemas.SEQUENCES,), ("sequences",), "build-sequences",
        ),
        StageSpec(
            "train", "hymirec_udfs.train_stage:run", (schemas.SEQUENCES, schemas.ITEM_EMBEDDINGS),
            (), ("embed", "codebook", "sequences", "model", "dmil", "train"), "train",
        ),
        StageSpec(
            "evaluate", "hymirec_udfs.evaluation:run", (schemas.SEQUENCES, schemas.ITEM_EMBEDDINGS),
            (schemas.EVAL_PER_USER, schemas.EVAL_METRICS),
            ("embed", "codebook", "sequences", "model", "dmil", "train", "evaluate"), "evaluate",
        ),
    ]
}


def register_stage(spec: StageSpec) -> None:
    """Add a stage to the registry (pipeline order is registration order)."""
    STAGES[spec.name] = spec


def stage_by_cli(name: str) -> StageSpec:
    """Find a stage by its stage or CLI name."""
    for spec in STAGES.values():
        if name in (spec.name, spec.cli):
            return spec
    raise KeyError(f"unknown stage '{name}'; stages: {[s.name for s in STAGES.values()]}")


@dataclass
class JobRun:
    """One row of ``job_runs`` (plus whether the pipeline skipped the stage)."""

    stage: str
    run_id: str
    status: str
    config_hash: str
    input_versions: dict[str, int]
    output_versions: dict[str, int]
    row_counts: dict[str, int]
    summary: dict[str, Any]
    wall_s: float
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    skipped: bool = False


def _record(store: TableStore, spark: "SparkSession", cfg: Config, job: JobRun, started: dt.datetime,
            pipeline_run_id: Optional[str]) -> None:
    row = {
        "stage": job.stage,
        "run_id": job.run_id,
        "pipeline_run_id": pipeline_run_id,
        "mlflow_run_id": job.mlflow_run_id,
        "profile": cfg.profile,
        "config_hash": job.config_hash,
        "status": job.status,
        "input_versions": job.input_versions,
        "output_versions": job.output_versions,
        "row_counts": job.row_counts,
        "summary": json.dumps(job.summary, default=str, sort_keys=True),
        "error": job.error,
        "started_at": started,
        "wall_s": job.wall_s,
    }
    store.append(schemas.JOB_RUNS, spark.createDataFrame([row], schemas.spark_schema(schemas.JOB_RUNS)))


def run_stage(
    spark: "SparkSession",
    cfg: Config,
    name: "str | StageSpec",
    *,
    store: Optional[TableStore] = None,
    pipeline_run_id: Optional[str] = None,
    nested: bool = False,
) -> JobRun:
    """Run one stage with lineage and tracking.

    Args:
        spark: the session (from :func:`hymirec_udfs.spark.get_spark`).
        cfg: resolved configuration.
        name: stage name or CLI name, or a spec outside the pipeline (e.g. ablations).
        store: table store (default: from config).
        pipeline_run_id: id of the enclosing pipeline run, recorded in ``job_runs``.
        nested: nest the MLflow run under the active one.

    Returns:
        The ``job_runs`` record.

    Raises:
        StageFailed: the stage raised (its ``job_runs`` row says ``failed``).
    """
    spec = name if isinstance(name, StageSpec) else stage_by_cli(name)
    store = store or get_table_store(spark, cfg)
    run_id = uuid.uuid4().hex[:12]
    config_hash = "unknown"
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    tags = {"hymirec.stage": spec.name, "hymirec.run_id": run_id, "hymirec.profile": cfg.profile}
    if pipeline_run_id:
        tags["hymirec.pipeline_run_id"] = pipeline_run_id
    with mlflow_run(cfg, spec.name, nested=nested, tags=tags) as logger:
        ctx = StageContext(spark, cfg, store, run_id, logger, spec.name)
        logger.params(_flatten({s: dataclasses.asdict(getattr(cfg, s)) for s in spec.config_sections}))
        try:
            config_hash = spec.config_hash(cfg)
            logger.tags({"hymirec.config_hash": config_hash})
            out = spec.function()(spark, cfg, ctx)
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
            job = JobRun(spec.name, run_id, "failed", config_hash, dict(ctx.input_versions), {}, {}, {},
                         time.perf_counter() - t0, logger.run_id,
                         error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"[:8000])
            _record(store, spark, cfg, job, started, pipeline_run_id)
            if isinstance(exc, Exception):
                raise StageFailed(spec.name, exc) from exc
            raise
        outputs = {t: int(store.version(t)) for t in (out.outputs or spec.outputs) if store.exists(t)}
        job = JobRun(spec.name, run_id, "success", config_hash, dict(ctx.input_versions), outputs,
                     dict(out.rows), dict(out.summary), time.perf_counter() - t0, logger.run_id)
        logger.tags({f"input_version.{k}": v for k, v in job.input_versions.items()})
        logger.tags({f"output_version.{k}": v for k, v in outputs.items()})
        logger.metrics({f"rows.{k}": v for k, v in job.row_counts.items()})
        logger.metrics({k: v for k, v in _flatten(job.summary).items()})
        logger.metrics({"wall_s": job.wall_s})
        _record(store, spark, cfg, job, started, pipeline_run_id)
    return job


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def last_success(store: TableStore, stage: str) -> Optional[dict[str, Any]]:
    """The latest successful ``job_runs`` row of ``stage`` (None when there is none)."""
    if not store.exists(schemas.JOB_RUNS):
        return None
    from pyspark.sql import functions as F

    rows = (
        store.read(schemas.JOB_RUNS)
        .where((F.col("stage") == stage) & (F.col("status") == "success"))
        .orderBy(F.col("started_at").desc())
        .limit(1)
        .collect()
    )
    return rows[0].asDict(recursive=True) if rows else None


def up_to_date(store: TableStore, cfg: Config, spec: StageSpec) -> Optional[str]:
    """Why ``spec`` can be skipped, or None when it must run.

    A stage is up to date when its last successful run had the same config hash, read
    the same versions of its input tables that are current now, and its output tables
    are still at the versions it wrote.
    """
    last = last_success(store, spec.name)
    if last is None:
        return None
    if last["config_hash"] != spec.config_hash(cfg):
        return None
    for table, version in (last["input_versions"] or {}).items():
        if store.version(table) != version:
            return None
    for table in spec.inputs:
        if table not in (last["input_versions"] or {}):
            return None
    for table, version in (last["output_versions"] or {}).items():
        if store.version(table) != version:
            return None
    return f"unchanged since run {last['run_id']} ({last['started_at']:%Y-%m-%d %H:%M:%S})"


def run_pipeline(
    spark: "SparkSession",
    cfg: Config,
    *,
    from_stage: Optional[str] = None,
    to_stage: Optional[str] = None,
    force: bool = False,
    stages: Optional[Sequence[str]] = None,
    echo: Callable[[str], None] = print,
) -> list[JobRun]:
    """Run the stages in order in one session, skipping the ones that are up to date.

    Args:
        spark: the session.
        cfg: resolved configuration.
        from_stage: first stage to consider (name or CLI name).
        to_stage: last stage to consider.
        force: run every selected stage even when up to date.
        stages: explicit stage list (overrides from/to).
        echo: where progress lines go.

    Returns:
        One record per stage (skipped ones flagged).

    Raises:
        StageFailed: the first failing stage; later stages do not run. A re-run resumes
            there, because the stages before it are up to date.
    """
    names = [s.name for s in STAGES.values()]
    if stages:
        selected = [stage_by_cli(s).name for s in stages]
    else:
        lo = names.index(stage_by_cli(from_stage).name) if from_stage else 0
        hi = names.index(stage_by_cli(to_stage).name) if to_stage else len(names) - 1
        selected = names[lo : hi + 1]
    store = get_table_store(spark, cfg)
    pipeline_run_id = uuid.uuid4().hex[:12]
    results: list[JobRun] = []
    with mlflow_run(cfg, "pipeline", tags={"hymirec.pipeline_run_id": pipeline_run_id}) as logger:
        logger.params({"stages": ",".join(selected), "profile": cfg.profile, "force": force})
        for i, name in enumerate(selected, 1):
            spec = STAGES[name]
            disabled = spec.disabled_reason(cfg)
            if disabled:
                echo(f"[{i}/{len(selected)}] {name:<22} skipped: {disabled}")
                results.append(JobRun(name, "", "skipped", "", {}, {}, {}, {"reason": disabled}, 0.0, skipped=True))
                continue
            try:
                reason = None if force else up_to_date(store, cfg, spec)
            except Exception as exc:  # noqa: BLE001 - e.g. a raw input file is missing
                echo(f"[{i}/{len(selected)}] {name:<22} FAILED: {exc}")
                raise StageFailed(name, exc) from exc
            if reason:
                echo(f"[{i}/{len(selected)}] {name:<22} skipped: {reason}")
                results.append(JobRun(name, "", "skipped", spec.config_hash(cfg), {}, {}, {}, {}, 0.0, skipped=True))
                continue
            echo(f"[{i}/{len(selected)}] {name:<22} running ...")
            try:
                job = run_stage(spark, cfg, name, store=store, pipeline_run_id=pipeline_run_id, nested=True)
            except StageFailed as exc:
                echo(f"[{i}/{len(selected)}] {name:<22} FAILED: {exc.error}")
                logger.tags({"hymirec.failed_stage": name})
                raise
            rows = ", ".join(f"{k}={v:,}" for k, v in job.row_counts.items())
            echo(f"[{i}/{len(selected)}] {name:<22} done in {job.wall_s:6.1f}s  {rows}")
            results.append(job)
    return results
