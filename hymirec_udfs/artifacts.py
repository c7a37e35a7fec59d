"""The read side: "the current embeddings, codebook, encoder, model and item store".

Every stage that consumes another stage's result finds it here, through the pinned table
versions of its :class:`~hymirec_udfs.core.stage_api.StageContext` and the ``job_runs``
lineage, never by importing that stage's module. This module imports core and algorithm
modules only; stage modules import it (the architecture test keeps it so).

Costs at 10M items: :func:`to_matrix` collects what it is given (callers pass a bounded
sample); :func:`build_item_store` streams the catalog into a memory-mapped item store
directory one partition at a time; :func:`latest_codebook` collects one codebook
(sum(ks) rows), :func:`current_model_id` and :func:`trained_encoder` read one ``job_runs`` row.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from hymirec_udfs.codebook.spark import CodebookStageError
from hymirec_udfs.content_encoder.model import ContentEncoderTrainingError
from hymirec_udfs.content_encoder.train import STAGE_NAME
from hymirec_udfs.core import schemas, uri
from hymirec_udfs.core.config import Config, EmbedConfig, Stage1Config
from hymirec_udfs.core.lineage import last_success
from hymirec_udfs.core.stage_api import StageContext
from hymirec_udfs.evaluation.offline import EvaluationError
from hymirec_udfs.recommender.data import TrainStageError
from hymirec_udfs.recommender.launch import needs_codes

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame

    from hymirec_udfs.codebook.residual import ResidualCodebook
    from hymirec_udfs.core.tables import TableStore
    from hymirec_udfs.recommender.item_store import ItemStore


def encoder_settings(
    cfg: EmbedConfig, store: Optional["TableStore"] = None, stage1: Optional[Stage1Config] = None
) -> dict[str, Any]:
    """ContentEncoder keyword arguments from the ``embed`` config section.

    Args:
        cfg: the ``embed`` section.
        store: the table store; needed when ``stage1.enabled`` (the fine-tuned encoder is
            found through ``job_runs``).
        stage1: the ``stage1`` section; when enabled, the model is the encoder of the
            latest successful ``train_content_encoder`` run instead of ``cfg.model``.

    Raises:
        ValueError: ``stage1.enabled`` without a store.
        ContentEncoderTrainingError: stage 1 is enabled but has no usable result.
    """
    from hymirec_udfs.embedding.encoder import resolve_model_path

    if stage1 is not None and stage1.enabled:
        if store is None:
            raise ValueError("stage1.enabled: pass the table store to find the fine-tuned content encoder")
        from hymirec_udfs.artifacts import trained_encoder

        model_path = trained_encoder(store, cfg).path
    elif uri.is_remote(cfg.model):
        # Executors copy it from object storage themselves (a driver's temp path is not
        # theirs); resolving here checks it exists and fills this machine's copy.
        resolve_model_path(cfg.model)
        model_path = cfg.model
    else:
        model_path = resolve_model_path(cfg.model)
    return {
        "model_path": model_path,
        "pooling": cfg.pooling,
        "max_tokens": cfg.max_tokens,
        "token_budget": cfg.token_budget,
        "max_batch_size": cfg.max_batch_size,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "num_threads": cfg.num_threads or None,
        "item_token": cfg.item_token or None,
    }


def current_model_id(
    cfg: EmbedConfig, store: Optional["TableStore"] = None, stage1: Optional[Stage1Config] = None
) -> str:
    """``model_id`` of the configured encoder (name + hash of config, weights, pooling).

    With ``stage1`` enabled (and the store given) it is the id of the fine-tuned encoder;
    see :func:`encoder_settings`.
    """
    from hymirec_udfs.embedding.encoder import compute_model_id

    settings = encoder_settings(cfg, store, stage1)
    return compute_model_id(settings["model_path"], cfg.pooling, cfg.max_tokens, cfg.item_token or None)


@dataclass(frozen=True)
class TrainedEncoder:
    """The encoder of the latest successful stage-1 run.

    Attributes:
        path: local checkpoint directory.
        model_id: its model id under the embed settings it was trained with.
        run_id: the ``job_runs`` run id.
    """

    path: str
    model_id: str
    run_id: str


def trained_encoder(store: "TableStore", embed_cfg: EmbedConfig) -> TrainedEncoder:
    """The latest successful ``train_content_encoder`` run's encoder, checked against ``embed``.

    Raises:
        ContentEncoderTrainingError: no successful run, a run for another base model /
            pooling / token limit / item token, or its checkpoint is gone.
    """
    row = last_success(store, STAGE_NAME)
    if row is None:
        raise ContentEncoderTrainingError(
            "stage1.enabled is true but job_runs has no successful 'train_content_encoder' run: run "
            "`hymirec train-content-encoder` (or the pipeline) first, or set stage1.enabled=false")
    summary = json.loads(row["summary"] or "{}")
    expected = {"base_model": embed_cfg.model, "pooling": embed_cfg.pooling, "max_tokens": embed_cfg.max_tokens,
                "item_token": embed_cfg.item_token or None}
    trained_for = {key: summary.get(key) for key in expected}
    if trained_for != expected:
        raise ContentEncoderTrainingError(
            f"the latest train_content_encoder run ({row['run_id']}) fine-tuned {trained_for}, but the embed "
            f"config is {expected}: run train-content-encoder again")
    path = summary.get("encoder_path") or ""
    if not (Path(path) / "config.json").is_file():
        logged = f" (logged to MLflow as {summary['mlflow_encoder']})" if summary.get("mlflow_encoder") else ""
        raise ContentEncoderTrainingError(
            f"the encoder of train_content_encoder run {row['run_id']} is missing at {path!r}{logged}: run "
            "train-content-encoder again")
    return TrainedEncoder(path=path, model_id=summary["model_id"], run_id=row["run_id"])


def resolve_encoder_model(store: "TableStore", cfg: Config) -> str:
    """The checkpoint the embed stage uses: stage 1's when ``stage1.enabled``, else ``embed.model``'s.

    Raises:
        ContentEncoderTrainingError: see :func:`trained_encoder`.
    """
    if not cfg.stage1.enabled:
        from hymirec_udfs.embedding.encoder import resolve_model_path

        return resolve_model_path(cfg.embed.model)
    return trained_encoder(store, cfg.embed).path


def current_embeddings(ctx: StageContext, cfg: Config) -> "DataFrame":
    """Rows of ``item_embeddings`` produced by the configured content encoder."""
    from pyspark.sql import functions as F


    model_id = current_model_id(cfg.embed, ctx.store, cfg.stage1)
    df = ctx.read(schemas.ITEM_EMBEDDINGS).where(F.col("model_id") == model_id)
    if df.limit(1).count() == 0:
        raise CodebookStageError(
            f"table 'item_embeddings' has no rows for model {model_id}: run the embed stage first"
        )
    return df


def to_matrix(df: "DataFrame", column: str = "embedding") -> tuple[list[str], np.ndarray]:
    """(item ids, float32 matrix) of ``df`` in ``item_id`` order, streamed a partition at a time
    (:func:`_stream_blocks`): the driver holds the result plus one partition, each pulled
    partition well under ``spark.driver.maxResultSize``. Callers pass bounded frames (the
    codebook's basepool sample), never a whole 10M catalog.

    Raises:
        CodebookStageError: rows of different widths or with NaN/inf (the item is named).
    """
    from pyspark.sql import functions as F

    first = df.select(F.size(column).alias("d")).first()
    if first is None:
        return [], np.zeros((0, 0), np.float32)
    ids: list[str] = []
    parts: list[np.ndarray] = []
    try:
        for block_ids, block in _stream_blocks(df, {column: ("float32", int(first["d"]))}, df.count()):
            ids.extend(block_ids)
            parts.append(block[column])
    except TrainStageError as exc:
        raise CodebookStageError(str(exc)) from None
    return ids, np.concatenate(parts) if parts else np.zeros((0, int(first["d"])), np.float32)


def latest_codebook(ctx: StageContext, version: Optional[str] = None) -> tuple[str, "ResidualCodebook", str]:
    """(version, codebook, embedding model id) of the newest codebook in ``codebooks``, or
    of codebook ``version`` when given."""
    from pyspark.sql import functions as F

    from hymirec_udfs.codebook.serialize import codebook_from_rows

    books = ctx.read(schemas.CODEBOOKS)
    if version:
        books = books.where(F.col("version") == version)
    latest = books.orderBy(F.col("created_at").desc(), F.col("version").desc()).select("version", "model_id").first()
    if latest is None:
        raise CodebookStageError(f"codebook {version} is not in table 'codebooks'" if version else
                                 "table 'codebooks' is empty: run fit-codebook first")
    rows = [r.asDict() for r in books.where(F.col("version") == latest.version).collect()]
    return latest.version, codebook_from_rows(rows), latest.model_id


def _pack_blocks(batches: Any, columns: dict[str, tuple[str, int]]) -> Any:
    """mapInArrow body: each Arrow batch of ``item_id`` + fixed-width array columns becomes
    one row of packed little-endian blocks (``columns``: name -> (numpy dtype, width)), so
    the driver receives a partition as a few large binary values, not per-row objects.

    A row of the wrong width or with NaN/inf fails the task with ``ValueError: item
    '<id>': ...`` (see :func:`_stream_blocks`)."""
    import pyarrow as pa

    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        ids = batch.column(schemas.ITEM_ID).to_pylist()
        packed = [pa.array([ids], type=pa.list_(pa.string()))]
        for name, (dtype, width) in columns.items():
            col = batch.column(name)
            lengths = np.diff(np.asarray(col.offsets))
            if lengths.size and (lengths.min() != width or lengths.max() != width):
                bad = int(np.argmax(lengths != width))
                raise ValueError(f"item {ids[bad]!r}: '{name}' has {int(lengths[bad])} values, expected {width}")
            values = col.values.to_numpy(zero_copy_only=False).reshape(n, width)
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                bad = int(np.argmin(np.isfinite(values).all(axis=1)))
                raise ValueError(f"item {ids[bad]!r}: '{name}' has NaN or inf")
            packed.append(pa.array([values.astype(dtype).tobytes()], type=pa.binary()))
        yield pa.record_batch(packed, names=["ids", *columns])


# Bytes of packed rows per partition the driver pulls at a time (at most a quarter of
# spark.driver.maxResultSize, which each pulled partition must stay under).
STREAM_PARTITION_BYTES = 64 * 2**20


def _stream_blocks(df: "DataFrame", columns: dict[str, tuple[str, int]], n_rows: int) -> Any:
    """``(ids, {column: (n, width) array})`` blocks of ``df`` in ``item_id`` order, one
    partition at a time on the driver (``toLocalIterator``).

    ``df`` is range-partitioned by ``item_id`` into partitions of about
    :data:`STREAM_PARTITION_BYTES` (and under a quarter of ``spark.driver.maxResultSize``,
    which toLocalIterator applies per partition), then sorted within each: driver memory
    is one partition, whatever the catalog. At 10M x 2048-d float16 that is ~640
    partitions of 64 MB, one small job each.

    Raises:
        TrainStageError: a row of the wrong width or with NaN/inf, naming the item.
    """
    import math

    from pyspark.sql import types as T

    from hymirec_udfs.core.spark import driver_result_limit

    row_bytes = 64 + sum(np.dtype(dtype).itemsize * width for dtype, width in columns.values())
    limit = driver_result_limit(df.sparkSession)
    target = min(STREAM_PARTITION_BYTES, limit // 4) if limit else STREAM_PARTITION_BYTES
    partitions = max(1, math.ceil(n_rows * row_bytes / max(target, 1)))
    ordered = df.select(schemas.ITEM_ID, *columns).repartitionByRange(partitions, schemas.ITEM_ID) \
        .sortWithinPartitions(schemas.ITEM_ID)
    schema = T.StructType([T.StructField("ids", T.ArrayType(T.StringType()))]
                          + [T.StructField(name, T.BinaryType()) for name in columns])
    blocks = ordered.mapInArrow(lambda it: _pack_blocks(it, columns), schema)
    try:
        for row in blocks.toLocalIterator():
            ids = row["ids"]
            yield ids, {name: np.frombuffer(row[name], dtype=dtype).reshape(len(ids), width)
                        for name, (dtype, width) in columns.items()}
    except Exception as exc:  # a bad row surfaces from the executor inside a Py4J error
        for line in str(exc).splitlines():
            if line.startswith("ValueError: item "):
                raise TrainStageError(line.removeprefix("ValueError: ")) from None
        raise


def build_item_store(ctx: StageContext, cfg: Config, *, need_codes: bool = True,
                     embeddings_only: bool = False, live_on: Optional["dt.date"] = None,
                     codebook_version: Optional[str] = None, keep_removed: bool = False) -> "ItemStore":
    """The tables' catalog as an item store directory (current embeddings, codes, codebook).

    Streamed: executors pack rows into binary blocks (``mapInArrow``), the driver pulls
    one partition at a time (``toLocalIterator``) into an :class:`ItemStoreWriter`. Driver
    memory is one partition's blocks (10M x 2048-d float16: ~640 range partitions of
    64 MB, each under ``spark.driver.maxResultSize``), never the catalog. The store
    is built once per input versions under ``<work_dir>/item_stores/`` and reused (train,
    evaluate, its baselines and ablations open the same files).

    Raises:
        TrainStageError: items with an embedding but no code (named) while the codebook
            is used, a code table built from another codebook than the latest, or an
            embedding of the wrong width or with NaN (named).
    """
    import hashlib

    from pyspark.sql import functions as F

    from hymirec_udfs.recommender.item_store import ItemStore, ItemStoreWriter

    emb = current_embeddings(ctx, cfg).select(schemas.ITEM_ID, "embedding")
    live_key = ""
    if live_on is not None and ctx.store.exists(schemas.ITEMS):
        # The catalog as of the run date: items already added and (unless keep_removed, for
        # histories) not yet removed. Items without an `items` row are kept.
        day = F.lit(live_on.isoformat()).cast("date")
        gone = F.col("valid_from") > day
        if not keep_removed:
            gone = gone | (F.col("removed_on") <= day)
        emb = emb.join(ctx.read(schemas.ITEMS).where(gone).select(schemas.ITEM_ID), schemas.ITEM_ID, "left_anti")
        live_key = f"{live_on.isoformat()}{'+removed' if keep_removed else ''}"
    first = emb.select(F.size("embedding").alias("d")).first()
    dim = int(first["d"]) if first else 0
    dtype = cfg.train.item_store_dtype
    # embeddings_only: today's catalog for serving, whatever item_codes holds (new items
    # have no code until encode runs; serving scores content).
    with_codes = not embeddings_only and (need_codes or ctx.store.exists(schemas.ITEM_CODES))
    if with_codes:
        version, book, _ = latest_codebook(ctx, codebook_version)
        # item_codes keeps every version's codes: this store reads the latest codebook's
        # (or ``codebook_version``'s: serving a model on the codes it was trained with).
        codes_df = ctx.read(schemas.ITEM_CODES).where(F.col("codebook_version") == version)
        joined = emb.join(codes_df.select(schemas.ITEM_ID, "codes", "coefs"), schemas.ITEM_ID, "left")
        missing_codes = joined.where(F.col("codes").isNull())
        n_missing = missing_codes.count()
        if n_missing:
            named = sorted(r[schemas.ITEM_ID] for r in missing_codes.select(schemas.ITEM_ID).limit(10).collect())
            raise TrainStageError(f"{n_missing} items have an embedding but no code of codebook {version} "
                                  f"(e.g. {named}): run encode")
        centroids, metric, layers = book.stacked_centroids("cpu").numpy(), str(book.metric), book.num_layers
    else:
        version, layers, metric = "", 0, "cosine"
        centroids = np.zeros((1, 1, dim), np.float32)
        joined = emb
    key = json.dumps({"inputs": {k: v for k, v in sorted(ctx.input_versions.items())
                                 if k in (schemas.ITEM_EMBEDDINGS, schemas.ITEM_CODES, schemas.CODEBOOKS)},
                      "codes": with_codes, "dtype": dtype, "model": current_model_id(cfg.embed, ctx.store, cfg.stage1),
                      "live_on": live_key, "items": ctx.input_versions.get(schemas.ITEMS) if live_key else None,
                      "codebook_version": codebook_version or ""},
                     sort_keys=True)
    directory = cfg.work_dir / "item_stores" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (directory / "meta.json").is_file():
        return ItemStore.load(str(directory))
    n = joined.count()
    columns = {"embedding": (dtype, dim)}
    if layers:
        columns.update({"codes": ("int32", layers), "coefs": ("float32", layers)})
    meta = {"embedding_model_id": current_model_id(cfg.embed, ctx.store, cfg.stage1), "codebook_version": version,
            "input_versions": json.loads(key)["inputs"]}
    with ItemStoreWriter(str(directory), n, dim, centroids, metric, layers=max(layers, 1), dtype=dtype,
                         meta=meta) as writer:
        for ids, block in _stream_blocks(joined, columns, n):
            zeros = np.zeros((len(ids), 1))
            writer.append(ids, block["embedding"], block.get("codes", zeros), block.get("coefs", zeros))
    return ItemStore.load(str(directory))


def trained_model(ctx: StageContext, cfg: Config) -> tuple[str, str]:
    """(checkpoint path, MLflow run id) of the model to evaluate.

    ``evaluate.model_run_id`` names an MLflow run (its checkpoint artifact is downloaded
    when the local path is gone); otherwise the last successful ``train`` run is used.
    """
    if cfg.evaluate.model_run_id:
        import mlflow

        from hymirec_udfs.core.tracking import configure_mlflow

        configure_mlflow(cfg)
        run_id = cfg.evaluate.model_run_id
        run = mlflow.get_run(run_id)
        checkpoint = run.data.tags.get("hymirec.checkpoint", "")
        if not checkpoint or not Path(checkpoint).exists():
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint")
            checkpoint = str(next(Path(local).glob("*.pt")))
        return checkpoint, run_id
    last = last_success(ctx.store, "train")
    if last is None:
        raise EvaluationError("no successful 'train' run in job_runs and evaluate.model_run_id is empty: run train first")
    summary = json.loads(last["summary"] or "{}")
    checkpoint = summary.get("best_checkpoint") or summary.get("last_checkpoint")
    if not checkpoint and summary.get("checkpoint_dir"):
        found = [Path(summary["checkpoint_dir"]) / n for n in ("best.pt", "last.pt")]
        checkpoint = next((str(p) for p in found if p.exists()), None)
    if not checkpoint or not Path(checkpoint).exists():
        raise EvaluationError(f"checkpoint of train run {last['run_id']} not found ({checkpoint})")
    return checkpoint, last.get("mlflow_run_id") or last["run_id"]


def item_store_for(ctx: StageContext, cfg: Config, model_type: str) -> "ItemStore":
    """The tables' catalog as ``model_type`` needs it (with codes only where it reads them)."""
    return build_item_store(ctx, cfg, need_codes=needs_codes(model_type, cfg))


def warm_start_source(ctx: StageContext, cfg: Config, item_store: "ItemStore") -> tuple[str, str]:
    """(checkpoint to warm-start from or '', why) for the ``train`` stage.

    ``train.warm_start=auto`` fine-tunes the champion (``models:/<registry.model_name>@champion``
    when the registry is on, else the latest successful ``train`` run) while it was
    trained on the codebook version ``item_store`` holds and with the same model type and
    shape; anything else trains from scratch, and the reason says why (a codebook refit
    renumbers codes, so the old weights' long-history inputs would change meaning).
    """
    import dataclasses

    from hymirec_udfs.core import registry
    from hymirec_udfs.recommender.item_store import ItemStore
    from hymirec_udfs.recommender.models import effective_model_config
    from hymirec_udfs.training.checkpoints import load_checkpoint

    if cfg.train.warm_start != "auto":
        return "", "full: train.warm_start=never"
    settings = cfg
    source = "latest train run"
    if cfg.registry.enabled and cfg.tracking.enabled:
        champion = registry.by_alias(cfg, registry.CHAMPION)
        if champion is None:
            return "", "full: no champion yet"
        settings = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, model_run_id=champion.run_id))
        source = f"champion {champion.name} v{champion.version}"
    elif last_success(ctx.store, "train") is None:
        return "", "full: no earlier train run"
    try:
        checkpoint, _ = trained_model(ctx, settings)
    except EvaluationError as exc:
        return "", f"full: {source} has no usable checkpoint ({exc})"
    from hymirec_udfs.evaluation.offline import item_store_path

    saved = load_checkpoint(checkpoint)
    old_book = str(ItemStore.load(item_store_path(checkpoint)).meta.get("codebook_version", ""))
    new_book = str(item_store.meta.get("codebook_version", ""))
    if old_book != new_book:
        return "", f"full: codebook changed ({old_book or 'none'} -> {new_book or 'none'}) since {source}"
    want = dataclasses.asdict(effective_model_config(cfg.train.model_type, cfg.model, cfg.dmil))
    if saved["model_type"] != cfg.train.model_type or saved["model_config"] != want:
        return "", f"full: {source} is a {saved['model_type']} model of another configuration"
    if cfg.model.item_adapter == "mlp_id" and saved["catalog_shape"][0] != item_store.n_items:
        return "", f"full: per-item parameters (item_adapter=mlp_id) and the catalog changed since {source}"
    return checkpoint, f"warm start from {source}"
