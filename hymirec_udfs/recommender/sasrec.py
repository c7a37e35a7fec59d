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
    """SASRec baseline: item-ID embeddings, causal self-attention, full or sampled softmax.

    Reads the last ``model.sasrec_max_len`` items of the history (its usual setting is 50:
    the long history's tail followed by the recent window); 0 reads the recent window only
    (length n). Width, depth, heads and dropout come from the ``light_*`` / ``dropout``
    fields of ModelConfig. Training predicts the next item at every position (the last
    position's next item is the first target) with cross-entropy over the whole catalog
    up to ``model.full_softmax_max_items`` items; past it, against the target and
    ``model.sampled_negatives`` uniform negatives shared by the batch (sampled softmax:
    memory P x (1 + K) instead of P x N, 84 MB instead of 20 GB for 5,120 positions at
    1M items). Ranking uses the raw dot product with the ID embedding table
    (``similarity = "dot"``).

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
        self.max_len = max(0, int(cfg.sasrec_max_len))
        self.max_recent = max(max_recent, self.max_len)  # the position table's size
        self.width = width
        self.item_emb = nn.Embedding(self.n_items + 1, width, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=width**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(self.max_recent, width)
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

    def sequence(self, long_idx: Optional[torch.Tensor], recent_idx: torch.Tensor) -> torch.Tensor:
        """(B, L) the items SASRec reads: the last ``max_len`` of long history + recent
        window (both left-padded, so their concatenation is too), or the window alone."""
        if not self.max_len or long_idx is None or long_idx.numel() == 0:
            return recent_idx
        seq = torch.cat([long_idx.to(recent_idx.dtype), recent_idx], dim=1)
        return seq[:, -self.max_len:] if seq.shape[1] > self.max_len else seq

    def encode(self, recent_idx: torch.Tensor) -> torch.Tensor:
        """(B, L, d) hidden state at every position of the sequence read."""
        n = recent_idx.shape[1]
        if n > self.max_recent:
            raise ValueError(f"sequence of {n} items exceeds the position table ({self.max_recent})")
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
            long_idx: (B, L) long history, left-padded (read when ``sasrec_max_len`` > 0).
            recent_idx: (B, n) window, left-padded.
            next_idx: (B,) the item after the window; when given, the next-item loss is
                returned instead (so DDP's forward hook covers training too).

        Returns:
            (B, 1, d) user vectors, or the scalar loss of :meth:`next_item_loss`.
        """
        seq = self.sequence(long_idx, recent_idx)
        if next_idx is not None:
            return self.next_item_loss(seq, next_idx)
        return self.encode(seq)[:, -1:]

    def next_item_loss(self, recent_idx: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next item at every real position: over the whole
        catalog, or sampled past ``model.full_softmax_max_items`` (see the class).

        Args:
            recent_idx: (B, L) the sequence read (:meth:`sequence`), left-padded.
            next_idx: (B,) the item after it (0 = none).

        Returns:
            Scalar mean loss over predicted positions.
        """
        hidden = self.encode(recent_idx)  # (B, L, d)
        labels = torch.cat([recent_idx[:, 1:], next_idx[:, None]], dim=1)
        keep = (recent_idx != 0) & (labels != 0)
        if not bool(keep.any()):
            return hidden.sum() * 0.0  # nothing to predict; cross_entropy of nothing is NaN
        h, y = hidden[keep].float(), labels[keep]
        limit, negatives = self.cfg.full_softmax_max_items, self.cfg.sampled_negatives
        if limit and negatives and self.n_items > limit:
            return self.sampled_loss(h, y, negatives)
        logits = h @ self.item_emb.weight.float().T  # (P, N+1)
        logits[:, 0] = -float("inf")  # padding is never a prediction
        return F.cross_entropy(logits, y)

    def sampled_loss(self, h: torch.Tensor, y: torch.Tensor, k: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sampled softmax: each position's target against ``k`` uniform negatives shared
        by the batch (a negative equal to the target is masked). Uniform sampling shifts
        every logit's log-probability correction equally, so none is applied.

        Args:
            h: (P, d) hidden states of the predicted positions.
            y: (P,) their targets (catalog indices >= 1).
            k: negatives.
            generator: RNG for the negatives (the global one by default, which training
                seeds per rank).
        """
        weight = self.item_emb.weight
        neg = torch.randint(1, self.n_items + 1, (k,), device=h.device, generator=generator)
        pos_logit = (h * weight[y].float()).sum(-1, keepdim=True)  # (P, 1)
        neg_logit = h @ weight[neg].float().T  # (P, k)
        neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], -float("inf"))
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))
