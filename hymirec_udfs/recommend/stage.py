"""Stage ``recommend``: ``user_interests`` and ``recommendations`` for one as-of date.

For every user of ``sequences`` (the whole history, no hold-out) the served model's
interests are computed from the user's most recent ``max_long`` / ``recent_window`` items,
and the top-K items are retrieved from **today's item index** -- the current catalog's
content embeddings through the model's item tower (:meth:`HyMiRec.ranking_vectors`), so
items embedded after the model was trained are recommended too (cold-start lane).

The driver builds the item index once (a memory-mapped float32 ``vectors.npy`` beside the
catalog's item ids, plus ``ann.faiss`` for ``retrieval=ann``) under
``<work_dir>/item_index/<key>``, streamed a chunk at a time; executors map it and score
their users (``mapInPandas``), one model per Python worker. Both tables are replaced for
the run's as-of date only (``replace_where``), so a re-run of a date is idempotent and
other dates stay.

Costs at 10M items x 2048-d and 100M users: the index is 82 GB of float32 written once
per run and mapped by each executor; scoring is U x N x D x s multiply-adds (exact) or
``nprobe / nlist`` of that (ANN); the outputs are U x s vectors and U x K rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator


from hymirec_udfs.core import rundate, schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput
from hymirec_udfs.recommend.serving import _worker, score_batch, write_item_index

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import SparkSession

    from hymirec_udfs.evaluation.offline import LoadedModel

# Catalog rows turned into ranking vectors per model call while the index is written.


class RecommendError(ValueError):
    """The recommend stage cannot serve (no model, a model that cannot rank new items,
    bad settings)."""


def preflight(cfg: Config) -> None:
    """``recommend.retrieval=ann`` needs faiss (the hymirec[ann] extra): fail before any
    Spark work, naming it."""
    if cfg.recommend.retrieval != "ann":
        return
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        raise ModuleNotFoundError("recommend.retrieval=ann needs faiss, which is not installed: pip install "
                                  "faiss-cpu (the hymirec[ann] extra; faiss-gpu on GPU nodes), or use retrieval=exact")


def as_of_date() -> dt.date:
    """The run's as-of date: ``--run-date`` / the notebook widget, else today (UTC)."""
    try:
        return rundate.as_of_date()
    except rundate.RunDateError as exc:
        raise RecommendError(str(exc)) from None


def as_of_fingerprint(cfg: Config) -> str:
    """Skip-check key: the as-of date and the model served (a new date, a retrained model
    or a promoted champion makes the stage run again)."""
    from pyspark.sql import SparkSession

    from hymirec_udfs.core.tables import get_table_store

    spark = SparkSession.getActiveSession()
    model = cfg.recommend.model_run_id
    if not model and _serves_champion(cfg):
        from hymirec_udfs.core import registry

        champion = registry.by_alias(cfg, registry.CHAMPION)
        model = f"{champion.name}@{champion.version}" if champion else "no-champion"
    elif not model and spark is not None:
        from hymirec_udfs.core.lineage import last_success

        last = last_success(get_table_store(spark, cfg), "train")
        model = last["run_id"] if last is not None else ""
    return f"{as_of_date().isoformat()}-{model}"


def _serves_champion(cfg: Config) -> bool:
    return not cfg.recommend.model_run_id and cfg.registry.enabled and cfg.tracking.enabled


@dataclass(frozen=True)
class Served:
    """The model ``recommend`` serves: its checkpoint, the version recorded in the tables
    (the registered version, else the MLflow run id), the registered name (empty when not
    from the registry) and the MLflow run that trained it."""

    checkpoint: str
    version: str
    registered_name: str
    run_id: str


def served_model(ctx: StageContext, cfg: Config) -> Served:
    """The model to serve: ``recommend.model_run_id``; else ``models:/<registry.model_name>@champion``
    (``registry.enabled`` with tracking on); else the latest successful ``train`` run.

    Raises:
        RecommendError: no such run, no champion alias, or no successful train run, each
            naming the setting to use.
    """
    import dataclasses

    from hymirec_udfs.artifacts import trained_model
    from hymirec_udfs.core import registry
    from hymirec_udfs.core.lineage import backfill_reason, recorded_serving
    from hymirec_udfs.evaluation.offline import EvaluationError

    run_id, name, version = cfg.recommend.model_run_id, "", ""
    day = rundate.run_date()
    recorded = (recorded_serving(ctx.store, day.isoformat())
                if day and not run_id and backfill_reason(ctx.store) else None)
    if recorded:
        # a backfill serves the model this date was served with, not today's champion
        run_id, version = recorded["model_run_id"], recorded.get("model_version", "")
        name = recorded.get("model_name", "") if recorded.get("model_name") == cfg.registry.model_name else ""
    elif _serves_champion(cfg):
        try:
            champion = registry.require_alias(cfg, registry.CHAMPION)
        except registry.RegistryError as exc:
            raise RecommendError(str(exc)) from None
        run_id, name, version = champion.run_id, champion.name, champion.version
    settings = cfg
    if run_id:
        settings = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, model_run_id=run_id))
    try:
        checkpoint, trained_run = trained_model(ctx, settings)
    except EvaluationError as exc:
        raise RecommendError(str(exc).replace("evaluate.model_run_id", "recommend.model_run_id")) from None
    return Served(checkpoint, version or trained_run, name, trained_run)


def _history_store(ctx: StageContext, cfg: Config, loaded: "LoadedModel", codebook_version: str,
                   day: dt.date) -> tuple[str, str]:
    """(item store path or '', what the histories are read with) for the served model.

    Histories are read with the catalog as of ``day`` (removed items included: their past
    interactions still count) encoded with the codebook version the model was trained
    on, so items added since training (encoded daily with the pinned codebook) are known
    to it, and a backfill of ``day`` reads the same items it read then. When that version
    does not cover the catalog (a refit since, and the items were only encoded with the new
    version) or the model has per-item parameters, the model's own item store is used:
    codes of another version are never mixed in.
    """
    from hymirec_udfs.artifacts import build_item_store
    from hymirec_udfs.codebook.spark import CodebookStageError
    from hymirec_udfs.recommender.data import TrainStageError

    if not codebook_version:
        return "", "the model's own item store (no codebook)"
    if loaded.model_config.get("item_adapter") == "mlp_id":
        return "", "the model's own item store (per-item parameters)"
    if not ctx.store.exists(schemas.ITEM_CODES):
        return "", "the model's own item store (no item_codes)"
    try:
        store = build_item_store(ctx, cfg, codebook_version=codebook_version, live_on=day, keep_removed=True)
    except (TrainStageError, CodebookStageError) as exc:
        return "", f"the model's own item store (today's catalog on {codebook_version}: {exc})"
    return store.path, f"today's catalog on codebook {codebook_version}"


SCORED_SCHEMA = (
    "user_id string, interests array<array<float>>, items array<string>, scores array<float>, which array<int>,"
    " unknown_history int, skipped boolean"
)


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Interests and top-K recommendations of every user, for the run's as-of date."""
    from pyspark.sql import functions as F

    from hymirec_udfs.artifacts import build_item_store
    from hymirec_udfs.evaluation.offline import LoadedModel

    rc = cfg.recommend
    if rc.top_k < 1:
        raise RecommendError(f"recommend.top_k must be >= 1, got {rc.top_k}")
    if rc.batch_users < 1:
        raise RecommendError(f"recommend.batch_users must be >= 1, got {rc.batch_users}")
    t0 = time.perf_counter()
    day = as_of_date()
    model_served = served_model(ctx, cfg)
    version = model_served.version
    loaded = LoadedModel(model_served.checkpoint)
    model_name = model_served.registered_name or str(getattr(loaded.model, "model_type", "hymirec"))
    if not hasattr(loaded.model, "ranking_vectors"):
        raise RecommendError(f"recommend serves content models (hymirec, hllm); the served model {version} is a "
                             f"{model_name!r}, which cannot score items it was not trained on")
    codebook_version = str(loaded.store.meta.get("codebook_version", ""))
    history_store, history_note = _history_store(ctx, cfg, loaded, codebook_version, day)
    if history_store:
        loaded = LoadedModel(model_served.checkpoint, history_store)
    # today's live catalog: items added by the as-of date and not removed (removed items
    # are never recommended; their past interactions still feed the histories)
    catalog = build_item_store(ctx, cfg, embeddings_only=True, live_on=day)
    key = hashlib.sha256(json.dumps([model_served.run_id, catalog.path, rc.retrieval, rc.ann_nlist, rc.ann_nprobe],
                                    sort_keys=True).encode()).hexdigest()[:16]
    t_index = time.perf_counter()
    index_dir = write_item_index(loaded, catalog, cfg.work_dir / "item_index" / key, retrieval=rc.retrieval,
                                 nlist=rc.ann_nlist, nprobe=rc.ann_nprobe,
                                 meta={"model_version": version, "model_name": model_name,
                                       "codebook_version": codebook_version, "catalog": catalog.path,
                                       "as_of_date": day.isoformat()})
    index_s = time.perf_counter() - t_index
    # The versioned item index for online ANN serving of user_interests, logged with the run
    # that records the model version: the id map and meta, and the faiss index (retrieval=ann;
    # the exact index's vectors.npy, N x D floats, stays on disk).
    for name in ("meta.json", "item_ids.arrow", "ann.faiss"):
        if (index_dir / name).is_file():
            ctx.logger.artifact(str(index_dir / name), f"item_index/{day.isoformat()}")

    snapshot = dict(cfg=cfg, checkpoint=model_served.checkpoint, index_dir=str(index_dir), store=history_store)

    def per_batch(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        loaded_w, index = _worker(snapshot["checkpoint"], snapshot["index_dir"], rc.ann_nprobe, snapshot["store"])
        for batch in batches:
            if len(batch):
                yield score_batch(loaded_w, index, batch[schemas.USER_ID].tolist(),
                                  [list(h) for h in batch[schemas.ITEM_IDS]], snapshot["cfg"])

    parts = max(2, spark.sparkContext.defaultParallelism)
    users = ctx.read(schemas.SEQUENCES).select(schemas.USER_ID, schemas.ITEM_IDS)
    scored = users.repartition(parts).mapInPandas(per_batch, SCORED_SCHEMA).persist()
    try:
        totals = scored.agg(F.count("*").alias("users"), F.sum(F.col("skipped").cast("int")).alias("skipped"),
                            F.sum("unknown_history").alias("unknown")).first()
        served = scored.where(~F.col("skipped"))
        date_col = F.lit(day).cast("date").alias(schemas.AS_OF_DATE)
        interests = served.select(schemas.USER_ID, F.posexplode("interests").alias("interest", "vector")).select(
            schemas.USER_ID, F.col("interest").cast("int"), "vector", F.lit(model_name).alias("model_name"),
            F.lit(version).alias("model_version"), F.lit(codebook_version).alias("codebook_version"), date_col)
        recs = served.select(schemas.USER_ID, F.posexplode(F.arrays_zip("items", "scores", "which")).alias("pos", "r")
                             ).select(schemas.USER_ID, (F.col("pos") + 1).cast("int").alias("rank"),
                                      F.col("r.items").alias(schemas.ITEM_ID), F.col("r.scores").alias("score"),
                                      F.col("r.which").cast("int").alias("interest"),
                                      F.lit(version).alias("model_version"), date_col)
        predicate = f"{schemas.AS_OF_DATE} = '{day.isoformat()}'"
        ctx.store.replace_where(schemas.USER_INTERESTS, interests, predicate)
        ctx.store.replace_where(schemas.RECOMMENDATIONS, recs, predicate)
    finally:
        scored.unpersist()
    written = {name: ctx.store.read(name).where(predicate).count()
               for name in (schemas.USER_INTERESTS, schemas.RECOMMENDATIONS)}
    users_served = int(totals["users"]) - int(totals["skipped"] or 0)
    wall = time.perf_counter() - t0
    summary = {"as_of_date": day.isoformat(), "model_version": version, "model_name": model_name,
               "model_run_id": model_served.run_id,
               "codebook_version": codebook_version, "history_codes": history_note,
               "retrieval": rc.retrieval, "top_k": rc.top_k,
               "item_index": str(index_dir), "catalog_items": catalog.n_items,
               "users_skipped_no_known_history": int(totals["skipped"] or 0),
               "history_items_unknown_to_model": int(totals["unknown"] or 0),
               "index_seconds": round(index_s, 2), "users_per_s": round(users_served / max(wall, 1e-9), 1)}
    return StageOutput(rows={"users": users_served, **written}, summary=summary,
                       outputs=(schemas.USER_INTERESTS, schemas.RECOMMENDATIONS))
