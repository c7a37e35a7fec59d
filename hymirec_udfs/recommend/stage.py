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
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from hymirec_udfs.core import schemas
from hymirec_udfs.core.choices import Retrieval
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import SparkSession

# Catalog rows turned into ranking vectors per model call while the index is written.
INDEX_CHUNK = 65536
_WORKER_CACHE: dict[str, Any] = {}


class RecommendError(ValueError):
    """The recommend stage cannot serve (no model, a model that cannot rank new items,
    bad settings)."""


def as_of_date() -> dt.date:
    """The run's as-of date: ``--run-date`` / the notebook widget, else today (UTC)."""
    raw = os.environ.get("HYMIREC_RUN_DATE", "")
    if not raw:
        return dt.datetime.now(dt.timezone.utc).date()
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise RecommendError(f"--run-date {raw!r} is not a date (YYYY-MM-DD)") from None


def as_of_fingerprint(cfg: Config) -> str:
    """Skip-check key: the as-of date and the model served (a new date or a retrained
    model makes the stage run again)."""
    from pyspark.sql import SparkSession

    from hymirec_udfs.core.tables import get_table_store

    spark = SparkSession.getActiveSession()
    model = cfg.recommend.model_run_id
    if not model and spark is not None:
        from hymirec_udfs.core.lineage import last_success

        last = last_success(get_table_store(spark, cfg), "train")
        model = last["run_id"] if last is not None else ""
    return f"{as_of_date().isoformat()}-{model}"


def served_model(ctx: StageContext, cfg: Config) -> tuple[str, str]:
    """(checkpoint, model version) of the model to serve: ``recommend.model_run_id`` or
    the latest successful ``train`` run."""
    from hymirec_udfs.artifacts import trained_model
    from hymirec_udfs.evaluation.offline import EvaluationError

    settings = cfg
    if cfg.recommend.model_run_id:
        import dataclasses

        settings = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate,
                                                                         model_run_id=cfg.recommend.model_run_id))
    try:
        return trained_model(ctx, settings)
    except EvaluationError as exc:
        raise RecommendError(str(exc).replace("evaluate.model_run_id", "recommend.model_run_id")) from None


def write_item_index(loaded: Any, catalog: Any, directory: Path, *, retrieval: str, nlist: int, nprobe: int,
                     meta: dict[str, Any]) -> Path:
    """Today's item index for a model: ranking vectors of every catalog item, ids, meta,
    and (ANN) the faiss index. Written under ``<directory>.partial`` and renamed; reused
    when complete. Memory: one chunk of :data:`INDEX_CHUNK` rows."""
    import shutil

    import torch
    from numpy.lib.format import open_memmap

    from hymirec_udfs.recommend.retrieval import AnnIndex

    if (directory / "meta.json").is_file():
        return directory
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n, dim = catalog.n_items, catalog.dim
    vectors = open_memmap(partial / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    model = loaded.model
    with torch.inference_mode():
        for lo in range(0, n, INDEX_CHUNK):
            hi = min(lo + INDEX_CHUNK, n)
            content = torch.from_numpy(np.asarray(catalog.embeddings[1 + lo : 1 + hi], dtype=np.float32))
            known = np.maximum(loaded.store.lookup(catalog.item_ids[lo:hi]), 0)
            vectors[lo:hi] = model.ranking_vectors(content, torch.from_numpy(known)).numpy()
    vectors.flush()
    try:  # the catalog's ids, in the index's row order: a hard link, no copy
        os.link(Path(catalog.path) / "item_ids.arrow", partial / "item_ids.arrow")
    except OSError:
        shutil.copy2(Path(catalog.path) / "item_ids.arrow", partial / "item_ids.arrow")
    if retrieval == Retrieval.ANN:
        AnnIndex(vectors, nlist=nlist, nprobe=nprobe).save(str(partial / "ann.faiss"))
    del vectors
    (partial / "meta.json").write_text(json.dumps({**meta, "n_items": n, "dim": dim, "retrieval": retrieval},
                                                  indent=2, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
    return directory


class _ItemIndex:
    """An executor's view of the item index: mapped vectors, ids, lookup, faiss index."""

    def __init__(self, directory: str, nprobe: int) -> None:
        import pandas as pd
        import pyarrow as pa

        root = Path(directory)
        self.vectors = np.load(root / "vectors.npy", mmap_mode="c")  # copy-on-write: torch views it, no copy
        with pa.memory_map(str(root / "item_ids.arrow")) as source:
            self.ids = np.asarray(pa.ipc.open_file(source).read_all().column(0).to_pylist(), dtype=object)
        self.position = pd.Index(self.ids)
        self.ann = None
        if (root / "ann.faiss").is_file():
            from hymirec_udfs.recommend.retrieval import AnnIndex

            self.ann = AnnIndex.load(str(root / "ann.faiss"), nprobe=nprobe)

    def rows(self, ids: list[str]) -> np.ndarray:
        found = self.position.get_indexer(np.asarray(ids, dtype=object))
        return np.unique(found[found >= 0])


def _worker(checkpoint: str, index_dir: str, nprobe: int) -> tuple[Any, _ItemIndex]:
    from hymirec_udfs.evaluation.offline import _load_model

    if index_dir not in _WORKER_CACHE:
        _WORKER_CACHE.clear()  # one index per worker: an older date's is dropped
        _WORKER_CACHE[index_dir] = _ItemIndex(index_dir, nprobe)
    return _load_model(checkpoint), _WORKER_CACHE[index_dir]


def score_batch(loaded: Any, index: _ItemIndex, users: list[str], histories: list[list[str]], cfg: Config
                ) -> "pd.DataFrame":
    """Interests and top-K of a batch of users (one output row per user).

    History items the model does not know (added after it was trained) are left out of
    its input (counted in ``unknown_history``); a user with none left gets no rows
    (``skipped`` = True), never interests computed from nothing.
    """
    import pandas as pd
    import torch

    from hymirec_udfs.core.devices import auto_device
    from hymirec_udfs.recommend.retrieval import exact_topk

    rc = cfg.recommend
    store, model = loaded.store, loaded.model
    known_rows, unknown = [], []
    for history in histories:
        idx = store.lookup(list(history))
        unknown.append(int((idx <= 0).sum()))
        known_rows.append(idx[idx > 0])
    keep = np.array([len(r) > 0 for r in known_rows], dtype=bool)

    def pad(rows: list[np.ndarray], width: int) -> torch.Tensor:
        out = np.zeros((len(rows), max(1, width)), dtype=np.int64)
        for i, r in enumerate(rows):
            r = r[-width:]
            out[i, out.shape[1] - len(r):] = r
        return torch.from_numpy(out)

    live = [r for r, k in zip(known_rows, keep) if k]
    interests = np.zeros((0, 1, index.vectors.shape[1]), np.float32)
    if live:
        with torch.inference_mode():
            out = [model(pad(live[i:i + rc.batch_users], loaded.max_long), pad(live[i:i + rc.batch_users],
                                                                                  loaded.max_recent))
                   for i in range(0, len(live), rc.batch_users)]
        interests = torch.cat(out).float().numpy()
    live_hist = [h for h, k in zip(histories, keep) if k]
    exclude = [index.rows(list(h)) for h in live_hist] if rc.exclude_history else None
    if len(live) == 0:
        rows_idx = np.zeros((0, rc.top_k), np.int64)
        scores = np.zeros((0, rc.top_k), np.float32)
        which = np.zeros((0, rc.top_k), np.int32)
    elif index.ann is not None:
        rows_idx, scores, which = index.ann.topk(interests, rc.top_k, exclude, per_interest_quota=rc.per_interest_quota)
    else:
        rows_idx, scores, which = exact_topk(interests, index.vectors, rc.top_k, exclude,
                                             per_interest_quota=rc.per_interest_quota, chunk_items=rc.chunk_items,
                                             device=auto_device("auto"))
    records = []
    live_pos = 0
    for user, ok, n_unknown in zip(users, keep, unknown):
        if not ok:
            records.append((user, None, None, None, None, n_unknown, True))
            continue
        valid = rows_idx[live_pos] >= 0
        records.append((user, [v.tolist() for v in interests[live_pos]],
                        index.ids[rows_idx[live_pos][valid]].tolist(), scores[live_pos][valid].tolist(),
                        which[live_pos][valid].tolist(), n_unknown, False))
        live_pos += 1
    return pd.DataFrame.from_records(records, columns=["user_id", "interests", "items", "scores", "which",
                                                       "unknown_history", "skipped"])


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
    checkpoint, version = served_model(ctx, cfg)
    loaded = LoadedModel(checkpoint)
    model_name = str(getattr(loaded.model, "model_type", "hymirec"))
    if not hasattr(loaded.model, "ranking_vectors"):
        raise RecommendError(f"recommend serves content models (hymirec, hllm); the served model {version} is a "
                             f"{model_name!r}, which cannot score items it was not trained on")
    codebook_version = str(loaded.store.meta.get("codebook_version", ""))
    catalog = build_item_store(ctx, cfg, embeddings_only=True)
    key = hashlib.sha256(json.dumps([version, catalog.path, rc.retrieval, rc.ann_nlist, rc.ann_nprobe],
                                    sort_keys=True).encode()).hexdigest()[:16]
    t_index = time.perf_counter()
    index_dir = write_item_index(loaded, catalog, cfg.work_dir / "item_index" / key, retrieval=rc.retrieval,
                                 nlist=rc.ann_nlist, nprobe=rc.ann_nprobe,
                                 meta={"model_version": version, "model_name": model_name,
                                       "codebook_version": codebook_version, "catalog": catalog.path,
                                       "as_of_date": day.isoformat()})
    index_s = time.perf_counter() - t_index
    ctx.logger.artifact(str(index_dir / "meta.json"), "item_index")

    snapshot = dict(cfg=cfg, checkpoint=checkpoint, index_dir=str(index_dir))

    def per_batch(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        loaded_w, index = _worker(snapshot["checkpoint"], snapshot["index_dir"], rc.ann_nprobe)
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
               "codebook_version": codebook_version, "retrieval": rc.retrieval, "top_k": rc.top_k,
               "item_index": str(index_dir), "catalog_items": catalog.n_items,
               "users_skipped_no_known_history": int(totals["skipped"] or 0),
               "history_items_unknown_to_model": int(totals["unknown"] or 0),
               "index_seconds": round(index_s, 2), "users_per_s": round(users_served / max(wall, 1e-9), 1)}
    return StageOutput(rows={"users": users_served, **written}, summary=summary,
                       outputs=(schemas.USER_INTERESTS, schemas.RECOMMENDATIONS))
