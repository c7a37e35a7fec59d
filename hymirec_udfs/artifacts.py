"""The read side: "the current embeddings, codebook, encoder, model and item store".

Every stage that consumes another stage's result finds it here, through the pinned table
versions of its :class:`~hymirec_udfs.core.stage_api.StageContext` and the ``job_runs``
lineage, never by importing that stage's module. This module imports core and algorithm
modules only; stage modules import it (the architecture test keeps it so).

Costs at 10M items: :func:`to_matrix` and :func:`build_item_store` collect the catalog's
embeddings to the driver (10M x D float32: 15 GB at D=384) -- the scale issue replaces the
dense item store with a streamed one; :func:`latest_codebook` collects one codebook
(sum(ks) rows), :func:`current_model_id` and :func:`trained_encoder` read one ``job_runs`` row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from hymirec_udfs.codebook.spark import CodebookStageError
from hymirec_udfs.content_encoder.model import ContentEncoderTrainingError
from hymirec_udfs.content_encoder.train import STAGE_NAME
from hymirec_udfs.core import schemas
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
    """Collect (item ids, float32 matrix) through Arrow (no per-row Python objects)."""
    table = df.select(schemas.ITEM_ID, column).toArrow()
    ids = table.column(schemas.ITEM_ID).to_pylist()
    values = table.column(column).combine_chunks()
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dims = np.diff(values.offsets.to_numpy())
    if len(dims) and (dims.min() != dims.max()):
        raise CodebookStageError(f"'{column}' rows have different lengths ({dims.min()}..{dims.max()})")
    return ids, flat.reshape(len(ids), int(dims[0]) if len(dims) else 0)


def latest_codebook(ctx: StageContext) -> tuple[str, "ResidualCodebook", str]:
    """(version, codebook, embedding model id) of the newest codebook in ``codebooks``."""
    from pyspark.sql import functions as F

    from hymirec_udfs.codebook.serialize import codebook_from_rows

    books = ctx.read(schemas.CODEBOOKS)
    latest = books.orderBy(F.col("created_at").desc(), F.col("version").desc()).select("version", "model_id").first()
    if latest is None:
        raise CodebookStageError("table 'codebooks' is empty: run fit-codebook first")
    rows = [r.asDict() for r in books.where(F.col("version") == latest.version).collect()]
    return latest.version, codebook_from_rows(rows), latest.model_id


def build_item_store(ctx: StageContext, cfg: Config, *, need_codes: bool = True) -> "ItemStore":
    """Join current embeddings, item codes and the latest codebook into an ItemStore.

    Raises:
        TrainStageError: items with an embedding but no code (named) while the codebook
            is used, or a code table built from another codebook than the latest.
    """
    from hymirec_udfs.recommender.item_store import ItemStore

    emb = current_embeddings(ctx, cfg).select(schemas.ITEM_ID, "embedding").orderBy(schemas.ITEM_ID)
    ids, matrix = to_matrix(emb)
    n, d = matrix.shape
    embeddings = np.zeros((n + 1, d), dtype=np.float32)
    embeddings[1:] = matrix
    if not need_codes and not ctx.store.exists(schemas.ITEM_CODES):
        return ItemStore(ids, embeddings, np.zeros((n + 1, 1), np.int64), np.zeros((n + 1, 1), np.float32),
                         np.zeros((1, 1, d), np.float32))
    version, book, _ = latest_codebook(ctx)
    codes_df = ctx.read(schemas.ITEM_CODES)
    stale = codes_df.where(codes_df.codebook_version != version).limit(1).count()
    if stale:
        raise TrainStageError(f"'item_codes' holds codes of another codebook than the latest ({version}): run encode")
    table = codes_df.select(schemas.ITEM_ID, "codes", "coefs").toArrow()
    layers = book.num_layers
    code_ids = table.column(schemas.ITEM_ID).to_pylist()
    code_arr = table.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, layers)
    coef_arr = table.column("coefs").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, layers)
    position = {item: i for i, item in enumerate(code_ids)}
    missing = [item for item in ids if item not in position]
    if missing:
        raise TrainStageError(f"{len(missing)} items have an embedding but no code (e.g. {missing[:10]}): run encode")
    rows = np.array([position[item] for item in ids])
    codes = np.zeros((n + 1, layers), np.int64)
    coefs = np.zeros((n + 1, layers), np.float32)
    codes[1:], coefs[1:] = code_arr[rows], coef_arr[rows]
    centroids = book.stacked_centroids("cpu").numpy()
    return ItemStore(ids, embeddings, codes, coefs, centroids, codebook_metric=str(book.metric))


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
