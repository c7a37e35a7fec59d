"""Stage ``train``: the stage-2 recommender trained with TorchDistributor (DDP on Spark).

The driver assembles the item store (current embeddings, codes, codebook centroids) into
one ``.npz``, pins the ``sequences`` snapshot and hands its Parquet files to
``TorchDistributor``; each rank reads its share (see :func:`hymirec_udfs.training.train`).
Checkpoints live in a directory named by the model type and a hash of everything the
result depends on (config sections and input table versions), so a run that is killed
and started again with the same inputs resumes from its last checkpoint. Rank 0's
per-step loss and per-epoch validation metrics are logged to the stage's MLflow run,
with the final model (``mlflow.pytorch``) that the evaluation stage loads by run id.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from hymirec_udfs import schemas
from hymirec_udfs.config import Config
from hymirec_udfs.stages import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from hymirec_udfs.models import ItemStore


class TrainStageError(ValueError):
    """Training inputs are unusable (no samples, items without embeddings or codes)."""


def build_item_store(ctx: StageContext, cfg: Config, *, need_codes: bool = True) -> "ItemStore":
    """Join current embeddings, item codes and the latest codebook into an ItemStore.

    Raises:
        TrainStageError: items with an embedding but no code (named) while the codebook
            is used, or a code table built from another codebook than the latest.
    """
    from hymirec_udfs.codebook_stages import current_embeddings, latest_codebook, to_matrix
    from hymirec_udfs.models import ItemStore

    emb = current_embeddings(ctx, cfg).select("item_id", "embedding").orderBy("item_id")
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
    table = codes_df.select("item_id", "codes", "coefs").toArrow()
    layers = book.num_layers
    code_ids = table.column("item_id").to_pylist()
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


class DistributedRunError(RuntimeError):
    """A TorchDistributor rank failed; the message carries each failing rank's error."""


def _entry(target: str, kwargs: dict[str, Any], result_path: str) -> Optional[dict[str, Any]]:
    """What each TorchDistributor process runs: ``target(**kwargs)``; rank 0 writes the result.

    A rank that raises writes its error next to the result, so the driver can report the
    real cause (TorchDistributor itself only says that a child failed).
    """
    import importlib

    module, name = target.split(":")
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = getattr(importlib.import_module(module), name)(**kwargs)
    except BaseException as exc:
        Path(f"{result_path}.rank{rank}.error").write_text(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    if rank == 0:
        Path(result_path).write_text(json.dumps(result, default=str))
    return result


def run_distributed(target: str, kwargs: dict[str, Any], run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` on ``train.num_processes`` TorchDistributor ranks.

    Returns:
        Rank 0's result (a JSON-serialisable dict).

    Raises:
        DistributedRunError: a rank raised; the message names the rank and its error.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    result_path = run_dir / "result.json"
    for stale in run_dir.glob("result.json*"):
        stale.unlink()
    try:
        TorchDistributor(
            num_processes=cfg.train.num_processes, local_mode=cfg.train.local_mode, use_gpu=cfg.train.use_gpu
        ).run(_entry, target, kwargs, str(result_path))
    except Exception as exc:
        errors = sorted(run_dir.glob("result.json.rank*.error"))
        if errors:
            raise DistributedRunError("; ".join(e.read_text() for e in errors)) from exc
        raise
    return json.loads(result_path.read_text())


def run_training(
    spark: "SparkSession", cfg: Config, ctx: StageContext, model_type: str, *, prefix: str = "",
    item_store: Optional["ItemStore"] = None,
) -> dict[str, Any]:
    """Train ``model_type`` on the current sequences; returns rank 0's result.

    Used by the ``train`` stage and by evaluation (baselines, ablations).

    Args:
        spark: the session.
        cfg: configuration (its model/dmil/train sections define the variant).
        ctx: the calling stage's context (inputs are pinned and recorded there).
        model_type: ``hymirec``, ``sasrec`` or ``hllm``.
        prefix: MLflow name prefix, so several models can log into one run.
        item_store: use this catalog instead of the tables' (e.g. an ablation codebook).
    """
    from pyspark.sql import functions as F

    seqs = ctx.read(schemas.SEQUENCES)
    if seqs.where(F.col("split") == "train").limit(1).count() == 0:
        raise TrainStageError("table 'sequences' has no training samples: run build-sequences first")
    files = ctx.store.files(schemas.SEQUENCES, ctx.input_versions[schemas.SEQUENCES])
    need_codes = model_type == "hymirec" and cfg.model.use_codebook and cfg.model.use_light
    store = item_store or build_item_store(ctx, cfg, need_codes=need_codes)

    key = json.dumps({"type": model_type, "cfg": cfg.section_hash("sequences", "model", "dmil", "train"),
                      "inputs": ctx.input_versions, "store": prefix if item_store is not None else ""},
                     sort_keys=True)
    run_dir = cfg.checkpoints_dir / f"{model_type}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    store_path = str(run_dir / "item_store.npz")
    store.save(store_path)
    metrics_path = str(run_dir / "metrics.jsonl")
    kwargs = dict(
        model_type=model_type, model_cfg=cfg.model, dmil_cfg=cfg.dmil, train_cfg=cfg.train,
        item_store_path=store_path, train_files=files, valid_files=files, checkpoint_dir=str(run_dir),
        metrics_path=metrics_path, max_long=cfg.sequences.max_long, recent_window=cfg.sequences.recent_window,
        chunk_items=cfg.evaluate.chunk_items, bucket_batches=cfg.train.bucket_batches,
    )
    ctx.logger.params({f"{prefix}model_type": model_type, f"{prefix}checkpoint_dir": str(run_dir),
                       f"{prefix}n_items": store.n_items, f"{prefix}sequence_files": len(files)})
    result = run_distributed("hymirec_udfs.training:train", kwargs, run_dir, cfg)
    _log_training(ctx, metrics_path, result, model_type, prefix)
    result["checkpoint_dir"] = str(run_dir)
    return result


def _log_training(ctx: StageContext, metrics_path: str, result: dict[str, Any], model_type: str, prefix: str) -> None:
    """Per-step/epoch metrics, the final model and its item store to the MLflow run."""
    if not ctx.logger.active:
        return
    import mlflow

    if Path(metrics_path).exists():
        for line in Path(metrics_path).read_text().splitlines():
            record = json.loads(line)
            step = int(record.get("step", 0))
            ctx.logger.metrics({f"{prefix}{k}": v for k, v in record.items() if k not in ("step", "kind")}, step=step)
        ctx.logger.artifact(metrics_path, f"{prefix}training")
    ctx.logger.dict(result, f"{prefix}training/result.json")
    checkpoint = result.get("best_checkpoint") or result.get("last_checkpoint")
    if checkpoint:
        import mlflow.pytorch

        from hymirec_udfs.training import load_trained_model

        model = load_trained_model(checkpoint)
        # Pickle format: the model takes index tensors, so there is no array example to
        # trace a pt2 graph from; requirements are given so MLflow does not re-import it.
        mlflow.pytorch.log_model(
            model, name=f"{prefix.strip('.')}_model" if prefix else "model", serialization_format="pickle",
            pip_requirements=["torch", "transformers", "hymirec"],
        )
        ctx.logger.artifact(checkpoint, f"{prefix}checkpoint")
        ctx.logger.artifact(str(Path(checkpoint).parent / "item_store.npz"), f"{prefix}checkpoint")
        ctx.logger.tags({f"hymirec.{prefix}model_type": model_type, f"hymirec.{prefix}checkpoint": checkpoint})


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Train ``train.model_type`` and log it to MLflow."""
    result = run_training(spark, cfg, ctx, cfg.train.model_type)
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageOutput(
        rows={"train_samples": int(result.get("train_samples", 0)), "steps": int(result.get("steps", 0))},
        summary={**numbers, "model_type": cfg.train.model_type, "stop_reason": result.get("stop_reason", ""),
                 "checkpoint_dir": result["checkpoint_dir"], "best_checkpoint": result.get("best_checkpoint"),
                 "last_checkpoint": result.get("last_checkpoint")},
        outputs=(),
    )
