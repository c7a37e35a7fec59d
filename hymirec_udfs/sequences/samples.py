"""Per-user samples: the held-out split of a history and the training cut points.

:func:`split_history` and :func:`user_samples` are pure Python (tested without Spark);
:func:`build_sequences` groups interactions per user in Spark and applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import SequencesConfig
from hymirec_udfs.core.shards import SHARD_COLUMN, user_shards

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import DataFrame


class SequenceError(ValueError):
    """Sequences cannot be built (empty log, items without embeddings or codes)."""


def split_history(items: list[str], timestamps: list[int], cfg: SequencesConfig) -> tuple[list[str], list[str], list[str]]:
    """Split one user's time-ordered history into (train, valid_prefix_tail, test_tail).

    Returns ``(train, valid, test)`` where ``valid``/``test`` hold at most one target each.
    For ``time_cutoff`` the prefix of the test target also includes validation-period items
    before it.
    """
    if cfg.split == "leave_one_out":
        if len(items) < 3:
            return items[: max(0, len(items) - 2)], [], []
        return items[:-2], [items[-2]], [items[-1]]
    train = [i for i, t in zip(items, timestamps) if t < cfg.valid_cutoff]
    valid = [i for i, t in zip(items, timestamps) if cfg.valid_cutoff <= t < cfg.test_cutoff]
    test = [i for i, t in zip(items, timestamps) if t >= cfg.test_cutoff]
    return train, valid, test


def user_samples(user_id: str, items: list[str], timestamps: list[int], cfg: SequencesConfig) -> list[dict]:
    """All samples of one user (empty when the user is too short).

    Args:
        user_id: the user.
        items: item ids ordered by (timestamp, source order).
        timestamps: matching timestamps.
        cfg: sequence settings.

    Returns:
        Rows with the ``sequences`` columns.
    """
    train, valid, test = split_history(items, timestamps, cfg)
    if len(train) < cfg.min_train_len:
        return []
    n, max_long, w = cfg.recent_window, cfg.max_long, cfg.window_targets

    def windows(prefix: list[str]) -> tuple[list[str], list[str]]:
        recent = prefix[-n:]
        long = prefix[: max(0, len(prefix) - n)][-max_long:] if max_long > 0 else []
        return long, recent

    rows = []
    cuts = list(range(1, len(train), cfg.stride))
    if cfg.max_samples_per_user and len(cuts) > cfg.max_samples_per_user:
        cuts = cuts[-cfg.max_samples_per_user :]  # keep the most recent cut points
    for cut in cuts:
        long, recent = windows(train[:cut])
        rows.append({schemas.USER_ID: user_id, "split": "train", "cut": cut, "long_ids": long, "recent_ids": recent,
                     "target_ids": train[cut : cut + w], "exclude_ids": []})
    if valid:
        long, recent = windows(train)
        rows.append({schemas.USER_ID: user_id, "split": "valid", "cut": len(train), "long_ids": long,
                     "recent_ids": recent, "target_ids": valid[:1], "exclude_ids": sorted(set(train))})
    if test:
        prefix = train + valid  # everything before the test target
        long, recent = windows(prefix)
        rows.append({schemas.USER_ID: user_id, "split": "test", "cut": len(prefix), "long_ids": long,
                     "recent_ids": recent, "target_ids": test[:1], "exclude_ids": sorted(set(prefix))})
    return rows


def build_sequences(interactions: "DataFrame", cfg: SequencesConfig) -> "DataFrame":
    """Interactions -> sequence samples (distributed: one pandas group per user)."""
    import pandas as pd
    from pyspark.sql import functions as F

    # Time order, ties by the source order (RecBole's rule: no item-id signal); the id is a
    # last key only for rows of different sources that tie on both.
    grouped = interactions.groupBy(schemas.USER_ID).agg(
        F.array_sort(F.collect_list(F.struct("timestamp", schemas.SOURCE_ORDER, schemas.ITEM_ID))).alias("events")
    )

    def per_user(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        for batch in batches:
            rows = []
            for user_id, events in zip(batch[schemas.USER_ID], batch["events"]):
                ordered = list(events)  # already sorted by (timestamp, source order)
                rows.extend(user_samples(
                    user_id, [e[schemas.ITEM_ID] for e in ordered], [int(e["timestamp"]) for e in ordered], cfg
                ))
            frame = pd.DataFrame(rows, columns=[c for c in schemas.arrow_schema(schemas.SEQUENCES).names
                                                if c != SHARD_COLUMN])
            frame[SHARD_COLUMN] = user_shards(frame[schemas.USER_ID].tolist()).astype("int32")
            yield frame

    schema = schemas.spark_schema(schemas.SEQUENCES)
    return grouped.mapInPandas(per_user, schema)
