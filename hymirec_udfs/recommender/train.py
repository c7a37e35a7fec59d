"""Stage-2 training loop: validation, early stopping, checkpoints and resume.

:func:`train` is the function every TorchDistributor process runs (top level, picklable,
keyword-only). It reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
``MASTER_PORT`` as set by TorchDistributor (or torchrun); without ``WORLD_SIZE`` (or with
one process) it runs single-process with no process group.

Data: each rank reads its share of the ``sequences`` table's Parquet files (files
round-robin by rank; with fewer files than ranks every rank reads all files and keeps the
rows whose index is congruent to its rank). Ranks run the same number of steps per epoch
(the smallest share decides) so DDP collectives always pair up.

Checkpoints (``<checkpoint_dir>/last.pt`` and ``best.pt``) hold everything needed to
continue bit-for-bit: model, optimizer, scheduler, step, epoch, position in the epoch,
every rank's torch / CUDA / numpy / Python / negative-sampler RNG state, the validation
history and the early-stopping state, plus the model type, the effective model config and
the item store path so :func:`load_trained_model` can rebuild the model for evaluation.
They are written to a temporary file and moved into place with ``os.replace``, so a kill
never leaves half a checkpoint. ``max_steps`` only stops the run: the learning-rate
schedule is laid out over ``epochs`` so a run stopped at K1 and resumed to K2 follows the
same schedule as one run to K2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from hymirec_udfs.core.choices import ModelType
from hymirec_udfs.core.config import DmilConfig, ModelConfig, SequencesConfig, TrainConfig
from hymirec_udfs.recommender.data import SequenceDataset, epoch_batches
from hymirec_udfs.recommender.dmil import gather_negatives, sample_negatives
from hymirec_udfs.recommender.item_store import ItemStore
from hymirec_udfs.recommender.models import build_model, effective_model_config, model_loss, score_against
from hymirec_udfs.training.checkpoints import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    append_metrics,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
    truncate_metrics,
)
from hymirec_udfs.training.ddp import all_gather_obj, all_reduce_, ddp_process, free_port
from hymirec_udfs.training.optim import NonFiniteLossError, WarmupCosine, build_optimizer

logger = logging.getLogger(__name__)
VALID_K = 10


@torch.no_grad()
def rank_of_targets(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    target_idx: torch.Tensor,
    exclude_idx: Optional[torch.Tensor] = None,
    chunk_items: int = 65536,
) -> torch.Tensor:
    """Exact full-catalog rank of each user's target (1 = best).

    A user's score for item i is ``max_j <u_j, v_i>`` (the cosine for unit vectors).
    The rank counts catalog items (padding row 0 excluded, ``exclude_idx`` excluded, the
    target itself excluded) scoring at least as high as the target, plus one: ties count
    against the target, the rule of the final evaluation
    (:func:`hymirec_udfs.evaluation.scoring.rank_targets`), so the checkpoint is chosen on
    the metric that is reported. The catalog is scored in chunks so memory stays
    bounded by ``B x chunk_items``.

    Args:
        user_vecs: (B, s, d).
        item_vecs: (N+1, d).
        target_idx: (B,) catalog index of the target.
        exclude_idx: (B, H) distinct items to drop from the ranking (0 = padding).
        chunk_items: catalog items per matmul.

    Returns:
        (B,) long ranks.
    """
    user_vecs = user_vecs.float()
    item_vecs = item_vecs.float()
    bsz = user_vecs.shape[0]
    n_rows = item_vecs.shape[0]
    t_score = score_against(user_vecs, item_vecs[target_idx][:, None, :])[:, 0]  # (B,)
    higher = torch.zeros(bsz, dtype=torch.long, device=user_vecs.device)
    skip_idx = target_idx[:, None]
    if exclude_idx is not None and exclude_idx.numel():
        skip_idx = torch.cat([skip_idx, exclude_idx], dim=1)
    for a in range(1, n_rows, chunk_items):
        b = min(a + chunk_items, n_rows)
        scores = score_against(user_vecs, item_vecs[a:b])  # (B, b-a)
        skip = torch.zeros(bsz, b - a + 1, dtype=torch.bool, device=scores.device)
        inside = (skip_idx >= a) & (skip_idx < b)
        skip.scatter_(1, torch.where(inside, skip_idx - a, b - a), True)
        higher += ((scores >= t_score[:, None]) & ~skip[:, :-1]).sum(1)
    return higher + 1


def ndcg_recall_at_k(ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user NDCG@K and Recall@K for one target: ``1/log2(rank+1)`` and ``rank <= K``."""
    hit = ranks <= k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks.double() + 1.0), torch.zeros_like(ranks, dtype=torch.double))
    return ndcg, hit.double()


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: SequenceDataset,
    *,
    batch_size: int,
    device: torch.device,
    k: int = VALID_K,
    chunk_items: int = 65536,
) -> tuple[float, float, int]:
    """Sums of NDCG@K and Recall@K over a dataset (history excluded) and its size.

    Args:
        model: model (unwrapped); switched to eval mode and back.
        dataset: validation samples loaded ``with_exclude``.
        batch_size: users per forward pass.
        device: model device.
        k: cutoff.
        chunk_items: catalog items per scoring matmul.

    Returns:
        ``(ndcg_sum, recall_sum, count)`` over this rank's samples.
    """
    was_training = model.training
    model.eval()
    ndcg_sum = recall_sum = 0.0
    count = 0
    item_vecs = model.item_vectors()
    for batch in dataset.batches(batch_size):
        batch = batch.to(device)
        keep = batch.target_mask[:, 0]
        if not bool(keep.any()):
            continue
        user_vecs = model(batch.long_idx[keep], batch.recent_idx[keep])
        ranks = rank_of_targets(user_vecs, item_vecs, batch.target_idx[keep, 0], batch.exclude_idx[keep], chunk_items)
        ndcg, recall = ndcg_recall_at_k(ranks, k)
        ndcg_sum += float(ndcg.sum())
        recall_sum += float(recall.sum())
        count += int(keep.sum())
    model.train(was_training)
    return ndcg_sum, recall_sum, count


def load_trained_model(
    checkpoint_path: str,
    *,
    item_store_path: Optional[str] = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a trained model for evaluation.

    Args:
        checkpoint_path: a ``last.pt`` / ``best.pt`` written by :func:`train`.
        item_store_path: item store to use instead of the path saved in the checkpoint
            (when the files moved).
        map_location: device for the weights.

    Returns:
        The model in eval mode; ``model.model_type`` names its type. Rank with
        ``model(long_idx, recent_idx)`` against ``model.item_vectors()`` (dot product).
    """
    ckpt = load_checkpoint(checkpoint_path, map_location)
    store = ItemStore.load(item_store_path or ckpt["item_store_path"])
    model = build_model(
        ckpt["model_type"],
        ModelConfig(**ckpt["model_config"]),
        store,
        dmil_cfg=DmilConfig(**ckpt["dmil_config"]),
        max_long=ckpt["max_long"],
        max_recent=ckpt["recent_window"],
    )
    model.load_state_dict(ckpt["model_state"])
    return model.to(map_location).eval()


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    pos: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    done: bool = False
    stop_reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


def load_parameters(model: nn.Module, checkpoint_path: str) -> None:
    """Copy ``checkpoint_path``'s parameters into ``model`` (buffers stay: they are today's
    catalog). Raises ValueError naming the parameters that are missing or of another shape."""
    saved = load_checkpoint(checkpoint_path)["model_state"]
    params = dict(model.named_parameters())
    wrong = [f"{name} {tuple(saved[name].shape) if name in saved else 'missing'} vs {tuple(p.shape)}"
             for name, p in params.items() if name not in saved or saved[name].shape != p.shape]
    if wrong:
        raise ValueError(f"cannot warm-start from {checkpoint_path}: parameters differ: {wrong[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def train(
    *,
    model_type: Optional[str] = None,
    model_cfg: Optional[ModelConfig] = None,
    dmil_cfg: Optional[DmilConfig] = None,
    train_cfg: Optional[TrainConfig] = None,
    item_store_path: str,
    train_files: Sequence[str],
    valid_files: Sequence[str] = (),
    checkpoint_dir: str,
    metrics_path: Optional[str] = None,
    max_long: int = SequencesConfig.max_long,
    recent_window: int = SequencesConfig.recent_window,
    window_targets: int = SequencesConfig.window_targets,
    stride: int = SequencesConfig.stride,
    max_samples_per_user: int = SequencesConfig.max_samples_per_user,
    chunk_items: int = 65536,
    bucket_batches: int = 50,
    init_checkpoint: Optional[str] = None,
    cuts_per_epoch: int = SequencesConfig.cuts_per_epoch,
) -> dict[str, Any]:
    """Train a stage-2 model (one TorchDistributor process; rank from the environment).

    ``init_checkpoint`` warm-starts a fresh run from another run's weights (the daily
    fine-tune from the champion): its parameters, not its buffers (the catalog arrays are
    today's) nor its optimizer; every parameter must exist with the same shape.

    Args:
        model_type: ``hymirec``, ``sasrec`` or ``hllm``; None uses ``train_cfg.model_type``.
        model_cfg: model section (default ``ModelConfig()``).
        dmil_cfg: DMIL section (default ``DmilConfig()``).
        train_cfg: training section (default ``TrainConfig()``).
        item_store_path: an item store directory (:meth:`ItemStore.save`; a legacy ``.npz`` too).
        train_files: Parquet files of the ``sequences`` table (one row per user; the rank
            reads its users' rows and cuts the training samples).
        valid_files: Parquet files the validation samples are cut from (may be the same).
        checkpoint_dir: where ``last.pt`` / ``best.pt`` live; an existing ``last.pt`` is
            resumed (a finished run returns its summary without training). Rank 0 writes,
            every rank reads on resume: across nodes it must be shared storage (DBFS, a
            Unity Catalog volume, NFS).
        metrics_path: JSON-lines file rank 0 appends per-step and per-epoch metrics to.
        max_long: long-history items kept (model position table size).
        recent_window: recent items kept.
        window_targets: next items used as targets of a training cut.
        stride: distance between training cut points.
        max_samples_per_user: cap on training cuts per user (0: none).
        cuts_per_epoch: k cuts per user drawn afresh each epoch (0: every cut every epoch).
        chunk_items: catalog items per validation scoring matmul.
        bucket_batches: length-bucketing window in batches (see :func:`epoch_batches`);
            0 or 1 gives plain shuffled batches.

    ``train_cfg.max_steps`` stops the run (checkpointing where it stops) without changing
    the learning-rate schedule, which spans ``epochs``; ``early_stopping_patience <= 0``
    disables early stopping. Validation (NDCG@10 / Recall@10, history excluded, exact
    full-catalog ranking) runs at every epoch end, sharded over ranks and all-reduced; a
    run stopped mid-epoch by ``max_steps`` also validates once, reported as ``final`` and
    logged with ``"partial": true`` but kept out of best / patience.

    Returns:
        ``final_val_ndcg@10``, ``best_val_ndcg@10`` (None without validation),
        ``best_epoch``, ``steps``, ``epochs`` (completed), ``best_checkpoint``,
        ``last_checkpoint``, ``samples_per_s`` (all ranks, this run, validation time
        excluded), ``validation_s``, ``stop_reason`` (``epochs``, ``early_stopping``,
        ``max_steps``), ``resumed_from_step``, ``world_size``, ``train_samples``. Every
        rank returns the same numbers (TorchDistributor keeps rank 0's).

    Raises:
        ValueError: no training samples, or the checkpoint directory holds another model.
        KeyError: a sequence names an item missing from the item store.
        NonFiniteLossError: the loss became NaN/Inf.
    """
    model_cfg = model_cfg or ModelConfig()
    dmil_cfg = dmil_cfg or DmilConfig()
    train_cfg = train_cfg or TrainConfig()
    model_type = model_type or train_cfg.model_type
    if model_type not in ModelType.values():
        raise ValueError(f"model_type must be one of {ModelType.values()}, got {model_type!r}")
    if not train_files:
        raise ValueError("train_files is empty: no sequences files to train on")

    with ddp_process(train_cfg) as (rank, world, device):
        return _train_loop(
            model_type=model_type, model_cfg=model_cfg, dmil_cfg=dmil_cfg, train_cfg=train_cfg,
            item_store_path=item_store_path, train_files=list(train_files), valid_files=list(valid_files),
            checkpoint_dir=checkpoint_dir, metrics_path=metrics_path, max_long=max_long,
            recent_window=recent_window, window_targets=window_targets, stride=stride,
            max_samples_per_user=max_samples_per_user, chunk_items=chunk_items, bucket_batches=bucket_batches,
            rank=rank, world=world, device=device, init_checkpoint=init_checkpoint, cuts_per_epoch=cuts_per_epoch,
        )


def _train_loop(
    *,
    model_type: str,
    model_cfg: ModelConfig,
    dmil_cfg: DmilConfig,
    train_cfg: TrainConfig,
    item_store_path: str,
    train_files: list[str],
    valid_files: list[str],
    checkpoint_dir: str,
    metrics_path: Optional[str],
    max_long: int,
    recent_window: int,
    window_targets: int,
    stride: int,
    max_samples_per_user: int,
    chunk_items: int,
    bucket_batches: int,
    rank: int,
    world: int,
    device: torch.device,
    init_checkpoint: Optional[str] = None,
    cuts_per_epoch: int = 0,
) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    distributed = world > 1

    seed = train_cfg.seed
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # identical initial weights on every rank
    item_store_path = os.path.abspath(item_store_path)
    store = ItemStore.load(item_store_path)
    eff_cfg = effective_model_config(model_type, model_cfg, dmil_cfg)
    model = build_model(model_type, eff_cfg, store, dmil_cfg=dmil_cfg, max_long=max(1, max_long),
                        max_recent=recent_window).to(device)
    if init_checkpoint and not os.path.exists(os.path.join(checkpoint_dir, LAST_CHECKPOINT)):
        load_parameters(model, init_checkpoint)
    torch.manual_seed(seed + 1_000_003 * rank)  # dropout streams differ per rank
    neg_gen = torch.Generator().manual_seed(seed * 7919 + 17 + rank)

    train_ds = SequenceDataset(train_files, store, split="train", max_long=max_long, recent_window=recent_window,
                               window_targets=window_targets, stride=stride,
                               max_samples_per_user=max_samples_per_user, rank=rank, world_size=world,
                               cuts_per_epoch=cuts_per_epoch)
    if eff_cfg.item_id_trained_only and getattr(model, "item_id", None) is not None:
        # The ID residual only for items some rank trains on as a target (one int32 per
        # item all-reduced once: 40 MB at 10M items); the rest are scored by content.
        live = torch.from_numpy(train_ds.target_item_mask(store.n_items + 1)).to(device=device, dtype=torch.int32)
        all_reduce_(live, dist.ReduceOp.MAX if distributed else None)
        model.set_item_id_live(live > 0)
    n_local = torch.tensor([len(train_ds), len(train_ds)], dtype=torch.long, device=device)
    n_min = all_reduce_(n_local[:1].clone(), dist.ReduceOp.MIN if distributed else None)
    n_total = all_reduce_(n_local[1:].clone())
    if int(n_total) == 0:
        raise ValueError(f"no training samples (split 'train') in train_files {train_files[:5]}"
                         f"{' ...' if len(train_files) > 5 else ''}")
    if int(n_min) == 0:
        raise ValueError(f"a rank got no training samples ({len(train_files)} file(s) over {world} ranks; "
                         f"rank {rank} read {train_ds.files})")
    bsz = train_cfg.batch_size
    steps_per_epoch = math.ceil(int(n_min) / bsz)
    total_steps = train_cfg.epochs * steps_per_epoch
    valid_ds = None
    if valid_files and train_cfg.eval_every_epoch:
        valid_ds = SequenceDataset(valid_files, store, split="valid", max_long=max_long,
                                   recent_window=recent_window, rank=rank, world_size=world, with_exclude=True)

    optimizer = build_optimizer(model, train_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(train_cfg.warmup_steps, total_steps))
    ddp_model: nn.Module = model
    if distributed:
        # Every buffer (catalog arrays, rotary tables) is a constant every rank builds
        # identically: broadcasting a large catalog at init or each step is pure cost.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, _ in model.named_buffers()]
        )
        ddp_model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # A pretrained checkpoint may carry heads (poolers) the recommender never uses.
            find_unused_parameters=bool(eff_cfg.llm_checkpoint) and model_type != "sasrec",
        )

    os.makedirs(checkpoint_dir, exist_ok=True)
    last_path = os.path.join(checkpoint_dir, LAST_CHECKPOINT)
    best_path = os.path.join(checkpoint_dir, BEST_CHECKPOINT)
    state = _State()
    resumed_from: Optional[int] = None
    last_good: Optional[str] = None
    if os.path.exists(last_path):
        ckpt = load_checkpoint(last_path)  # CPU: RNG states must stay CPU tensors
        if (ckpt["model_type"] != model_type or ckpt["model_config"] != dataclasses.asdict(eff_cfg)
                or ckpt["catalog_shape"] != [store.n_items, store.dim]):
            raise ValueError(
                f"{last_path} holds a {ckpt['model_type']} model with config {ckpt['model_config']} over a "
                f"catalog of {ckpt['catalog_shape']} (items, dim), not this {model_type} run's "
                f"{dataclasses.asdict(eff_cfg)} over {[store.n_items, store.dim]}; use a fresh checkpoint_dir"
            )
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for key in ("step", "epoch", "pos", "best_metric", "best_epoch", "bad_epochs", "done", "stop_reason"):
            setattr(state, key, ckpt[key])
        state.history = list(ckpt["history"])
        if ckpt["world_size"] != world or ckpt["steps_per_epoch"] != steps_per_epoch:
            logger.warning("resuming %s with %d ranks / %d steps per epoch (saved: %d / %d): "
                           "the data order differs from an uninterrupted run", last_path, world,
                           steps_per_epoch, ckpt["world_size"], ckpt["steps_per_epoch"])
            state.pos = min(state.pos, steps_per_epoch)
        if rank < len(ckpt["rng"]):
            set_rng_state(ckpt["rng"][rank], neg_gen)
        resumed_from = state.step
        last_good = last_path
        if state.stop_reason == "max_steps":
            state.stop_reason = ""
        logger.info("rank %d resumed from %s at step %d (epoch %d, batch %d)", rank, last_path,
                    state.step, state.epoch, state.pos)
    if rank == 0 and metrics_path:
        truncate_metrics(metrics_path, state.step)

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            append_metrics(metrics_path, record)

    def save(also_best: bool = False) -> None:
        nonlocal last_good
        rngs = all_gather_obj(rng_state(neg_gen))
        if rank == 0:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "model_type": model_type,
                "model_config": dataclasses.asdict(eff_cfg),
                "dmil_config": dataclasses.asdict(dmil_cfg),
                "train_config": dataclasses.asdict(train_cfg),
                "item_store_path": item_store_path,
                "catalog_shape": [store.n_items, store.dim],
                "max_long": max(1, max_long),
                "recent_window": recent_window,
                "model_state": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "world_size": world,
                "steps_per_epoch": steps_per_epoch,
                "rng": rngs,
                **{k: getattr(state, k) for k in ("step", "epoch", "pos", "best_metric", "best_epoch",
                                                   "bad_epochs", "done", "stop_reason", "history")},
            }
            atomic_save(payload, last_path)
            if also_best:
                atomic_save(payload, best_path)
        if distributed:
            dist.barrier()  # no rank runs ahead of a checkpoint it might need to resume
        last_good = last_path

    def run_validation() -> Optional[tuple[float, float]]:
        nonlocal val_seconds
        if valid_ds is None:
            return None
        t0 = time.perf_counter()
        sums = validate(model, valid_ds, batch_size=bsz, device=device, chunk_items=chunk_items)
        tot = all_reduce_(torch.tensor(sums, dtype=torch.float64, device=device))
        val_seconds += time.perf_counter() - t0
        if float(tot[2]) == 0:
            return None
        return float(tot[0] / tot[2]), float(tot[1] / tot[2])

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    final_metric: Optional[float] = state.history[-1]["val_ndcg@10"] if state.history else None
    samples = 0
    t_start = time.perf_counter()
    model.train()
    val_seconds = 0.0

    def reached_max_steps() -> bool:
        return bool(train_cfg.max_steps) and state.step >= train_cfg.max_steps

    while not state.done and state.epoch < train_cfg.epochs and not reached_max_steps():
        train_ds.select_epoch(state.epoch, seed)  # k sampled cuts per user (no-op without k)
        batches = epoch_batches(train_ds.long_lengths, bsz, np.random.default_rng([seed, state.epoch, rank]),
                                bucket_batches)
        stopped_mid_epoch = False
        for b in range(state.pos, steps_per_epoch):
            batch = train_ds.collate(batches[b]).to(device)
            neg_ids = None
            if model_type != "sasrec":
                neg_ids = gather_negatives(sample_negatives(store.n_items, dmil_cfg.negatives, neg_gen).to(device))
            with autocast:
                loss, _ = model_loss(ddp_model, batch, dmil_cfg, neg_ids)
            finite = bool(torch.isfinite(loss.detach()))
            stat = all_reduce_(torch.tensor([float(loss.detach()) if finite else 0.0, 0.0 if finite else 1.0],
                                            dtype=torch.float64, device=device))
            if float(stat[1]) > 0:
                reports = all_gather_obj((rank, finite, batch.user_ids))
                bad = [(r, users) for r, ok, users in reports if not ok]
                bad_users = [u for _, users in bad for u in users]
                raise NonFiniteLossError(
                    f"non-finite loss at step {state.step + 1} (epoch {state.epoch}, batch {b}) on rank(s) "
                    f"{[r for r, _ in bad]}; users in the batch: {bad_users[:20]}"
                    f"{' ...' if len(bad_users) > 20 else ''}; last good checkpoint: {last_good or 'none'}",
                    step=state.step + 1, user_ids=bad_users, checkpoint_path=last_good,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The norm is taken after DDP's all-reduce, so every rank sees the same value
            # and they all stop together; max_norm=inf only measures.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                model.parameters(), train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient (loss {float(stat[0]) / world:.4g}) at step {state.step + 1} "
                    f"(epoch {state.epoch}, batch {b}); users in the rank-{rank} batch: {batch.user_ids[:20]}"
                    f"{' ...' if len(batch) > 20 else ''}; last good checkpoint: {last_good or 'none'}",
                    step=state.step + 1, user_ids=list(batch.user_ids), checkpoint_path=last_good,
                )
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.pos = b + 1
            samples += len(batch) * world
            log({"kind": "train", "step": state.step, "epoch": state.epoch, "loss": float(stat[0]) / world,
                 "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                 "samples_per_s": samples / max(time.perf_counter() - t_start - val_seconds, 1e-9)})
            if reached_max_steps() and state.pos < steps_per_epoch:
                state.stop_reason = "max_steps"
                save()
                stopped_mid_epoch = True
                break
            if train_cfg.checkpoint_every and state.step % train_cfg.checkpoint_every == 0:
                save()
        if stopped_mid_epoch:
            metrics = run_validation()
            if metrics is not None:
                final_metric = metrics[0]
                # Not an epoch boundary: reported, but kept out of best/patience so a
                # resumed run makes the same early-stopping decisions.
                log({"kind": "val", "partial": True, "step": state.step, "epoch": state.epoch,
                     "val_ndcg@10": metrics[0], "val_recall@10": metrics[1]})
            break
        state.epoch += 1
        state.pos = 0
        improved = False
        metrics = run_validation()
        if metrics is not None:
            final_metric = metrics[0]
            entry = {"kind": "val", "step": state.step, "epoch": state.epoch,
                     "val_ndcg@10": metrics[0], "val_recall@10": metrics[1]}
            state.history.append(entry)
            log(entry)
            if metrics[0] > state.best_metric:
                state.best_metric, state.best_epoch, state.bad_epochs = metrics[0], state.epoch, 0
                improved = True
            else:
                state.bad_epochs += 1
                if train_cfg.early_stopping_patience > 0 and state.bad_epochs >= train_cfg.early_stopping_patience:
                    state.done, state.stop_reason = True, "early_stopping"
        if state.epoch >= train_cfg.epochs:
            state.done, state.stop_reason = True, state.stop_reason or "epochs"
        if reached_max_steps() and not state.done:
            state.stop_reason = "max_steps"
        save(also_best=improved)
    elapsed = time.perf_counter() - t_start - val_seconds
    if reached_max_steps() and not state.done:
        state.stop_reason = "max_steps"

    has_val = state.best_epoch >= 0
    if last_good is None:  # zero epochs requested: still leave a loadable checkpoint
        save()
    result = {
        "final_val_ndcg@10": final_metric,
        "best_val_ndcg@10": state.best_metric if has_val else None,
        "best_epoch": state.best_epoch if has_val else None,
        "steps": state.step,
        "epochs": state.epoch,
        "best_checkpoint": best_path if has_val and os.path.exists(best_path) else last_path,
        "last_checkpoint": last_path,
        "samples_per_s": samples / elapsed if elapsed > 0 and samples else 0.0,  # validation excluded
        "validation_s": val_seconds,
        "stop_reason": state.stop_reason or ("done" if state.done else ""),
        "resumed_from_step": resumed_from,
        "world_size": world,
        "train_samples": int(n_total),
    }
    if rank == 0:
        logger.info("training finished: %s", result)
    return result


def _local_process_entry(local_rank: int, world: int, port: int, kwargs: dict[str, Any], queue: Any) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
    })
    result = train(**kwargs)
    queue.put((local_rank, result))


def train_local_processes(num_processes: int = 2, **train_kwargs: Any) -> list[dict[str, Any]]:
    """Run :func:`train` in ``num_processes`` local processes (DDP), without Spark.

    The same environment TorchDistributor's local mode sets up (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``, ...), for tests and CPU debugging. An exception in
    any process is re-raised here with its traceback.

    Args:
        num_processes: number of ranks.
        **train_kwargs: keyword arguments of :func:`train`.

    Returns:
        Every rank's result, in rank order.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_local_process_entry, args=(num_processes, free_port(), train_kwargs, queue),
             nprocs=num_processes, join=True)
    results: dict[int, dict[str, Any]] = {}
    while not queue.empty():
        rank, result = queue.get()
        results[rank] = result
    return [results[r] for r in sorted(results)]
