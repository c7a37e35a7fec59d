"""The promotion gate: does the challenger beat the champion on the same test users?

A paired bootstrap over users (``scipy.stats.bootstrap(paired=True)``) gives a confidence
interval for the mean per-user difference of the configured metric (challenger minus
champion). The challenger is promoted when the interval's lower bound is above zero (it is
better, not just different) and no named segment regresses, i.e. no segment's interval lies
wholly below zero. Segments: users with short / long histories (split at the median
history length of the paired users) and users whose test target is cold (at most
``registry.cold_max_train_users`` training users). A segment with fewer than
``registry.min_users`` users is reported and not judged (too little evidence either way).

:func:`decide` is numpy + scipy on per-user arrays already joined on user id (O(users x
resamples), never the catalog); :func:`paired_metrics` builds those arrays with Spark from
``eval_per_user`` and ``sequences`` (the driver receives 4 numbers per test user: 32 MB at
1M users); :func:`run_gate` registers, sets the aliases and decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import re
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from hymirec_udfs.core.config import Config
    from hymirec_udfs.core.registry import ModelVersion
    from hymirec_udfs.core.stage_api import StageContext


@dataclass
class Interval:
    """Mean paired difference (challenger - champion) and its bootstrap interval."""

    users: int
    diff: float
    low: float
    high: float


@dataclass
class Decision:
    """What the gate decided, and why, with its numbers (logged to MLflow and job_runs)."""

    promote: bool
    reason: str
    metric: str
    overall: Optional[Interval] = None
    segments: dict[str, Optional[Interval]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Flat figures for ``job_runs.summary`` and MLflow."""
        out: dict[str, Any] = {"promotion.promoted": int(self.promote), "promotion.reason": self.reason,
                               "promotion.metric": self.metric}
        parts = {"overall": self.overall, **{f"segment.{k}": v for k, v in self.segments.items()}}
        for name, interval in parts.items():
            if interval is not None:
                out.update({f"promotion.{name}.{k}": v for k, v in asdict(interval).items()})
        return out


def paired_interval(challenger: np.ndarray, champion: np.ndarray, *, confidence: float, resamples: int,
                    seed: int) -> Interval:
    """Mean of ``challenger - champion`` over paired users and its percentile bootstrap
    interval (users resampled with replacement, pairs kept together)."""
    from scipy.stats import bootstrap

    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired metrics need equal 1-d shapes, got {a.shape} and {b.shape}")
    diff = float(np.mean(a - b)) if len(a) else float("nan")
    if len(a) < 2 or np.all(a - b == (a - b)[0]):
        # a degenerate sample (one user, or every difference equal): the interval is the point
        return Interval(len(a), diff, diff, diff)
    res = bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                    n_resamples=resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed))
    return Interval(len(a), diff, float(res.confidence_interval.low), float(res.confidence_interval.high))


def decide(challenger: np.ndarray, champion: np.ndarray, *, history_len: np.ndarray, target_cold: np.ndarray,
           metric: str, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
           min_users: int = 30) -> Decision:
    """The gate on per-user metrics of the same users (same order in every array).

    Args:
        challenger, champion: per-user metric (e.g. NDCG@10) of each model.
        history_len: each user's history length at the test cut.
        target_cold: whether each user's test target is a cold item.
        metric: the metric's name (reported).
        confidence, resamples, seed: the bootstrap.
        min_users: fewer paired users refuses promotion; smaller segments are not judged.
    """
    n = len(challenger)
    if n < min_users:
        return Decision(False, f"only {n} paired test users (registry.min_users={min_users})", metric)
    opts = {"confidence": confidence, "resamples": resamples, "seed": seed}
    overall = paired_interval(challenger, champion, **opts)
    history_len = np.asarray(history_len)
    median = float(np.median(history_len))
    masks = {"short_history": history_len <= median, "long_history": history_len > median,
             "cold_target": np.asarray(target_cold, dtype=bool)}
    segments: dict[str, Optional[Interval]] = {}
    regressed = []
    for name, mask in masks.items():
        if int(mask.sum()) < min_users:
            segments[name] = None
            continue
        segments[name] = paired_interval(challenger[mask], champion[mask], **opts)
        if segments[name].high < 0:
            regressed.append(name)
    if overall.low <= 0:
        reason = (f"{metric} difference {overall.diff:+.4f}, {confidence:.0%} CI [{overall.low:+.4f}, "
                  f"{overall.high:+.4f}] includes or lies below 0")
        return Decision(False, reason, metric, overall, segments)
    if regressed:
        return Decision(False, f"regresses on {', '.join(regressed)}", metric, overall, segments)
    reason = f"{metric} +{overall.diff:.4f}, {confidence:.0%} CI [{overall.low:+.4f}, {overall.high:+.4f}] above 0"
    return Decision(True, reason, metric, overall, segments)


#: The name evaluation gives the champion's rows in ``eval_per_user`` / ``eval_metrics``.
CHAMPION_MODEL = "champion"


def metric_column(metric: str, ks: list[int]) -> tuple[str, int]:
    """``("ndcg", 10)`` for ``ndcg@10``; ``recall@K`` reads the per-user ``hit`` map.

    Raises:
        ValueError: naming ``registry.metric`` for any other spelling or a K not evaluated.
    """
    match = re.fullmatch(r"(ndcg|recall)@(\d+)", metric.strip().lower())
    if not match or int(match.group(2)) not in ks:
        raise ValueError(f"registry.metric={metric!r}: use ndcg@K or recall@K with K in evaluate.ks={ks}")
    return ("ndcg" if match.group(1) == "ndcg" else "hit"), int(match.group(2))


def paired_metrics(ctx: "StageContext", cfg: "Config", model: str, run_id: str, champion_run_id: str
                   ) -> dict[str, np.ndarray]:
    """Per test user present for both models: the metric of each, the history length at the
    test cut and whether the target is cold; arrays in user id order."""
    from pyspark.sql import functions as F

    from hymirec_udfs.core import schemas
    from hymirec_udfs.evaluation.offline import sample_users

    column, k = metric_column(cfg.registry.metric, list(cfg.evaluate.ks))
    seqs = ctx.read(schemas.SEQUENCES)
    # the users this evaluation scored (evaluate.max_users), not rows left by earlier ones
    users = sample_users(seqs, cfg.evaluate.max_users).select(schemas.USER_ID)
    rows = ctx.read(schemas.EVAL_PER_USER).where(F.col("split") == "test").join(users, schemas.USER_ID, "left_semi")

    def side(name: str, rid: str, alias: str):
        return (rows.where((F.col("model") == name) & (F.col("run_id") == rid))
                .select(schemas.USER_ID, "target_id", F.col(column)[k].cast("double").alias(alias)))

    train_users = (seqs.select(schemas.USER_ID, F.explode(F.slice(schemas.ITEM_IDS, 1, F.col(schemas.TRAIN_END)))
                               .alias("target_id"))
                   .distinct().groupBy("target_id").agg(F.count("*").alias("train_users")))
    joined = (side(model, run_id, "challenger")
              .join(side(CHAMPION_MODEL, champion_run_id, "champion").drop("target_id"), schemas.USER_ID)
              .join(seqs.select(schemas.USER_ID, F.col(schemas.VALID_END).alias("history_len")), schemas.USER_ID)
              .join(train_users, "target_id", "left")
              .select(schemas.USER_ID, "challenger", "champion", "history_len",
                      (F.coalesce(F.col("train_users"), F.lit(0)) <= cfg.registry.cold_max_train_users).alias("cold"))
              .orderBy(schemas.USER_ID))
    table = joined.toArrow()
    return {"challenger": table.column("challenger").to_numpy(), "champion": table.column("champion").to_numpy(),
            "history_len": table.column("history_len").to_numpy(), "cold": table.column("cold").to_numpy()}


def run_gate(ctx: "StageContext", cfg: "Config", model: str, run_id: str,
             champion: Optional["ModelVersion"]) -> dict[str, Any]:
    """Register the evaluated model, point ``challenger`` at it, and move ``champion`` to it
    when it is the first model or the gate passes. Returns the figures for the summary."""
    from hymirec_udfs.core import registry

    version = registry.register(cfg, run_id)
    registry.set_alias(cfg, registry.CHALLENGER, version)
    metric = cfg.registry.metric
    if champion is None:
        decision = Decision(True, "no champion yet: the first evaluated model becomes champion", metric)
    elif champion.version == version.version:
        decision = Decision(False, f"version {version.version} is already the champion", metric)
    else:
        data = paired_metrics(ctx, cfg, model, run_id, champion.run_id)
        decision = decide(data["challenger"], data["champion"], history_len=data["history_len"],
                          target_cold=data["cold"], metric=metric, confidence=cfg.registry.confidence,
                          resamples=cfg.registry.resamples, seed=cfg.registry.seed, min_users=cfg.registry.min_users)
    if decision.promote:
        registry.set_alias(cfg, registry.CHAMPION, version)
    champion_version = version.version if decision.promote else (champion.version if champion else "")
    return {"registry.model_name": version.name, "registry.version": version.version,
            "registry.champion_version": champion_version, **decision.summary()}
