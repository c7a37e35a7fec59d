"""Stage ``build_sequences``: interactions -> train/valid/test samples.

Per user, interactions are ordered by time (ties broken by item id, so the order is
deterministic). Leave-one-out by default: the last item is the test target, the one
before it the validation target, the rest is training data. Training samples are cut
at points along the training prefix (every ``stride`` items); each carries the recent
window (last ``n`` items before the cut), the long history before that window (up to
``max_long``) and the window targets (next ``w`` items, never past the training part).
Validation and test samples use the whole prefix before their target and carry the
prefix's distinct items for excluding history at ranking time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from hymirec_udfs import schemas
from hymirec_udfs.config import Config, SequencesConfig
from hymirec_udfs.stages import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession


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
        items: item ids ordered by (timestamp, item id).
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
        rows.append({"user_id": user_id, "split": "train", "cut": cut, "long_ids": long, "recent_ids": recent,
                     "target_ids": train[cut : cut + w], "exclude_ids": []})
    if valid:
        long, recent = windows(train)
        rows.append({"user_id": user_id, "split": "valid", "cut": len(train), "long_ids": long,
                     "recent_ids": recent, "target_ids": valid[:1], "exclude_ids": sorted(set(train))})
    if test:
        prefix = train + valid  # everything before the test target
        long, recent = windows(prefix)
        rows.append({"user_id": user_id, "split": "test", "cut": len(prefix), "long_ids": long,
                     "recent_ids": recent, "target_ids": test[:1], "exclude_ids": sorted(set(prefix))})
    return rows


def build_sequences(interactions: "DataFrame", cfg: SequencesConfig) -> "DataFrame":
    """Interactions -> sequence samples (distributed: one pandas group per user)."""
    import pandas as pd
    from pyspark.sql import functions as F

    grouped = interactions.groupBy("user_id").agg(
        F.array_sort(F.collect_list(F.struct("timestamp", "item_id"))).alias("events")
    )

    def per_user(batches: Iterator["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        for batch in batches:
            rows = []
            for user_id, events in zip(batch["user_id"], batch["events"]):
                ordered = list(events)  # already sorted by (timestamp, item_id)
                rows.extend(user_samples(
                    user_id, [e["item_id"] for e in ordered], [int(e["timestamp"]) for e in ordered], cfg
                ))
            yield pd.DataFrame(rows, columns=schemas.arrow_schema(schemas.SEQUENCES).names)

    schema = schemas.spark_schema(schemas.SEQUENCES)
    return grouped.mapInPandas(per_user, schema)


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Build and write the ``sequences`` table.

    Raises:
        SequenceError: no interactions, no user long enough, or interactions naming items
            that have no embedding or no code (named, first 10).
    """
    inter = ctx.read(schemas.INTERACTIONS).select("user_id", "item_id", "timestamp")
    if inter.limit(1).count() == 0:
        raise SequenceError("table 'interactions' is empty: nothing to build sequences from")
    for table in (schemas.ITEM_EMBEDDINGS, schemas.ITEM_CODES):
        if ctx.store.exists(table):
            known = ctx.read(table).select("item_id").distinct()
            missing = inter.select("item_id").distinct().join(known, "item_id", "left_anti")
            examples = [r.item_id for r in missing.limit(10).collect()]
            if examples:
                raise SequenceError(
                    f"{missing.count()} interacted items have no row in '{table}' (e.g. {examples});"
                    f" re-run the stage that writes '{table}'"
                )

    samples = build_sequences(inter, cfg.sequences)
    files = max(4, 2 * cfg.train.num_processes)
    # Several files, so every training rank gets its own share to read.
    ctx.store.overwrite(schemas.SEQUENCES, samples.repartition(files, "user_id"))
    written = ctx.store.read(schemas.SEQUENCES)
    counts = {r["split"]: r["count"] for r in written.groupBy("split").count().collect()}
    users = inter.select("user_id").distinct().count()
    kept = written.select("user_id").distinct().count()
    if kept == 0:
        raise SequenceError(
            f"no user has at least sequences.min_train_len={cfg.sequences.min_train_len} training items"
        )
    return StageOutput(
        rows={"train_samples": counts.get("train", 0), "valid_samples": counts.get("valid", 0),
              "test_samples": counts.get("test", 0), "users": kept, "users_skipped_short": users - kept},
        summary={"split": cfg.sequences.split, "mean_train_samples_per_user":
                 counts.get("train", 0) / kept if kept else 0.0},
    )


