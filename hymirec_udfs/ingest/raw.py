"""Raw frames as read from a source, and ingestion errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame


ITEM_TEXT_FIELDS = ("title", "description", "tags")
ML_GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


class IngestError(ValueError):
    """Raw input cannot be ingested (missing file, too many bad rows, bad mapping)."""


@dataclass
class RawFrames:
    """Parsed-but-unvalidated raw rows, all ids and values still strings.

    ``items``: item_id, title, description, tags, raw_record.
    ``interactions``: user_id, item_id, timestamp (string), rating (string), raw_record.
    """

    items: "DataFrame"
    interactions: "DataFrame"
    source: str
