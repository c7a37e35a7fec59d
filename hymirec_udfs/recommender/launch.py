"""Train one stage-2 model on TorchDistributor ranks and log it to the calling stage's MLflow run.

Checkpoints live in a directory named by the model type and a hash of everything the
result depends on (config sections and input table versions), so a run that is killed
and started again with the same inputs resumes from its last checkpoint. Used by the
``train``, ``evaluate`` (baselines) and ``ablations`` stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hymirec_udfs.core import schemas
from hymirec_udfs.core.choices import ModelType
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.progress import MetricsFollower
from hymirec_udfs.core.stage_api import StageContext
from hymirec_udfs.recommender.data import TrainStageError
from hymirec_udfs.recommender.item_store import link_or_copy_store
from hymirec_udfs.training.launch import run_distributed

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from hymirec_udfs.recommender.item_store import ItemStore


def needs_codes(model_type: str, cfg: Config) -> bool:
    """Whether ``model_type`` under ``cfg`` reads item codes (HyMiRec's codebook long history)."""
    return model_type == ModelType.HYMIREC and cfg.model.use_codebook and cfg.model.use_light


def require_training_samples(ctx: StageContext) -> None:
    """Fail early, naming the table, when ``sequences`` has no training sample.

    Raises:
        TrainStageError: no user with a training cut (at least two training items).
    """
    from pyspark.sql import functions as F

    seqs = ctx.read(schemas.SEQUENCES)
    if seqs.where(F.col(schemas.TRAIN_END) > 1).limit(1).count() == 0:
        raise TrainStageError("table 'sequences' has no training samples: run build-sequences first")


def run_training(
    spark: "SparkSession", cfg: Config, ctx: StageContext, model_type: str, item_store: "ItemStore", *,
    prefix: str = "", custom_store: bool = False, init_checkpoint: str = "", epochs: int = 0,
) -> dict[str, Any]:
    """Train ``model_type`` on the current sequences; returns rank 0's result.

    Used by the ``train`` stage and by evaluation (baselines, ablations).

    Args:
        spark: the session.
        cfg: configuration (its model/dmil/train sections define the variant).
        ctx: the calling stage's context (inputs are pinned and recorded there).
        model_type: ``hymirec``, ``sasrec`` or ``hllm``.
        prefix: MLflow name prefix, so several models can log into one run.
        item_store: the catalog (:func:`hymirec_udfs.artifacts.build_item_store`, or e.g. an
            ablation's own codebook).
        custom_store: ``item_store`` is not the tables' catalog (its checkpoints then live
            in a directory of their own, keyed by ``prefix``).
        init_checkpoint: warm start from these weights (the daily fine-tune).
        epochs: override ``train.epochs`` (0: keep it).
    """
    require_training_samples(ctx)
    # ranks open these with plain file I/O (a staged copy for Unity Catalog managed tables)
    files = ctx.store.rank_files(schemas.SEQUENCES, ctx.input_versions[schemas.SEQUENCES])
    model_type = ModelType(model_type).value  # a plain str: it is pickled into checkpoints
    store = item_store

    train_cfg = dataclasses.replace(cfg.train, epochs=epochs) if epochs else cfg.train
    key = json.dumps({"type": model_type, "cfg": cfg.section_hash("sequences", "model", "dmil", "train"),
                      "inputs": ctx.input_versions, "store": prefix if custom_store else "",
                      "init": init_checkpoint, "epochs": epochs}, sort_keys=True)
    run_dir = cfg.checkpoints_dir / f"{model_type}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    store_path = str(run_dir / "item_store")
    if store.path:  # the tables' store (artifacts.build_item_store): link its files, no copy
        link_or_copy_store(store.path, store_path)
    else:  # built in memory (an ablation's own codebook)
        store.save(store_path, dtype=cfg.train.item_store_dtype)
    metrics_path = str(run_dir / "metrics.jsonl")
    kwargs = dict(
        model_type=model_type, model_cfg=cfg.model, dmil_cfg=cfg.dmil, train_cfg=train_cfg,
        item_store_path=store_path, train_files=files, valid_files=files, checkpoint_dir=str(run_dir),
        metrics_path=metrics_path, max_long=cfg.sequences.max_long, recent_window=cfg.sequences.recent_window,
        window_targets=cfg.sequences.window_targets, stride=cfg.sequences.stride,
        max_samples_per_user=cfg.sequences.max_samples_per_user, cuts_per_epoch=cfg.sequences.cuts_per_epoch,
        chunk_items=cfg.evaluate.chunk_items, bucket_batches=cfg.train.bucket_batches,
        init_checkpoint=init_checkpoint or None,
    )
    ctx.logger.params({f"{prefix}model_type": model_type, f"{prefix}checkpoint_dir": str(run_dir),
                       f"{prefix}n_items": store.n_items, f"{prefix}sequence_files": len(files)})
    # Metrics reach MLflow (and progress lines the log) while training runs, from the file
    # rank 0 appends to; a run that crashes keeps what it logged. A resumed run's file
    # starts with the earlier attempt's records: they are sent too (one whole curve).
    def send(values: dict[str, float], step: int) -> None:
        ctx.logger.metrics({f"{prefix}{k}": v for k, v in values.items()}, step=step)

    follower = MetricsFollower(metrics_path, cfg.tracking.progress_every_s, send,
                               label=prefix.rstrip(".") or model_type)
    with follower:
        result = run_distributed("hymirec_udfs.recommender.train:train", kwargs, run_dir, cfg)
    _log_training(ctx, metrics_path, result, model_type, prefix)
    result["checkpoint_dir"] = str(run_dir)
    return result


def _log_training(ctx: StageContext, metrics_path: str, result: dict[str, Any], model_type: str, prefix: str) -> None:
    """Per-step/epoch metrics, the final model and its item store to the MLflow run."""
    if not ctx.logger.active:
        return

    if Path(metrics_path).exists():  # its records went to MLflow during training (MetricsFollower)
        ctx.logger.artifact(metrics_path, f"{prefix}training")
    ctx.logger.dict(result, f"{prefix}training/result.json")
    checkpoint = result.get("best_checkpoint") or result.get("last_checkpoint")
    if checkpoint:
        from hymirec_udfs.recommender.train import load_trained_model

        model = load_trained_model(checkpoint)
        logged_name = f"{prefix.strip('.')}_model" if prefix else "model"
        if hasattr(model, "ranking_vectors"):
            # Content models (HyMiRec, HLLM): a pyfunc that scores histories like the
            # recommend stage, loadable by name in any process (no pickled module).
            from hymirec_udfs.recommend.pyfunc import log_pyfunc

            log_pyfunc(ctx.cfg, checkpoint, ctx.cfg.work_dir / "pyfunc" / Path(checkpoint).parent.name,
                       name=logged_name)
        else:
            # SASRec (a baseline, never served: it cannot score unseen items): its weights
            # as safetensors plus the configs (no pickled module, no MLflow-version-specific
            # flavour options); training.checkpoints.load_checkpoint reads them back.
            from hymirec_udfs.training.checkpoints import export_safetensors

            with tempfile.TemporaryDirectory(prefix="hymirec-weights-") as tmp:
                export_safetensors(checkpoint, Path(tmp))
                ctx.logger.artifact(tmp, logged_name)
        ctx.logger.artifact(checkpoint, f"{prefix}checkpoint")
        ctx.logger.artifact(str(Path(checkpoint).parent / "item_store"), f"{prefix}checkpoint/item_store")
        ctx.logger.tags({f"hymirec.{prefix}model_type": model_type, f"hymirec.{prefix}checkpoint": checkpoint})
