"""Stage ``train_content_encoder``: fine-tune the content LLM with the recommendation loss.

Stage 1 proper of METHOD.md, HLLM-style. The content LLM (any local transformers
checkpoint, pooled exactly as the embed stage pools it) turns the texts of the items in a
step into embeddings on the fly; a small causal user model (a transformer encoder as wide
as the LLM) reads a short recent window of item embeddings and predicts the next item at
every position; the loss is InfoNCE (:func:`hymirec_udfs.recommender.dmil.dmil_loss` with one interest
and one target) against ``stage1.negatives`` catalog items sampled per step, whose
embeddings come from the same encoder in the same forward pass, so gradients reach the
encoder through positives and negatives alike. A negative equal to the target is masked.

Data. Windows are cut from each user's time-ordered history (ties by the source order, as
``build_sequences`` orders it) with the held-out part removed first: the last two items
under ``leave_one_out`` (stage 2's validation and test targets), everything from
``sequences.valid_cutoff`` on under ``time_cutoff``. The rest is cut into consecutive windows
of ``stage1.seq_len`` items from the most recent backwards; items without text are dropped
(the embed stage has nothing to embed for them either). The driver writes the windows and
the catalog texts as Parquet into the run directory with Spark; every DDP rank reads its
share of the window files and the whole catalog (negatives are drawn from all of it).

Runs. The run directory ``<checkpoints_dir>/content-encoder-<hash>`` is named by a hash of
everything the result depends on (the ``embed`` and ``stage1`` sections, the training knobs
borrowed from ``train``/``dmil``, the base model's id and the input table versions), so a
killed run started again with the same inputs resumes from ``last.pt`` at the same step with
the same optimizer, schedule and RNG state. Only trainable tensors are checkpointed (a
frozen 1B-parameter body is reloaded from the base checkpoint). The result is a normal
transformers checkpoint in ``<run dir>/encoder`` (``save_pretrained`` of model and tokenizer,
the learned item-token embedding written into its row), which the embed stage loads when
``stage1.enabled`` is true (:func:`resolve_encoder_model`); its model id differs from the
base model's, so the incremental embed stage re-embeds the whole catalog.

The learnable item token. For ``last_token`` pooling the item token's input embedding is a
separate parameter during training (a forward hook on the input embedding layer puts it in
place of the token's row), so it is trained whatever ``stage1.trainable`` freezes; on save
it is written into the embedding matrix. Set ``embed.item_token`` to a new token (e.g.
``[ITEM]``) for a dedicated one; by default it is the tokenizer's eos/sep token, as in the
embed stage.

Training knobs that ``Stage1Config`` does not have come from the stage-2 sections:
``train.seed``, ``train.weight_decay``, ``train.warmup_steps``, ``train.grad_clip``,
``train.checkpoint_every``, ``train.torch_threads``, the TorchDistributor settings
``train.num_processes`` / ``local_mode`` / ``use_gpu``, and the InfoNCE temperature
``dmil.temperature``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hymirec_udfs.content_encoder.model import ContentEncoderTrainingError
from hymirec_udfs.content_encoder.train import ENCODER_DIR, FILES_PER_RANK, FINAL_LOSS_STEPS
from hymirec_udfs.content_encoder.windows import HELD_OUT_PER_USER, MIN_WINDOW_ITEMS, build_windows
from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.progress import MetricsFollower
from hymirec_udfs.core.shards import SHARD_COLUMN, spark_user_shard
from hymirec_udfs.core.stage_api import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession



logger = logging.getLogger(__name__)
CATALOG_DIR = "catalog"
WINDOWS_DIR = "windows"
METRICS_FILE = "metrics.jsonl"


def split_fingerprint(cfg: Config) -> str:
    """The held-out split the windows respect (a stage input beyond its config sections)."""
    seq = cfg.sequences
    return seq.split if seq.split == "leave_one_out" else f"{seq.split}-{seq.valid_cutoff}"


def run_dir_for(cfg: Config, input_versions: dict[str, int], base_model_id: str) -> Path:
    """``<checkpoints_dir>/content-encoder-<hash>`` of everything the trained encoder depends on."""
    t = cfg.train
    key = json.dumps({
        "sections": cfg.section_hash("embed", "stage1"), "split": split_fingerprint(cfg),
        "train": {"seed": t.seed, "weight_decay": t.weight_decay, "warmup_steps": t.warmup_steps,
                  "grad_clip": t.grad_clip, "num_processes": t.num_processes, "use_gpu": t.use_gpu},
        "temperature": cfg.dmil.temperature, "base_model_id": base_model_id, "inputs": input_versions,
    }, sort_keys=True)
    return cfg.checkpoints_dir / f"content-encoder-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _written(path: Path) -> bool:
    return (path / "_SUCCESS").exists()


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Fine-tune the content encoder on recent windows and save it for the embed stage.

    Raises:
        ContentEncoderTrainingError: no items with text, no interactions or no windows, or a
            training rank failed (each failed rank's error named, e.g. a NaN loss with its step
            and last good checkpoint).
    """
    from pyspark.sql import functions as F

    from hymirec_udfs.embedding.encoder import compute_model_id, resolve_model_path
    from hymirec_udfs.training.launch import DistributedRunError, run_distributed

    items = ctx.read(schemas.ITEMS)
    interactions = ctx.read(schemas.INTERACTIONS)
    catalog = items.where(F.length(F.trim(F.coalesce("text", F.lit("")))) > 0).select(schemas.ITEM_ID, "text")
    n_items = catalog.count()
    if n_items == 0:
        raise ContentEncoderTrainingError("table 'items' has no item with text: nothing to fine-tune the "
                                          "content encoder on (run ingest)")
    if interactions.limit(1).count() == 0:
        raise ContentEncoderTrainingError("table 'interactions' is empty: no sequences to fine-tune the "
                                          "content encoder on (run ingest)")
    emb = cfg.embed
    base_path = resolve_model_path(emb.model)
    base_model_id = compute_model_id(base_path, emb.pooling, emb.max_tokens, emb.item_token or None)
    run_dir = run_dir_for(cfg, dict(ctx.input_versions), base_model_id)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Written once per run directory (same hash = same inputs), so a resumed run reads
    # exactly the windows the killed one read.
    catalog_dir, windows_dir = run_dir / CATALOG_DIR, run_dir / WINDOWS_DIR
    if not _written(catalog_dir):
        catalog.write.mode("overwrite").parquet(str(catalog_dir))
    if not _written(windows_dir):
        files = FILES_PER_RANK * max(1, cfg.train.num_processes)
        # sorted by shard so each rank's reader skips the others' row groups
        (build_windows(interactions, items, seq_len=cfg.stage1.seq_len, sequences_cfg=cfg.sequences)
         .withColumn(SHARD_COLUMN, spark_user_shard(schemas.USER_ID))
         .repartitionByRange(files, SHARD_COLUMN).sortWithinPartitions(SHARD_COLUMN, schemas.USER_ID, "window")
         .write.mode("overwrite").parquet(str(windows_dir)))
    n_windows = spark.read.parquet(str(windows_dir)).count()
    if n_windows == 0:
        held_out = (f"each user's last {HELD_OUT_PER_USER} items" if cfg.sequences.split == "leave_one_out"
                    else f"interactions from sequences.valid_cutoff={cfg.sequences.valid_cutoff} on")
        raise ContentEncoderTrainingError(
            f"no stage-1 windows: no user has {MIN_WINDOW_ITEMS} interactions with items that have text once "
            f"{held_out} are held out")

    metrics_path = run_dir / METRICS_FILE
    encoder_dir = run_dir / ENCODER_DIR
    kwargs = dict(
        embed_cfg=emb, stage1_cfg=cfg.stage1, train_cfg=cfg.train, temperature=cfg.dmil.temperature,
        catalog_files=sorted(str(p) for p in catalog_dir.glob("*.parquet")),
        window_files=sorted(str(p) for p in windows_dir.glob("*.parquet")),
        checkpoint_dir=str(run_dir), output_dir=str(encoder_dir), metrics_path=str(metrics_path),
    )
    ctx.logger.params({"stage1_checkpoint_dir": str(run_dir), "stage1_windows": n_windows, "n_items": n_items,
                       "base_model_id": base_model_id})
    def send(values: dict[str, float], step: int) -> None:  # live, as rank 0 appends them
        ctx.logger.metrics({f"stage1.{k}": v for k, v in values.items()}, step=step)

    try:
        with MetricsFollower(str(metrics_path), cfg.tracking.progress_every_s, send, label="stage1"):
            result = run_distributed("hymirec_udfs.content_encoder.train:train_content_encoder", kwargs, run_dir,
                                     cfg)
    except DistributedRunError as exc:
        raise ContentEncoderTrainingError(str(exc)) from exc
    encoder_path = result["encoder_path"]
    model_id = compute_model_id(encoder_path, emb.pooling, emb.max_tokens, emb.item_token or None)
    losses = _losses(metrics_path)
    _log_run(ctx, metrics_path, encoder_path, result, model_id)
    summary = {
        "encoder_path": encoder_path, "model_id": model_id, "base_model": emb.model, "base_model_id": base_model_id,
        "pooling": emb.pooling, "max_tokens": emb.max_tokens, "item_token": emb.item_token or None,
        "checkpoint_dir": str(run_dir), "stop_reason": result["stop_reason"],
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-FINAL_LOSS_STEPS:])) if losses else None,
        **{k: result[k] for k in ("windows_per_s", "trainable_params", "total_params", "world_size")},
    }
    if ctx.logger.active:
        summary["mlflow_encoder"] = f"mlflow:{ctx.logger.run_id}/{ENCODER_DIR}"
    return StageOutput(
        rows={"items": n_items, "windows": n_windows, "steps": int(result["steps"])},
        summary=summary,
        outputs=(),
    )


def _losses(metrics_path: Path) -> list[float]:
    if not metrics_path.exists():
        return []
    return [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines() if line.strip()]


def _log_run(ctx: StageContext, metrics_path: Path, encoder_path: str, result: dict[str, Any], model_id: str) -> None:
    """Per-step metrics and the trained encoder (a transformers checkpoint) to the MLflow run."""
    if not ctx.logger.active:
        return
    if metrics_path.exists():  # its records went to MLflow during training (MetricsFollower)
        ctx.logger.artifact(str(metrics_path), "training")
    ctx.logger.dict(result, "training/result.json")
    ctx.logger.artifact(encoder_path, ENCODER_DIR)
    ctx.logger.tags({"hymirec.encoder_path": encoder_path, "hymirec.encoder_model_id": model_id})
