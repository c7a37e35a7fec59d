"""Stage-2 recommenders: HyMiRec and the SASRec / HLLM baselines (METHOD.md "Stage 2").

All three models share one interface used by training and evaluation:

* ``forward(long_idx, recent_idx) -> user_vecs`` with ``long_idx`` (B, Lh) and
  ``recent_idx`` (B, n) catalog indices, oldest first, **left-padded** with 0;
  ``user_vecs`` is (B, s, d) (s = 1 for the baselines).
* ``item_vectors() -> (N+1, d)``: the vectors items are ranked with (row 0 = padding).
* ``score_items(user_vecs)`` / :func:`score_against`: a user's score for item i is
  ``max_j <u_j, v_i>``. HyMiRec and HLLM return unit vectors on both sides, so this dot
  product *is* the cosine of METHOD.md's evaluation protocol; SASRec returns raw vectors
  and is ranked by the raw dot product its softmax was trained with. Evaluation therefore
  never needs to know the model type: it always takes the dot product of ``forward``'s
  output with ``item_vectors()``.

Positions are counted by recency (0 = most recent item), so adding left padding never
changes a prediction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hymirec_udfs.core.choices import ItemAdapter, ModelType
from hymirec_udfs.core.config import DmilConfig, ModelConfig
from hymirec_udfs.recommender.dmil import dmil_loss, select_targets
from hymirec_udfs.recommender.item_store import ItemStore
from hymirec_udfs.recommender.sasrec import SASRec, recency_positions, score_against

# TinyLlama-1.1B's decoder shape, for the GPU profile (random weights for speed work or a
# real checkpoint through ``llm_checkpoint``). Keys are ModelConfig fields.
TINYLLAMA_1_1B_SIZES: dict[str, int] = {
    "llm_hidden": 2048,
    "llm_layers": 22,
    "llm_heads": 32,
    "llm_kv_heads": 4,
    "llm_intermediate": 5632,
}


# Long-history position table size when no ``max_long`` is given; longer inputs raise.
DEFAULT_MAX_POSITIONS = 1024
# At init a position vector's norm is this fraction of the projected item content's, so
# the content dominates a history token (share ~0.9) and order is still visible.
POSITION_TO_CONTENT = 0.5
# Catalog rows used to measure the projected content's norm at init.
CONTENT_SCALE_SAMPLE = 256


def _shared_tensor(arr: Any) -> torch.Tensor:
    """A tensor over ``arr``'s memory (no copy) where numpy allows it, else a copy."""
    arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if arr.flags.writeable and arr.flags.c_contiguous:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.ascontiguousarray(arr).copy())


def _linear_or_identity(d_in: int, d_out: int) -> nn.Module:
    # METHOD.md: projections bridge D and the model widths only when they differ.
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


def _check_widths(cfg: ModelConfig) -> None:
    if cfg.interests < 1:
        raise ValueError(f"model.interests must be >= 1, got {cfg.interests}")
    if cfg.use_light:
        if cfg.coarse_queries < 1:
            raise ValueError(f"model.coarse_queries must be >= 1 with use_light, got {cfg.coarse_queries}")
        if cfg.light_width < 1 or cfg.light_heads < 1 or cfg.light_width % cfg.light_heads:
            raise ValueError(
                f"model.light_width ({cfg.light_width}) must be a positive multiple of "
                f"model.light_heads ({cfg.light_heads})"
            )
        if cfg.light_layers < 1:
            raise ValueError(f"model.light_layers must be >= 1, got {cfg.light_layers}")
    if not cfg.llm_checkpoint:
        if cfg.llm_heads < 1 or cfg.llm_hidden % cfg.llm_heads:
            raise ValueError(
                f"model.llm_hidden ({cfg.llm_hidden}) must be divisible by model.llm_heads ({cfg.llm_heads})"
            )
        if (cfg.llm_hidden // cfg.llm_heads) % 2:
            raise ValueError(
                f"LLM head dim llm_hidden/llm_heads = {cfg.llm_hidden // cfg.llm_heads} must be even (RoPE)"
            )
        if cfg.llm_kv_heads < 1 or cfg.llm_heads % cfg.llm_kv_heads:
            raise ValueError(
                f"model.llm_heads ({cfg.llm_heads}) must be divisible by model.llm_kv_heads ({cfg.llm_kv_heads})"
            )
        if cfg.llm_layers < 1 or cfg.llm_intermediate < 1:
            raise ValueError("model.llm_layers and model.llm_intermediate must be >= 1")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")


def build_llm(cfg: ModelConfig, max_positions: int) -> tuple[nn.Module, int]:
    """The LLM recommender's transformers decoder and its hidden size.

    Args:
        cfg: model configuration (``llm_checkpoint`` or the ``llm_*`` sizes).
        max_positions: longest input sequence (coarse + recent + queries).

    Returns:
        ``(model, hidden_size)``.
    """
    if cfg.llm_checkpoint:
        from transformers import AutoModel

        llm = AutoModel.from_pretrained(cfg.llm_checkpoint, local_files_only=True)
        hidden = int(llm.config.hidden_size)
    else:
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            hidden_size=cfg.llm_hidden,
            num_hidden_layers=cfg.llm_layers,
            num_attention_heads=cfg.llm_heads,
            num_key_value_heads=cfg.llm_kv_heads,
            intermediate_size=cfg.llm_intermediate,
            # Inputs are always embeddings: a one-row vocabulary keeps the unused token
            # table negligible.
            vocab_size=1,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            max_position_embeddings=max(max_positions, 64),
        )
        llm = LlamaModel(config)
        hidden = cfg.llm_hidden
    # The token table never sees an input id; freezing it keeps DDP from waiting on its
    # gradient and AdamW from decaying it.
    emb = llm.get_input_embeddings()
    if emb is not None:
        emb.requires_grad_(False)
    return llm, hidden


class _LightBlock(nn.Module):
    """Pre-norm transformer block whose queries may be a prefix of its keys."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        # Dropout on the residual branches only: dropping (B, heads, L, L) attention
        # weights was a fifth of a CPU training step (Bernoulli sampling) for no gain.
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, n_out: int) -> torch.Tensor:
        bsz, length, width = x.shape
        dh = width // self.heads
        h = self.norm1(x)
        w_q, w_kv = self.qkv.weight.split([width, 2 * width])
        b_q, b_kv = self.qkv.bias.split([width, 2 * width])
        q = F.linear(h[:, :n_out], w_q, b_q).view(bsz, n_out, self.heads, dh).transpose(1, 2)
        k, v = F.linear(h, w_kv, b_kv).view(bsz, length, 2, self.heads, dh).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x[:, :n_out] + self.drop(self.proj(att.transpose(1, 2).reshape(bsz, n_out, width)))
        return x + self.drop(self.ff(self.norm2(x)))


class LightEncoder(nn.Module):
    """The lightweight recommender's shallow transformer over ``[queries ; history]``.

    A standard pre-norm encoder, except that the last block computes outputs only at the
    query positions (the only ones read): its history rows would cost about five sixths
    of that block for nothing. Attention is bidirectional, padding keys are masked.

    Args:
        width: model width.
        heads: attention heads.
        layers: blocks.
        dropout: residual dropout.
    """

    def __init__(self, width: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_LightBlock(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, n_queries: int) -> torch.Tensor:
        """Outputs at the first ``n_queries`` positions.

        Args:
            tokens: (B, L, W) queries first, then the history.
            keep: (B, L) bool, False for padding (queries are always kept, so no
                attention row is empty).
            n_queries: number of leading query tokens.

        Returns:
            (B, n_queries, W).
        """
        x = tokens
        for i, block in enumerate(self.blocks):
            x = block(x, keep, n_queries if i == len(self.blocks) - 1 else x.shape[1])
        return self.norm(x)


class HyMiRec(nn.Module):
    """Hybrid multi-interest recommender (METHOD.md "Stage 2").

    1. Lightweight recommender: the long history, decoded from codes + coefficients
       (``use_codebook``; else the full embeddings), projected to ``light_width`` with
       recency positions, behind ``n_c`` learnable coarse queries, through a shallow
       pre-norm transformer (:class:`LightEncoder`); outputs at the query positions are ``R_coarse``.
    2. ``R_coarse`` projected to the LLM width, plus the indicator embedding ``I``.
    3. LLM recommender: ``inputs_embeds = [R_coarse + I ; proj(e_recent) ; Q_refined]``
       with the padding of the recent window masked; the last hidden states at the s
       query positions, projected to D and L2-normalised, are the interests.

    The catalog arrays are non-persistent buffers: they stay out of checkpoints (which
    name the item store file instead) and are never trained.

    Args:
        cfg: model configuration.
        item_store: catalog arrays.
        max_long: longest long history (position table size).
        max_recent: longest recent window.
        temperature: initial tau when ``learnable_temperature``.
        learnable_temperature: hold a learnable ``logit_scale`` (log 1/tau) for DMIL.
    """

    similarity = "cosine"

    def __init__(
        self,
        cfg: ModelConfig,
        item_store: ItemStore,
        *,
        max_long: int = DEFAULT_MAX_POSITIONS,
        max_recent: int = 256,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        _check_widths(cfg)
        self.cfg = cfg
        self.codebook_metric = item_store.codebook_metric
        self.n_items = item_store.n_items
        self.dim = item_store.dim
        self.max_long = max_long
        self.max_recent = max_recent
        # Views of the store's arrays, not copies: a memory-mapped float16 store stays
        # mapped (shared by the node's ranks); rows are cast to float32 as gathered.
        self.register_buffer("item_embeddings", _shared_tensor(item_store.embeddings), persistent=False)
        self.register_buffer("item_codes", _shared_tensor(item_store.codes), persistent=False)
        self.register_buffer("item_coefs", _shared_tensor(item_store.coefs), persistent=False)
        self.register_buffer("centroids", torch.from_numpy(item_store.centroids.copy()), persistent=False)

        self.llm, hidden = build_llm(cfg, cfg.coarse_queries * cfg.use_light + max_recent + cfg.interests)
        self.llm_hidden = hidden
        if cfg.use_light:
            width = cfg.light_width
            self.light_in = _linear_or_identity(self.dim, width)
            self.light_pos = nn.Embedding(max_long, width)
            self.coarse_queries = nn.Parameter(torch.randn(cfg.coarse_queries, width) * 0.02)
            self.light = LightEncoder(width, cfg.light_heads, cfg.light_layers, cfg.dropout)
            self.coarse_out = _linear_or_identity(width, hidden)
            if cfg.use_indicator:
                self.indicator = nn.Parameter(torch.randn(hidden) * 0.02)
        self.recent_in = _linear_or_identity(self.dim, hidden)
        self.refined_queries = nn.Parameter(torch.randn(cfg.interests, hidden) * 0.02)
        self.out = _linear_or_identity(hidden, self.dim)
        self._build_item_adapter(cfg.item_adapter)
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.logit_scale = None
        self._init_at_content_scale()

    @torch.no_grad()
    def _init_at_content_scale(self) -> None:
        """Position table and indicator at the scale of the item content they are added to.

        ``nn.Embedding``'s default N(0, 1) gives positions of norm ~sqrt(width) (7.9 at
        64), against ~0.35 for a projected unit item vector: the content would be ~4% of
        a history token. Positions are drawn so their norm is :data:`POSITION_TO_CONTENT`
        of the projected content's, and the indicator with the norm of a projected recent
        item (the content tokens it tells the coarse tokens apart from).
        """
        sample = self.item_embeddings[1 : 1 + CONTENT_SCALE_SAMPLE].float()
        sample = sample[torch.isfinite(sample).all(dim=-1)]  # bad rows fail later, named
        if not len(sample):
            return
        if self.cfg.use_light:
            content = self.light_in(sample).norm(dim=-1).mean().item()
            width = self.light_pos.weight.shape[1]
            nn.init.normal_(self.light_pos.weight, std=POSITION_TO_CONTENT * content / math.sqrt(width))
            if self.cfg.use_indicator:
                recent = self.recent_in(sample).norm(dim=-1).mean().item()
                nn.init.normal_(self.indicator, std=recent / math.sqrt(self.indicator.numel()))

    # Item side -------------------------------------------------------------------------
    def _build_item_adapter(self, kind: str) -> None:
        """The trainable item tower (:class:`ItemAdapter`); identity at initialisation.

        Memory: the MLP is ``2 D^2`` weights whatever the catalog; ``mlp_id`` adds an
        ``(N+1) x D`` float32 table (15 GB at 10M items x 384-d, plus AdamW's 2x), so it
        is for catalogs that fit a rank, not the paper's 11.7M.
        """
        if kind not in ItemAdapter.values():
            raise ValueError(f"model.item_adapter must be one of {ItemAdapter.values()}, got {kind!r}")
        if self.cfg.item_id_trained_only and kind != ItemAdapter.MLP_ID:
            raise ValueError(f"model.item_id_trained_only needs model.item_adapter=mlp_id (an ID table), got {kind!r}")
        self.adapter = None
        self.item_id = None
        if kind == ItemAdapter.NONE:
            return
        self.adapter = nn.Sequential(nn.Linear(self.dim, 2 * self.dim), nn.GELU(), nn.Linear(2 * self.dim, self.dim))
        nn.init.zeros_(self.adapter[2].weight)
        nn.init.zeros_(self.adapter[2].bias)
        if kind == ItemAdapter.MLP_ID:
            self.item_id = nn.Embedding(self.n_items + 1, self.dim, padding_idx=0)
            nn.init.zeros_(self.item_id.weight)
            # Which rows of the ID table are used (``model.item_id_trained_only``; set by
            # training from its targets, :meth:`set_item_id_live`). One byte per item,
            # saved with the model; all live by default, as before the setting existed.
            self.register_buffer("item_id_live", torch.ones(self.n_items + 1, dtype=torch.bool))
            self.register_load_state_dict_pre_hook(self._default_item_id_live)

    def _default_item_id_live(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A model saved before ``item_id_live`` existed used every row of its ID table."""
        state_dict.setdefault(prefix + "item_id_live", torch.ones(self.n_items + 1, dtype=torch.bool))

    def set_item_id_live(self, live: torch.Tensor) -> None:
        """Use the ID residual only for the items where ``live`` (``(N+1,)`` bool) is set;
        the other rows get neither a residual nor a gradient (they stay zero)."""
        if self.item_id is None:
            raise ValueError("set_item_id_live needs model.item_adapter=mlp_id (an ID table)")
        if live.shape != self.item_id_live.shape:
            raise ValueError(f"item_id_live must have shape {tuple(self.item_id_live.shape)}, got {tuple(live.shape)}")
        self.item_id_live.copy_(live.to(torch.bool))

    def _item_residual(self, idx: torch.Tensor) -> torch.Tensor:
        """The ID residual of ``idx`` (zero for padding and for rows that are not live)."""
        residual = self.item_id(idx)
        if self.cfg.item_id_trained_only:
            residual = residual * self.item_id_live[idx][..., None]
        return residual

    @property
    def has_item_adapter(self) -> bool:
        return self.adapter is not None

    def item_vectors_of(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx.shape + (D,)`` unit vectors items are ranked with (zeros for padding).

        Without an adapter these are the content embeddings themselves; with one,
        ``normalize(e + MLP(e) [+ id(i)])``.
        """
        emb = self.content(idx)
        if self.adapter is None:
            return emb
        out = emb + self.adapter(emb)
        if self.item_id is not None:
            out = out + self._item_residual(idx)
        return F.normalize(out.float(), dim=-1) * (idx != 0)[..., None]

    def ranking_vectors(self, content: torch.Tensor, model_idx: torch.Tensor) -> torch.Tensor:
        """Ranking vectors of catalog items -- also items this model never saw -- from
        their content embeddings (the serving path: today's catalog, not the store frozen
        at training).

        Args:
            content: ``(n, D)`` content embeddings of the items.
            model_idx: ``(n,)`` each item's index in this model's store, 0 for an item
                added after training (cold start: scored by its content through the MLP
                tower; the ID table has nothing for it).

        Returns:
            ``(n, D)`` unit vectors; equal to :meth:`item_vectors_of` for known items.
        """
        content = content.float()
        if self.adapter is None:
            return F.normalize(content, dim=-1)
        out = content + self.adapter(content)
        if self.item_id is not None:
            out = out + self._item_residual(model_idx)  # the padding row 0 is zero and never trained
        return F.normalize(out, dim=-1)

    def content(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx.shape + (D,)`` float32 content embeddings (the store may hold float16)."""
        return self.item_embeddings[idx].float()

    def decode_items(self, idx: torch.Tensor) -> torch.Tensor:
        """Codebook reconstructions ``e_hat`` of catalog items, L2-normalised.

        Args:
            idx: catalog indices of any shape.

        Returns:
            ``idx.shape + (D,)`` reconstructions (zeros for padding).
        """
        codes = self.item_codes[idx]  # (..., L)
        layers = torch.arange(codes.shape[-1], device=idx.device)
        picked = self.centroids[layers, codes]  # (..., L, D)
        if self.codebook_metric == "cosine":
            recon = (self.item_coefs[idx][..., None] * picked).sum(-2)
        else:
            recon = picked.sum(-2)
        recon = F.normalize(recon, dim=-1)
        return recon * (idx != 0)[..., None].to(recon.dtype)

    def long_history_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """The long-history inputs: reconstructions (``use_codebook``) or full embeddings."""
        if self.cfg.use_codebook:
            return self.decode_items(idx)
        return self.content(idx)

    def item_vectors(self) -> torch.Tensor:
        """(N+1, D) unit item vectors items are ranked with (row 0 zeros).

        With an adapter this runs it over the whole catalog: ``(N+1) x D`` float32 out
        (15 GB at 10M x 384-d); the serving path scores chunks with ``item_vectors_of``.
        """
        if self.adapter is None:
            return self.item_embeddings.float()
        idx = torch.arange(self.n_items + 1, device=self.item_embeddings.device)
        return self.item_vectors_of(idx)

    def score_items(self, user_vecs: torch.Tensor) -> torch.Tensor:
        """(B, N+1) cosine scores ``max_j cos(r_j, e_i)``; column 0 is padding."""
        return score_against(user_vecs, self.item_vectors())

    # User side -------------------------------------------------------------------------
    def coarse_interests(self, long_idx: torch.Tensor) -> torch.Tensor:
        """``R_coarse`` (+ indicator), (B, n_c, llm_hidden)."""
        if long_idx.shape[1] > self.max_long:
            raise ValueError(f"long history of {long_idx.shape[1]} items exceeds max_long={self.max_long}")
        bsz = long_idx.shape[0]
        # Decode each distinct item once, then gather: the batch repeats items heavily and
        # the (B, Lh, L, D) intermediate of a direct decode would dominate memory.
        uniq, inverse = torch.unique(long_idx, return_inverse=True)
        hist = self.light_in(self.long_history_vectors(uniq))[inverse]  # (B, Lh, W)
        hist = hist + self.light_pos(recency_positions(long_idx))
        queries = self.coarse_queries.expand(bsz, -1, -1).to(hist.dtype)
        tokens = torch.cat([queries, hist], dim=1)
        pad = torch.cat(
            [torch.zeros(bsz, queries.shape[1], dtype=torch.bool, device=long_idx.device), long_idx == 0], dim=1
        )
        out = self.light(tokens, ~pad, n_queries=queries.shape[1])
        coarse = self.coarse_out(out)
        if self.cfg.use_indicator:
            coarse = coarse + self.indicator
        return coarse

    def forward(
        self, long_idx: torch.Tensor, recent_idx: torch.Tensor, item_idx: Optional[torch.Tensor] = None
    ) -> Any:
        """Refined interests (and the ranking vectors of ``item_idx``).

        Args:
            long_idx: (B, Lh) long-history indices, left-padded with 0 (ignored without
                the lightweight recommender).
            recent_idx: (B, n) recent-window indices, left-padded with 0.
            item_idx: optional catalog indices (the loss's targets and negatives); their
                :meth:`item_vectors_of` come back too, computed inside ``forward`` so that
                a DDP wrapper synchronises the item adapter's gradients.

        Returns:
            (B, s, D) L2-normalised interests; with ``item_idx`` the pair
            ``(interests, item_vectors_of(item_idx))``.
        """
        interests = self._interests(long_idx, recent_idx)
        if item_idx is None:
            return interests
        return interests, self.item_vectors_of(item_idx)

    def _interests(self, long_idx: torch.Tensor, recent_idx: torch.Tensor) -> torch.Tensor:
        bsz = recent_idx.shape[0]
        device = recent_idx.device
        parts = []
        masks = []
        if self.cfg.use_light:
            coarse = self.coarse_interests(long_idx)
            parts.append(coarse)
            masks.append(torch.ones(bsz, coarse.shape[1], dtype=torch.long, device=device))
        recent = self.recent_in(self.content(recent_idx))
        parts.append(recent)
        masks.append((recent_idx != 0).long())
        queries = self.refined_queries.expand(bsz, -1, -1)
        parts.append(queries)
        masks.append(torch.ones(bsz, queries.shape[1], dtype=torch.long, device=device))
        dtype = parts[-1].dtype
        inputs = torch.cat([p.to(dtype) for p in parts], dim=1)
        mask = torch.cat(masks, dim=1)
        # Positions over the real tokens only, so padding never shifts them.
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.llm(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids).last_hidden_state
        refined = hidden[:, -self.cfg.interests :]
        return F.normalize(self.out(refined).float(), dim=-1)


class HLLMSingle(HyMiRec):
    """HLLM baseline: the LLM recommender over the recent window, one interest.

    Exactly :class:`HyMiRec` with ``use_light=False`` (no long history, no coarse tokens,
    no indicator) and ``interests=1``, trained by the DMIL loss with ``s = w = 1``, which
    is HLLM's next-item InfoNCE with shared sampled negatives. Item embeddings are the
    frozen stage-1 content embeddings (HLLM's item LLM is trained in stage 1, not here).
    """

    def __init__(self, cfg: ModelConfig, item_store: ItemStore, **kwargs: Any) -> None:
        single = dataclasses.replace(cfg, use_light=False, use_indicator=False, interests=1)
        super().__init__(single, item_store, **kwargs)


def effective_model_config(model_type: str, cfg: ModelConfig, dmil_cfg: Optional[DmilConfig] = None) -> ModelConfig:
    """The model configuration actually built (ablation and baseline overrides applied).

    Without DMIL HyMiRec has one interest (METHOD.md: "one interest, next item only").

    Args:
        model_type: ``hymirec``, ``sasrec`` or ``hllm``.
        cfg: configured model section.
        dmil_cfg: DMIL section (None: DMIL enabled).

    Returns:
        A copy of ``cfg`` with the overrides.
    """
    if model_type not in ModelType.values():
        raise ValueError(f"model_type must be one of {ModelType.values()}, got {model_type!r}")
    if model_type == "hllm":
        return dataclasses.replace(cfg, use_light=False, use_indicator=False, interests=1)
    if model_type == "hymirec" and dmil_cfg is not None and not dmil_cfg.enabled:
        return dataclasses.replace(cfg, interests=1)
    return dataclasses.replace(cfg)


def build_model(
    model_type: str,
    model_cfg: ModelConfig,
    item_store: ItemStore,
    *,
    dmil_cfg: Optional[DmilConfig] = None,
    max_long: int = DEFAULT_MAX_POSITIONS,
    max_recent: int = 256,
) -> nn.Module:
    """Build a stage-2 model.

    Args:
        model_type: ``hymirec``, ``sasrec`` or ``hllm``.
        model_cfg: model section.
        item_store: catalog arrays.
        dmil_cfg: DMIL section (learnable temperature, the w/o-DMIL one-interest switch).
        max_long: longest long history the model accepts.
        max_recent: longest recent window the model accepts.

    Returns:
        The model (``model.model_type`` is set).
    """
    cfg = effective_model_config(model_type, model_cfg, dmil_cfg)
    dmil_cfg = dmil_cfg or DmilConfig()
    kwargs: dict[str, Any] = {
        "max_long": max_long,
        "max_recent": max_recent,
        "temperature": dmil_cfg.temperature,
        "learnable_temperature": dmil_cfg.learnable_temperature,
    }
    if model_type == "hymirec":
        model: nn.Module = HyMiRec(cfg, item_store, **kwargs)
    elif model_type == "hllm":
        model = HLLMSingle(cfg, item_store, **kwargs)
    else:
        model = SASRec(cfg, item_store, max_recent=max_recent)
    model.model_type = model_type
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)


def model_loss(
    model: nn.Module,
    batch: Any,
    dmil_cfg: DmilConfig,
    neg_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The training loss of a model on one batch.

    HyMiRec and HLLM: DMIL loss (HLLM and w/o-DMIL with ``s = w = 1``) against the shared
    negatives ``neg_ids``; SASRec: full-softmax next-item cross-entropy.

    Args:
        model: the model, possibly DDP-wrapped (its forward is what runs, so gradients
            synchronise).
        batch: an object with ``long_idx``, ``recent_idx`` (B, n), ``target_idx`` (B, w)
            and ``target_mask`` (B, w) tensors on the model's device.
        dmil_cfg: DMIL section.
        neg_ids: (M,) negative catalog indices (required for HyMiRec / HLLM), already
            gathered across ranks.

    Returns:
        ``(loss, info)``.
    """
    inner = unwrap(model)
    if isinstance(inner, SASRec):
        # Full softmax needs no sampled negatives; the loss runs through forward so a
        # DDP wrapper synchronises its gradients.
        loss = model(batch.long_idx, batch.recent_idx, batch.target_idx[:, 0])
        return loss, {}
    if neg_ids is None:
        raise ValueError("HyMiRec/HLLM losses need sampled negatives (neg_ids)")
    target_idx, target_mask = select_targets(batch.target_idx, batch.target_mask, dmil_cfg)
    if isinstance(inner, HLLMSingle) or inner.cfg.interests == 1:
        target_idx, target_mask = target_idx[:, :1], target_mask[:, :1]
    neg_ids = neg_ids.to(target_idx.device)
    if inner.has_item_adapter:
        ids = torch.cat([target_idx.reshape(-1), neg_ids])
        interests, vecs = model(batch.long_idx, batch.recent_idx, ids)
        target_emb, neg_emb = vecs[: target_idx.numel()].view(*target_idx.shape, -1), vecs[target_idx.numel():]
    else:
        interests = model(batch.long_idx, batch.recent_idx)
        target_emb, neg_emb = inner.content(target_idx), inner.content(neg_ids)
    return dmil_loss(
        interests,
        target_emb,
        target_mask,
        target_idx,
        neg_emb,
        neg_ids,
        s=interests.shape[1],
        matching=dmil_cfg.matching,
        temperature=dmil_cfg.temperature,
        cluster_iters=dmil_cfg.cluster_iters,
        logit_scale=inner.logit_scale,
    )
