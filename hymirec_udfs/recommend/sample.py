"""A readable sample of the serving tables: one user's recent titles and what each of
their interests retrieved (``make demo`` and the recommend notebook print it)."""

from __future__ import annotations

from typing import Any, Optional

from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import Config


def sample_text(spark: Any, cfg: Config, as_of: str, user: Optional[str] = None, *, recent: int = 5,
                per_interest: int = 5) -> str:
    """Text block for one user (the smallest user id with recommendations when not given).

    Reads only that user's rows (a filter on each table), whatever the table sizes.
    """
    from pyspark.sql import functions as F

    from hymirec_udfs.core.tables import get_table_store

    store = get_table_store(spark, cfg)
    recs = store.read(schemas.RECOMMENDATIONS).where(F.col(schemas.AS_OF_DATE) == F.lit(as_of).cast("date"))
    if user is None:
        first = recs.agg(F.min(schemas.USER_ID).alias("u")).first()
        if first is None or first["u"] is None:
            return f"no recommendations for {as_of}"
        user = first["u"]
    titles = store.read(schemas.ITEMS).select(schemas.ITEM_ID, F.coalesce("title", schemas.TEXT).alias("title"))
    history = store.read(schemas.SEQUENCES).where(F.col(schemas.USER_ID) == user).select(schemas.ITEM_IDS).first()
    lines = [f"user {user}, as of {as_of}"]
    if history is not None:
        last = list(history[schemas.ITEM_IDS])[-recent:][::-1]
        names = {r[schemas.ITEM_ID]: r["title"] for r in titles.where(F.col(schemas.ITEM_ID).isin(last)).collect()}
        lines.append("  most recent: " + " | ".join(names.get(i, i) for i in last))
    mine = recs.where(F.col(schemas.USER_ID) == user).join(titles, schemas.ITEM_ID, "left")
    rows = mine.orderBy("interest", "rank").collect()
    for interest in sorted({r["interest"] for r in rows}):
        top = [r for r in rows if r["interest"] == interest][:per_interest]
        lines.append(f"  interest {interest}: " + " | ".join(f"{r['title'] or r[schemas.ITEM_ID]} ({r['score']:.2f})"
                                                           for r in top))
    return "\n".join(lines)
