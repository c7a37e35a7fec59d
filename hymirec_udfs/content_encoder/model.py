"""Stage-1 model: the content LLM with a small causal user model, trained end to end.

The content LLM (any local transformers checkpoint, pooled exactly as the embed stage
pools it) embeds the items of a step on the fly; a shallow causal transformer reads a
recent window of item embeddings and predicts the next item; the loss is InfoNCE against
sampled catalog negatives embedded in the same forward pass. For ``last_token`` pooling
the item token's input embedding is a separate trained parameter, written into the
embedding matrix on save.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hymirec_udfs.core.choices import Trainable
from hymirec_udfs.core.config import Stage1Config
from hymirec_udfs.recommender.dmil import dmil_loss

if TYPE_CHECKING:  # pragma: no cover

    from hymirec_udfs.embedding.encoder import ContentEncoder


# The user model: a shallow pre-norm transformer as wide as the LLM. Heads: the first of
# these that divides the width.
USER_MODEL_LAYERS = 2
USER_MODEL_HEAD_CHOICES = (8, 4, 2, 1)
USER_MODEL_FFN_MULT = 2
USER_MODEL_DROPOUT = 0.1
POSITION_INIT_STD = 0.02

# Written next to the saved checkpoint; not one of the files compute_model_id hashes.
ENCODER_INFO_FILE = "hymirec_stage1.json"


class ContentEncoderTrainingError(ValueError):
    """Stage 1 cannot run (empty input) or its result cannot be used (none, stale, missing)."""


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
    if mode not in Trainable.values():
        raise ValueError(f"stage1.trainable must be one of {Trainable.values()}, got {mode!r}")
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

    The LLM is loaded and pooled by :class:`hymirec_udfs.embedding.encoder.ContentEncoder`, so the
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
        from hymirec_udfs.embedding.encoder import ContentEncoder, Pooling

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
        from hymirec_udfs.embedding.encoder import plan_token_budget_batches

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
