"""Stage ``build_sequences``: interactions -> one ``sequences`` row per user.

Per user, interactions are ordered by time (ties broken by the source order assigned at
ingest, so the order is deterministic and carries no item-id signal). The row holds the
whole ordered history (item ids, timestamps, source order) and its split boundaries:
leave-one-out by default (the last item is the test target, the one before it the
validation target, the rest is training data), or ``time_cutoff``. Samples are not
materialised: the training loader cuts them on the fly (every ``stride`` items, each with
the recent window of ``n`` items, up to ``max_long`` items of long history before it and
the next ``w`` training items as targets), and evaluation cuts the valid/test samples
(:func:`hymirec_udfs.sequences.samples.cut_samples`), so the table is O(T) per user where
per-cut rows were O(T x min(T, max_long)). Every row carries its user's ``shard`` and the
table is written sorted by it, so each training rank reads the rows of its own users
(:func:`hymirec_udfs.core.shards.read_rank_share`).

With a run date (``--run-date D``) only interactions before the end of D are used
(:mod:`hymirec_udfs.core.rundate`): the table, and everything trained, evaluated and
served from it, is "as of D". A backfill of D (an earlier date than the latest run) reads
the ``interactions`` version D's own run read (``job_runs``), so late rows merged since
do not change it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hymirec_udfs.core import rundate, schemas
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.lineage import backfill_reason, recorded_input_version
from hymirec_udfs.core.shards import SHARD_COLUMN
from hymirec_udfs.core.stage_api import StageContext, StageOutput
from hymirec_udfs.sequences.samples import SequenceError, build_sequences, sample_counts

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Build and write the ``sequences`` table.

    Raises:
        SequenceError: no interactions, no user long enough, or interactions naming items
            that have no embedding or no code (named, first 10).
    """
    day = rundate.run_date()
    if day is not None and backfill_reason(ctx.store):
        # a backfill reads the interactions version D's run read: late rows merged since
        # then do not change D's reproduction
        recorded = recorded_input_version(ctx.store, "build_sequences", day.isoformat(), schemas.INTERACTIONS)
        if recorded is not None:
            ctx.input_versions[schemas.INTERACTIONS] = recorded
    inter = ctx.read(schemas.INTERACTIONS)
    if schemas.SOURCE_ORDER not in inter.columns:
        raise SequenceError(
            f"table 'interactions' has no '{schemas.SOURCE_ORDER}' column (written by an older ingest):"
            " run `hymirec ingest` again (or `pipeline run --force`)")
    inter = inter.select(schemas.USER_ID, schemas.ITEM_ID, "timestamp", schemas.SOURCE_ORDER)
    after = 0
    if day is not None:
        from pyspark.sql import functions as F

        later = F.col("timestamp") >= F.lit(rundate.cutoff_epoch(day))
        after = inter.where(later).count()
        inter = inter.where(~later)
    if inter.limit(1).count() == 0:
        raise SequenceError("table 'interactions' is empty: nothing to build sequences from"
                            + (f" as of the run date {day}" if day else ""))
    for table in (schemas.ITEM_EMBEDDINGS, schemas.ITEM_CODES):
        if ctx.store.exists(table):
            known = ctx.read(table).select(schemas.ITEM_ID).distinct()
            missing = inter.select(schemas.ITEM_ID).distinct().join(known, schemas.ITEM_ID, "left_anti")
            examples = [r.item_id for r in missing.limit(10).collect()]
            if examples:
                raise SequenceError(
                    f"{missing.count()} interacted items have no row in '{table}' (e.g. {examples});"
                    f" re-run the stage that writes '{table}'"
                )

    rows = build_sequences(inter, cfg.sequences)
    files = max(4, 2 * cfg.train.num_processes)
    # Several files, each a contiguous range of shards sorted by (shard, user): a rank's
    # readers skip the row groups of other ranks' shards. Which rows a rank reads and their
    # order do not depend on this layout (read_rank_share sorts them).
    ctx.store.overwrite(
        schemas.SEQUENCES,
        rows.repartitionByRange(files, SHARD_COLUMN).sortWithinPartitions(SHARD_COLUMN, schemas.USER_ID),
    )
    written = ctx.store.read(schemas.SEQUENCES)
    counts = sample_counts(written, cfg.sequences)
    users = inter.select(schemas.USER_ID).distinct().count()
    kept = counts["users"]
    if kept == 0:
        raise SequenceError(
            f"no user has at least sequences.min_train_len={cfg.sequences.min_train_len} training items"
        )
    return StageOutput(
        rows={"train_samples": counts["train"], "valid_samples": counts["valid"], "test_samples": counts["test"],
              "users": kept, "users_skipped_short": users - kept,
              "history_items": counts["items"], "interactions_after_run_date": after},
        summary={"split": cfg.sequences.split, "as_of": day.isoformat() if day else "all",
                 "mean_train_samples_per_user": counts["train"] / kept if kept else 0.0},
    )
