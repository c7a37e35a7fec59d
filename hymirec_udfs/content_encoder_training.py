"""Stage ``train_content_encoder``: fine-tune the content LLM with the recommendation loss.

Stage 1 proper of METHOD.md, HLLM-style. The content LLM (any local transformers
checkpoint, pooled exactly as the embed stage pools it) turns the texts of the items in a
step into embeddings on the fly; a small causal user model (a transformer encoder as wide
as the LLM) reads a short recent window of item embeddings and predicts the next item at
every position; the loss is InfoNCE (:func:`hymirec_udfs.dmil.dmil_loss` with one interest
and one target) against ``stage1.negatives`` catalog items sampled per step, whose
embeddings come from the same encoder in the same forward pass, so gradients reach the
encoder through positives and negatives alike. A negative equal to the target is masked.

Data. Windows are cut from each user's time-ordered history (ties by item id, as
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

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hymirec_udfs import schemas
from hymirec_udfs.config import Config, EmbedConfig, SequencesConfig, Stage1Config, TrainConfig
from hymirec_udfs.dmil import dmil_loss, sample_negatives
from hymirec_udfs.stages import StageContext, StageOutput, last_success
from hymirec_udfs.training import (
    all_gather_obj,
    all_reduce_,
    append_metrics,
    ddp_process,
    NonFiniteLossError,
    WarmupCosine,
    _atomic_save,
    _rng_state,
    _set_rng_state,
    _truncate_metrics,
    build_optimizer,
    load_checkpoint,
    shard_files,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

    from hymirec_udfs.embedding import ContentEncoder
    from hymirec_udfs.tables import TableStore

logger = logging.getLogger(__name__)

STAGE_NAME = "train_content_encoder"
LAST_CHECKPOINT = "last.pt"
ENCODER_DIR = "encoder"
CATALOG_DIR = "catalog"
WINDOWS_DIR = "windows"
METRICS_FILE = "metrics.jsonl"
# Written next to the saved checkpoint; not one of the files compute_model_id hashes.
ENCODER_INFO_FILE = "hymirec_stage1.json"
CHECKPOINT_FORMAT = 1

# Leave-one-out holds out each user's validation and test target.
HELD_OUT_PER_USER = 2
# A window needs an input and a next item.
MIN_WINDOW_ITEMS = 2
# Window files per DDP rank, so every rank reads files of its own.
FILES_PER_RANK = 2
# Steps averaged for the reported final loss.
FINAL_LOSS_STEPS = 10

# The user model: a shallow pre-norm transformer as wide as the LLM. Heads: the first of
# these that divides the width.
USER_MODEL_LAYERS = 2
USER_MODEL_HEAD_CHOICES = (8, 4, 2, 1)
USER_MODEL_FFN_MULT = 2
USER_MODEL_DROPOUT = 0.1
POSITION_INIT_STD = 0.02

TRAINABLE_CHOICES = ("all", "last_layers", "none")


class ContentEncoderTrainingError(ValueError):
    """Stage 1 cannot run (empty input) or its result cannot be used (none, stale, missing)."""


# Model -----------------------------------------------------------------------------------


class NextItemUserModel(nn.Module):
    """Causal transformer over item embeddings: the output at position t predicts item t+1.

    Windows are right-padded, so with the causal mask a real position never sees padding.

    Args:
        width: item embedding size (the LLM's hidden size).
        max_len: longest window.
        layers: transformer layers.
        dropout: dropout inside the layers.
    """

    def __init__(self, width: int, max_len: int, layers: int = USER_MODEL_LAYERS,
                 dropout: float = USER_MODEL_DROPOUT) -> None:
        super().__init__()
        heads = next(h for h in USER_MODEL_HEAD_CHOICES if width % h == 0)
        self.positions = nn.Parameter(torch.randn(max_len, width) * POSITION_INIT_STD)
        # Unit-norm item embeddings have tiny components; the norm puts them on the scale
        # the transformer layers expect.
        self.input_norm = nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=USER_MODEL_FFN_MULT * width, dropout=dropout,
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(width)

    def forward(self, item_emb: torch.Tensor) -> torch.Tensor:
        """(B, L, D) item embeddings -> (B, L, D) next-item predictions."""
        length = item_emb.shape[1]
        x = self.input_norm(item_emb + self.positions[:length].to(item_emb.dtype))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        return self.output_norm(self.encoder(x, mask=causal, is_causal=True))


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list of a transformers model (the longest ``ModuleList``).

    Covers BERT (``encoder.layer``), Llama/Mistral/Qwen (``layers``), GPT-2 (``h``) and the
    like without naming architectures.

    Raises:
        ValueError: the model has no ``ModuleList``.
    """
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no transformer layer list found; use stage1.trainable=all or none")
    return max(stacks, key=lambda item: len(item[1]))


def set_trainable(model: nn.Module, mode: str, last_layers: int = 1) -> tuple[int, int]:
    """Freeze the content LLM according to ``stage1.trainable``.

    ``all`` trains everything; ``none`` nothing; ``last_layers`` the last ``last_layers``
    blocks of :func:`find_layer_stack` plus the normalisation layers registered after the
    stack (Llama's final ``norm``, GPT-2's ``ln_f``), which shape every output; embeddings,
    earlier blocks and unused heads (BERT's pooler) stay frozen.

    Args:
        model: the transformers model.
        mode: ``all``, ``last_layers`` or ``none``.
        last_layers: blocks trained under ``last_layers`` (capped at the stack size).

    Returns:
        ``(trainable, total)`` parameter counts.

    Raises:
        ValueError: an unknown mode or ``last_layers < 1``.
    """
    if mode not in TRAINABLE_CHOICES:
        raise ValueError(f"stage1.trainable must be one of {TRAINABLE_CHOICES}, got {mode!r}")
    model.requires_grad_(mode == "all")
    if mode == "last_layers":
        if last_layers < 1:
            raise ValueError(f"stage1.last_layers must be >= 1, got {last_layers}")
        stack_name, stack = find_layer_stack(model)
        for block in list(stack)[-last_layers:]:
            block.requires_grad_(True)
        seen_stack = False
        for name, module in model.named_modules():
            if name == stack_name:
                seen_stack = True
            elif seen_stack and not name.startswith(f"{stack_name}.") and "norm" in type(module).__name__.lower():
                module.requires_grad_(True)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass
class Stage1Batch:
    """One step's input: the distinct items it touches and windows/negatives as rows of them.

    Attributes:
        token_ids: token ids of each distinct item (as :meth:`ContentEncoder.predict` feeds them).
        item_idx: (U,) catalog index (1-based) of each distinct item.
        window_rows: (B, L) row in ``token_ids`` of each window position, -1 for padding.
        negative_rows: (M,) row of each sampled negative.
    """

    token_ids: list[list[int]]
    item_idx: torch.Tensor
    window_rows: torch.Tensor
    negative_rows: torch.Tensor

    def to(self, device: torch.device) -> "Stage1Batch":
        """The batch with its tensors on ``device``."""
        return Stage1Batch(self.token_ids, self.item_idx.to(device), self.window_rows.to(device),
                           self.negative_rows.to(device))


class ContentEncoderTrainer(nn.Module):
    """The content LLM, its learnable item token and the user model, trained together.

    The LLM is loaded and pooled by :class:`hymirec_udfs.embedding.ContentEncoder`, so the
    embeddings trained here are computed exactly as the embed stage computes them.

    Args:
        model_path: model spec of the base checkpoint (see ``resolve_model_path``).
        pooling: ``mean``, ``cls`` or ``last_token``.
        max_tokens: tokens per item text.
        item_token: item token for ``last_token`` (None: the tokenizer's eos/sep).
        token_budget: padded tokens per forward chunk.
        max_batch_size: items per forward chunk.
        seq_len: longest window (user model positions).
        trainable: ``all``, ``last_layers`` or ``none``.
        last_layers: blocks trained under ``last_layers``.
        gradient_checkpointing: recompute activations in the backward pass.
        device: torch device.
        num_threads: CPU threads (None: leave torch's setting).
    """

    def __init__(
        self,
        model_path: str,
        *,
        pooling: str = "mean",
        max_tokens: int = 128,
        item_token: Optional[str] = None,
        token_budget: int = 8192,
        max_batch_size: int = 256,
        seq_len: int = Stage1Config.seq_len,
        trainable: str = Stage1Config.trainable,
        last_layers: int = Stage1Config.last_layers,
        gradient_checkpointing: bool = False,
        device: str | torch.device = "cpu",
        num_threads: Optional[int] = None,
    ) -> None:
        super().__init__()
        from hymirec_udfs.embedding import ContentEncoder, Pooling

        # fp32 weights; mixed precision on GPU comes from autocast in the training loop.
        encoder = ContentEncoder(
            model_path, pooling=pooling, max_tokens=max_tokens, token_budget=token_budget,
            max_batch_size=max_batch_size, device=str(device), dtype="fp32",
            num_threads=num_threads or torch.get_num_threads(), item_token=item_token,
        )
        self.content_encoder: "ContentEncoder" = encoder
        self.llm = encoder.model  # registered here so DDP, optimizer and state_dict see it
        self.trainable_params, self.total_params = set_trainable(self.llm, trainable, last_layers)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            if not getattr(self.llm, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(self.llm).__name__} does not support gradient checkpointing")
            self._set_checkpointing(True)
        self.item_token_id: Optional[int] = None
        if encoder.pooling is Pooling.LAST_TOKEN:
            self.item_token_id = int(encoder.item_token_id)
            row = self.llm.get_input_embeddings().weight[self.item_token_id].detach().float().clone()
            self.item_token_embedding = nn.Parameter(row)
            self.llm.get_input_embeddings().register_forward_hook(self._put_item_token)
        self.user_model = NextItemUserModel(encoder.dim, seq_len).to(encoder.device)
        self.seq_len = seq_len
        self.dim = encoder.dim
        self.train()

    def _set_checkpointing(self, on: bool) -> None:
        """Switch transformers' activation (gradient) checkpointing of the LLM."""
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
        renamed = hasattr(self.llm, "activation_checkpointing_enable")
        if not on:
            (self.llm.activation_checkpointing_disable if renamed else self.llm.gradient_checkpointing_disable)()
            return
        # Non-reentrant: gradients reach the trained blocks even when the frozen
        # embeddings feeding them do not require grad.
        kwargs = {"use_reentrant": False}
        if renamed:
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return self.content_encoder.device

    def _put_item_token(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        is_item_token = (args[0] == self.item_token_id).unsqueeze(-1)
        return torch.where(is_item_token, self.item_token_embedding.to(output.dtype), output)

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """L2-normalised embeddings of tokenized items, differentiable.

        Items run in token-budget chunks (:func:`plan_token_budget_batches`), each through
        the embed stage's own padding and pooling.

        Returns:
            (U, D) float32.
        """
        from hymirec_udfs.embedding import plan_token_budget_batches

        encoder = self.content_encoder
        chunks = plan_token_budget_batches([len(ids) for ids in token_ids], encoder.token_budget,
                                           encoder.max_batch_size)
        pooled = torch.cat([encoder._embed_batch([list(token_ids[i]) for i in chunk]).float() for chunk in chunks])
        order = torch.from_numpy(np.concatenate(chunks)).to(pooled.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return F.normalize(pooled[inverse], dim=-1)

    def make_batch(self, windows: np.ndarray, negatives: np.ndarray, texts: Sequence[str]) -> Stage1Batch:
        """Collect the distinct items of a step and tokenize them once.

        Args:
            windows: (B, L) catalog indices (1-based), right-padded with 0.
            negatives: (M,) catalog indices.
            texts: catalog texts; index i is ``texts[i - 1]``.

        Returns:
            The batch (CPU tensors).
        """
        windows = np.asarray(windows, dtype=np.int64)
        negatives = np.asarray(negatives, dtype=np.int64)
        items = np.unique(np.concatenate([windows[windows > 0], negatives]))
        token_ids = self.content_encoder.encode_token_ids([texts[i - 1] for i in items])
        rows = np.where(windows > 0, np.searchsorted(items, windows), -1)
        return Stage1Batch(token_ids, torch.from_numpy(items), torch.from_numpy(rows),
                           torch.from_numpy(np.searchsorted(items, negatives)))

    def forward(self, batch: Stage1Batch, temperature: float) -> tuple[torch.Tensor, int]:
        """InfoNCE of next-item prediction over a batch of windows.

        Returns:
            ``(loss, targets)``: the mean loss over the scored positions and their number.
        """
        emb = self.embed_token_ids(batch.token_ids)  # (U, D)
        valid = batch.window_rows >= 0
        rows = batch.window_rows.clamp(min=0)
        seq = emb[rows] * valid.unsqueeze(-1)
        predicted = self.user_model(seq[:, :-1])  # (B, L-1, D)
        target_rows = rows[:, 1:]
        has_target = valid[:, :-1] & valid[:, 1:]
        loss, _ = dmil_loss(
            predicted.reshape(-1, 1, self.dim),
            emb[target_rows].reshape(-1, 1, self.dim),
            has_target.reshape(-1, 1),
            batch.item_idx[target_rows].reshape(-1, 1),
            emb[batch.negative_rows],
            batch.item_idx[batch.negative_rows],
            s=1, matching="max", temperature=temperature,
        )
        return loss, int(has_target.sum())

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of texts as the embed stage would compute them with this model (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            return self.content_encoder.predict(list(texts))
        finally:
            self.train(was_training)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors training changes (what a checkpoint holds)."""
        return {name: p.detach().cpu() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state`.

        Raises:
            ValueError: the saved tensors are not this model's trainable ones.
        """
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            raise ValueError(f"checkpoint holds {len(state)} trainable tensors that do not match this model's "
                             f"{len(params)} (e.g. {sorted(set(state) ^ set(params))[:5]})")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def save_encoder(self, path: str | Path, info: Optional[dict[str, Any]] = None) -> str:
        """Save the LLM and tokenizer as a transformers checkpoint (item token included).

        Written to a temporary directory and moved into place, so a kill leaves either the
        old or the new checkpoint.

        Args:
            path: target directory (replaced).
            info: extra metadata for ``hymirec_stage1.json``.

        Returns:
            The directory.
        """
        target = Path(path)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad():
            if self.item_token_id is not None:
                weight = self.llm.get_input_embeddings().weight
                weight[self.item_token_id] = self.item_token_embedding.to(weight.dtype)
        if self.gradient_checkpointing:
            self._set_checkpointing(False)
        try:
            self.llm.save_pretrained(tmp)
        finally:
            if self.gradient_checkpointing:
                self._set_checkpointing(True)
        self.content_encoder.tokenizer.save_pretrained(tmp)
        meta = {"pooling": self.content_encoder.pooling.value, "max_tokens": self.content_encoder.max_tokens,
                "item_token": self.content_encoder.item_token, **(info or {})}
        (tmp / ENCODER_INFO_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return str(target)


# Data ------------------------------------------------------------------------------------


def build_windows(interactions: "DataFrame", items: "DataFrame", *, seq_len: int,
                  sequences_cfg: Optional[SequencesConfig] = None) -> "DataFrame":
    """Stage-1 windows: recent training-part item sequences per user.

    Args:
        interactions: ``interactions`` rows (``user_id``, ``item_id``, ``timestamp``).
        items: ``items`` rows; items whose text is empty are dropped from the windows.
        seq_len: items per window.
        sequences_cfg: the split of stage 2 (held-out items are never used).

    Returns:
        ``user_id``, ``window`` (0 = most recent), ``item_ids`` (oldest first, 2 to
        ``seq_len`` items).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if seq_len < MIN_WINDOW_ITEMS:
        raise ValueError(f"stage1.seq_len must be >= {MIN_WINDOW_ITEMS}, got {seq_len}")
    sequences_cfg = sequences_cfg or SequencesConfig()
    events = interactions.select("user_id", "item_id", "timestamp")
    if sequences_cfg.split == "leave_one_out":
        # The same order as build_sequences: (timestamp, item_id); the last two go.
        newest_first = Window.partitionBy("user_id").orderBy(F.col("timestamp").desc(), F.col("item_id").desc())
        events = (events.withColumn("_from_end", F.row_number().over(newest_first))
                  .where(F.col("_from_end") > HELD_OUT_PER_USER).drop("_from_end"))
    else:
        events = events.where(F.col("timestamp") < sequences_cfg.valid_cutoff)
    with_text = items.where(F.length(F.trim(F.coalesce("text", F.lit("")))) > 0).select("item_id")
    events = events.join(with_text, "item_id", "left_semi")
    users = (events.groupBy("user_id")
             .agg(F.array_sort(F.collect_list(F.struct("timestamp", "item_id"))).alias("events"))
             .select("user_id", F.transform("events", lambda e: e["item_id"]).alias("items"))
             .where(F.size("items") >= MIN_WINDOW_ITEMS))
    n = F.size("items")
    windows = users.select("user_id", "items", F.explode(
        F.sequence(F.lit(0), (F.ceil(n / F.lit(seq_len)) - 1).cast("int"))).alias("window"))
    end = n - F.col("window") * seq_len  # 1-based, inclusive
    start = F.greatest(F.lit(1), end - seq_len + 1)
    return (windows.select("user_id", F.col("window").cast("int").alias("window"),
                           F.slice("items", start, end - start + 1).alias("item_ids"))
            .where(F.size("item_ids") >= MIN_WINDOW_ITEMS))


def load_catalog(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """Catalog item ids (sorted; catalog index = position + 1) and their texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(path, columns=["item_id", "text"]) for path in files]
    if not tables:
        return [], []
    table = pa.concat_tables(tables).sort_by("item_id")
    return table.column("item_id").to_pylist(), table.column("text").to_pylist()


def load_windows(files: Sequence[str], catalog_ids: Sequence[str], *, seq_len: int, rank: int = 0,
                 world_size: int = 1) -> np.ndarray:
    """A rank's share of the window files as catalog indices.

    Args:
        files: window Parquet files (``item_ids`` column), in a deterministic order.
        catalog_ids: sorted catalog ids (:func:`load_catalog`).
        seq_len: window width.
        rank: this rank.
        world_size: number of ranks.

    Returns:
        (n, seq_len) int64, right-padded with 0.

    Raises:
        KeyError: a window names an item that is not in the catalog.
        ValueError: a window is longer than ``seq_len``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    mine, split_rows = shard_files(files, rank, world_size)
    parts, offset = [], 0
    for path in mine:
        column = pq.read_table(path, columns=["item_ids"]).column("item_ids").combine_chunks()
        if split_rows:
            keep = np.nonzero(np.arange(offset, offset + len(column)) % world_size == rank)[0]
            offset += len(column)
            column = column.take(pa.array(keep))
        parts.append(column)
    if not parts or sum(len(p) for p in parts) == 0:
        return np.zeros((0, seq_len), dtype=np.int64)
    column = pa.concat_arrays(parts)
    lengths = np.asarray(pc.list_value_length(column), dtype=np.int64)
    if lengths.max() > seq_len:
        raise ValueError(f"window of {lengths.max()} items in {mine[:3]} exceeds stage1.seq_len={seq_len}")
    flat = pc.list_flatten(column)
    index = pc.index_in(flat, value_set=pa.array(list(catalog_ids), pa.string()))
    if index.null_count:
        missing = flat.filter(pc.is_null(index)).unique().to_pylist()
        raise KeyError(f"windows name {len(missing)} item(s) missing from the catalog, e.g. {missing[:5]}")
    values = np.asarray(index, dtype=np.int64) + 1
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(values)) - np.repeat(starts, lengths)
    out = np.zeros((len(lengths), seq_len), dtype=np.int64)
    out[rows, cols] = values
    return out


# Training --------------------------------------------------------------------------------


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
            _set_rng_state(ckpt["rng"][rank], neg_gen)
        resumed_from = state.step
        last_good = last_path
        logger.info("rank %d resumed %s at step %d", rank, last_path, state.step)
    if rank == 0 and metrics_path:
        _truncate_metrics(metrics_path, state.step)

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            append_metrics(metrics_path, record)

    def save() -> None:
        nonlocal last_good
        rngs = all_gather_obj(_rng_state(neg_gen))
        if rank == 0:
            _atomic_save({
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


# The stage -------------------------------------------------------------------------------


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
    from hymirec_udfs.train_stage import DistributedRunError, run_distributed
    from pyspark.sql import functions as F

    from hymirec_udfs.embedding import compute_model_id, resolve_model_path

    items = ctx.read(schemas.ITEMS)
    interactions = ctx.read(schemas.INTERACTIONS)
    catalog = items.where(F.length(F.trim(F.coalesce("text", F.lit("")))) > 0).select("item_id", "text")
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
        (build_windows(interactions, items, seq_len=cfg.stage1.seq_len, sequences_cfg=cfg.sequences)
         .repartition(files, "user_id").sortWithinPartitions("user_id", "window")
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
    try:
        result = run_distributed("hymirec_udfs.content_encoder_training:train_content_encoder", kwargs, run_dir, cfg)
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
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            ctx.logger.metrics({f"stage1.{k}": v for k, v in record.items() if k not in ("step", "kind")},
                               step=int(record["step"]))
        ctx.logger.artifact(str(metrics_path), "training")
    ctx.logger.dict(result, "training/result.json")
    ctx.logger.artifact(encoder_path, ENCODER_DIR)
    ctx.logger.tags({"hymirec.encoder_path": encoder_path, "hymirec.encoder_model_id": model_id})


# Using the result ------------------------------------------------------------------------


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
        from hymirec_udfs.embedding import resolve_model_path

        return resolve_model_path(cfg.embed.model)
    return trained_encoder(store, cfg.embed).path
