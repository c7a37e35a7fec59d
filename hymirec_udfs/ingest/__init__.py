"""Stage ``ingest``: raw files (ml-100k, ml-1m, CSV/Parquet, synthetic) -> ``items``,
``interactions``, ``quarantine``.
"""
