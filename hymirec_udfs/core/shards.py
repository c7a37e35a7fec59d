"""Rank shares by user: which rows a training rank reads, fixed by the data alone.

Users are hashed into :data:`USER_SHARDS` shards; a rank reads the users of a contiguous
shard range, sorted by a key of the data (user, cut). Writers store the shard in a
``shard`` column and sort by it so readers skip other ranks' row groups; readers fall back
to hashing the user id where a file has no such column. Used by ``build_sequences`` and
stage 2's loader, and by stage 1's window writer and loader. numpy only at import time
(these run inside Spark's Python workers).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

#: Users are hashed into this many shards (CRC-32 of the UTF-8 user id, mod this); rank r
#: of W reads the contiguous shard range ``[r*S//W, (r+1)*S//W)``. A rank's rows therefore
#: depend on the user ids only, never on the order or the files Spark wrote them in. Keep
#: the number of ranks at or below it (more ranks than shards leaves ranks without data).
USER_SHARDS = 1024
SHARD_COLUMN = "shard"


def user_shards(user_ids: Any) -> np.ndarray:
    """Shard of each user id: ``crc32(utf8(id)) % USER_SHARDS`` (Spark: ``pmod(crc32(id), S)``).

    Args:
        user_ids: an Arrow array or any sequence of strings.

    Returns:
        (n,) int64 shard numbers.
    """
    import zlib

    values = user_ids.to_pylist() if hasattr(user_ids, "to_pylist") else list(user_ids)
    return np.fromiter((zlib.crc32(str(u).encode("utf-8")) % USER_SHARDS for u in values),
                       dtype=np.int64, count=len(values))


def spark_user_shard(user_col: str) -> Any:
    """The Spark column equal to :func:`user_shards` (for writers that store the shard)."""
    from pyspark.sql import functions as F

    return F.pmod(F.crc32(F.col(user_col).cast("binary")), F.lit(USER_SHARDS)).cast("int")


def rank_shard_range(rank: int, world_size: int) -> tuple[int, int]:
    """Half-open shard range ``[lo, hi)`` of ``rank`` among ``world_size`` ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank * USER_SHARDS // world_size, (rank + 1) * USER_SHARDS // world_size


def iter_rank_share(
    files: Sequence[str],
    columns: Sequence[str],
    *,
    rank: int,
    world_size: int,
    user_col: str,
    row_filter: Optional[Callable[[Any, str], Any]] = None,
    filter_columns: Sequence[str] = (),
    batch_rows: int = 65_536,
) -> Iterator[Any]:
    """This rank's rows of a set of Parquet files, streamed: one ``pyarrow.Table`` of at
    most ``batch_rows`` rows at a time (in file order; callers that need the data-fixed
    order sort what they keep, see :func:`read_rank_share`).

    A row belongs to the rank whose shard range holds its user's shard (the file's
    ``shard`` column, or the hash of ``user_col`` where the file has none). Row groups
    whose ``shard`` statistics lie outside the rank's range are not read, so writers that
    sort by shard (``build_sequences``) give each rank about 1/W of the bytes to read; the
    rest costs one footer per file. Memory: one batch of the raw columns at a time.

    Args:
        files: Parquet files.
        columns: columns to return (``user_col`` is always read).
        rank: this rank.
        world_size: number of ranks.
        user_col: the user id column.
        row_filter: optional ``(table, path) -> boolean mask`` applied per batch before
            sharding (e.g. the split).
        filter_columns: columns ``row_filter`` reads, where the file has them.
        batch_rows: rows per batch read.

    Raises:
        ValueError: a file lacks a column (named with the file).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hymirec_udfs.core.uri import open_input

    lo, hi = rank_shard_range(rank, world_size)
    wanted = list(dict.fromkeys([user_col, *columns]))
    for path in files:
        handle = pq.ParquetFile(open_input(path))
        names = handle.schema_arrow.names
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"{path}: lacks column(s) {missing} (has {names})")
        has_shard = SHARD_COLUMN in names
        groups = list(range(handle.num_row_groups))
        if has_shard:
            index = names.index(SHARD_COLUMN)
            keep = []
            for g in groups:
                stats = handle.metadata.row_group(g).column(index).statistics
                if stats is None or not stats.has_min_max or (stats.max >= lo and stats.min < hi):
                    keep.append(g)
            groups = keep
        if not groups:
            continue
        extra = [c for c in (*filter_columns, *([SHARD_COLUMN] if has_shard else [])) if c in names]
        read = list(dict.fromkeys(wanted + extra))
        for batch in handle.iter_batches(batch_size=batch_rows, row_groups=groups, columns=read):
            table = pa.Table.from_batches([batch])
            if row_filter is not None:
                table = table.filter(row_filter(table, path))
            shard = (np.asarray(table.column(SHARD_COLUMN)) if has_shard
                     else user_shards(table.column(user_col)))
            mask = (shard >= lo) & (shard < hi)
            if mask.any():
                yield table.select(wanted).filter(pa.array(mask))


def read_rank_share(
    files: Sequence[str],
    columns: Sequence[str],
    *,
    rank: int,
    world_size: int,
    user_col: str,
    sort_by: Sequence[str],
    row_filter: Optional[Callable[[Any, str], Any]] = None,
    filter_columns: Sequence[str] = (),
) -> Any:
    """This rank's rows of a set of Parquet files (:func:`iter_rank_share`), in an order
    fixed by the data alone: sorted by ``sort_by``, so the result is the same whatever
    files Spark wrote and whatever order the rows came out in. Holds the whole share; the
    stage-2 loader streams instead (:class:`hymirec_udfs.recommender.data.SequenceDataset`).

    Returns:
        A ``pyarrow.Table`` with ``columns`` (empty when the rank has no rows).

    Raises:
        ValueError: no files, or a file lacks a column (named with the file).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hymirec_udfs.core.uri import open_input

    if not files:
        raise ValueError("no files to read: the table has no data files")
    wanted = list(dict.fromkeys([user_col, *columns, *sort_by]))
    parts = list(iter_rank_share(files, wanted, rank=rank, world_size=world_size, user_col=user_col,
                                 row_filter=row_filter, filter_columns=filter_columns))
    if not parts:
        schema = pq.ParquetFile(open_input(files[0])).schema_arrow
        return schema.empty_table().select(list(columns))
    table = pa.concat_tables(parts)
    return table.sort_by([(c, "ascending") for c in sort_by]).select(list(columns))
