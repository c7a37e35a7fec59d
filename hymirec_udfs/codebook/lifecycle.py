"""The codebook's life across daily runs: drift score, aligned refits, code stability.

HyMiRec's paper fits the codebook once (its stated limitation); a daily pipeline cannot:
new items arrive every day. Between refits they are encoded with the *pinned* codebook,
so every code keeps its meaning for the trained model. :func:`drift_score` says when the
pinned codebook no longer fits the new items; a refit then starts from the pinned
centroids (:func:`~hymirec_udfs.codebook.residual.fit_residual_codebook` ``init=``) and
:func:`align` renumbers each layer's new centroids to the old code ids, so most items
keep their codes and the long-history inputs keep their meaning.

The drift score (stated in the README, "Daily runs")::

    e_new  = mean over the run's new items of (1 - reconstruction cosine)
    e_ref  = the same mean on the fit-time reference (held-out basepool items when
             codebook.holdout_fraction > 0, else the basepool itself)
    drift  = e_new / e_ref - 1          (0: new items fit as well as at fit time)

It trips at ``codebook.drift_threshold`` (default 0.5: new items reconstructed with 50 %
more residual error than at fit time) when at least ``codebook.min_new_items`` are new.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hymirec_udfs.codebook.residual import ResidualCodebook


def align(old: ResidualCodebook, new: ResidualCodebook) -> tuple[ResidualCodebook, list[np.ndarray]]:
    """``new`` with each layer's centroids permuted so that code ``j`` is the new centroid
    matched to old centroid ``j`` (maximum total cosine, Hungarian: ``scipy``'s
    ``linear_sum_assignment``). A permutation only relabels codes, so the reconstruction
    of every item is unchanged; layers are aligned independently (a residual depends on
    the centroid chosen, not on its id).

    Costs ``k^2 D`` for the similarity and ``O(k^3)`` for the matching per layer: at
    k = 256 well under a second, independent of the catalog.

    Returns:
        The aligned codebook and, per layer, ``perm`` with ``aligned[j] = new[perm[j]]``.
    """
    from scipy.optimize import linear_sum_assignment

    if old.ks != new.ks or old.dim != new.dim:
        raise ValueError(f"cannot align codebooks of ks={new.ks} to ks={old.ks} (D {new.dim} vs {old.dim})")
    centroids, perms = [], []
    for c_old, c_new in zip(old.centroids, new.centroids):
        a = torch.nn.functional.normalize(c_old.float(), dim=1)
        b = torch.nn.functional.normalize(c_new.float(), dim=1)
        sim = (a @ b.T).numpy()
        rows, cols = linear_sum_assignment(-sim)
        perm = np.empty(len(rows), dtype=np.int64)
        perm[rows] = cols
        perms.append(perm)
        centroids.append(c_new[torch.from_numpy(perm)].clone())
    return ResidualCodebook(centroids=centroids, metric=new.metric, dim=new.dim), perms


def drift_score(new_recon_mean: Optional[float], reference_recon_mean: float) -> Optional[float]:
    """``e_new / e_ref - 1`` with ``e = 1 - mean reconstruction cosine`` (None without new items)."""
    if new_recon_mean is None:
        return None
    e_ref = max(1.0 - reference_recon_mean, 1e-6)
    return float((1.0 - new_recon_mean) / e_ref - 1.0)


def codes_unchanged(old: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Share of items whose whole code tuple, and whose layer-``l`` code, is unchanged."""
    if old.shape != new.shape or old.size == 0:
        raise ValueError(f"code arrays differ in shape: {old.shape} vs {new.shape}")
    same = old == new
    out = {"all_layers": float(same.all(axis=1).mean())}
    out.update({f"layer{layer}": float(same[:, layer].mean()) for layer in range(same.shape[1])})
    return out


@dataclass(frozen=True)
class Decision:
    """Whether ``fit_codebook`` fits a new version this run, and why."""

    refit: bool
    reason: str
    warm: bool = False


def decide(policy: str, *, has_book: bool, same_shape: bool, drift: Optional[float], threshold: float,
           new_items: int, min_new_items: int, days_since_fit: Optional[int], every_days: int) -> Decision:
    """The refit policy (``codebook.refit``) applied to this run's health figures."""
    if not has_book:
        return Decision(True, "no codebook for the current embedding model")
    if not same_shape:
        return Decision(True, "codebook settings (ks, metric) changed")
    if policy == "always":
        return Decision(True, "forced (codebook.refit=always)", warm=True)
    if policy == "never":
        return Decision(False, "pinned (codebook.refit=never)")
    if drift is not None and new_items >= min_new_items and drift >= threshold:
        return Decision(True, f"drift {drift:.3f} >= threshold {threshold}", warm=True)
    if every_days and days_since_fit is not None and days_since_fit >= every_days:
        return Decision(True, f"scheduled: pinned codebook is {days_since_fit} days old", warm=True)
    if drift is None or new_items < min_new_items:
        return Decision(False, f"pinned: {new_items} new items (< {min_new_items} to judge drift)")
    return Decision(False, f"pinned: drift {drift:.3f} < threshold {threshold}")
