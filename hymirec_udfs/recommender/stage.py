"""Stage ``train``: the stage-2 recommender trained with TorchDistributor (DDP on Spark).

The driver assembles the item store (current embeddings, codes, codebook centroids) into
one ``.npz``, pins the ``sequences`` snapshot and hands its Parquet files to
``TorchDistributor``; each rank reads its share (see :func:`hymirec_udfs.recommender.train.train`).
Checkpoints live in a directory named by the model type and a hash of everything the
result depends on (config sections and input table versions), so a run that is killed
and started again with the same inputs resumes from its last checkpoint. Rank 0's
per-step loss and per-epoch validation metrics are logged to the stage's MLflow run,
with the final model (``mlflow.pytorch``) that the evaluation stage loads by run id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hymirec_udfs.artifacts import item_store_for
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput
from hymirec_udfs.recommender.launch import require_training_samples, run_training

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession



def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Train ``train.model_type`` and log it to MLflow."""
    model_type = cfg.train.model_type
    require_training_samples(ctx)  # before the item store: the likelier mistake first
    result = run_training(spark, cfg, ctx, model_type, item_store_for(ctx, cfg, model_type))
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageOutput(
        rows={"train_samples": int(result.get("train_samples", 0)), "steps": int(result.get("steps", 0))},
        summary={**numbers, "model_type": cfg.train.model_type, "stop_reason": result.get("stop_reason", ""),
                 "checkpoint_dir": result["checkpoint_dir"], "best_checkpoint": result.get("best_checkpoint"),
                 "last_checkpoint": result.get("last_checkpoint")},
        outputs=(),
    )
