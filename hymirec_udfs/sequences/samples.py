"""Per-user samples: the held-out split of a history and the training cut points.

:func:`split_history` and :func:`user_samples` are pure Python (tested without Spark);
:func:`build_sequences` groups interactions per user in Spark and applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import SequencesConfig
from hymirec_udfs.core.schemas import ITEM_IDS, SOURCE_ORDERS, TIMESTAMPS, TRAIN_END, VALID_END
from hymirec_udfs.core.shards import SHARD_COLUMN, user_shards

#: The sample kinds a user row is cut into.
SPLITS = ("train", "valid", "test")

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


def user_row(user_id: str, items: list[str], timestamps: list[int], source_orders: list[int],
             cfg: SequencesConfig) -> Optional[dict[str, Any]]:
    """One user's ``sequences`` row: the whole time-ordered history and its split boundaries.

    ``items[:train_end]`` is the training part, ``items[train_end]`` the validation target
    when ``valid_end > train_end``, ``items[valid_end]`` the test target when the history is
    longer than ``valid_end``. Returns None for a user with fewer than
    ``min_train_len`` training items (counted as skipped by the stage).
    """
    train, valid, _ = split_history(items, timestamps, cfg)
    if len(train) < cfg.min_train_len:
        return None
    return {schemas.USER_ID: user_id, ITEM_IDS: list(items), TIMESTAMPS: [int(t) for t in timestamps],
            SOURCE_ORDERS: [int(o) for o in source_orders], TRAIN_END: len(train), VALID_END: len(train) + len(valid)}


def train_cuts(train_end: int, cfg: SequencesConfig) -> list[int]:
    """Training cut points of a user: every ``stride`` items, the most recent ``max_samples_per_user``."""
    cuts = list(range(1, train_end, cfg.stride))
    if cfg.max_samples_per_user and len(cuts) > cfg.max_samples_per_user:
        cuts = cuts[-cfg.max_samples_per_user :]  # keep the most recent cut points
    return cuts


def cut_samples(row: dict[str, Any], cfg: SequencesConfig, splits: Sequence[str] = SPLITS) -> list[dict]:
    """The samples of one user row, cut as the loader cuts them (the former per-cut rows).

    Args:
        row: a ``sequences`` row (:func:`user_row`).
        cfg: sequence settings (recent window, long-history cap, targets, stride, cap).
        splits: which samples to cut (``train``, ``valid``, ``test``).

    Returns:
        Dicts with ``user_id``, ``split``, ``cut``, ``long_ids``, ``recent_ids``,
        ``target_ids`` and ``exclude_ids`` (the distinct history, for valid/test).
    """
    items = list(row[ITEM_IDS])
    train_end, valid_end = int(row[TRAIN_END]), int(row[VALID_END])
    n, max_long, w = cfg.recent_window, cfg.max_long, cfg.window_targets
    user = row[schemas.USER_ID]

    def sample(split: str, cut: int, targets: list[str], exclude: list[str]) -> dict:
        prefix = items[:cut]
        long = prefix[: max(0, cut - n)][-max_long:] if max_long > 0 else []
        return {schemas.USER_ID: user, "split": split, "cut": cut, "long_ids": long, "recent_ids": prefix[-n:],
                "target_ids": targets, "exclude_ids": exclude}

    rows = []
    if "train" in splits:
        rows.extend(sample("train", cut, items[cut : min(cut + w, train_end)], []) for cut in train_cuts(train_end, cfg))
    if "valid" in splits and valid_end > train_end:
        rows.append(sample("valid", train_end, [items[train_end]], sorted(set(items[:train_end]))))
    if "test" in splits and len(items) > valid_end:
        rows.append(sample("test", valid_end, [items[valid_end]], sorted(set(items[:valid_end]))))
    return rows


def user_samples(user_id: str, items: list[str], timestamps: list[int], cfg: SequencesConfig) -> list[dict]:
    """All samples of one user (empty when the user is too short): :func:`cut_samples` of its row."""
    row = user_row(user_id, items, timestamps, list(range(len(items))), cfg)
    return cut_samples(row, cfg) if row is not None else []


def build_sequences(interactions: "DataFrame", cfg: SequencesConfig) -> "DataFrame":
    """Interactions -> one ``sequences`` row per user (distributed: one pandas group per user).

    Cost: O(T) ids per user with T interactions (the former per-cut rows were O(T x
    min(T, max_long))); at 10M users x 1,000 items about 10G ids, written once.
    """
    import pandas as pd
    from pyspark.sql import functions as F

    # Time order, ties by the source order (RecBole's rule: no item-id signal); the id is a
    # last key only for rows of different sources that tie on both.
    grouped = interactions.groupBy(schemas.USER_ID).agg(
        F.array_sort(F.collect_list(F.struct("timestamp", schemas.SOURCE_ORDER, schemas.ITEM_ID))).alias("events")
    )
    columns = [c for c in schemas.arrow_schema(schemas.SEQUENCES).names if c != SHARD_COLUMN]

    def per_user(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        for batch in batches:
            rows = []
            for user_id, events in zip(batch[schemas.USER_ID], batch["events"]):
                ordered = list(events)  # already sorted by (timestamp, source order)
                row = user_row(user_id, [e[schemas.ITEM_ID] for e in ordered], [int(e["timestamp"]) for e in ordered],
                               [int(e[schemas.SOURCE_ORDER]) for e in ordered], cfg)
                if row is not None:
                    rows.append(row)
            frame = pd.DataFrame(rows, columns=columns)
            frame[SHARD_COLUMN] = user_shards(frame[schemas.USER_ID].tolist()).astype("int32")
            yield frame

    return grouped.mapInPandas(per_user, schemas.spark_schema(schemas.SEQUENCES))


def sample_counts(sequences: "DataFrame", cfg: SequencesConfig) -> dict[str, int]:
    """Users, stored history items and the samples the loader cuts per split (one Spark pass)."""
    from pyspark.sql import functions as F

    n_cuts = F.when(F.col(TRAIN_END) > 1, F.ceil((F.col(TRAIN_END) - 1) / F.lit(cfg.stride))).otherwise(0)
    if cfg.max_samples_per_user:
        n_cuts = F.least(n_cuts, F.lit(cfg.max_samples_per_user))
    row = sequences.agg(
        F.count(F.lit(1)).alias("users"),
        F.coalesce(F.sum(F.size(ITEM_IDS)), F.lit(0)).alias("items"),
        F.coalesce(F.sum(n_cuts), F.lit(0)).alias("train"),
        F.coalesce(F.sum((F.col(VALID_END) > F.col(TRAIN_END)).cast("int")), F.lit(0)).alias("valid"),
        F.coalesce(F.sum((F.size(ITEM_IDS) > F.col(VALID_END)).cast("int")), F.lit(0)).alias("test"),
    ).first()
    return {key: int(row[key]) for key in ("users", "items", "train", "valid", "test")}


EVAL_SAMPLE_SCHEMA = ("user_id string, split string, cut int, long_ids array<string>, recent_ids array<string>, "
                      "target_ids array<string>, exclude_ids array<string>")


def eval_samples(sequences: "DataFrame", cfg: SequencesConfig, splits: Sequence[str]) -> "DataFrame":
    """The valid/test samples of every user, cut in Spark from the user rows (distributed).

    Same cutting as the training loader (:func:`cut_samples`); one row per user and split.
    """
    import pandas as pd

    wanted = [s for s in splits if s in SPLITS]
    names = [c.split()[0] for c in EVAL_SAMPLE_SCHEMA.split(", ")]

    def per_batch(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        for batch in batches:
            rows = []
            for row in batch.to_dict("records"):
                rows.extend(cut_samples(row, cfg, wanted))
            yield pd.DataFrame(rows, columns=names)

    cols = [schemas.USER_ID, ITEM_IDS, TRAIN_END, VALID_END]
    return sequences.select(*cols).mapInPandas(per_batch, EVAL_SAMPLE_SCHEMA)
