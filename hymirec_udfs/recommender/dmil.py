"""Disentangled multi-interest learning (DMIL), METHOD.md "DMIL".

For every training sample the w window targets are clustered into ``s' = min(s, distinct
targets)`` groups by cosine k-means, the s refined interests are matched one-to-one to the
groups by the Hungarian algorithm (maximum total cosine), and each target is scored with an
InfoNCE loss only against the interest matched to its group:

``L = (1/w) sum_i sum_j L_ctr(t_i, r_j) 1[t_i in G_perm(j)]``

``L_ctr(t, r) = -log(exp(cos(t,r)/tau) / (exp(cos(t,r)/tau) + sum_m exp(cos(r,e_m)/tau)))``

with m catalog negatives shared by the batch (and gathered across DDP ranks), negatives
equal to any positive of the sample masked out.

The ablations of the paper's Table 4 map onto the same loss:

* without DMIL: one interest, next item only (``s=1``, ``w=1``);
* without window targets: s interests, next item only (``w=1``, hence ``s'=1``: the one
  target's group is matched to the most similar interest);
* max matching: no clustering, each target goes to its most similar interest.

:func:`select_targets` applies the target side of these switches to a batch.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hymirec_udfs.core.choices import Matching
from hymirec_udfs.core.config import DmilConfig

# Two targets whose cosine is at least this close to 1 are the same point for clustering:
# a repeated item (or two items with identical content) cannot form two groups.
DUPLICATE_COS_TOL = 1e-5

# Upper bound of the learnable logit scale (1/tau), as CLIP does: an unbounded scale lets
# the loss collapse to a hard argmax and the gradients explode.
MAX_LOGIT_SCALE = 100.0

# Below this many interests a batched enumeration of all s! permutations is cheaper than
# one scipy call per sample (and runs on the GPU); above it, s! explodes.
BRUTE_FORCE_MAX_INTERESTS = 5


def count_distinct(target_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Number of distinct valid targets per sample.

    Two valid targets are the same when their cosine is within ``DUPLICATE_COS_TOL`` of 1
    (a repeated item has the same embedding).

    Args:
        target_emb: (B, w, D) target embeddings.
        mask: (B, w) bool, True for real targets.

    Returns:
        (B,) long tensor of distinct counts.
    """
    unit = F.normalize(target_emb.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (B, w, w)
    w = mask.shape[1]
    earlier = torch.ones(w, w, dtype=torch.bool, device=mask.device).tril(-1)  # j < i
    dup_of_earlier = (sim >= 1 - DUPLICATE_COS_TOL) & earlier & mask[:, None, :]
    first_of_kind = mask & ~dup_of_earlier.any(-1)
    return first_of_kind.sum(-1)


@torch.no_grad()
def cluster_targets(
    target_emb: torch.Tensor, mask: torch.Tensor, s: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine k-means of each sample's window targets into ``s' = min(s, distinct)`` groups.

    Batched over samples; the only Python loops run over the s centroids at init and over
    the ``iters`` iterations. Initialisation is deterministic farthest-point: the first
    valid target is centroid 0, each next centroid is the valid target least similar to
    the centroids chosen so far. Because ``s'`` never exceeds the number of distinct
    targets, every initial centroid is a different point.

    Args:
        target_emb: (B, w, D) target embeddings (normalised here).
        mask: (B, w) bool, True for real targets.
        s: maximum number of groups (the number of interests).
        iters: assignment/update iterations (0 keeps the farthest-point assignment).

    Returns:
        ``assign`` (B, w) long, the group of each target, -1 where masked;
        ``centroids`` (B, s, D) unit centroids, zero rows for groups >= ``s'``;
        ``n_groups`` (B,) long, ``s'`` per sample.
    """
    if s < 1:
        raise ValueError(f"s must be >= 1, got {s}")
    mask = mask.bool()
    unit = F.normalize(target_emb.float(), dim=-1)
    bsz, w, dim = unit.shape
    n_groups = torch.clamp(count_distinct(unit, mask), max=s)
    batch = torch.arange(bsz, device=unit.device)

    centroids = unit.new_zeros(bsz, s, dim)
    # Farthest-point init; targets not valid never win the argmin.
    best_sim = torch.full((bsz, w), -float("inf"), device=unit.device)
    first = torch.argmax(mask.int(), dim=1)  # first valid target (0 when none)
    pick = first
    for k in range(s):
        active = k < n_groups
        centroids[batch, k] = torch.where(active[:, None], unit[batch, pick], centroids[batch, k])
        sim_k = (unit * centroids[:, k : k + 1]).sum(-1)  # (B, w)
        best_sim = torch.where(active[:, None], torch.maximum(best_sim, sim_k), best_sim)
        pick = torch.argmin(best_sim.masked_fill(~mask, float("inf")), dim=1)

    group_ids = torch.arange(s, device=unit.device)
    group_active = group_ids[None, :] < n_groups[:, None]  # (B, s)

    def _assign(cents: torch.Tensor) -> torch.Tensor:
        sim = unit @ cents.transpose(1, 2)  # (B, w, s)
        sim = sim.masked_fill(~group_active[:, None, :], -float("inf"))
        return torch.argmax(sim, dim=-1)

    assign = _assign(centroids)
    for _ in range(iters):
        onehot = F.one_hot(assign, s).float() * mask[..., None].float()  # (B, w, s)
        sums = onehot.transpose(1, 2) @ unit  # (B, s, D)
        counts = onehot.sum(1)  # (B, s)
        # An emptied group keeps its previous centroid instead of collapsing to zero.
        keep = (counts == 0) | ~group_active
        centroids = torch.where(keep[..., None], centroids, F.normalize(sums, dim=-1))
        assign = _assign(centroids)

    # Centroids are the normalised means of the returned groups (consistent pair).
    onehot = F.one_hot(assign, s).float() * mask[..., None].float()
    sums = onehot.transpose(1, 2) @ unit
    counts = onehot.sum(1)
    centroids = torch.where((counts > 0)[..., None], F.normalize(sums, dim=-1), centroids)
    centroids = centroids * group_active[..., None].float()
    assign = assign.masked_fill(~mask, -1)
    return assign, centroids, n_groups


def _hungarian_scipy(sim: np.ndarray, n_groups: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    bsz, s, _ = sim.shape
    perm = np.full((bsz, s), -1, dtype=np.int64)
    for b in range(bsz):
        g = int(n_groups[b])
        if g == 0:
            continue
        rows, cols = linear_sum_assignment(sim[b, :, :g], maximize=True)
        perm[b, rows] = cols
    return perm


def _hungarian_brute(sim: torch.Tensor, n_groups: torch.Tensor) -> torch.Tensor:
    bsz, s, _ = sim.shape
    perms = torch.tensor(list(itertools.permutations(range(s))), device=sim.device)  # (P, s)
    # Groups >= s' are dummies worth 0: interest j "matched" to a dummy is unmatched.
    real = perms[None, :, :] < n_groups[:, None, None]  # (B, P, s)
    gathered = sim[:, torch.arange(s, device=sim.device)[None, :], perms]  # (B, P, s)
    totals = (gathered * real).sum(-1)  # (B, P)
    best = torch.argmax(totals, dim=1)
    chosen = perms[best]  # (B, s)
    return torch.where(chosen < n_groups[:, None], chosen, torch.full_like(chosen, -1))


@torch.no_grad()
def hungarian_match(
    interests: torch.Tensor,
    centroids: torch.Tensor,
    n_groups: torch.Tensor,
    method: str = "auto",
) -> torch.Tensor:
    """One-to-one matching of interests to target groups maximising the summed cosine.

    With ``s' < s`` groups the assignment is rectangular: ``s'`` interests are matched,
    the others get -1 (no loss for that sample).

    Args:
        interests: (B, s, D) interest embeddings.
        centroids: (B, s, D) group centroids (rows >= ``n_groups`` ignored).
        n_groups: (B,) number of real groups ``s'`` per sample.
        method: ``scipy`` (``linear_sum_assignment`` per sample), ``brute`` (batched
            enumeration of the s! permutations, exact, GPU friendly) or ``auto`` (brute
            for s <= ``BRUTE_FORCE_MAX_INTERESTS``, scipy above).

    Returns:
        (B, s) long: ``perm[b, j]`` is the group matched to interest j, or -1.
    """
    sim = F.normalize(interests.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).transpose(1, 2)
    s = sim.shape[1]
    if method == "auto":
        method = "brute" if s <= BRUTE_FORCE_MAX_INTERESTS else "scipy"
    if method == "brute":
        return _hungarian_brute(sim, n_groups.to(sim.device))
    if method == "scipy":
        perm = _hungarian_scipy(sim.cpu().numpy(), n_groups.cpu().numpy())
        return torch.from_numpy(perm).to(interests.device)
    raise ValueError(f"method must be 'auto', 'scipy' or 'brute', got {method!r}")


def assign_targets_to_interests(
    interests: torch.Tensor,
    target_emb: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    s: int,
    matching: str = "hungarian",
    cluster_iters: int = 5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The interest each target is scored against.

    Args:
        interests: (B, s_model, D) interest embeddings.
        target_emb: (B, w, D) target embeddings.
        target_mask: (B, w) bool.
        s: maximum number of groups (normally the number of interests).
        matching: ``hungarian`` (cluster + one-to-one matching) or ``max`` (each target to
            its most similar interest).
        cluster_iters: k-means iterations for ``hungarian``.

    Returns:
        ``interest_of_target`` (B, w) long (-1 where masked or unmatched) and a dict with
        ``assign``, ``perm`` and ``n_groups`` (hungarian) for diagnostics.
    """
    with torch.no_grad():
        r = F.normalize(interests.detach().float(), dim=-1)
        t = F.normalize(target_emb.float(), dim=-1)
        mask = target_mask.bool()
        if matching == "max":
            best = torch.argmax(t @ r.transpose(1, 2), dim=-1)  # (B, w)
            return best.masked_fill(~mask, -1), {}
        if matching != "hungarian":
            raise ValueError(f"matching must be one of {Matching.values()}, got {matching!r}")
        if s > r.shape[1]:
            raise ValueError(f"s={s} groups but the model returns only {r.shape[1]} interests")
        assign, centroids, n_groups = cluster_targets(t, mask, s, cluster_iters)
        # Interests beyond s take no part (s < s_model is never used, but keep it sound).
        perm = hungarian_match(r[:, :s], centroids, n_groups)  # (B, s)
        # Invert: interest_of_group[b, g] = j with perm[b, j] == g.
        bsz = perm.shape[0]
        interest_of_group = torch.full((bsz, s + 1), -1, dtype=torch.long, device=perm.device)
        j_idx = torch.arange(s, device=perm.device).expand(bsz, s)
        # Unmatched interests (perm == -1) write into the spare column s.
        interest_of_group.scatter_(1, torch.where(perm >= 0, perm, s), j_idx)
        interest_of_group[:, s] = -1
        target_interest = torch.gather(interest_of_group, 1, assign.clamp(min=0))
        target_interest = target_interest.masked_fill(~mask, -1)
        return target_interest, {"assign": assign, "perm": perm, "n_groups": n_groups}


def dmil_loss(
    interests: torch.Tensor,
    target_emb: torch.Tensor,
    target_mask: torch.Tensor,
    target_ids: torch.Tensor,
    neg_emb: torch.Tensor,
    neg_ids: torch.Tensor,
    *,
    s: Optional[int] = None,
    matching: str = "hungarian",
    temperature: float = 0.07,
    cluster_iters: int = 5,
    logit_scale: Optional[torch.Tensor] = None,
    mask_positive_negatives: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The DMIL loss of METHOD.md, averaged over the samples that have a target.

    Args:
        interests: (B, s, D) refined interests (need not be normalised; cosines are used).
        target_emb: (B, w, D) target embeddings ``e_t``.
        target_mask: (B, w) bool, True for real targets.
        target_ids: (B, w) long catalog indices of the targets (for negative masking).
        neg_emb: (M, D) negative embeddings ``e_m`` (shared by the batch).
        neg_ids: (M,) long catalog indices of the negatives.
        s: maximum number of target groups; defaults to the number of interests.
        matching: ``hungarian`` or ``max``.
        temperature: tau, used when ``logit_scale`` is None.
        cluster_iters: cosine k-means iterations.
        logit_scale: optional learnable log of 1/tau (scalar tensor); the scale
            ``exp(logit_scale)`` is clamped to ``MAX_LOGIT_SCALE``.
        mask_positive_negatives: drop negatives equal to any positive of the sample
            (True per METHOD.md; False only to measure its effect in tests).

    Returns:
        ``(loss, info)``: the scalar loss and detached diagnostics (``n_groups_mean``,
        ``matched_fraction``: share of (sample, interest) pairs with a group,
        ``interest_of_target``: (B, w)).
    """
    if s is None:
        s = interests.shape[1]
    mask = target_mask.bool()
    r = F.normalize(interests.float(), dim=-1)
    t = F.normalize(target_emb.float(), dim=-1)
    e = F.normalize(neg_emb.float(), dim=-1)
    if logit_scale is not None:
        scale = torch.exp(logit_scale.float()).clamp(max=MAX_LOGIT_SCALE)
    else:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        scale = torch.tensor(1.0 / temperature, device=r.device)

    interest_of_target, extra = assign_targets_to_interests(
        r, t, mask, s=s, matching=matching, cluster_iters=cluster_iters
    )
    scored = interest_of_target >= 0  # (B, w): real targets with a matched interest
    safe = interest_of_target.clamp(min=0)
    r_t = torch.gather(r, 1, safe[..., None].expand(-1, -1, r.shape[-1]))  # (B, w, D)

    pos = (t * r_t).sum(-1) * scale  # (B, w)
    neg = (r @ e.T) * scale  # (B, s, M)
    neg_t = torch.gather(neg, 1, safe[..., None].expand(-1, -1, neg.shape[-1]))  # (B, w, M)
    if mask_positive_negatives:
        # A negative equal to any positive of the sample would push the interest away
        # from an item the user did consume.
        is_pos = ((neg_ids[None, None, :] == target_ids[:, :, None]) & mask[..., None]).any(1)  # (B, M)
        neg_t = neg_t.masked_fill(is_pos[:, None, :], -float("inf"))
    logits = torch.cat([pos[..., None], neg_t], dim=-1)  # (B, w, 1+M)
    ctr = torch.logsumexp(logits, dim=-1) - pos  # (B, w)
    ctr = torch.where(scored, ctr, torch.zeros_like(ctr))

    w_valid = mask.sum(1)  # 1/w counts every real target, matched or not
    has_target = w_valid > 0
    per_sample = ctr.sum(1) / w_valid.clamp(min=1)
    loss = per_sample[has_target].mean() if bool(has_target.any()) else ctr.sum() * 0.0

    info: dict[str, Any] = {"interest_of_target": interest_of_target.detach()}
    if "n_groups" in extra:
        ng = extra["n_groups"].float()
        info["n_groups_mean"] = float(ng[has_target].mean()) if bool(has_target.any()) else 0.0
        info["matched_fraction"] = float((extra["perm"] >= 0).float().mean())
        info["perm"] = extra["perm"]
        info["assign"] = extra["assign"]
    return loss, info


def select_targets(
    target_idx: torch.Tensor, target_mask: torch.Tensor, dmil_cfg: DmilConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the target-side ablation switches to a batch.

    Without DMIL or without window targets only the next item ``t_1`` is a target.

    Args:
        target_idx: (B, w) long catalog indices.
        target_mask: (B, w) bool.
        dmil_cfg: DMIL configuration.

    Returns:
        ``(target_idx, target_mask)`` possibly cut to (B, 1).
    """
    if not dmil_cfg.enabled or not dmil_cfg.window_targets:
        return target_idx[:, :1], target_mask[:, :1]
    return target_idx, target_mask


def sample_negatives(n_items: int, m: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """m catalog indices drawn uniformly (with replacement) from 1..N; 0 is padding.

    Args:
        n_items: catalog size N.
        m: number of negatives.
        generator: torch generator (CPU) for reproducible draws.

    Returns:
        (m,) long tensor on the CPU.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    return torch.randint(1, n_items + 1, (m,), generator=generator, dtype=torch.long)


def gather_negatives(ids: torch.Tensor) -> torch.Tensor:
    """All ranks' negative ids, concatenated in rank order (HLLM's shared negatives).

    Only ids travel; each rank looks the embeddings up in its own copy of the catalog.
    Without an initialised process group (or with one rank) the ids are returned as is.

    Args:
        ids: (m,) long tensor; on nccl it must live on the rank's GPU.

    Returns:
        (world * m,) long tensor.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)
