"""The stage registry, the stage runner with ``job_runs`` lineage, and the pipeline runner.

:data:`STAGES` is the one stage list: pipeline order, the ``hymirec`` sub-commands, the
spark-submit jobs, the notebooks, the Airflow DAG's tasks and the Databricks bundle's tasks
are all generated from it or tested against it. Stage modules are named here only, as
``module:function`` strings resolved when a stage runs, so nothing else imports them.
:data:`ON_DEMAND` holds stages run by name only (``hymirec ablations``), never by the
pipeline.

The runner gives every stage the same behaviour: an MLflow run (nested under the
pipeline's), input table versions pinned and recorded, a ``job_runs`` row appended on
success and on failure, and -- in the pipeline -- a skip when nothing it depends on changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from hymirec_udfs.core import rundate, schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.lineage import JobRun, backfill_reason, record_job_run, up_to_date
from hymirec_udfs.core.progress import SparkProgress
from hymirec_udfs.core.stage_api import StageContext, StageFailed, StageSpec
from hymirec_udfs.core.tables import TableStore, get_table_store
from hymirec_udfs.core.tracking import mlflow_run

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec(
            "ingest", "hymirec_udfs.ingest.stage:run", (),
            (schemas.ITEMS, schemas.INTERACTIONS, schemas.QUARANTINE),
            ("ingest", "synthetic"), "ingest", fingerprint="hymirec_udfs.ingest.stage:raw_fingerprint",
        ),
        StageSpec(
            "train_content_encoder", "hymirec_udfs.content_encoder.stage:run",
            (schemas.ITEMS, schemas.INTERACTIONS), (), ("embed", "stage1"), "train-content-encoder",
            fingerprint="hymirec_udfs.content_encoder.stage:split_fingerprint", enabled="stage1.enabled",
            gpu=True, preflight="hymirec_udfs.embedding.stage:preflight",
        ),
        StageSpec(
            "embed_items", "hymirec_udfs.embedding.stage:run", (schemas.ITEMS,),
            (schemas.ITEM_EMBEDDINGS,), ("embed",), "embed",
            fingerprint="hymirec_udfs.embedding.stage:encoder_fingerprint", gpu=True,
            preflight="hymirec_udfs.embedding.stage:preflight",
        ),
        StageSpec(
            "fit_codebook", "hymirec_udfs.codebook.stage:run_fit", (schemas.ITEM_EMBEDDINGS,),
            (schemas.CODEBOOKS, schemas.CODEBOOK_HEALTH), ("codebook", "embed"), "fit-codebook",
            fingerprint="hymirec_udfs.core.rundate:fingerprint",
        ),
        StageSpec(
            "encode_items", "hymirec_udfs.codebook.stage:run_encode", (schemas.ITEM_EMBEDDINGS, schemas.CODEBOOKS),
            (schemas.ITEM_CODES,), ("codebook", "embed"), "encode",
        ),
        StageSpec(
            "build_sequences", "hymirec_udfs.sequences.stage:run", (schemas.INTERACTIONS,),
            (schemas.SEQUENCES,), ("sequences",), "build-sequences",
            fingerprint="hymirec_udfs.core.rundate:fingerprint",
        ),
        StageSpec(
            "train", "hymirec_udfs.recommender.stage:run", (schemas.SEQUENCES, schemas.ITEM_EMBEDDINGS),
            (), ("embed", "codebook", "sequences", "model", "dmil", "train"), "train", gpu=True,
        ),
        StageSpec(
            "evaluate", "hymirec_udfs.evaluation.stage:run", (schemas.SEQUENCES, schemas.ITEM_EMBEDDINGS),
            (schemas.EVAL_PER_USER, schemas.EVAL_METRICS),
            ("embed", "codebook", "sequences", "model", "dmil", "train", "evaluate", "registry"), "evaluate",
        ),
        StageSpec(
            "recommend", "hymirec_udfs.recommend.stage:run", (schemas.SEQUENCES, schemas.ITEM_EMBEDDINGS),
            (schemas.USER_INTERESTS, schemas.RECOMMENDATIONS), ("embed", "recommend"), "recommend",
            fingerprint="hymirec_udfs.recommend.stage:as_of_fingerprint",
            preflight="hymirec_udfs.recommend.stage:preflight",
        ),
    ]
}

# Stages run by name only (never by ``pipeline run``).
ON_DEMAND: dict[str, StageSpec] = {
    "ablations": StageSpec(
    "ablations", "hymirec_udfs.ablations.stage:run", (schemas.SEQUENCES, schemas.ITEM_EMBEDDINGS),
    (schemas.EVAL_PER_USER, schemas.EVAL_METRICS),
    ("embed", "codebook", "sequences", "model", "dmil", "train", "evaluate"), "ablations",
),
}
ABLATIONS_SPEC = ON_DEMAND["ablations"]



# Stages a backfill does not run: it reproduces a date with the codebook and the model
# that date used (recommend serves the model job_runs recorded for it).
BACKFILL_SKIPS = ("train_content_encoder", "fit_codebook", "train", "evaluate")


def register_stage(spec: StageSpec) -> None:
    """Add a stage to the registry (pipeline order is registration order)."""
    STAGES[spec.name] = spec


def stage_by_cli(name: str) -> StageSpec:
    """Find a stage (pipeline or on-demand) by its stage or CLI name."""
    for spec in all_stages():
        if name in (spec.name, spec.cli):
            return spec
    raise KeyError(f"unknown stage '{name}'; stages: {[s.name for s in all_stages()]}")


def all_stages() -> list[StageSpec]:
    """Pipeline stages in order, then the on-demand ones (what the CLI offers)."""
    return [*STAGES.values(), *ON_DEMAND.values()]


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
        spark: the session (from :func:`hymirec_udfs.core.spark.get_spark`).
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
    try:
        day = rundate.run_date()
    except rundate.RunDateError as exc:
        raise StageFailed(spec.name, exc) from exc
    if day:
        tags["hymirec.run_date"] = day.isoformat()
    with mlflow_run(cfg, spec.name, nested=nested, tags=tags) as logger:
        ctx = StageContext(spark, cfg, store, run_id, logger, spec.name)
        logger.params(_flatten({s: dataclasses.asdict(getattr(cfg, s)) for s in spec.config_sections}))
        try:
            config_hash = spec.config_hash(cfg)
            logger.tags({"hymirec.config_hash": config_hash})
            # The Spark UI (and its REST API) groups this stage's jobs under its name.
            spark.sparkContext.setJobGroup(f"hymirec:{spec.name}", f"hymirec {spec.name} (run {run_id})")
            spec.check_requirements(cfg)  # a missing optional package fails here, before Spark work
            ctx.progress = SparkProgress(spark, spec.name, cfg.tracking.progress_every_s).start()
            try:
                out = spec.function()(spark, cfg, ctx)
                outputs = {t: int(store.version(t)) for t in (out.outputs or spec.outputs) if store.exists(t)}
                # What each output table holds after the stage, read back from its committed
                # version (Parquet footers, no data scan): the record never rests on the
                # DataFrame the stage meant to write. For merged/dated tables (eval_*,
                # recommendations) it is the whole table, not this run's share.
                committed = {f"committed.{t}": int(store.read(t, version=v).count()) for t, v in outputs.items()}
            finally:
                ctx.progress.stop()
                spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
                spark.sparkContext.setLocalProperty("spark.job.description", None)
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
            job = JobRun(spec.name, run_id, "failed", config_hash, dict(ctx.input_versions), {}, {}, {},
                         time.perf_counter() - t0, logger.run_id,
                         error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"[:8000])
            record_job_run(store, spark, cfg, job, started, pipeline_run_id)
            if isinstance(exc, Exception):
                raise StageFailed(spec.name, exc) from exc
            raise
        rows = dict(out.rows) | committed
        summary = dict(out.summary) | ({"run_date": day.isoformat()} if day else {})
        job = JobRun(spec.name, run_id, "success", config_hash, dict(ctx.input_versions), outputs,
                     rows, summary, time.perf_counter() - t0, logger.run_id)
        logger.tags({f"input_version.{k}": v for k, v in job.input_versions.items()})
        logger.tags({f"output_version.{k}": v for k, v in outputs.items()})
        logger.metrics({f"rows.{k}": v for k, v in job.row_counts.items()})
        logger.metrics({k: v for k, v in _flatten(job.summary).items()})
        logger.metrics({"wall_s": job.wall_s})
        record_job_run(store, spark, cfg, job, started, pipeline_run_id)
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
    backfill = backfill_reason(store)
    with mlflow_run(cfg, "pipeline", tags={"hymirec.pipeline_run_id": pipeline_run_id}) as logger:
        logger.params({"stages": ",".join(selected), "profile": cfg.profile, "force": force})
        for i, name in enumerate(selected, 1):
            spec = STAGES[name]
            disabled = spec.disabled_reason(cfg)
            if disabled:
                echo(f"[{i}/{len(selected)}] {name:<22} skipped: {disabled}")
                results.append(JobRun(name, "", "skipped", "", {}, {}, {}, {"reason": disabled}, 0.0, skipped=True))
                continue
            if backfill and name in BACKFILL_SKIPS:
                echo(f"[{i}/{len(selected)}] {name:<22} skipped: {backfill}")
                results.append(JobRun(name, "", "skipped", "", {}, {}, {}, {"reason": backfill}, 0.0, skipped=True))
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
