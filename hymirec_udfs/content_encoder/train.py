"""Stage-1 training loop (one TorchDistributor process per rank), resumable from ``last.pt``.

Only trainable tensors are checkpointed (a frozen body is reloaded from the base
checkpoint); the result is a normal transformers checkpoint the embed stage loads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from hymirec_udfs.content_encoder.model import ContentEncoderTrainer, ContentEncoderTrainingError
from hymirec_udfs.content_encoder.windows import load_catalog, load_windows
from hymirec_udfs.core.config import EmbedConfig, Stage1Config, TrainConfig
from hymirec_udfs.recommender.dmil import sample_negatives
from hymirec_udfs.training.checkpoints import (
    append_metrics,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
    truncate_metrics,
)
from hymirec_udfs.training.ddp import all_gather_obj, all_reduce_, ddp_process
from hymirec_udfs.training.optim import NonFiniteLossError, WarmupCosine, build_optimizer

if TYPE_CHECKING:  # pragma: no cover

    pass


logger = logging.getLogger(__name__)
STAGE_NAME = "train_content_encoder"
LAST_CHECKPOINT = "last.pt"
ENCODER_DIR = "encoder"




CHECKPOINT_FORMAT = 1

# Window files per DDP rank, so every rank reads files of its own.
FILES_PER_RANK = 2

# Steps averaged for the reported final loss.
FINAL_LOSS_STEPS = 10


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    pos: int = 0
    done: bool = False
    stop_reason: str = ""


def train_content_encoder(
    *,
    embed_cfg: EmbedConfig,
    stage1_cfg: Stage1Config,
    train_cfg: TrainConfig,
    temperature: float,
    catalog_files: Sequence[str],
    window_files: Sequence[str],
    checkpoint_dir: str,
    output_dir: str,
    metrics_path: Optional[str] = None,
) -> dict[str, Any]:
    """Fine-tune the content LLM (one TorchDistributor process; rank from the environment).

    Reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` as
    TorchDistributor (or torchrun) sets them; without them it runs single-process. DDP
    uses nccl with ``train.use_gpu`` (bf16 autocast) and gloo otherwise.

    Args:
        embed_cfg: the ``embed`` section: base model, pooling, item token, token limits.
        stage1_cfg: the ``stage1`` section.
        train_cfg: seed, weight decay, warmup, gradient clip, checkpoint interval, threads
            and devices come from here.
        temperature: InfoNCE temperature.
        catalog_files: Parquet files with ``item_id``, ``text`` (the whole catalog).
        window_files: Parquet files with ``item_ids`` windows (each rank reads its share).
        checkpoint_dir: where ``last.pt`` lives; an existing one is resumed. Shared storage
            across nodes.
        output_dir: where rank 0 saves the trained encoder.
        metrics_path: JSON-lines file rank 0 appends per-step metrics to.

    Returns:
        ``steps``, ``epochs``, ``stop_reason`` (``epochs`` or ``max_steps``),
        ``resumed_from_step``, ``world_size``, ``train_windows`` (all ranks), ``n_items``,
        ``windows_per_s``, ``trainable_params``, ``total_params``, ``encoder_path``,
        ``last_checkpoint``.

    Raises:
        ContentEncoderTrainingError: no windows or an empty catalog.
        NonFiniteLossError: the loss or the gradient became NaN/Inf (names the step and the
            last good checkpoint).
        ValueError: the checkpoint directory holds a run with other settings.
    """
    with ddp_process(train_cfg) as (rank, world, device):
        return _train_loop(
            embed_cfg=embed_cfg, stage1_cfg=stage1_cfg, train_cfg=train_cfg, temperature=temperature,
            catalog_files=list(catalog_files), window_files=list(window_files), checkpoint_dir=checkpoint_dir,
            output_dir=output_dir, metrics_path=metrics_path, rank=rank, world=world, device=device,
        )


def _train_loop(
    *,
    embed_cfg: EmbedConfig,
    stage1_cfg: Stage1Config,
    train_cfg: TrainConfig,
    temperature: float,
    catalog_files: list[str],
    window_files: list[str],
    checkpoint_dir: str,
    output_dir: str,
    metrics_path: Optional[str],
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    distributed = world > 1

    catalog_ids, texts = load_catalog(catalog_files)
    if not catalog_ids:
        raise ContentEncoderTrainingError(f"the stage-1 catalog is empty (files {catalog_files[:3]})")
    windows = load_windows(window_files, catalog_ids, seq_len=stage1_cfg.seq_len, rank=rank, world_size=world)
    counts = torch.tensor([len(windows), len(windows)], dtype=torch.long, device=device)
    n_min = int(all_reduce_(counts[:1].clone(), dist.ReduceOp.MIN if distributed else None))
    n_total = int(all_reduce_(counts[1:].clone()))
    if n_total == 0:
        raise ContentEncoderTrainingError(f"no stage-1 windows in {window_files[:3]}")
    if n_min == 0:
        raise ContentEncoderTrainingError(f"a rank got no stage-1 windows ({len(window_files)} file(s) over {world} "
                                          f"ranks)")

    seed = train_cfg.seed
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # identical user-model weights on every rank
    trainer = ContentEncoderTrainer(
        embed_cfg.model, pooling=embed_cfg.pooling, max_tokens=embed_cfg.max_tokens,
        item_token=embed_cfg.item_token or None, token_budget=embed_cfg.token_budget,
        max_batch_size=embed_cfg.max_batch_size, seq_len=stage1_cfg.seq_len, trainable=stage1_cfg.trainable,
        last_layers=stage1_cfg.last_layers, gradient_checkpointing=stage1_cfg.gradient_checkpointing,
        device=device, num_threads=torch.get_num_threads(),
    )
    torch.manual_seed(seed + 1_000_003 * rank)  # dropout streams differ per rank
    neg_gen = torch.Generator().manual_seed(seed * 7919 + 17 + rank)

    bsz = stage1_cfg.batch_size
    steps_per_epoch = math.ceil(n_min / bsz)
    total_steps = stage1_cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(trainer, dataclasses.replace(train_cfg, lr=stage1_cfg.lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(train_cfg.warmup_steps, total_steps))
    model: nn.Module = trainer
    if distributed:
        # Every rank loads the same base weights: broadcasting the frozen body is pure cost.
        frozen = [name for name, p in trainer.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            trainer, frozen + [name for name, _ in trainer.named_buffers()])
        model = DistributedDataParallel(
            trainer, device_ids=[device.index] if device.type == "cuda" else None,
            # With everything trainable, heads the pooling never reads (BERT's pooler) get no gradient.
            find_unused_parameters=stage1_cfg.trainable == "all",
        )

    settings = {
        "base_model": embed_cfg.model, "pooling": embed_cfg.pooling, "max_tokens": embed_cfg.max_tokens,
        "item_token": embed_cfg.item_token or None, "trainable": stage1_cfg.trainable,
        "last_layers": stage1_cfg.last_layers, "seq_len": stage1_cfg.seq_len, "n_items": len(catalog_ids),
    }
    os.makedirs(checkpoint_dir, exist_ok=True)
    last_path = os.path.join(checkpoint_dir, LAST_CHECKPOINT)
    state = _State()
    resumed_from: Optional[int] = None
    last_good: Optional[str] = None
    if os.path.exists(last_path):
        ckpt = load_checkpoint(last_path)
        if ckpt["settings"] != settings:
            raise ValueError(f"{last_path} was written by a run with settings {ckpt['settings']}, not "
                             f"{settings}; use a fresh checkpoint directory")
        trainer.load_trainable_state(ckpt["trainable_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for key in ("step", "epoch", "pos", "done", "stop_reason"):
            setattr(state, key, ckpt[key])
        if ckpt["world_size"] != world or ckpt["steps_per_epoch"] != steps_per_epoch:
            logger.warning("resuming %s with %d ranks / %d steps per epoch (saved: %d / %d): the data order "
                           "differs from an uninterrupted run", last_path, world, steps_per_epoch,
                           ckpt["world_size"], ckpt["steps_per_epoch"])
            state.pos = min(state.pos, steps_per_epoch)
        if rank < len(ckpt["rng"]):
            set_rng_state(ckpt["rng"][rank], neg_gen)
        resumed_from = state.step
        last_good = last_path
        logger.info("rank %d resumed %s at step %d", rank, last_path, state.step)
    if rank == 0 and metrics_path:
        truncate_metrics(metrics_path, state.step)

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            append_metrics(metrics_path, record)

    def save() -> None:
        nonlocal last_good
        rngs = all_gather_obj(rng_state(neg_gen))
        if rank == 0:
            atomic_save({
                "format": CHECKPOINT_FORMAT, "settings": settings, "trainable_state": trainer.trainable_state(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "world_size": world,
                "steps_per_epoch": steps_per_epoch, "rng": rngs,
                **{k: getattr(state, k) for k in ("step", "epoch", "pos", "done", "stop_reason")},
            }, last_path)
        if distributed:
            dist.barrier()  # no rank runs ahead of a checkpoint it might resume from
        last_good = last_path

    def reached_max_steps() -> bool:
        return bool(stage1_cfg.max_steps) and state.step >= stage1_cfg.max_steps

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    trainable = [p for p in trainer.parameters() if p.requires_grad]
    windows_done = 0
    t_start = time.perf_counter()
    trainer.train()
    while not state.done and state.epoch < stage1_cfg.epochs and not reached_max_steps():
        order = np.random.default_rng([seed, state.epoch, rank]).permutation(len(windows))
        for b in range(state.pos, steps_per_epoch):
            rows = order[b * bsz:(b + 1) * bsz]
            negatives = sample_negatives(len(catalog_ids), stage1_cfg.negatives, neg_gen).numpy()
            batch = trainer.make_batch(windows[rows], negatives, texts).to(device)
            with autocast:
                loss, n_targets = model(batch, temperature)
            finite = bool(torch.isfinite(loss.detach()))
            stat = all_reduce_(torch.tensor([float(loss.detach()) if finite else 0.0, 0.0 if finite else 1.0],
                                            dtype=torch.float64, device=device))
            if float(stat[1]) > 0:
                bad_ranks = [r for r, ok in all_gather_obj((rank, finite)) if not ok]
                raise NonFiniteLossError(
                    f"stage 1: non-finite loss at step {state.step + 1} (epoch {state.epoch}, batch {b}) on "
                    f"rank(s) {bad_ranks}; last good checkpoint: {last_good or 'none'}",
                    step=state.step + 1, user_ids=[], checkpoint_path=last_good,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                trainable, train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"stage 1: non-finite gradient (loss {float(stat[0]) / world:.4g}) at step {state.step + 1} "
                    f"(epoch {state.epoch}, batch {b}); last good checkpoint: {last_good or 'none'}",
                    step=state.step + 1, user_ids=[], checkpoint_path=last_good,
                )
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.pos = b + 1
            windows_done += len(rows) * world
            log({"kind": "train", "step": state.step, "epoch": state.epoch, "loss": float(stat[0]) / world,
                 "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "targets": n_targets})
            if reached_max_steps():
                break
            if train_cfg.checkpoint_every and state.step % train_cfg.checkpoint_every == 0:
                save()
        if state.pos >= steps_per_epoch:
            state.epoch += 1
            state.pos = 0
        if state.epoch >= stage1_cfg.epochs:
            state.done = True
    # Also right for a resumed run that had nothing left to do.
    state.stop_reason = "epochs" if state.done else ("max_steps" if reached_max_steps() else "")
    elapsed = time.perf_counter() - t_start
    save()
    encoder_path = os.path.abspath(output_dir)
    if rank == 0:
        trainer.save_encoder(encoder_path, info={"base_model": embed_cfg.model, "steps": state.step})
    if distributed:
        dist.barrier()
    result = {
        "steps": state.step,
        "epochs": state.epoch,
        "stop_reason": state.stop_reason,
        "resumed_from_step": resumed_from,
        "world_size": world,
        "train_windows": n_total,
        "n_items": len(catalog_ids),
        "windows_per_s": windows_done / elapsed if elapsed > 0 and windows_done else 0.0,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in trainer.parameters()),
        "encoder_path": encoder_path,
        "last_checkpoint": last_path,
    }
    if rank == 0:
        logger.info("stage-1 training finished: %s", result)
    return result
