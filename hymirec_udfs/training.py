"""Stage-2 training: data loading, the DDP training loop, checkpoints and resume.

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

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from hymirec_udfs.config import DmilConfig, ModelConfig, SequencesConfig, TrainConfig
from hymirec_udfs.dmil import gather_negatives, sample_negatives
from hymirec_udfs.models import (
    MODEL_TYPES,
    ItemStore,
    build_model,
    effective_model_config,
    model_loss,
    score_against,
)

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_FORMAT = 1
VALID_K = 10

# Sequences table columns (the contract with the build_sequences stage).
COL_USER = "user_id"
COL_SPLIT = "split"
COL_CUT = "cut"
COL_LONG = "long_ids"
COL_RECENT = "recent_ids"
COL_TARGET = "target_ids"
COL_EXCLUDE = "exclude_ids"

_SPLIT_DIR = re.compile(r"(?:^|[/\\])split=([^/\\]+)")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite.

    Attributes:
        step: the optimizer step that produced it (1-based: step K follows K-1 updates).
        user_ids: users of the offending batch (on the ranks where it was non-finite).
        checkpoint_path: the last good checkpoint, or None when none was written.
    """

    def __init__(self, message: str, step: int, user_ids: list[str], checkpoint_path: Optional[str]) -> None:
        super().__init__(message)
        self.step = step
        self.user_ids = user_ids
        self.checkpoint_path = checkpoint_path


# Data ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One collated batch; index tensors are catalog indices, left-padded with 0.

    Attributes:
        long_idx: (B, Lh) long history, oldest first.
        recent_idx: (B, n) recent window, oldest first.
        target_idx: (B, w) targets (train: next w items; valid/test: the held-out item).
        target_mask: (B, w) bool, True for real targets.
        exclude_idx: (B, H) distinct history items to drop from the ranking (target and
            padding removed); (B, 0) for training batches.
        user_ids: the samples' users, for error messages.
    """

    long_idx: torch.Tensor
    recent_idx: torch.Tensor
    target_idx: torch.Tensor
    target_mask: torch.Tensor
    exclude_idx: torch.Tensor
    user_ids: list[str]

    def to(self, device: torch.device) -> "Batch":
        """The batch with its tensors on ``device``."""
        return Batch(
            long_idx=self.long_idx.to(device, non_blocking=True),
            recent_idx=self.recent_idx.to(device, non_blocking=True),
            target_idx=self.target_idx.to(device, non_blocking=True),
            target_mask=self.target_mask.to(device, non_blocking=True),
            exclude_idx=self.exclude_idx.to(device, non_blocking=True),
            user_ids=self.user_ids,
        )

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass
class _Ragged:
    """A list column as catalog indices in CSR form (values[starts[i]:ends[i]])."""

    values: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def row(self, i: int, keep_last: int = 0) -> np.ndarray:
        start, end = int(self.starts[i]), int(self.ends[i])
        if keep_last and end - start > keep_last:
            start = end - keep_last
        return self.values[start:end]

    @staticmethod
    def concat(parts: list["_Ragged"]) -> "_Ragged":
        values, starts, ends, base = [], [], [], 0
        for p in parts:
            values.append(p.values)
            starts.append(p.starts + base)
            ends.append(p.ends + base)
            base += len(p.values)
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return _Ragged(np.zeros(0, dtype=np.int32), empty, empty)
        return _Ragged(np.concatenate(values), np.concatenate(starts), np.concatenate(ends))

    def take(self, rows: np.ndarray) -> "_Ragged":
        return _Ragged(self.values, self.starts[rows], self.ends[rows])


def shard_files(files: Sequence[str], rank: int, world_size: int) -> tuple[list[str], bool]:
    """The files a rank reads.

    Args:
        files: all Parquet files, in a deterministic order.
        rank: this rank.
        world_size: number of ranks.

    Returns:
        ``(files, split_rows)``: round-robin files when there are at least as many files
        as ranks; otherwise all files with ``split_rows`` True (keep rows ``i % world ==
        rank``).
    """
    files = list(files)
    if world_size <= 1:
        return files, False
    if len(files) >= world_size:
        return files[rank::world_size], False
    return files, True


def _split_from_path(path: str) -> Optional[str]:
    # Delta/Hive partitioning stores the partition value in the path, not in the file.
    match = _SPLIT_DIR.findall(path)
    return match[-1] if match else None


class SequenceDataset:
    """Samples of the ``sequences`` table mapped to catalog indices.

    Ids are looked up in the item store once at load time (in Arrow, without Python
    strings); an id with no embedding/code raises a KeyError naming the file, the column,
    the users and the ids.

    Args:
        files: Parquet files (the rank's share is selected here).
        item_store: catalog.
        split: keep rows of this split (``train``, ``valid``, ``test``); files whose
            ``split=`` partition directory names another split are skipped; None keeps
            everything.
        max_long: long history kept (most recent items).
        recent_window: recent items kept.
        rank: this rank.
        world_size: number of ranks.
        with_exclude: also load ``exclude_ids`` (evaluation).
    """

    def __init__(
        self,
        files: Sequence[str],
        item_store: ItemStore,
        *,
        split: Optional[str] = "train",
        max_long: int = SequencesConfig.max_long,
        recent_window: int = SequencesConfig.recent_window,
        rank: int = 0,
        world_size: int = 1,
        with_exclude: bool = False,
    ) -> None:
        import pyarrow as pa

        if max_long < 0 or recent_window < 1:
            raise ValueError(f"need max_long >= 0 and recent_window >= 1, got {max_long}, {recent_window}")
        self.item_store = item_store
        self.max_long = max_long
        self.recent_window = recent_window
        self.with_exclude = with_exclude
        my_files, split_rows = shard_files(files, rank, world_size)
        self.files = my_files
        users: list[np.ndarray] = []
        cols: dict[str, list[_Ragged]] = {COL_LONG: [], COL_RECENT: [], COL_TARGET: [], COL_EXCLUDE: []}
        wanted = [COL_LONG, COL_RECENT, COL_TARGET] + ([COL_EXCLUDE] if with_exclude else [])
        offset = 0
        for path in my_files:
            table = self._read(path, split, wanted)
            n = table.num_rows
            if split_rows:
                keep = np.nonzero((np.arange(offset, offset + n) % world_size) == rank)[0]
                offset += n
                table = table.take(pa.array(keep))
            if table.num_rows == 0:
                continue
            user_col = np.asarray(table.column(COL_USER).cast(pa.string()).to_pylist(), dtype=object)
            users.append(user_col)
            for name in wanted:
                cols[name].append(self._index_column(table.column(name), name, user_col, path))
        self.user_ids = np.concatenate(users) if users else np.zeros(0, dtype=object)
        self.long = _Ragged.concat(cols[COL_LONG])
        self.recent = _Ragged.concat(cols[COL_RECENT])
        self.target = _Ragged.concat(cols[COL_TARGET])
        self.exclude = _Ragged.concat(cols[COL_EXCLUDE]) if with_exclude else None
        self.max_targets = int((self.target.ends - self.target.starts).max()) if len(self) else 0

    @property
    def long_lengths(self) -> np.ndarray:
        """Long-history length of every sample after truncation to ``max_long``."""
        return np.minimum(self.long.ends - self.long.starts, self.max_long)

    @staticmethod
    def _read(path: str, split: Optional[str], wanted: list[str]) -> Any:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        path_split = _split_from_path(path)
        schema = pq.read_schema(path)
        missing = [c for c in [COL_USER] + wanted if c not in schema.names]
        if missing:
            raise ValueError(f"{path}: sequences file lacks column(s) {missing} (has {schema.names})")
        columns = [COL_USER] + wanted
        if split is not None and path_split is not None and path_split != split:
            return pq.read_table(path, columns=columns).slice(0, 0)
        has_split = COL_SPLIT in schema.names
        table = pq.read_table(path, columns=columns + ([COL_SPLIT] if has_split else []))
        if split is not None and has_split:
            table = table.filter(pc.equal(table.column(COL_SPLIT), split))
        return table.select(columns)

    def _index_column(self, column: Any, name: str, users: np.ndarray, path: str) -> _Ragged:
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = np.asarray(pc.list_value_length(arr).fill_null(0), dtype=np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        flat = pc.list_flatten(arr)
        idx = self.item_store.lookup(flat)
        bad = idx < 0
        if bad.any():
            bad_pos = np.nonzero(bad)[0]
            rows = np.searchsorted(ends, bad_pos, side="right")
            bad_users = list(dict.fromkeys(users[rows].tolist()))
            bad_ids = list(dict.fromkeys(flat.take(pa.array(bad_pos[:50])).to_pylist()))
            raise KeyError(
                f"{path}: column {name} of user(s) {bad_users[:5]} names {int(bad.sum())} item "
                f"occurrence(s) with no embedding/code in the item store, e.g. {bad_ids[:5]}"
            )
        return _Ragged(idx.astype(np.int32), starts, ends)

    def __len__(self) -> int:
        return len(self.user_ids)

    def collate(self, rows: Sequence[int] | np.ndarray) -> Batch:
        """Collate samples into a left-padded batch.

        Args:
            rows: sample positions in this dataset.

        Returns:
            The batch (CPU tensors).
        """
        rows = np.asarray(rows, dtype=np.int64)
        bsz = len(rows)
        longs = [self.long.row(r, self.max_long) if self.max_long else self.long.values[:0] for r in rows]
        recents = [self.recent.row(r, self.recent_window) for r in rows]
        targets = [self.target.row(r) for r in rows]

        def left_pad(seqs: list[np.ndarray], width: int) -> np.ndarray:
            out = np.zeros((bsz, width), dtype=np.int64)
            for i, seq in enumerate(seqs):
                if len(seq):
                    out[i, width - len(seq):] = seq
            return out

        long_w = max([len(x) for x in longs] + [1])
        recent_w = max([len(x) for x in recents] + [1])
        w = max([len(x) for x in targets] + [1])
        target = np.zeros((bsz, w), dtype=np.int64)
        for i, seq in enumerate(targets):
            target[i, : len(seq)] = seq  # targets are right-padded: t_1 is column 0
        if self.exclude is not None:
            excl = []
            for i, r in enumerate(rows):
                ex = np.unique(self.exclude.row(r))
                excl.append(ex[(ex != target[i, 0]) & (ex != 0)])
            exclude = left_pad(excl, max([len(x) for x in excl] + [0]))
        else:
            exclude = np.zeros((bsz, 0), dtype=np.int64)
        target_t = torch.from_numpy(target)
        return Batch(
            long_idx=torch.from_numpy(left_pad(longs, long_w)),
            recent_idx=torch.from_numpy(left_pad(recents, recent_w)),
            target_idx=target_t,
            target_mask=target_t != 0,
            exclude_idx=torch.from_numpy(exclude),
            user_ids=[str(u) for u in self.user_ids[rows]],
        )

    def batches(self, batch_size: int, order: Optional[np.ndarray] = None) -> Iterator[Batch]:
        """Consecutive batches over ``order`` (default: file order)."""
        order = np.arange(len(self)) if order is None else order
        for start in range(0, len(order), batch_size):
            yield self.collate(order[start : start + batch_size])


def epoch_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 50
) -> list[np.ndarray]:
    """One epoch's batches: shuffled, with length bucketing.

    The shuffled samples are cut into windows of ``bucket_batches`` batches; inside a
    window samples are sorted by long-history length before being cut into batches, and
    the batches are shuffled again. A batch is padded to its longest history, and the
    lightweight transformer's cost grows with the square of that length, so grouping
    similar lengths saves most of the padding work while every sample is still seen once
    per epoch in a random batch order.

    Args:
        lengths: (n,) long-history length of every sample (after truncation).
        batch_size: samples per batch.
        rng: generator seeded from (seed, epoch, rank), so a resumed run rebuilds the
            same batches.
        bucket_batches: batches per sorting window; 0 or 1 disables bucketing.

    Returns:
        Arrays of sample positions, ``ceil(n / batch_size)`` of them.
    """
    n = len(lengths)
    order = rng.permutation(n)
    if bucket_batches <= 1:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    window = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, n, window):
        part = order[start : start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


# Ranking ---------------------------------------------------------------------------------


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
    target itself excluded) scoring strictly higher than the target, plus one; ties are
    resolved in the target's favour. The catalog is scored in chunks so memory stays
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
        higher += ((scores > t_score[:, None]) & ~skip[:, :-1]).sum(1)
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


# Optimisation ----------------------------------------------------------------------------


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = max(0, warmup)
        self.total = max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms, scales and queries excluded)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and not name.endswith(("queries", "indicator"))
        (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.lr)


# Checkpoints -----------------------------------------------------------------------------


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[1].tolist(), "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "gauss": float(np_state[4])},
        "python": random.getstate(),
        "negatives": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(np_state["key"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["negatives"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (tensors, configs and plain values only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


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


# Training --------------------------------------------------------------------------------


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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


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
    chunk_items: int = 65536,
    bucket_batches: int = 50,
) -> dict[str, Any]:
    """Train a stage-2 model (one TorchDistributor process; rank from the environment).

    Args:
        model_type: ``hymirec``, ``sasrec`` or ``hllm``; None uses ``train_cfg.model_type``.
        model_cfg: model section (default ``ModelConfig()``).
        dmil_cfg: DMIL section (default ``DmilConfig()``).
        train_cfg: training section (default ``TrainConfig()``).
        item_store_path: ``.npz`` written by :meth:`ItemStore.save`.
        train_files: Parquet files of the ``sequences`` table (rows with split ``train``
            are used; the rank reads its share).
        valid_files: Parquet files holding the ``valid`` rows (may be the same files).
        checkpoint_dir: where ``last.pt`` / ``best.pt`` live; an existing ``last.pt`` is
            resumed (a finished run returns its summary without training). Rank 0 writes,
            every rank reads on resume: across nodes it must be shared storage (DBFS, a
            Unity Catalog volume, NFS).
        metrics_path: JSON-lines file rank 0 appends per-step and per-epoch metrics to.
        max_long: long-history items kept (model position table size).
        recent_window: recent items kept.
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
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if not train_files:
        raise ValueError("train_files is empty: no sequences files to train on")

    with ddp_process(train_cfg) as (rank, world, device):
        return _train_loop(
            model_type=model_type, model_cfg=model_cfg, dmil_cfg=dmil_cfg, train_cfg=train_cfg,
            item_store_path=item_store_path, train_files=list(train_files), valid_files=list(valid_files),
            checkpoint_dir=checkpoint_dir, metrics_path=metrics_path, max_long=max_long,
            recent_window=recent_window, chunk_items=chunk_items, bucket_batches=bucket_batches, rank=rank,
            world=world, device=device,
        )


@contextlib.contextmanager
def ddp_process(train_cfg: TrainConfig) -> Iterator[tuple[int, int, torch.device]]:
    """Set up this process as one DDP rank (from TorchDistributor/torchrun's environment).

    Picks the device (the local GPU with ``train.use_gpu``), joins the process group
    (gloo on CPU, nccl on GPU) unless one exists, and sets the torch thread count; all of
    it is undone on exit, because the caller's process may go on (tests, single-process).

    Yields:
        ``(rank, world_size, device)``.
    """
    import torch.distributed as dist

    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if train_cfg.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu is true but CUDA is not available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if train_cfg.use_gpu else "gloo", rank=rank, world_size=world)
        own_group = True
    prev_threads = torch.get_num_threads()
    # Oversubscribed OpenMP threads spin against each other: on a busy 2-core machine a
    # tiny matmul went from 2 ms to 100 ms with 2 threads instead of 1.
    torch.set_num_threads(train_cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    try:
        yield rank, world, device
    finally:
        torch.set_num_threads(prev_threads)
        if own_group:
            dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """In-place all-reduce (SUM by default) across ranks; a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_obj(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (``[obj]`` in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
    chunk_items: int,
    bucket_batches: int,
    rank: int,
    world: int,
    device: torch.device,
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
    torch.manual_seed(seed + 1_000_003 * rank)  # dropout streams differ per rank
    neg_gen = torch.Generator().manual_seed(seed * 7919 + 17 + rank)

    train_ds = SequenceDataset(train_files, store, split="train", max_long=max_long, recent_window=recent_window,
                               rank=rank, world_size=world)
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
            _set_rng_state(ckpt["rng"][rank], neg_gen)
        resumed_from = state.step
        last_good = last_path
        if state.stop_reason == "max_steps":
            state.stop_reason = ""
        logger.info("rank %d resumed from %s at step %d (epoch %d, batch %d)", rank, last_path,
                    state.step, state.epoch, state.pos)
    if rank == 0 and metrics_path:
        _truncate_metrics(metrics_path, state.step)

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            append_metrics(metrics_path, record)

    def save(also_best: bool = False) -> None:
        nonlocal last_good
        rngs = all_gather_obj(_rng_state(neg_gen))
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
            _atomic_save(payload, last_path)
            if also_best:
                _atomic_save(payload, best_path)
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
                 "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm})
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


def append_metrics(metrics_path: Optional[str], record: dict[str, Any]) -> None:
    """Append one JSON line to the metrics file (rank 0 only; no-op without a path)."""
    if metrics_path:
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines logged after ``step`` (a run killed after its last checkpoint
    logged steps the resumed run will log again)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) > step:
                    continue
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            kept.append(line)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)


# Local multi-process launcher ------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    mp.spawn(_local_process_entry, args=(num_processes, _free_port(), train_kwargs, queue),
             nprocs=num_processes, join=True)
    results: dict[int, dict[str, Any]] = {}
    while not queue.empty():
        rank, result = queue.get()
        results[rank] = result
    return [results[r] for r in sorted(results)]
