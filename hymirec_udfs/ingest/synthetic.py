"""Synthetic catalog and interaction log for scale work.

Items belong to latent interest clusters; each item's text mixes words typical of its
cluster with common words, and its length in words is lognormal (log-mean 3.0, log-sd
0.9, clipped to [4, 256]) — the skew real catalogs show. Users mix a few clusters, so
their histories carry several interests. Generation is distributed (``mapInPandas`` over
id ranges) and deterministic: every block seeds its own generator from (seed, block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import SyntheticConfig

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import SparkSession

    from hymirec_udfs.ingest.raw import RawFrames


COMMON_WORDS = 400
# Longest synthetic history; also the stride of the user-major source order.
MAX_HISTORY = 2000
WORDS_PER_CLUSTER = 60
EPOCH0 = 1_600_000_000


def word_lengths(rng: np.random.Generator, n: int, log_mean: float = 3.0, log_sd: float = 0.9) -> np.ndarray:
    """Text lengths in words: lognormal, clipped to [4, 256]."""
    return np.clip(np.round(rng.lognormal(log_mean, log_sd, size=n)), 4, 256).astype(int)


def item_cluster(item_ids: np.ndarray, n_clusters: int) -> np.ndarray:
    """Deterministic cluster of each item (by id, so users and items agree without a join)."""
    return (item_ids * 2654435761 % 2**32) % n_clusters


def item_texts(item_ids: np.ndarray, cfg: SyntheticConfig) -> list[tuple[str, str, str]]:
    """(title, description, tags) per item id."""
    out = []
    clusters = item_cluster(item_ids, cfg.n_clusters)
    for item_id, cluster in zip(item_ids, clusters):
        rng = np.random.default_rng([cfg.seed, int(item_id), 1])
        n = int(word_lengths(rng, 1)[0])
        own = rng.integers(0, WORDS_PER_CLUSTER, size=n)
        common = rng.integers(0, COMMON_WORDS, size=n)
        pick_own = rng.random(n) < 0.5
        words = [f"c{cluster}w{o}" if p else f"w{c}" for o, c, p in zip(own, common, pick_own)]
        title = " ".join(words[: min(4, n)])
        out.append((title, " ".join(words[4:]), f"topic{cluster}"))
    return out


def _cluster_tables(cfg: SyntheticConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per cluster: its item ids and the cumulative Zipf-like (exponent 0.8) popularity."""
    all_ids = np.arange(1, cfg.n_items + 1)
    clusters = item_cluster(all_ids, cfg.n_clusters)
    by_cluster = [all_ids[clusters == c] for c in range(cfg.n_clusters)]
    cdfs = []
    for ids in by_cluster:
        w = 1.0 / np.arange(1, len(ids) + 1) ** 0.8
        cdf = np.cumsum(w / w.sum()) if len(ids) else np.zeros(0)
        if len(cdf):
            cdf[-1] = 1.0
        cdfs.append(cdf)
    return by_cluster, cdfs


_TABLES: dict[tuple, tuple[list[np.ndarray], list[np.ndarray]]] = {}


def user_events(users: np.ndarray, cfg: SyntheticConfig) -> "pd.DataFrame":
    """The interactions of 0-based user ids, vectorised per user (numpy draws for the whole
    history at once: items by inverse-CDF sampling of the cluster's popularity, gaps,
    ratings). Deterministic per user (its generator is seeded by (seed, user)), so the
    Spark batching does not change the data. Same distributions as the per-event loop
    it replaced: a few clusters per user, 5 + geometric(1 / mean_history) events (at most
    :data:`MAX_HISTORY`), gaps uniform in [60, 86400) s, ratings uniform 1..5."""
    import pandas as pd

    key = (cfg.n_items, cfg.n_clusters)
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = _cluster_tables(cfg)
    by_cluster, cdfs = _TABLES[key]
    parts_user, parts_item, parts_t, parts_r, parts_order = [], [], [], [], []
    for user in users:
        rng = np.random.default_rng([cfg.seed, int(user), 2])
        mine = rng.choice(cfg.n_clusters, size=min(cfg.interests_per_user, cfg.n_clusters), replace=False)
        length = int(min(5 + rng.geometric(1.0 / cfg.mean_history), MAX_HISTORY))
        picks = rng.choice(mine, size=length)
        t0 = EPOCH0 + int(rng.integers(0, 10**7))
        u = rng.random(length)
        items = np.zeros(length, dtype=np.int64)
        for c in np.unique(picks):
            at = picks == c
            if len(by_cluster[c]):
                items[at] = by_cluster[c][np.minimum(np.searchsorted(cdfs[c], u[at]), len(cdfs[c]) - 1)]
        keep = items > 0  # an empty cluster draws nothing, as before
        times = t0 + np.cumsum(rng.integers(60, 86400, size=length))
        ratings = rng.integers(1, 6, size=length)
        events = np.arange(length)[keep]
        parts_user.append(np.full(len(events), int(user) + 1))
        parts_item.append(items[keep])
        parts_t.append(times[keep])
        parts_r.append(ratings[keep])
        # source order: user-major, then the event's place in the user's log
        parts_order.append(int(user) * MAX_HISTORY + events)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    df = pd.DataFrame({
        schemas.USER_ID: cat(parts_user).astype(str), schemas.ITEM_ID: cat(parts_item).astype(str),
        "timestamp": cat(parts_t).astype(str), "rating": cat(parts_r).astype(str),
        schemas.SOURCE_ORDER: cat(parts_order).astype(np.int64),
    })
    df["raw_record"] = df[schemas.USER_ID] + "," + df[schemas.ITEM_ID] + "," + df["timestamp"]
    return df


def generate_raw(spark: "SparkSession", cfg: SyntheticConfig) -> "RawFrames":
    """Raw items and interactions in the shape the ingestion validators expect."""
    import pandas as pd
    from pyspark.sql import functions as F

    from hymirec_udfs.ingest.raw import RawFrames

    n_blocks = max(1, min(64, cfg.n_items // 5000 + 1))

    def items_block(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        for batch in batches:
            ids = batch["id"].to_numpy() + 1
            texts = item_texts(ids, cfg)
            yield pd.DataFrame(
                {
                    schemas.ITEM_ID: ids.astype(str),
                    "title": [t[0] for t in texts],
                    "description": [t[1] for t in texts],
                    "tags": [t[2] for t in texts],
                    "raw_record": [f"synthetic item {i}" for i in ids],
                }
            )

    items = spark.range(0, cfg.n_items, numPartitions=n_blocks).mapInPandas(
        items_block, "item_id string, title string, description string, tags string, raw_record string"
    )

    n_user_blocks = max(1, min(64, cfg.n_users // 2000 + 1))

    def users_block(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        for batch in batches:
            yield user_events(batch["id"].to_numpy(), cfg)

    inter = spark.range(0, cfg.n_users, numPartitions=n_user_blocks).mapInPandas(
        users_block,
        "user_id string, item_id string, timestamp string, rating string, source_order long, raw_record string",
    )
    return RawFrames(items, inter.select(*[F.col(c) for c in inter.columns]), "synthetic")
