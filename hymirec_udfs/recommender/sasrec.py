"""The SASRec baseline (item-ID self-attention, full-softmax next-item loss) and the
recency positions and dot-product scoring every stage-2 model shares. :mod:`hymirec_udfs.recommender.models`
builds it beside HyMiRec and HLLM and re-exports it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hymirec_udfs.core.config import ModelConfig
from hymirec_udfs.recommender.item_store import ItemStore


def recency_positions(idx: torch.Tensor) -> torch.Tensor:
    """Position of each entry counted from the most recent valid one (0), pads get 0.

    Args:
        idx: (B, L) indices, 0 = padding, left-padded.

    Returns:
        (B, L) long positions.
    """
    valid = (idx != 0).long()
    after = valid.flip(1).cumsum(1).flip(1)  # valid entries at or after each position
    return (after - 1).clamp(min=0) * valid


def score_against(user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
    """``max_j <u_j, v_i>`` for every user and item.

    Args:
        user_vecs: (B, s, d).
        item_vecs: (M, d), or (B, M, d) for per-user item lists.

    Returns:
        (B, M) scores.
    """
    if item_vecs.dim() == 2:
        return torch.einsum("bsd,md->bsm", user_vecs, item_vecs).amax(1)
    return torch.einsum("bsd,bmd->bsm", user_vecs, item_vecs).amax(1)


class SASRec(nn.Module):
    """SASRec baseline: item-ID embeddings, causal self-attention, full softmax.

    Reads the recent window only (its sequence length is the window n). Width, depth,
    heads and dropout come from the ``light_*`` / ``dropout`` fields of ModelConfig.
    Training predicts the next item at every position of the window (the last position's
    next item is the first target) with cross-entropy over the whole catalog. Ranking
    uses the raw dot product with the ID embedding table (``similarity = "dot"``).

    Args:
        cfg: model configuration.
        item_store: catalog (only its size is used).
        max_recent: longest recent window (position table size).
    """

    similarity = "dot"

    def __init__(self, cfg: ModelConfig, item_store: ItemStore, *, max_recent: int = 256, **_: Any) -> None:
        super().__init__()
        width, heads = cfg.light_width, cfg.light_heads
        if width < 1 or heads < 1 or width % heads:
            raise ValueError(f"model.light_width ({width}) must be a positive multiple of model.light_heads ({heads})")
        self.cfg = cfg
        self.n_items = item_store.n_items
        self.max_recent = max_recent
        self.width = width
        self.item_emb = nn.Embedding(self.n_items + 1, width, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=width**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(max_recent, width)
        self.emb_drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=4 * width,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, max(1, cfg.light_layers), norm=nn.LayerNorm(width),
                                            enable_nested_tensor=False)
        self.heads = heads

    def item_vectors(self) -> torch.Tensor:
        """(N+1, d) ID embeddings (row 0 padding)."""
        return self.item_emb.weight

    def score_items(self, user_vecs: torch.Tensor) -> torch.Tensor:
        """(B, N+1) dot-product scores."""
        return score_against(user_vecs, self.item_vectors())

    def encode(self, recent_idx: torch.Tensor) -> torch.Tensor:
        """(B, n, d) hidden state at every position of the window."""
        n = recent_idx.shape[1]
        if n > self.max_recent:
            raise ValueError(f"recent window of {n} items exceeds max_recent={self.max_recent}")
        x = self.item_emb(recent_idx) * math.sqrt(self.width) + self.pos_emb(recency_positions(recent_idx))
        x = self.emb_drop(x)
        valid = recent_idx != 0
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None] & valid[:, None, :]
        # A left pad has no earlier real item: letting it see itself keeps its row finite
        # (an all-masked softmax row is NaN and NaN * 0 would leak into real rows).
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=x.device)[None]
        attn_mask = (~allowed).repeat_interleave(self.heads, dim=0)  # True = blocked
        return self.blocks(x, mask=attn_mask)

    def forward(
        self, long_idx: torch.Tensor, recent_idx: torch.Tensor, next_idx: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """User vector after the last item, or the training loss.

        Args:
            long_idx: ignored (SASRec reads the recent window only).
            recent_idx: (B, n) window, left-padded.
            next_idx: (B,) the item after the window; when given, the next-item loss is
                returned instead (so DDP's forward hook covers training too).

        Returns:
            (B, 1, d) user vectors, or the scalar loss of :meth:`next_item_loss`.
        """
        if next_idx is not None:
            return self.next_item_loss(recent_idx, next_idx)
        return self.encode(recent_idx)[:, -1:]

    def next_item_loss(self, recent_idx: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
        """Full-softmax cross-entropy of the next item at every real position.

        Args:
            recent_idx: (B, n) window, left-padded.
            next_idx: (B,) the item after the window (0 = none).

        Returns:
            Scalar mean loss over predicted positions.
        """
        hidden = self.encode(recent_idx)  # (B, n, d)
        labels = torch.cat([recent_idx[:, 1:], next_idx[:, None]], dim=1)
        keep = (recent_idx != 0) & (labels != 0)
        if not bool(keep.any()):
            return hidden.sum() * 0.0  # nothing to predict; cross_entropy of nothing is NaN
        logits = hidden[keep].float() @ self.item_emb.weight.float().T  # (P, N+1)
        logits[:, 0] = -float("inf")  # padding is never a prediction
        return F.cross_entropy(logits, labels[keep])
