"""Stage ``train``: the stage-2 recommender trained with TorchDistributor (DDP on Spark).

The driver assembles the item store (current embeddings, codes, codebook centroids) into
one ``.npz``, pins the ``sequences`` snapshot and hands its Parquet files to
``TorchDistributor``; each rank reads its share (see :func:`hymirec_udfs.recommender.train.train`).
Checkpoints live in a directory named by the model type and a hash of everything the
result depends on (config sections and input table versions), so a run that is killed
and started again with the same inputs resumes from its last checkpoint. Rank 0's
per-step loss and per-epoch validation metrics are logged to the stage's MLflow run,
with the final model (``mlflow.pytorch``) that the evaluation stage loads by run id.

With ``train.warm_start=auto`` a daily run fine-tunes the champion for
``train.warm_start_epochs`` while its codebook version is current, and retrains in full
after a refit (:func:`hymirec_udfs.artifacts.warm_start_source`); the mode and the reason
go to ``job_runs`` and MLflow (tags ``hymirec.training_mode`` / ``hymirec.training_reason``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hymirec_udfs.artifacts import item_store_for, warm_start_source
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput
from hymirec_udfs.recommender.launch import require_training_samples, run_training

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession



def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Train ``train.model_type`` and log it to MLflow."""
    model_type = cfg.train.model_type
    require_training_samples(ctx)  # before the item store: the likelier mistake first
    store = item_store_for(ctx, cfg, model_type)
    init, why = warm_start_source(ctx, cfg, store)
    mode = "warm_start" if init else "full"
    ctx.logger.tags({"hymirec.training_mode": mode, "hymirec.training_reason": why,
                     "hymirec.codebook_version": str(store.meta.get("codebook_version", ""))})
    result = run_training(spark, cfg, ctx, model_type, store, init_checkpoint=init,
                          epochs=cfg.train.warm_start_epochs if init else 0)
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageOutput(
        rows={"train_samples": int(result.get("train_samples", 0)), "steps": int(result.get("steps", 0))},
        summary={**numbers, "model_type": cfg.train.model_type, "stop_reason": result.get("stop_reason", ""),
                 "training_mode": mode, "training_reason": why, "init_checkpoint": init,
                 "codebook_version": str(store.meta.get("codebook_version", "")),
                 "checkpoint_dir": result["checkpoint_dir"], "best_checkpoint": result.get("best_checkpoint"),
                 "last_checkpoint": result.get("last_checkpoint")},
        outputs=(),
    )
