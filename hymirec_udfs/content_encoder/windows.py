"""Stage-1 training data: windows cut from each user's history, the catalog texts.

The held-out part (stage 2's validation and test targets) is removed first; the rest is
cut into consecutive windows of ``stage1.seq_len`` items from the most recent backwards.
The driver writes windows and catalog as Parquet; each DDP rank reads its share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import SequencesConfig
from hymirec_udfs.core.shards import read_rank_share

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame



# Leave-one-out holds out each user's validation and test target.
HELD_OUT_PER_USER = 2

# A window needs an input and a next item.
MIN_WINDOW_ITEMS = 2


def build_windows(interactions: "DataFrame", items: "DataFrame", *, seq_len: int,
                  sequences_cfg: Optional[SequencesConfig] = None) -> "DataFrame":
    """Stage-1 windows: recent training-part item sequences per user.

    Args:
        interactions: ``interactions`` rows (``user_id``, ``item_id``, ``timestamp``).
        items: ``items`` rows; items whose text is empty are dropped from the windows.
        seq_len: items per window.
        sequences_cfg: the split of stage 2 (held-out items are never used).

    Returns:
        ``user_id``, ``window`` (0 = most recent), ``item_ids`` (oldest first, 2 to
        ``seq_len`` items).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if seq_len < MIN_WINDOW_ITEMS:
        raise ValueError(f"stage1.seq_len must be >= {MIN_WINDOW_ITEMS}, got {seq_len}")
    sequences_cfg = sequences_cfg or SequencesConfig()
    events = interactions.select(schemas.USER_ID, schemas.ITEM_ID, "timestamp", schemas.SOURCE_ORDER)
    if sequences_cfg.split == "leave_one_out":
        # The same order as build_sequences: (timestamp, source order); the last two go.
        newest_first = Window.partitionBy(schemas.USER_ID).orderBy(
            F.col("timestamp").desc(), F.col(schemas.SOURCE_ORDER).desc(), F.col(schemas.ITEM_ID).desc())
        events = (events.withColumn("_from_end", F.row_number().over(newest_first))
                  .where(F.col("_from_end") > HELD_OUT_PER_USER).drop("_from_end"))
    else:
        events = events.where(F.col("timestamp") < sequences_cfg.valid_cutoff)
    with_text = items.where(F.length(F.trim(F.coalesce("text", F.lit("")))) > 0).select(schemas.ITEM_ID)
    events = events.join(with_text, schemas.ITEM_ID, "left_semi")
    users = (events.groupBy(schemas.USER_ID)
             .agg(F.array_sort(F.collect_list(
                 F.struct("timestamp", schemas.SOURCE_ORDER, schemas.ITEM_ID))).alias("events"))
             .select(schemas.USER_ID, F.transform("events", lambda e: e[schemas.ITEM_ID]).alias("items"))
             .where(F.size("items") >= MIN_WINDOW_ITEMS))
    n = F.size("items")
    windows = users.select(schemas.USER_ID, "items", F.explode(
        F.sequence(F.lit(0), (F.ceil(n / F.lit(seq_len)) - 1).cast("int"))).alias("window"))
    end = n - F.col("window") * seq_len  # 1-based, inclusive
    start = F.greatest(F.lit(1), end - seq_len + 1)
    return (windows.select(schemas.USER_ID, F.col("window").cast("int").alias("window"),
                           F.slice("items", start, end - start + 1).alias("item_ids"))
            .where(F.size("item_ids") >= MIN_WINDOW_ITEMS))


def load_catalog(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """Catalog item ids (sorted; catalog index = position + 1) and their texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(path, columns=[schemas.ITEM_ID, "text"]) for path in files]
    if not tables:
        return [], []
    table = pa.concat_tables(tables).sort_by(schemas.ITEM_ID)
    return table.column(schemas.ITEM_ID).to_pylist(), table.column("text").to_pylist()


def load_windows(files: Sequence[str], catalog_ids: Sequence[str], *, seq_len: int, rank: int = 0,
                 world_size: int = 1) -> np.ndarray:
    """A rank's share of the window files as catalog indices.

    The rank's users come from a hash of the user id and the windows are ordered by
    (user, window), whatever files and row order Spark wrote (:func:`read_rank_share`).

    Args:
        files: window Parquet files (``user_id``, ``window``, ``item_ids`` columns).
        catalog_ids: sorted catalog ids (:func:`load_catalog`).
        seq_len: window width.
        rank: this rank.
        world_size: number of ranks.

    Returns:
        (n, seq_len) int64, right-padded with 0.

    Raises:
        KeyError: a window names an item that is not in the catalog.
        ValueError: a window is longer than ``seq_len``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = read_rank_share(files, ["item_ids"], rank=rank, world_size=world_size, user_col=schemas.USER_ID,
                            sort_by=[schemas.USER_ID, "window"])
    if table.num_rows == 0:
        return np.zeros((0, seq_len), dtype=np.int64)
    column = table.column("item_ids").combine_chunks()
    lengths = np.asarray(pc.list_value_length(column), dtype=np.int64)
    if lengths.max() > seq_len:
        raise ValueError(f"window of {lengths.max()} items in {list(files)[:3]} exceeds stage1.seq_len={seq_len}")
    flat = pc.list_flatten(column)
    index = pc.index_in(flat, value_set=pa.array(list(catalog_ids), pa.string()))
    if index.null_count:
        missing = flat.filter(pc.is_null(index)).unique().to_pylist()
        raise KeyError(f"windows name {len(missing)} item(s) missing from the catalog, e.g. {missing[:5]}")
    values = np.asarray(index, dtype=np.int64) + 1
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(values)) - np.repeat(starts, lengths)
    out = np.zeros((len(lengths), seq_len), dtype=np.int64)
    out[rows, cols] = values
    return out
