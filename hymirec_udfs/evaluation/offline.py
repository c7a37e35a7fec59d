"""Offline evaluation of trained checkpoints on the valid/test users.

Users are scored in a pandas UDF (``mapInPandas``): each Python worker loads the model
once (:class:`LoadedModel`), computes every user's interest embeddings and ranks the whole
catalog exactly with :func:`hymirec_udfs.evaluation.scoring.rank_targets`. Per-user rows
are aggregated by Spark (:func:`aggregate`); :func:`metrics_table` formats the comparison.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext
from hymirec_udfs.sequences.samples import eval_samples

# Per-user metrics are summed in this type (exact addition: order-independent).
EXACT_SUM_TYPE = "decimal(38,18)"

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import Column, DataFrame, SparkSession


_MODEL_CACHE: dict[str, Any] = {}


class EvaluationError(ValueError):
    """No model to evaluate, or no evaluation samples."""


class LoadedModel:
    """A trained model with its item store and window sizes (as trained)."""

    def __init__(self, checkpoint: str, store_path: Optional[str] = None) -> None:
        """``store_path``: another item store of the same codebook version (today's catalog
        encoded with the codebook the model was trained on); default the model's own."""
        from hymirec_udfs.recommender.item_store import ItemStore
        from hymirec_udfs.recommender.train import load_trained_model
        from hymirec_udfs.training.checkpoints import load_checkpoint

        store_path = store_path or item_store_path(checkpoint)
        meta = load_checkpoint(checkpoint)
        self.model = load_trained_model(checkpoint, item_store_path=store_path)
        self.store = ItemStore.load(store_path)
        self.max_long = int(meta["max_long"])
        self.max_recent = int(meta["recent_window"])
        self.model_config = dict(meta.get("model_config") or {})


def item_store_path(checkpoint: str) -> str:
    """The item store beside a checkpoint: the directory, or a legacy ``item_store.npz``."""
    folder = Path(checkpoint).parent
    legacy = folder / "item_store.npz"
    return str(legacy) if legacy.exists() and not (folder / "item_store").exists() else str(folder / "item_store")


def _load_model(checkpoint: str, store_path: Optional[str] = None) -> LoadedModel:
    """One model per Python worker, checkpoint and item store (reused across tasks and batches)."""
    key = f"{checkpoint}|{store_path or ''}"
    if key not in _MODEL_CACHE:
        import torch

        torch.set_num_threads(1)
        _MODEL_CACHE[key] = LoadedModel(checkpoint, store_path)
    return _MODEL_CACHE[key]


def mips_to_cosine(items: np.ndarray) -> np.ndarray:
    """Augment item vectors so cosine ranking equals dot-product ranking.

    ``v -> [v / M, sqrt(1 - |v|^2 / M^2)]`` with ``M`` the largest norm (Bachrach et al.,
    2014). A user vector padded with a 0 then has ``cos(u', v') = u.v / (|u| M)``: the
    same order as ``u.v`` for each user. Unit-norm items (HyMiRec, HLLM) are unchanged
    apart from a zero column.
    """
    norms = np.linalg.norm(items, axis=1)
    m = float(norms.max()) or 1.0
    extra = np.sqrt(np.clip(1.0 - (norms / m) ** 2, 0.0, None))
    return np.hstack([items / m, extra[:, None]]).astype(np.float32)


def score_users(
    loaded: LoadedModel,
    long_ids: Sequence[Sequence[str]],
    recent_ids: Sequence[Sequence[str]],
    target_ids: Sequence[str],
    exclude_ids: Sequence[Sequence[str]],
    *,
    exclude_history: bool,
    merge: str,
    ks: Sequence[int],
    chunk_items: int,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Ranks, per-user metrics and interest diversity for a batch of users.

    Args:
        loaded: a trained stage-2 model (``forward(long_idx, recent_idx)``, ``item_vectors``)
            with its item store.
        long_ids: long history item ids per user.
        recent_ids: recent window item ids per user.
        target_ids: the held-out item per user.
        exclude_ids: history item ids per user (excluded when ``exclude_history``).
        exclude_history: drop history items from the ranking.
        merge: ``max`` or ``union``.
        ks: cut-offs.
        chunk_items: catalog items per scoring matmul.
        batch_size: users per forward pass.

    Returns:
        ``rank`` (0 = target not in catalog), ``hit_K``/``ndcg_K`` columns and
        ``diversity`` (mean pairwise cosine of a user's interests; NaN for one interest).
    """
    import torch

    from hymirec_udfs.evaluation.metrics import per_user_metrics
    from hymirec_udfs.evaluation.scoring import rank_targets

    model, store = loaded.model, loaded.store
    max_long, max_recent = loaded.max_long, loaded.max_recent

    def pad(rows: Sequence[Sequence[str]], width: int) -> torch.Tensor:
        out = np.zeros((len(rows), max(1, width)), dtype=np.int64)
        for i, ids in enumerate(rows):
            idx = store.lookup(list(ids)[-width:] if width else [])
            idx = idx[idx > 0]  # an unknown history item contributes nothing
            if len(idx):
                out[i, out.shape[1] - len(idx):] = idx
        return torch.from_numpy(out)

    with torch.inference_mode():
        items = model.item_vectors()[1:].float().cpu().numpy()
    items = mips_to_cosine(items)
    targets = store.lookup(list(target_ids)) - 1  # catalog row; -1 - 1 < 0 for absent
    targets = np.where(targets < 0, -1, targets)
    exclude = None
    if exclude_history:
        exclude = [np.unique(store.lookup(list(ids))) - 1 for ids in exclude_ids]
        exclude = [e[e >= 0] for e in exclude]

    interests = []
    with torch.inference_mode():
        for start in range(0, len(target_ids), batch_size):
            sl = slice(start, start + batch_size)
            out = model(pad(long_ids[sl], max_long), pad(recent_ids[sl], max_recent))
            interests.append(out.float().cpu().numpy())
    user_vecs = np.concatenate(interests) if interests else np.zeros((0, 1, items.shape[1] - 1), np.float32)
    user_vecs = np.concatenate([user_vecs, np.zeros(user_vecs.shape[:2] + (1,), np.float32)], axis=2)
    ranks = rank_targets(user_vecs, items, targets, exclude, merge=merge, chunk_items=chunk_items)
    cols = per_user_metrics(ranks, ks)
    cols["rank"] = ranks
    s = user_vecs.shape[1]
    if s > 1:
        unit = user_vecs / np.maximum(np.linalg.norm(user_vecs, axis=2, keepdims=True), 1e-12)
        gram = np.einsum("usd,utd->ust", unit, unit)
        cols["diversity"] = (gram.sum(axis=(1, 2)) - s) / (s * (s - 1))
    else:
        cols["diversity"] = np.full(len(ranks), np.nan)
    return cols


def evaluate_checkpoint(
    samples: "DataFrame", checkpoint: str, *, model_name: str, run_id: str, cfg: Config
) -> "DataFrame":
    """Per-user evaluation rows (``eval_per_user`` schema) of one model, distributed."""
    import pandas as pd

    ks = list(cfg.evaluate.ks)
    exclude_history, merge, chunk = cfg.evaluate.exclude_history, cfg.evaluate.merge, cfg.evaluate.chunk_items

    def per_batch(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        model = _load_model(checkpoint)
        for batch in batches:
            if batch.empty:
                continue
            targets = [t[0] for t in batch["target_ids"]]
            cols = score_users(
                model, list(batch["long_ids"]), list(batch["recent_ids"]), targets, list(batch["exclude_ids"]),
                exclude_history=exclude_history, merge=merge, ks=ks, chunk_items=chunk,
            )
            yield pd.DataFrame({
                "model": model_name, "run_id": run_id, "split": batch["split"].to_numpy(),
                schemas.USER_ID: batch[schemas.USER_ID].to_numpy(), "target_id": targets,
                "rank": cols["rank"].astype(np.int64), "target_in_catalog": cols["rank"] > 0,
                "hit": [{k: bool(cols[f"hit_{k}"][i]) for k in ks} for i in range(len(batch))],
                "ndcg": [{k: float(cols[f"ndcg_{k}"][i]) for k in ks} for i in range(len(batch))],
                "interest_diversity": [None if np.isnan(d) else float(d) for d in cols["diversity"]],
            })

    return samples.mapInPandas(per_batch, schemas.spark_schema(schemas.EVAL_PER_USER))


def aggregate(per_user: "DataFrame", ks: Sequence[int]) -> "DataFrame":
    """``eval_metrics`` rows: Recall@K, NDCG@K, MRR and user counts per (model, split, K).

    Means are exact sums of per-user values (rounded to 1e-18 each) divided by the count,
    so they do not change with the partition layout of the input.
    """
    from pyspark.sql import functions as F

    def exact_mean(col: "Column") -> "Column":
        # A sum of doubles depends on the order Spark adds partial sums in (the partition
        # layout of the input), so the last digits of a metric could move with the layout
        # of ``sequences``. Decimal addition is exact: the mean depends on the values only.
        return F.sum(col.cast(EXACT_SUM_TYPE)).cast("double") / F.count(F.lit(1))

    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for k in ks:
        rows.append(
            per_user.groupBy("model", "run_id", "split").agg(
                F.lit(int(k)).cast("int").alias("k"),
                exact_mean(F.col("hit")[int(k)].cast("double")).alias("recall"),
                exact_mean(F.col("ndcg")[int(k)]).alias("ndcg"),
                exact_mean(F.when(F.col("rank") > 0, 1.0 / F.col("rank")).otherwise(0.0)).alias("mrr"),
                F.count("*").alias("users"),
                F.sum(F.when(F.col("target_in_catalog"), 0).otherwise(1)).cast("long").alias("users_target_absent"),
            )
        )
    out = rows[0]
    for df in rows[1:]:
        out = out.unionByName(df)
    return out.withColumn("evaluated_at", F.lit(now).cast("timestamp"))


# Seed of the evaluation user sample: fixed, so the sample depends on the user ids only.
USER_SAMPLE_SEED = 20251015


def sample_users(sequences: "DataFrame", max_users: int) -> "DataFrame":
    """About ``max_users`` user rows of ``sequences`` (all of them when 0 or fewer users).

    Each user is kept when a 64-bit hash of its id, read as a uniform draw in [0, 1), is
    below ``max_users / users``: the same users on every run, model and day, whatever the
    partitioning, and a superset when ``max_users`` grows. Cost: one count and one filter
    (no sort, nothing on the driver), so 1M users out of 100M is a scan.
    """
    if max_users <= 0:
        return sequences
    from pyspark.sql import functions as F

    total = sequences.count()
    if total <= max_users:
        return sequences
    draw = F.pmod(F.xxhash64(F.col(schemas.USER_ID).cast("string"), F.lit(USER_SAMPLE_SEED)),
                  F.lit(1 << 40)) / float(1 << 40)
    return sequences.where(draw < max_users / total)


def evaluate_models(
    spark: "SparkSession", cfg: Config, ctx: StageContext, models: dict[str, tuple[str, str]]
) -> list[dict[str, Any]]:
    """Evaluate ``{name: (checkpoint, run_id)}`` on the configured splits; write both tables."""
    from pyspark.sql import functions as F

    parts = max(2, spark.sparkContext.defaultParallelism)
    # one valid/test sample per user, cut from the user rows in Spark, cached: every model
    # scores the same samples
    users = sample_users(ctx.read(schemas.SEQUENCES), cfg.evaluate.max_users)
    seqs = eval_samples(users, cfg.sequences, cfg.evaluate.splits).repartition(parts).cache()
    n_samples = seqs.count()
    if n_samples == 0:
        raise EvaluationError(f"table 'sequences' has no samples for splits {cfg.evaluate.splits}"
                              + (f" (evaluate.max_users={cfg.evaluate.max_users})" if cfg.evaluate.max_users else ""))
    ctx.expect(n_samples * len(models), "user evaluations")  # progress lines: users/s
    per_user = None
    for name, (checkpoint, run_id) in models.items():
        df = evaluate_checkpoint(seqs, checkpoint, model_name=name, run_id=run_id, cfg=cfg)
        per_user = df if per_user is None else per_user.unionByName(df)
    ctx.store.merge(schemas.EVAL_PER_USER, per_user)
    written = ctx.store.read(schemas.EVAL_PER_USER)
    # (model, run id) pairs: a champion evaluated earlier as the challenger has rows under
    # the main model's name with the same run id; they must not be mixed in here.
    from functools import reduce

    mine = written.where(reduce(lambda a, b: a | b, [(F.col("model") == name) & (F.col("run_id") == rid)
                                                     for name, (_, rid) in models.items()]))
    # Only this evaluation's users: rows of the same (model, run id) from an earlier
    # evaluation of other users (another user sample, users since gone) are not merged over.
    mine = mine.join(seqs.select(schemas.USER_ID, "split"), [schemas.USER_ID, "split"], "left_semi")  # cached
    metrics = aggregate(mine, cfg.evaluate.ks)
    ctx.store.merge(schemas.EVAL_METRICS, metrics)
    rows = [r.asDict() for r in metrics.orderBy("model", "split", "k").collect()]
    for r in rows:
        prefix = f"{r['model']}.{r['split']}"
        ctx.logger.metrics({f"{prefix}.recall@{r['k']}": r["recall"], f"{prefix}.ndcg@{r['k']}": r["ndcg"],
                            f"{prefix}.mrr": r["mrr"]})
    return rows


def metrics_table(rows: Sequence[dict[str, Any]], split: str = "test") -> str:
    """Markdown table: one row per model, R@K and N@K columns."""
    ks = sorted({r["k"] for r in rows})
    header = "| model | " + " | ".join(f"R@{k}" for k in ks) + " | " + " | ".join(f"N@{k}" for k in ks) + " | MRR | users |"
    lines = [header, "|" + "---|" * (2 * len(ks) + 3)]
    for model in sorted({r["model"] for r in rows if r["split"] == split}, key=lambda m: (m != "hymirec", m)):
        by_k = {r["k"]: r for r in rows if r["model"] == model and r["split"] == split}
        first = next(iter(by_k.values()))
        lines.append(
            f"| {model} | " + " | ".join(f"{by_k[k]['recall']:.4f}" for k in ks) + " | "
            + " | ".join(f"{by_k[k]['ndcg']:.4f}" for k in ks) + f" | {first['mrr']:.4f} | {first['users']} |"
        )
    return "\n".join(lines)
